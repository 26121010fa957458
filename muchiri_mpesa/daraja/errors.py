"""Exceptions of the Daraja layer.

One base class so callers can catch everything Daraja-related, and one subclass per kind of
failure, because each kind asks for a different reaction: a validation error means nothing was
sent, an API error means Daraja refused, a connection error may or may not have reached Daraja.
Messages are written for people and never contain a secret (consumer secret, passkey, Password,
access token): callers show and log them as they are.
"""

from __future__ import annotations

__all__ = [
    "CallbackParseError",
    "DarajaApiError",
    "DarajaAuthError",
    "DarajaConnectionError",
    "DarajaError",
    "DarajaProtocolError",
    "DarajaValidationError",
    "InvalidAmount",
    "InvalidConfiguration",
    "InvalidPhoneNumber",
]


class DarajaError(Exception):
    """Base of every error raised by the Daraja layer."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class DarajaValidationError(DarajaError, ValueError):
    """Bad input, found before any request leaves: nothing was sent to Daraja."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class InvalidPhoneNumber(DarajaValidationError):
    """The phone number cannot receive an M-Pesa prompt."""

    def __init__(self, message: str, field: str = "phone") -> None:
        super().__init__(message, field)


class InvalidAmount(DarajaValidationError):
    """The amount is not a payable number of shillings."""

    def __init__(self, message: str, field: str = "amount") -> None:
        super().__init__(message, field)


class InvalidConfiguration(DarajaValidationError):
    """The provider settings (shortcode, passkey, URLs, limits) are not usable."""


class DarajaApiError(DarajaError):
    """Daraja answered, and refused the request.

    ``retryable`` says whether sending the same request again later can succeed (spike arrest,
    quota, a 5xx on an idempotent call); it never means the client already retried.
    """

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        error_code: str | None = None,
        error_message: str | None = None,
        request_id: str | None = None,
        retryable: bool = False,
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.error_code = error_code
        self.error_message = error_message
        self.request_id = request_id
        self.retryable = retryable


class DarajaAuthError(DarajaApiError):
    """Daraja refused the credentials, or refused a freshly fetched access token."""


class DarajaConnectionError(DarajaError):
    """The network failed.

    ``request_may_have_reached`` is False only when the request surely never left (connection
    refused, connect timeout, DNS or TLS handshake failure).  When True, an STK push may have been
    processed: it must not be sent again blindly.
    """

    def __init__(self, message: str, *, request_may_have_reached: bool) -> None:
        super().__init__(message)
        self.request_may_have_reached = request_may_have_reached


class DarajaProtocolError(DarajaError):
    """Daraja (or something in front of it) answered in a shape Daraja does not use.

    The request did reach a server, so for an STK push the outcome is unknown.
    """

    def __init__(self, message: str, *, http_status: int | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status


class CallbackParseError(DarajaError, ValueError):
    """A body posted to the callback URL is not a Daraja stkCallback."""
