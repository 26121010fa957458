"""Daraja's code catalogue: what each code means, final or pending, retry or not, what to tell people.

Every code Daraja answers with lives here, and only here:

- the ``ResultCode`` of an STK transaction (callback and query);
- the ``errorCode`` of a refused API call;
- the ``ResponseCode`` of an accepted request;
- the ``ResultCode`` of an initiator Result (Reversal, Transaction Status);
- the ``ResultCode`` a C2B ValidationURL answers to refuse a payment;
- the ``ResponseCode`` of a Pull Transactions query;
- the ``code`` of a B2B Express Checkout acknowledgement and the ``resultCode`` of its result.

Codes are compared as text because Daraja sends them as numbers in callbacks, as strings in
queries, and sometimes as words (``SFC_IC0003``, ``R000001``).  An unknown STK result code is
never read as a failure: the payment stays pending until a known answer arrives
(docs/design.md, 12. Failure modes: pending read as failure).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "ALREADY_REVERSED_CODE",
    "B2B_CANCELLED_CODE",
    "B2B_KYC_FAILED_CODE",
    "B2B_NO_NOMINATED_NUMBER_CODE",
    "B2B_RESULT_CODES",
    "B2B_RETRYABLE_CODES",
    "B2B_USSD_ERROR_CODE",
    "B2B_USSD_NETWORK_ERROR_CODE",
    "C2B_INVALID_ACCOUNT",
    "C2B_INVALID_AMOUNT",
    "C2B_INVALID_KYC",
    "C2B_INVALID_MSISDN",
    "C2B_INVALID_SHORTCODE",
    "C2B_OTHER_ERROR",
    "C2B_REJECTION_CODES",
    "ERROR_CODES",
    "INITIATOR_INVALID_CODES",
    "INITIATOR_RESULT_CODES",
    "INITIATOR_TIMEOUT_MESSAGE",
    "INVALID_TOKEN_CODES",
    "PRODUCT_MISMATCH_CODE",
    "PULL_NONE_FOUND",
    "PULL_SUCCESS",
    "REQUEST_ACCEPTED",
    "RESULT_CODES",
    "UNKNOWN_TRANSACTION_CODE",
    "UNKNOWN_TRANSACTION_CODES",
    "URLS_ALREADY_REGISTERED_CODE",
    "ApiErrorCode",
    "Outcome",
    "ResultCode",
    "classify_b2b_result",
    "classify_result",
    "describe_api_error",
    "describe_initiator_result",
    "is_being_processed",
]


class Outcome(str, enum.Enum):
    """Where a payment stands once a result code is known."""

    SUCCESS = "success"
    CANCELED = "canceled"
    FAILED = "failed"
    PENDING = "pending"


@dataclass(frozen=True)
class ResultCode:
    """One STK result code with its outcome and a sentence a distributor understands."""

    code: str
    outcome: Outcome
    message: str


def _lt(text: str) -> str:
    """Mark a sentence distributors read.  The Odoo addon's translation catalogue extracts it (Odoo reads the
    ``_lt("...")`` calls of every Python file of the addon) and shows it in the reader's language; this layer
    stays English and free of Odoo.  A literal only: a text built from variables would be extracted wrong."""
    return text


PENDING_MESSAGE = _lt("M-Pesa has not confirmed this payment yet.")

_MISCONFIGURED = _lt(
    "The seller's M-Pesa paybill or till is not set up for this payment. No money was taken; "
    "please contact the seller."
)
_PUSH_ERROR = _lt("M-Pesa could not send the prompt to the phone. No money was taken; try again.")


def _failed(code: str, message: str) -> ResultCode:
    return ResultCode(code, Outcome.FAILED, message)


RESULT_CODES: dict[str, ResultCode] = {
    entry.code: entry
    for entry in (
        ResultCode("0", Outcome.SUCCESS, _lt("The M-Pesa payment was received.")),
        _failed("1", _lt("The M-Pesa balance is too low for this payment.")),
        _failed("2", _lt("The amount is below the M-Pesa minimum.")),
        _failed("3", _lt("The amount is above the M-Pesa maximum for one payment.")),
        _failed(
            "4",
            _lt(
                "This payment would take the phone over its M-Pesa daily limit (KES 500,000 a day). "
                "No money was taken for it: pay the rest tomorrow, or another way, such as to the "
                "seller's paybill."
            ),
        ),
        _failed(
            "8",
            _lt(
                "This payment would take the M-Pesa account over its balance limit (KES 500,000). "
                "No money was taken for it: pay the rest tomorrow, or another way, such as to the "
                "seller's paybill."
            ),
        ),
        _failed(
            "17",
            _lt(
                "M-Pesa refused a second payment of the same amount from this phone within 2 minutes. "
                "Wait 2 minutes, then try again."
            ),
        ),
        _failed("26", _lt("M-Pesa is busy. Try again in a few minutes.")),
        _failed(
            "1001",
            _lt(
                "Another M-Pesa transaction is in progress on this phone. Complete it, then try again."
            ),
        ),
        _failed("1019", _lt("The M-Pesa prompt expired before it was answered.")),
        _failed("1025", _PUSH_ERROR),
        _failed("9999", _PUSH_ERROR),
        ResultCode("1032", Outcome.CANCELED, _lt("You cancelled the M-Pesa prompt.")),
        _failed(
            "1037",
            _lt(
                "The phone did not answer the M-Pesa prompt. Check that it is on and has network, "
                "then try again."
            ),
        ),
        _failed("2001", _lt("The M-Pesa PIN entered was wrong.")),
        _failed("2028", _MISCONFIGURED),
        _failed("2029", _MISCONFIGURED),
        _failed("SFC_IC0003", _MISCONFIGURED),
        _failed(
            "8006",
            _lt(
                "The M-Pesa account's security credential is locked. The account holder must contact "
                "Safaricom."
            ),
        ),
    )
}


def classify_result(code: object) -> ResultCode:
    """Look a result code up as text; an unknown code (or none) means PENDING, never FAILED."""
    text = "" if code is None else str(code).strip()
    known = RESULT_CODES.get(text)
    if known is not None:
        return known
    return ResultCode(text, Outcome.PENDING, PENDING_MESSAGE)


@dataclass(frozen=True)
class ApiErrorCode:
    """One Daraja ``errorCode``: may the same request be sent again later, and what it means."""

    code: str
    retryable: bool
    message: str


BEING_PROCESSED = "being processed"
SUBSCRIBER_LOCKED_MESSAGE = _lt(
    "Another M-Pesa prompt is already waiting on this phone. Complete or cancel it, then try again."
)

ERROR_CODES: dict[str, ApiErrorCode] = {
    entry.code: entry
    for entry in (
        ApiErrorCode("400.002.02", False, "Daraja refused a field of the request as invalid."),
        ApiErrorCode("400.002.05", False, "Daraja could not read the request."),
        ApiErrorCode(
            "400.008.01", False, "Daraja refused the consumer key and secret. Check the credentials."
        ),
        ApiErrorCode("400.008.02", False, "Daraja refused the grant type of the token request."),
        ApiErrorCode(
            "401.002.01", True, "Daraja refused the access token; a new token is needed."
        ),
        ApiErrorCode("404.001.01", False, "Daraja does not know this address. Check the base URL."),
        ApiErrorCode(
            "404.001.03", True, "Daraja refused the access token; a new token is needed."
        ),
        ApiErrorCode(
            "404.001.04", False, "Daraja refused the authorization header of the request."
        ),
        ApiErrorCode(
            "500.001.1001",
            False,
            "M-Pesa refused the request (wrong shortcode or passkey, unknown merchant, or a "
            "transaction already in progress for this phone).",
        ),
        ApiErrorCode(
            "500.003.02", True, "Daraja is limiting the request rate (spike arrest). Try again shortly."
        ),
        ApiErrorCode(
            "500.003.03", True, "The Daraja app's request quota is used up. Try again later."
        ),
        ApiErrorCode("500.003.1001", True, "Daraja had an internal error. Try again shortly."),
    )
}

# errorCodes that mean "this access token is not (or no longer) valid": refresh it once and resend.
INVALID_TOKEN_CODES = frozenset({"404.001.03", "401.002.01"})
# C2B URL registration: "the version must match the API product on the app", i.e. try the other version.
PRODUCT_MISMATCH_CODE = "401.003.01"
# C2B URL registration in production, once the URLs are set: "Urls are already registered" (a result, no error).
URLS_ALREADY_REGISTERED_CODE = "500.003.1001"

# 500.001.1001 covers several refusals; the errorMessage tells them apart.
_1001_BY_MESSAGE: tuple[tuple[str, ApiErrorCode], ...] = (
    (
        BEING_PROCESSED,
        ApiErrorCode("500.001.1001", True, "M-Pesa is still processing this payment."),
    ),
    ("lock subscriber", ApiErrorCode("500.001.1001", False, SUBSCRIBER_LOCKED_MESSAGE)),
    (
        "wrong credentials",
        ApiErrorCode(
            "500.001.1001",
            False,
            "M-Pesa refused the shortcode and passkey. Check the M-Pesa settings of the provider.",
        ),
    ),
    (
        "merchant does not exist",
        ApiErrorCode(
            "500.001.1001",
            False,
            "M-Pesa does not know this shortcode. Check the M-Pesa settings of the provider.",
        ),
    ),
)


def describe_api_error(error_code: str | None, error_message: str | None) -> ApiErrorCode | None:
    """The catalogue entry for an error, refined by its message for 500.001.1001; None if unknown."""
    code = (error_code or "").strip()
    if code == "500.001.1001":
        text = (error_message or "").casefold()
        for needle, entry in _1001_BY_MESSAGE:
            if needle in text:
                return entry
    return ERROR_CODES.get(code)


def is_being_processed(error_code: str | None, error_message: str | None) -> bool:
    """True for the query answer that means the customer has not answered yet (PENDING)."""
    return (error_code or "").strip() == "500.001.1001" and BEING_PROCESSED in (
        error_message or ""
    ).casefold()


# === REQUESTS ACCEPTED === #

# The ResponseCode of a request Daraja accepted (STK Push, Reversal, Transaction Status, C2B registration and
# simulation): accepted means queued, not done; the result comes later.
REQUEST_ACCEPTED = "0"


# === INITIATOR RESULTS (Reversal, Transaction Status) === #

INITIATOR_TIMEOUT_MESSAGE = (
    "M-Pesa did not process the request in time (queue timeout): nothing was done. Check with Transaction Status "
    "before sending it again."
)

INITIATOR_RESULT_CODES: dict[str, str] = {
    "0": "M-Pesa completed the request.",
    "1": "The M-Pesa balance of the shortcode is too low for this reversal.",
    "26": "M-Pesa is busy. Try again in a few minutes.",
    "2001": (
        "M-Pesa refused the initiator: the initiator name or its password is wrong, or the security credential "
        "was made with the certificate of another environment (sandbox or production)."
    ),
    "8006": "The initiator's security credential is locked. The account holder must reset it on the M-Pesa portal.",
    "R000001": "This M-Pesa transaction was already reversed.",
    "R000002": (
        "M-Pesa does not know the original transaction: check the receipt, the amount and that it was paid to "
        "this shortcode."
    ),
}

# What the Odoo layer decides on, by code (compared as text).
ALREADY_REVERSED_CODE = "R000001"
UNKNOWN_TRANSACTION_CODE = "R000002"
UNKNOWN_TRANSACTION_CODES: tuple[str, ...] = (UNKNOWN_TRANSACTION_CODE,)
# The initiator set-up is wrong: asking again changes nothing until an administrator fixes it.
INITIATOR_INVALID_CODES: tuple[str, ...] = ("2001",)


def describe_initiator_result(code: object) -> str:
    """A sentence for an initiator ResultCode (compared as text; unknown codes say so, they are no success)."""
    text = "" if code is None else str(code).strip()
    known = INITIATOR_RESULT_CODES.get(text)
    if known is not None:
        return known
    return f"M-Pesa did not complete the request (code {text or 'none'}); nothing can be assumed done."


# === C2B VALIDATION === #

# The ResultCodes a ValidationURL may answer to refuse a payment, with Safaricom's descriptions.
C2B_INVALID_MSISDN = "C2B00011"
C2B_INVALID_ACCOUNT = "C2B00012"
C2B_INVALID_AMOUNT = "C2B00013"
C2B_INVALID_KYC = "C2B00014"
C2B_INVALID_SHORTCODE = "C2B00015"
C2B_OTHER_ERROR = "C2B00016"
C2B_REJECTION_CODES: dict[str, str] = {
    C2B_INVALID_MSISDN: "Invalid MSISDN",
    C2B_INVALID_ACCOUNT: "Invalid Account Number",
    C2B_INVALID_AMOUNT: "Invalid Amount",
    C2B_INVALID_KYC: "Invalid KYC Details",
    C2B_INVALID_SHORTCODE: "Invalid Shortcode",
    C2B_OTHER_ERROR: "Other Error",
}


# === PULL TRANSACTIONS === #

# The ResponseCode of a query (HTTP 200 both): rows found, or none in the window.
PULL_SUCCESS = "1000"
PULL_NONE_FOUND = "1001"


# === B2B EXPRESS CHECKOUT (USSD push to a till) === #

# The acknowledgement {"code", "status"} starts the USSD prompt only when its code is REQUEST_ACCEPTED ("0"); the
# resultCode of the result posted to callbackUrl says what the till's operator did.  The codes are the same in
# both places: a refusal may come at once (in the acknowledgement) or later (in the result).
B2B_CANCELLED_CODE = "4001"
B2B_KYC_FAILED_CODE = "4102"
B2B_NO_NOMINATED_NUMBER_CODE = "4104"
B2B_USSD_NETWORK_ERROR_CODE = "4201"
B2B_USSD_ERROR_CODE = "4203"

B2B_RESULT_CODES: dict[str, ResultCode] = {
    entry.code: entry
    for entry in (
        ResultCode(REQUEST_ACCEPTED, Outcome.SUCCESS, _lt("The M-Pesa payment from the till was received.")),
        ResultCode(B2B_CANCELLED_CODE, Outcome.CANCELED, _lt("The till's operator cancelled the M-Pesa prompt.")),
        _failed(
            B2B_KYC_FAILED_CODE,
            _lt(
                "M-Pesa refused the till: its KYC details are incomplete. The till's owner must update them with "
                "Safaricom. No money was taken."
            ),
        ),
        _failed(
            B2B_NO_NOMINATED_NUMBER_CODE,
            _lt(
                "The till has no nominated phone number to receive the M-Pesa prompt. The till's owner must set one "
                "under Organization Details on the M-Pesa web portal. No money was taken."
            ),
        ),
        _failed(
            B2B_USSD_NETWORK_ERROR_CODE,
            _lt(
                "M-Pesa could not reach the phone of the till's operator (USSD network error). No money was taken "
                "from the till; try again."
            ),
        ),
        _failed(
            B2B_USSD_ERROR_CODE,
            _lt(
                "M-Pesa could not show the prompt on the phone of the till's operator (USSD error). No money was "
                "taken from the till; try again."
            ),
        ),
    )
}
# Refusals that may pass when the same request is sent again later (a passing network fault).
B2B_RETRYABLE_CODES = frozenset({B2B_USSD_NETWORK_ERROR_CODE, B2B_USSD_ERROR_CODE})


def classify_b2b_result(code: object) -> ResultCode:
    """Look a B2B Express Checkout code up as text; an unknown code (or none) means PENDING, never FAILED, as for
    STK (docs/design.md, 12. Failure modes: pending read as failure)."""
    text = "" if code is None else str(code).strip()
    known = B2B_RESULT_CODES.get(text)
    if known is not None:
        return known
    return ResultCode(text, Outcome.PENDING, PENDING_MESSAGE)
