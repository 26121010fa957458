"""B2B Express Checkout: a USSD prompt asks a distributor's till to pay our paybill.

``POST /v1/ussdpush/get-msisdn`` (OAuth only: no passkey, no initiator) with the camelCase body
``{primaryShortCode, receiverShortCode, amount, paymentRef, callbackUrl, partnerName, RequestRefID}``.  Daraja
acknowledges ``{"code": "0", "status": "USSD Initiated Successfully"}``: the prompt is on its way, nothing is paid.
The till's operator enters the operator ID and PIN (or cancels), and Daraja posts a flat JSON result to
callbackUrl: ``resultCode`` "0" with the receipt in ``transactionId``, or a failure such as "4001" (cancelled).
``parse_b2b_checkout_result`` reads it with the hardening of ``parse_stk_callback`` (``_inbound``).

The result's ``requestId`` is the RequestRefID we sent (a UUID): it ties the result to its request.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

from . import _inbound
from .codes import REQUEST_ACCEPTED, Outcome, ResultCode, classify_b2b_result
from .errors import CallbackParseError, DarajaValidationError, InvalidAmount, InvalidConfiguration
from .money import DEFAULT_MAX_AMOUNT, check_amount
from .urls import check_daraja_url

__all__ = [
    "B2B_CHECKOUT_PATH",
    "B2B_SUCCESS_STATUS",
    "PARTNER_NAME_MAX",
    "PAYMENT_REF_MAX",
    "B2BCheckoutAck",
    "B2BCheckoutRequest",
    "B2BCheckoutResult",
    "parse_b2b_checkout_result",
]

B2B_CHECKOUT_PATH = "/v1/ussdpush/get-msisdn"
# The "status" of a successful result (it complements resultCode "0").
B2B_SUCCESS_STATUS = "SUCCESS"
# paymentRef is shown in the prompt and becomes the account of the payment into the paybill: the STK
# AccountReference rule (12 of [A-Za-z0-9-], see stk.account_reference), which Daraja takes for a paybill account.
PAYMENT_REF_MAX = 12
# partnerName is shown in the prompt, which fits one USSD page (182 characters) with the amount and reference.
PARTNER_NAME_MAX = 100

_SHORTCODE = re.compile(r"[0-9]{5,7}")  # a till or paybill number, as ShortcodeConfig takes it
_PAYMENT_REF = re.compile(rf"[A-Za-z0-9-]{{1,{PAYMENT_REF_MAX}}}")
_RECEIPT = re.compile(r"[A-Za-z0-9]{4,32}")
_REQUEST_ID = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
_WHAT = "B2B checkout result"


# -- the request ------------------------------------------------------------------------------------------------
def _shortcode(value: object, field_name: str, label: str) -> str:
    text = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    if not _SHORTCODE.fullmatch(text):
        raise InvalidConfiguration(f"The {label} must be 5 to 7 digits (got {str(value)[:20]!r}).", field=field_name)
    return text


def _whole_shillings(amount: object, maximum: int) -> int:
    """Whole shillings within the limits; a fraction is refused, not rounded (the till pays what it is shown)."""
    if isinstance(amount, float) and amount.is_integer():
        amount = int(amount)
    shillings = check_amount(amount, maximum)  # type: ignore[arg-type]  # it refuses what is no number
    if Decimal(str(amount).strip()) != shillings:
        raise InvalidAmount(f"A B2B checkout is for whole shillings (got {str(amount)[:30]}).")
    return shillings


def _callback_url(url: object, allow_http: bool) -> str:
    text = check_daraja_url(url, "callback_url")
    if urlsplit(text).scheme != "https" and not allow_http:
        raise InvalidConfiguration(
            "The B2B checkout callback URL must be an https:// address.", field="callback_url"
        )
    return text


def _request_id(value: object) -> str:
    try:
        return str(uuid.UUID(value.strip())) if isinstance(value, str) else ""
    except ValueError:
        return ""


@dataclass(frozen=True)
class B2BCheckoutRequest:
    """One B2B Express Checkout request, validated when made (DarajaValidationError: nothing is sent).

    ``primary_shortcode`` is the distributor's till (the payer), ``receiver_shortcode`` our paybill; ``amount``
    whole shillings from MIN_AMOUNT to ``max_amount`` (a fraction is refused); ``payment_ref`` 1 to 12 of
    [A-Za-z0-9-] (make it with ``account_reference``); ``callback_url`` https:// and free of the words Daraja
    refuses (``allow_http`` lets a local simulator's http:// address through); ``partner_name`` our name as the
    payer knows it; ``request_id`` a UUID, new for each request (the result's ``requestId``).
    """

    primary_shortcode: str
    receiver_shortcode: str
    amount: int
    payment_ref: str
    callback_url: str = field(repr=False)  # it holds the provider's secret path
    partner_name: str
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    max_amount: int = field(default=DEFAULT_MAX_AMOUNT, repr=False, compare=False)
    allow_http: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "primary_shortcode", _shortcode(self.primary_shortcode, "primary_shortcode", "paying till"))
        set_(self, "receiver_shortcode", _shortcode(self.receiver_shortcode, "receiver_shortcode", "paybill"))
        if self.primary_shortcode == self.receiver_shortcode:
            raise InvalidConfiguration("A till cannot pay its own shortcode.", field="primary_shortcode")
        set_(self, "amount", _whole_shillings(self.amount, self.max_amount))
        reference = self.payment_ref.strip() if isinstance(self.payment_ref, str) else ""
        if not _PAYMENT_REF.fullmatch(reference):
            raise DarajaValidationError(
                f"The payment reference must be 1 to {PAYMENT_REF_MAX} letters, digits or dashes.", field="payment_ref"
            )
        set_(self, "payment_ref", reference)
        set_(self, "callback_url", _callback_url(self.callback_url, self.allow_http))
        name = " ".join(self.partner_name.split()) if isinstance(self.partner_name, str) else ""
        if not name or len(name) > PARTNER_NAME_MAX or not name.isprintable():
            raise DarajaValidationError(
                f"The partner name shown to the payer must be 1 to {PARTNER_NAME_MAX} printable characters.",
                field="partner_name",
            )
        set_(self, "partner_name", name)
        request_id = _request_id(self.request_id)
        if not request_id:
            raise DarajaValidationError("The RequestRefID must be a UUID.", field="request_id")
        set_(self, "request_id", request_id)

    def payload(self) -> dict[str, Any]:
        """Daraja's exact body: every value a string, the amount too ("100")."""
        return {
            "primaryShortCode": self.primary_shortcode,
            "receiverShortCode": self.receiver_shortcode,
            "amount": str(self.amount),
            "paymentRef": self.payment_ref,
            "callbackUrl": self.callback_url,
            "partnerName": self.partner_name,
            "RequestRefID": self.request_id,
        }


@dataclass(frozen=True)
class B2BCheckoutAck:
    """Daraja started the USSD prompt.  Started is not paid: the result to callbackUrl says what happened."""

    request_id: str  # the RequestRefID sent: the result's requestId
    code: str
    status: str
    request: B2BCheckoutRequest = field(compare=False)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


# -- the result -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class B2BCheckoutResult:
    """The result Daraja posts to callbackUrl.

    ``transaction_id`` (the M-Pesa receipt) is set whenever ``is_success``; ``amount`` is whole shillings above
    zero.  ``payment_reference`` comes with failures, ``conversation_id`` and ``status`` with a success.
    """

    result_code: str
    result_desc: str
    request_id: str
    amount: Decimal
    transaction_id: str | None
    conversation_id: str | None
    payment_reference: str | None
    status: str | None
    result_type: str | None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def result(self) -> ResultCode:
        return classify_b2b_result(self.result_code)

    @property
    def outcome(self) -> Outcome:
        """SUCCESS, CANCELED, FAILED, or PENDING for a code nobody documented (never read as a failure)."""
        return self.result.outcome

    @property
    def is_success(self) -> bool:
        return self.result_code == REQUEST_ACCEPTED

    @property
    def description(self) -> str:
        """What the code means, for people."""
        return self.result.message


def _optional_id(data: dict[str, Any], name: str, pattern: re.Pattern[str] | None = None) -> str | None:
    text = _inbound.scalar_text(data.get(name), _WHAT, name, _inbound.MAX_ID_LENGTH, ascii_only=True)
    if text and pattern is not None and not pattern.fullmatch(text):
        raise CallbackParseError(f"The {_WHAT} {name} is not a Daraja value.")
    return text or None


def parse_b2b_checkout_result(body: bytes | str | dict[str, Any]) -> B2BCheckoutResult:
    """Parse the result posted to callbackUrl (JSON text, bytes or a decoded dict).

    Raises CallbackParseError on anything that is not one: a key repeated, no resultCode, no resultDesc, no
    requestId, an amount that is absent, not a number, not whole or not above zero, a success without its
    receipt (transactionId) or whose status says otherwise, a failure that claims SUCCESS, and any hostile value
    (NUL, surrogates, absurd lengths, objects where text belongs).  Unknown keys are kept in ``raw`` only.
    """
    data = _inbound.load_object(body, "The B2B checkout result body")
    if "resultCode" not in data:
        raise CallbackParseError("The B2B checkout result has no resultCode.")
    code = _inbound.result_code(data["resultCode"], _WHAT)
    desc = data.get("resultDesc")
    if not isinstance(desc, str):
        raise CallbackParseError("The B2B checkout result has no resultDesc.")
    request_id = _optional_id(data, "requestId", _REQUEST_ID)
    if request_id is None:
        raise CallbackParseError("The B2B checkout result has no requestId.")
    if "amount" not in data:
        raise CallbackParseError("The B2B checkout result has no amount.")
    amount = _inbound.amount(data["amount"], _WHAT, "amount")
    if amount <= 0 or amount != amount.to_integral_value():
        raise CallbackParseError("The B2B checkout result amount is not whole shillings above zero.")
    receipt = _optional_id(data, "transactionId", _RECEIPT)
    status = _inbound.scalar_text(data.get("status"), _WHAT, "status", 40, ascii_only=True) or None
    said_success = status is not None and status.upper() == B2B_SUCCESS_STATUS
    if code == REQUEST_ACCEPTED:
        if receipt is None:
            raise CallbackParseError("The B2B checkout result says paid but has no transactionId (receipt).")
        if status is not None and not said_success:
            raise CallbackParseError("The B2B checkout result says paid with resultCode 0 but not with its status.")
    elif said_success:
        raise CallbackParseError("The B2B checkout result says SUCCESS with a failure resultCode.")
    return B2BCheckoutResult(
        result_code=code,
        result_desc=_inbound.clean(desc.strip(), _WHAT, "resultDesc"),
        request_id=request_id,
        amount=amount,
        transaction_id=receipt,
        conversation_id=_optional_id(data, "conversationID"),
        payment_reference=_inbound.scalar_text(data.get("paymentReference"), _WHAT, "paymentReference", 100) or None,
        status=status,
        result_type=_inbound.scalar_text(data.get("resultType"), _WHAT, "resultType", 20, ascii_only=True) or None,
        raw=data,
    )
