"""C2B (customers paying the paybill or till from their phone): URL registration, validation, confirmation.

Daraja posts the same body to the ValidationURL (only when Safaricom switched External Validation on for the
shortcode) and to the ConfirmationURL: ``parse_c2b_payment`` reads both with the hardening of
``parse_stk_callback``.  The payer's number comes as Daraja chooses to send it: in full, masked, or (C2B v2,
the current default) as the SHA-256 hex of the MSISDN, which ``hash_msisdn`` reproduces so that partners'
numbers can be matched.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from . import _inbound
from .codes import (  # Daraja's codes live in codes.py; re-exported here, where callers first found them.
    C2B_INVALID_ACCOUNT,
    C2B_INVALID_AMOUNT,
    C2B_INVALID_KYC,
    C2B_INVALID_MSISDN,
    C2B_INVALID_SHORTCODE,
    C2B_OTHER_ERROR,
    C2B_REJECTION_CODES,
    PRODUCT_MISMATCH_CODE,
    REQUEST_ACCEPTED,
    URLS_ALREADY_REGISTERED_CODE,
)
from .errors import CallbackParseError, DarajaValidationError, InvalidConfiguration, InvalidPhoneNumber
from .money import DARAJA_MAX_AMOUNT, check_amount
from .phone import normalize_msisdn
from .stk import PAYBILL, TILL
from .urls import check_daraja_url

__all__ = [
    "C2B_CONFIRMATION_ACK",
    "C2B_INVALID_ACCOUNT",
    "C2B_INVALID_AMOUNT",
    "C2B_INVALID_KYC",
    "C2B_INVALID_MSISDN",
    "C2B_INVALID_SHORTCODE",
    "C2B_OTHER_ERROR",
    "C2B_REGISTER_PATHS",
    "C2B_REJECTION_CODES",
    "C2B_SIMULATE_PATH",
    "PRODUCT_MISMATCH_CODE",
    "RESPONSE_CANCELLED",
    "RESPONSE_COMPLETED",
    "C2BPayment",
    "C2BRegistration",
    "build_c2b_register_payload",
    "build_c2b_simulate_payload",
    "c2b_validation_accept",
    "c2b_validation_reject",
    "check_daraja_url",
    "hash_msisdn",
    "is_already_registered",
    "parse_c2b_payment",
]

C2B_REGISTER_PATHS = {"v2": "/mpesa/c2b/v2/registerurl", "v1": "/mpesa/c2b/v1/registerurl"}
C2B_SIMULATE_PATH = "/mpesa/c2b/v1/simulate"
# What Daraja does when the ValidationURL does not answer in time (about 8 s).
RESPONSE_COMPLETED = "Completed"
RESPONSE_CANCELLED = "Cancelled"

# The answer to a confirmation (copy before changing).
C2B_CONFIRMATION_ACK: dict[str, Any] = {"ResultCode": 0, "ResultDesc": "Accepted"}

_WHAT = "C2B"
_RECEIPT = re.compile(r"[A-Za-z0-9]{4,32}")
_SHORTCODE = re.compile(r"[0-9]{5,12}")
_HASH = re.compile(r"[0-9a-fA-F]{64}")
_NAME_LIMIT = 100
_REFERENCE_LIMIT = 100  # Daraja allows 20 in BillRefNumber; a longer one is still a payment, not an attack.


def c2b_validation_accept() -> dict[str, Any]:
    """The ValidationURL's answer that lets the payment go through."""
    return {"ResultCode": "0", "ResultDesc": "Accepted"}


def c2b_validation_reject(code: str = C2B_OTHER_ERROR) -> dict[str, Any]:
    """The ValidationURL's answer that refuses the payment (the customer's money does not move)."""
    if code not in C2B_REJECTION_CODES:
        raise ValueError(f"{code!r} is not a C2B rejection code ({', '.join(C2B_REJECTION_CODES)})")
    return {"ResultCode": code, "ResultDesc": "Rejected"}


def hash_msisdn(phone: str | int) -> str:
    """The SHA-256 hex (lowercase) of the normalised MSISDN "2547XXXXXXXX" / "2541XXXXXXXX", as C2B
    confirmations carry it (sha256("254712345678") = "7132104d...").

    Raises InvalidPhoneNumber for what is not a Kenyan mobile number.  Any 2547/2541 number is hashed, not only
    Safaricom's ranges: a number ported to Safaricom pays with M-Pesa too, and must still match its partner.
    """
    return hashlib.sha256(normalize_msisdn(phone, safaricom_only=False).encode("ascii")).hexdigest()


@dataclass(frozen=True)
class C2BPayment:
    """One validation or confirmation body; ``trans_time`` is aware UTC (Daraja sends Kenya time)."""

    trans_id: str
    transaction_type: str
    trans_time: datetime
    amount: Decimal
    shortcode: str
    bill_ref: str
    invoice_number: str
    third_party_id: str
    org_balance: str | None
    msisdn: str  # as sent: full, masked or hashed ('' when absent)
    msisdn_hash: str | None  # lowercase 64-hex when Daraja sent a hash
    phone: str | None  # 2547XXXXXXXX when Daraja sent the number in full
    first_name: str
    middle_name: str
    last_name: str
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def payer_name(self) -> str:
        return " ".join(part for part in (self.first_name, self.middle_name, self.last_name) if part)

    def matches_phone(self, phone: str | int) -> bool:
        """Whether the payer is ``phone``: by hash when Daraja hashed, by number when it sent one."""
        try:
            wanted = normalize_msisdn(phone, safaricom_only=False)
        except InvalidPhoneNumber:
            return False
        if self.msisdn_hash is not None:
            return hash_msisdn(wanted) == self.msisdn_hash
        return self.phone == wanted


def _text(data: dict[str, Any], name: str, limit: int, *, ascii_only: bool = False) -> str:
    return _inbound.scalar_text(data.get(name), _WHAT, name, limit, ascii_only=ascii_only)


def _payer(value: Any) -> tuple[str, str | None, str | None]:
    msisdn = _inbound.scalar_text(value, _WHAT, "MSISDN", 64, ascii_only=True)
    if _HASH.fullmatch(msisdn):
        return msisdn, msisdn.lower(), None
    phone = None
    if msisdn.isdigit():
        try:
            phone = normalize_msisdn(msisdn, safaricom_only=False)  # a ported number is a payer too
        except InvalidPhoneNumber:
            phone = None
    return msisdn, None, phone


def parse_c2b_payment(body: bytes | str | dict[str, Any]) -> C2BPayment:
    """Parse a C2B validation or confirmation body (JSON text, bytes or a decoded dict).

    Raises CallbackParseError on anything that is not one: no TransID (receipt-shaped), no Kenya TransTime, no
    positive TransAmount, no BusinessShortCode, or any hostile value (NUL, surrogates, absurd lengths).
    """
    data = _inbound.load_object(body, "The C2B body")
    trans_id = _text(data, "TransID", _inbound.MAX_ID_LENGTH, ascii_only=True)
    if not _RECEIPT.fullmatch(trans_id):
        raise CallbackParseError("The C2B body has no TransID (an M-Pesa receipt is required).")
    trans_time = _inbound.kenya_time(data.get("TransTime"))
    if trans_time is None:
        raise CallbackParseError("The C2B TransTime is not a YYYYMMDDHHmmss date.")
    if "TransAmount" not in data:
        raise CallbackParseError("The C2B body has no TransAmount.")
    amount = _inbound.amount(data.get("TransAmount"), _WHAT, "TransAmount")
    if amount <= 0:
        raise CallbackParseError("The C2B TransAmount is not an amount of money.")
    shortcode = _text(data, "BusinessShortCode", _inbound.MAX_ID_LENGTH, ascii_only=True)
    if not _SHORTCODE.fullmatch(shortcode):
        raise CallbackParseError("The C2B body has no BusinessShortCode.")
    balance = _text(data, "OrgAccountBalance", 40, ascii_only=True)
    msisdn, msisdn_hash, phone = _payer(data.get("MSISDN"))
    return C2BPayment(
        trans_id=trans_id,
        transaction_type=_text(data, "TransactionType", 50),
        trans_time=trans_time,
        amount=amount,
        shortcode=shortcode,
        bill_ref=_text(data, "BillRefNumber", _REFERENCE_LIMIT),
        invoice_number=_text(data, "InvoiceNumber", _REFERENCE_LIMIT),
        third_party_id=_text(data, "ThirdPartyTransID", _REFERENCE_LIMIT),
        org_balance=balance or None,
        msisdn=msisdn,
        msisdn_hash=msisdn_hash,
        phone=phone,
        first_name=_text(data, "FirstName", _NAME_LIMIT),
        middle_name=_text(data, "MiddleName", _NAME_LIMIT),
        last_name=_text(data, "LastName", _NAME_LIMIT),
        raw=data,
    )


# -- registration and simulation --------------------------------------------------------------------------------
@dataclass(frozen=True)
class C2BRegistration:
    """What Daraja said to a URL registration; "already registered" is a result, not an error."""

    version: str  # "v1" | "v2": the one Daraja accepted (or refused with "already registered")
    already_registered: bool
    response_code: str
    description: str


def is_already_registered(error_code: str | None, message: str | None) -> bool:
    """Daraja's one-time production registration: "500.003.1001 Urls are already registered"."""
    return "already registered" in (message or "").casefold() and (error_code or "").strip() in (
        URLS_ALREADY_REGISTERED_CODE,
        "",
        REQUEST_ACCEPTED,
    )


def _shortcode(value: object) -> str:
    text = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    if not _SHORTCODE.fullmatch(text):
        raise InvalidConfiguration("The M-Pesa shortcode must be 5 to 12 digits.", field="shortcode")
    return text


def build_c2b_register_payload(
    shortcode: str, response_type: str, confirmation_url: str, validation_url: str
) -> dict[str, Any]:
    """Daraja's exact registerurl body; both URLs pass check_daraja_url."""
    if response_type not in (RESPONSE_COMPLETED, RESPONSE_CANCELLED):
        raise InvalidConfiguration(
            f"The C2B response type must be {RESPONSE_COMPLETED} or {RESPONSE_CANCELLED}.", field="response_type"
        )
    return {
        "ShortCode": _shortcode(shortcode),
        "ResponseType": response_type,
        "ConfirmationURL": check_daraja_url(confirmation_url, "confirmation_url"),
        "ValidationURL": check_daraja_url(validation_url, "validation_url"),
    }


def build_c2b_simulate_payload(
    shortcode: str, amount: Decimal | int | str, msisdn: str | int, bill_ref: str, command_id: str = PAYBILL
) -> dict[str, Any]:
    """Daraja's sandbox simulate body (a customer paying from the phone's menu)."""
    if command_id not in (PAYBILL, TILL):
        raise InvalidConfiguration(f"The C2B command must be {PAYBILL} or {TILL}.", field="command_id")
    reference = bill_ref.strip() if isinstance(bill_ref, str) else ""
    if command_id == PAYBILL and not reference:
        raise DarajaValidationError("A paybill payment needs an account number (BillRefNumber).", field="bill_ref")
    return {
        "ShortCode": _shortcode(shortcode),
        "CommandID": command_id,
        "Amount": check_amount(amount, DARAJA_MAX_AMOUNT),
        "Msisdn": normalize_msisdn(msisdn),
        "BillRefNumber": reference[:20],
    }
