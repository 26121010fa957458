"""The initiator APIs (Reversal, Transaction Status): SecurityCredential, request bodies, the Result they post.

Both need an Initiator (a web operator of the shortcode) and a SecurityCredential: the initiator's password
encrypted with Safaricom's public certificate of the environment (RSA, PKCS#1 v1.5), base64.  Both answer at once
``{OriginatorConversationID, ConversationID, ResponseCode: "0", ResponseDescription}``, which means *accepted*,
not done; the Result comes later to ResultURL (or a timeout to QueueTimeOutURL) and ``parse_initiator_result``
reads it with the same hardening as ``parse_stk_callback``.

``cryptography`` (a dependency of Odoo 18 itself) does the RSA; only APIs of 3.4.8 and later are used.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from . import _inbound
from .codes import (  # Daraja's codes live in codes.py; re-exported here, where callers first found them.
    ALREADY_REVERSED_CODE,
    INITIATOR_INVALID_CODES,
    INITIATOR_RESULT_CODES,
    INITIATOR_TIMEOUT_MESSAGE,
    UNKNOWN_TRANSACTION_CODES,
    describe_initiator_result,
)
from .errors import CallbackParseError, DarajaValidationError, InvalidConfiguration
from .money import DARAJA_MAX_AMOUNT, check_amount
from .tokens import UTC
from .urls import check_daraja_url

__all__ = [
    "ALREADY_REVERSED_CODE",
    "IDENTIFIER_MSISDN",
    "IDENTIFIER_SHORTCODE",
    "IDENTIFIER_TILL",
    "INITIATOR_INVALID_CODES",
    "INITIATOR_RESULT_CODES",
    "RECEIVER_IDENTIFIER_SHORTCODE",
    "REVERSAL_COMMAND",
    "REVERSAL_PATH",
    "TRANSACTION_STATUS_COMMAND",
    "TRANSACTION_STATUS_PATH",
    "UNKNOWN_TRANSACTION_CODES",
    "CertificateSummary",
    "InitiatorAck",
    "InitiatorResult",
    "build_reversal_payload",
    "build_transaction_status_payload",
    "certificate_summary",
    "describe_initiator_result",
    "parse_initiator_result",
    "security_credential",
]

REVERSAL_PATH = "/mpesa/reversal/v1/request"
TRANSACTION_STATUS_PATH = "/mpesa/transactionstatus/v1/query"
REVERSAL_COMMAND = "TransactionReversal"
TRANSACTION_STATUS_COMMAND = "TransactionStatusQuery"
# Reversal: RecieverIdentifierType (Safaricom's spelling) "11" for the organisation's shortcode.
RECEIVER_IDENTIFIER_SHORTCODE = "11"
# Transaction Status: IdentifierType of PartyA.
IDENTIFIER_MSISDN = "1"
IDENTIFIER_TILL = "2"
IDENTIFIER_SHORTCODE = "4"

REMARKS_MIN, REMARKS_MAX, OCCASION_MAX = 2, 100, 100
_PARTY = re.compile(r"[0-9]{5,12}")
_TRANSACTION_ID = re.compile(r"[A-Za-z0-9]{4,32}")
_CONVERSATION_ID = re.compile(r"[A-Za-z0-9_.:-]{4,100}")  # a RequestRefID (UUID), an AG_... ConversationID
_MAX_PARAMETERS = 100
_WHAT = "initiator result"


# -- SecurityCredential ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CertificateSummary:
    """What an administrator checks of a certificate: whose it is, and until when."""

    subject: str
    not_after: datetime  # aware UTC


def _load_certificate(certificate: str | bytes) -> Any:
    """A PEM (or DER, as some .cer files are) X.509 certificate with an RSA key; InvalidConfiguration otherwise."""
    from cryptography import x509  # noqa: PLC0415 - only the initiator APIs need cryptography
    from cryptography.exceptions import UnsupportedAlgorithm  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: PLC0415

    data = certificate.encode("ascii", "replace") if isinstance(certificate, str) else bytes(certificate or b"")
    refused = InvalidConfiguration(
        "The M-Pesa certificate is not a PEM or DER X.509 certificate. Use the certificate Safaricom publishes "
        "for this environment (sandbox or production).",
        field="certificate",
    )
    if not data.strip():
        raise refused
    try:
        if b"-----BEGIN" in data:
            loaded = x509.load_pem_x509_certificate(data.strip())
        else:
            loaded = x509.load_der_x509_certificate(data)
        key = loaded.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm):  # the last: a key type this cryptography cannot load
        raise refused from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise InvalidConfiguration(
            "The M-Pesa certificate does not hold an RSA public key; Daraja's certificates do.", field="certificate"
        )
    return loaded


def certificate_summary(certificate_pem: str | bytes) -> CertificateSummary:
    """Subject and expiry of the certificate; InvalidConfiguration on a bad PEM or a non-RSA key."""
    loaded = _load_certificate(certificate_pem)
    # cryptography 42+ deprecates the naive property (a warning, an error under -W error); 3.4.8 has only it.
    aware = getattr(loaded, "not_valid_after_utc", None)
    not_after = aware if aware is not None else loaded.not_valid_after.replace(tzinfo=UTC)
    return CertificateSummary(subject=loaded.subject.rfc4514_string(), not_after=not_after.astimezone(UTC))


def security_credential(password: str, certificate_pem: str | bytes) -> str:
    """Daraja's SecurityCredential: base64 of the initiator password encrypted with the certificate (PKCS#1 v1.5).

    Each call gives a different text (the padding is random); all of them decrypt to the same password.
    """
    from cryptography.hazmat.primitives.asymmetric import padding  # noqa: PLC0415

    if not isinstance(password, str) or not password:
        raise InvalidConfiguration("The M-Pesa initiator password is missing.", field="initiator_password")
    key = _load_certificate(certificate_pem).public_key()
    try:
        encrypted = key.encrypt(password.encode("utf-8"), padding.PKCS1v15())
    except ValueError:  # longer than the key can carry (245 bytes for RSA 2048)
        raise InvalidConfiguration("The M-Pesa initiator password is too long.", field="initiator_password") from None
    return base64.b64encode(encrypted).decode("ascii")


# -- request bodies ---------------------------------------------------------------------------------------------
def _required(value: object, field_name: str, label: str, limit: int = 100) -> str:
    text = value.strip() if isinstance(value, str) else ""
    if not text or len(text) > limit or not text.isprintable():
        raise DarajaValidationError(f"The M-Pesa {label} is missing or not usable.", field=field_name)
    return text


def _party(value: object, field_name: str, label: str) -> str:
    text = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    if not _PARTY.fullmatch(text):
        raise InvalidConfiguration(f"The M-Pesa {label} must be 5 to 12 digits.", field=field_name)
    return text


def _transaction_id(value: object) -> str:
    text = value.strip() if isinstance(value, str) else ""
    if not _TRANSACTION_ID.fullmatch(text):
        raise DarajaValidationError(
            "The M-Pesa transaction ID must be a receipt such as NLJ7RT61SV.", field="transaction_id"
        )
    return text


def _remarks(remarks: object, occasion: object) -> tuple[str, str]:
    text = " ".join(remarks.split()) if isinstance(remarks, str) else ""
    if len(text) < REMARKS_MIN:
        raise DarajaValidationError(
            f"The M-Pesa remarks need at least {REMARKS_MIN} characters.", field="remarks"
        )
    other = " ".join(occasion.split()) if isinstance(occasion, str) else ""
    # Daraja refuses over-long values; cut them rather than fail a refund over a comment.
    return text[:REMARKS_MAX], other[:OCCASION_MAX]


def _common(
    initiator: str, credential: str, result_url: str, timeout_url: str, remarks: str, occasion: str
) -> dict[str, Any]:
    text, other = _remarks(remarks, occasion)
    return {
        "Initiator": _required(initiator, "initiator", "initiator name"),
        "SecurityCredential": _required(credential, "security_credential", "security credential", 4096),
        "ResultURL": check_daraja_url(result_url, "result_url"),
        "QueueTimeOutURL": check_daraja_url(timeout_url, "timeout_url"),
        "Remarks": text,
        "Occasion": other,
    }


def build_reversal_payload(
    *,
    initiator: str,
    security_credential: str,
    transaction_id: str,
    amount: Decimal | int | str,
    receiver_party: str,
    result_url: str,
    timeout_url: str,
    remarks: str,
    occasion: str = "",
) -> dict[str, Any]:
    """Daraja's exact Reversal body (the whole transaction: Amount is the original amount, whole shillings)."""
    common = _common(initiator, security_credential, result_url, timeout_url, remarks, occasion)
    return {
        "Initiator": common["Initiator"],
        "SecurityCredential": common["SecurityCredential"],
        "CommandID": REVERSAL_COMMAND,
        "TransactionID": _transaction_id(transaction_id),
        "Amount": check_amount(amount, DARAJA_MAX_AMOUNT),
        "ReceiverParty": _party(receiver_party, "receiver_party", "shortcode receiving the reversal"),
        "RecieverIdentifierType": RECEIVER_IDENTIFIER_SHORTCODE,
        "ResultURL": common["ResultURL"],
        "QueueTimeOutURL": common["QueueTimeOutURL"],
        "Remarks": common["Remarks"],
        "Occasion": common["Occasion"],
    }


def _original_conversation_id(value: object) -> str:
    text = value.strip() if isinstance(value, str) else ""
    if not _CONVERSATION_ID.fullmatch(text):
        raise DarajaValidationError(
            "The original conversation ID must be the identifier of the request (such as its RequestRefID).",
            field="original_conversation_id",
        )
    return text


def build_transaction_status_payload(
    *,
    initiator: str,
    security_credential: str,
    transaction_id: str = "",
    party_a: str,
    identifier_type: str,
    result_url: str,
    timeout_url: str,
    remarks: str,
    occasion: str = "",
    original_conversation_id: str = "",
) -> dict[str, Any]:
    """Daraja's exact Transaction Status body; ``identifier_type`` "4" shortcode, "2" till, "1" MSISDN.

    A payment is named by its receipt (``transaction_id``) or, when the receipt never came (a lost result), by
    the identifier of the request that made it (``original_conversation_id``, Daraja's OriginalConversationID:
    for a B2B Express Checkout its RequestRefID).
    """
    kind = str(identifier_type).strip()
    if kind not in (IDENTIFIER_SHORTCODE, IDENTIFIER_TILL, IDENTIFIER_MSISDN):
        raise InvalidConfiguration(
            "The M-Pesa identifier type must be 4 (shortcode), 2 (till) or 1 (MSISDN).", field="identifier_type"
        )
    named: dict[str, str] = {}
    if transaction_id or not original_conversation_id:
        named["TransactionID"] = _transaction_id(transaction_id)
    if original_conversation_id:
        named["OriginalConversationID"] = _original_conversation_id(original_conversation_id)
    common = _common(initiator, security_credential, result_url, timeout_url, remarks, occasion)
    return {
        "Initiator": common["Initiator"],
        "SecurityCredential": common["SecurityCredential"],
        "CommandID": TRANSACTION_STATUS_COMMAND,
        **named,
        "PartyA": _party(party_a, "party_a", "party of the transaction"),
        "IdentifierType": kind,
        "ResultURL": common["ResultURL"],
        "QueueTimeOutURL": common["QueueTimeOutURL"],
        "Remarks": common["Remarks"],
        "Occasion": common["Occasion"],
    }


# -- answers ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InitiatorAck:
    """Daraja accepted the request.  Accepted is not done: the Result (or a timeout) comes later."""

    originator_conversation_id: str
    conversation_id: str
    response_code: str
    description: str
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class InitiatorResult:
    """One Result posted to ResultURL (or QueueTimeOutURL: ``is_timeout``).

    ``parameters`` is ResultParameters as {Key: Value} (values as text, '' when Daraja sent no Value; the first
    of a repeated key wins), ``reference`` the same of ReferenceData.
    """

    result_type: str
    result_code: str
    result_desc: str
    originator_conversation_id: str
    conversation_id: str
    transaction_id: str
    parameters: dict[str, str]
    reference: dict[str, str]
    is_timeout: bool
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_success(self) -> bool:
        return not self.is_timeout and self.result_code == "0"

    @property
    def description(self) -> str:
        """What the code means, for people (see describe_initiator_result)."""
        if self.is_timeout:
            return INITIATOR_TIMEOUT_MESSAGE
        return describe_initiator_result(self.result_code)

    # The parameters a caller checks (Transaction Status: receipt, amount, status, shortcode).
    @property
    def receipt_no(self) -> str | None:
        return self.parameters.get("ReceiptNo") or None

    @property
    def amount(self) -> Decimal | None:
        value = self.parameters.get("Amount") or self.parameters.get("TransactionAmount")
        if not value:
            return None
        try:
            return _inbound.amount(value, _WHAT)
        except CallbackParseError:
            return None

    @property
    def transaction_status(self) -> str | None:
        """Transaction Status: "Completed", or "Reversed" once a reversal went through."""
        return self.parameters.get("TransactionStatus") or None

    @property
    def original_transaction_id(self) -> str | None:
        """Reversal: the receipt that was reversed."""
        return self.parameters.get("OriginalTransactionID") or None

    @property
    def credit_party_shortcode(self) -> str | None:
        """The shortcode of "174379 - Business Name" (CreditPartyName; a reversal's DebitPartyPublicName)."""
        for key in ("CreditPartyName", "DebitPartyPublicName"):
            head = self.parameters.get(key, "").split(" - ", 1)[0].strip()
            if _PARTY.fullmatch(head):
                return head
        return None

    @property
    def finalised_at(self) -> datetime | None:
        return _inbound.kenya_time(self.parameters.get("FinalisedTime") or self.parameters.get("TransCompletedTime"))


def _pairs(container: Any, list_key: str, name: str) -> dict[str, str]:
    """ResultParameters.ResultParameter / ReferenceData.ReferenceItem (a list, or one object) as {Key: Value}."""
    if container is None or container == "":
        return {}
    if not isinstance(container, dict):
        raise CallbackParseError(f"The initiator result {name} is not an object.")
    items = container.get(list_key, [])
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list) or len(items) > _MAX_PARAMETERS:
        raise CallbackParseError(f"The initiator result {name}.{list_key} is not a list of Key/Value items.")
    pairs: dict[str, str] = {}
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("Key"), str):
            raise CallbackParseError(f"An item of the initiator result {name} has no Key.")
        key = _inbound.clean(item["Key"].strip(), _WHAT, f"{name} Key", _inbound.MAX_ID_LENGTH)
        value = item.get("Value")
        if isinstance(value, (dict, list)):  # e.g. a balance structure: kept as compact JSON text
            try:
                value = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
            except (TypeError, ValueError, RecursionError):  # a decoded dict may hold anything, at any depth
                raise CallbackParseError(f"The initiator result {name} {key} is not a Daraja value.") from None
        pairs.setdefault(key, _inbound.scalar_text(value, _WHAT, f"{name} {key}"))
    return pairs


def _id(result: dict[str, Any], name: str, *, required: bool) -> str:
    value = result.get(name)
    text = _inbound.scalar_text(value, _WHAT, name, _inbound.MAX_ID_LENGTH, ascii_only=True)
    if required and not text:
        raise CallbackParseError(f"The initiator result has no {name}.")
    return text


def parse_initiator_result(body: bytes | str | dict[str, Any], *, timeout: bool = False) -> InitiatorResult:
    """Read a Result posted to ResultURL, or (``timeout=True``) the body posted to QueueTimeOutURL.

    Raises CallbackParseError on anything that is not such a body.  A timeout body is read leniently (Daraja
    documents little of it): only the envelope must be there; every missing field is ''.
    """
    data = _inbound.load_object(body, "The initiator result body")
    result = data.get("Result")
    if not isinstance(result, dict):
        raise CallbackParseError("The initiator result body has no Result object.")
    if "ResultCode" in result:
        code = _inbound.result_code(result["ResultCode"], _WHAT)
    elif timeout:
        code = ""
    else:
        raise CallbackParseError("The initiator result has no ResultCode.")
    desc = result.get("ResultDesc", "")
    if not isinstance(desc, str) and not timeout:
        raise CallbackParseError("The initiator result has no ResultDesc.")
    return InitiatorResult(
        result_type=_inbound.scalar_text(result.get("ResultType", ""), _WHAT, "ResultType", 20, ascii_only=True),
        result_code=code,
        result_desc=_inbound.scalar_text(desc, _WHAT, "ResultDesc") if isinstance(desc, str) else "",
        originator_conversation_id=_id(result, "OriginatorConversationID", required=not timeout),
        conversation_id=_id(result, "ConversationID", required=False),
        transaction_id=_id(result, "TransactionID", required=False),
        parameters=_pairs(result.get("ResultParameters"), "ResultParameter", "ResultParameters"),
        reference=_pairs(result.get("ReferenceData"), "ReferenceItem", "ReferenceData"),
        is_timeout=timeout,
        raw=data,
    )

