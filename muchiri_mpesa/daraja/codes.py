"""What Daraja's codes mean: final or pending, retry or not, and what to tell the customer.

Two families: the ``ResultCode`` of an STK transaction (callback and query), and the
``errorCode`` of a refused API call.  Result codes are compared as text because Daraja sends
them as numbers in callbacks, as strings in queries, and sometimes as words (``SFC_IC0003``).
An unknown result code is never read as a failure: the payment stays pending until a known
answer arrives (failure mode 11, pending misread as failure).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "ERROR_CODES",
    "INVALID_TOKEN_CODES",
    "RESULT_CODES",
    "ApiErrorCode",
    "Outcome",
    "ResultCode",
    "classify_result",
    "describe_api_error",
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


PENDING_MESSAGE = "M-Pesa has not confirmed this payment yet."

_MISCONFIGURED = (
    "The seller's M-Pesa paybill or till is not set up for this payment. No money was taken; "
    "please contact the seller."
)
_PUSH_ERROR = "M-Pesa could not send the prompt to the phone. No money was taken; try again."


def _failed(code: str, message: str) -> ResultCode:
    return ResultCode(code, Outcome.FAILED, message)


RESULT_CODES: dict[str, ResultCode] = {
    entry.code: entry
    for entry in (
        ResultCode("0", Outcome.SUCCESS, "The M-Pesa payment was received."),
        _failed("1", "The M-Pesa balance is too low for this payment."),
        _failed("2", "The amount is below the M-Pesa minimum."),
        _failed("3", "The amount is above the M-Pesa maximum for one payment."),
        _failed("4", "This payment would go over the daily M-Pesa limit of this phone."),
        _failed("8", "This payment would go over the M-Pesa account balance limit."),
        _failed(
            "17",
            "M-Pesa refused a second payment of the same amount from this phone within 2 minutes. "
            "Wait 2 minutes, then try again.",
        ),
        _failed("26", "M-Pesa is busy. Try again in a few minutes."),
        _failed(
            "1001",
            "Another M-Pesa transaction is in progress on this phone. Complete it, then try again.",
        ),
        _failed("1019", "The M-Pesa prompt expired before it was answered."),
        _failed("1025", _PUSH_ERROR),
        _failed("9999", _PUSH_ERROR),
        ResultCode("1032", Outcome.CANCELED, "You cancelled the M-Pesa prompt."),
        _failed(
            "1037",
            "The phone did not answer the M-Pesa prompt. Check that it is on and has network, "
            "then try again.",
        ),
        _failed("2001", "The M-Pesa PIN entered was wrong."),
        _failed("2028", _MISCONFIGURED),
        _failed("2029", _MISCONFIGURED),
        _failed("SFC_IC0003", _MISCONFIGURED),
        _failed(
            "8006",
            "The M-Pesa account's security credential is locked. The account holder must contact "
            "Safaricom.",
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
SUBSCRIBER_LOCKED_MESSAGE = (
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
