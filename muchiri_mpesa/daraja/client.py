"""DarajaClient: OAuth token, STK Push and STK Push Query, and the other Daraja APIs, over HTTP.

Rules that keep money safe:
- everything is validated before anything is sent (see stk.py);
- a push is sent again only after Daraja refused its access token (HTTP 401 / 404.001.03), which
  Daraja does before processing; after any other failure it is never resent automatically
  (docs/design.md, 12. Failure modes: push retried): a read timeout raises
  DarajaConnectionError(request_may_have_reached=True);
- a query answered "being processed" is PENDING, not a failure (docs/design.md, 12. Failure modes);
- every HTTP exchange is reported, redacted, to an optional observer for the audit log;
- no secret (consumer secret, passkey, Password, token) reaches a log, an error or a repr.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
import urllib3.exceptions

from .b2b import B2B_CHECKOUT_PATH, B2BCheckoutAck, B2BCheckoutRequest
from .c2b import (
    C2B_REGISTER_PATHS,
    C2B_SIMULATE_PATH,
    C2BRegistration,
    build_c2b_register_payload,
    build_c2b_simulate_payload,
    is_already_registered,
)
from .codes import (
    B2B_RESULT_CODES,
    B2B_RETRYABLE_CODES,
    INVALID_TOKEN_CODES,
    PRODUCT_MISMATCH_CODE,
    PULL_NONE_FOUND,
    PULL_SUCCESS,
    REQUEST_ACCEPTED,
    Outcome,
    ResultCode,
    classify_result,
    describe_api_error,
    is_being_processed,
)
from .errors import (
    CallbackParseError,
    DarajaApiError,
    DarajaAuthError,
    DarajaConnectionError,
    DarajaError,
    DarajaProtocolError,
    InvalidConfiguration,
)
from .initiator import (
    REVERSAL_PATH,
    TRANSACTION_STATUS_PATH,
    InitiatorAck,
    build_reversal_payload,
    build_transaction_status_payload,
)
from .money import DEFAULT_MAX_AMOUNT, MIN_AMOUNT, check_amount
from .phone import mask_msisdn
from .pull import (
    PULL_CUT_PAGE_LIMIT,
    PULL_CUT_REPEATED_PAGE,
    PULL_QUERY_PATH,
    PULL_REGISTER_PATH,
    PullListing,
    PullTransaction,
    build_pull_query_payload,
    build_pull_register_payload,
    parse_pull_rows,
)
from .qr import QR_PATH, QrCode, build_qr_payload, parse_qr_answer
from .stk import (
    PAYBILL,
    SANDBOX_URL,
    ShortcodeConfig,
    build_stk_push_payload,
    build_stk_query_payload,
    redact,
)
from .tokens import (
    DEFAULT_TOKEN_MARGIN,
    UTC,
    AccessToken,
    MemoryTokenStore,
    TokenStore,
    token_cache_key,
)

__all__ = [
    "DarajaClient",
    "DarajaCredentials",
    "Exchange",
    "StkPushResult",
    "StkQueryResult",
]

_log = logging.getLogger(__name__)

TOKEN_PATH = "/oauth/v1/generate?grant_type=client_credentials"
STK_PUSH_PATH = "/mpesa/stkpush/v1/processrequest"
STK_QUERY_PATH = "/mpesa/stkpushquery/v1/query"

_MAX_TEXT = 2000  # characters of a non-JSON answer kept for the audit log

_T = TypeVar("_T")
_E = TypeVar("_E", bound=DarajaApiError)


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class DarajaCredentials:
    """The Daraja app's consumer key and secret, and which Daraja (sandbox, production, simulator)."""

    consumer_key: str
    consumer_secret: str = field(repr=False)
    base_url: str = SANDBOX_URL

    def __post_init__(self) -> None:
        for name, label in (("consumer_key", "consumer key"), ("consumer_secret", "consumer secret")):
            value = getattr(self, name)
            value = value.strip() if isinstance(value, str) else ""
            if not value:
                raise InvalidConfiguration(f"The Daraja {label} is missing.", field=name)
            object.__setattr__(self, name, value)
        base = self.base_url.strip().rstrip("/") if isinstance(self.base_url, str) else ""
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
            raise InvalidConfiguration(
                "The Daraja base URL must be an absolute http:// or https:// address "
                f"(got {str(self.base_url)[:60]!r}).",
                field="base_url",
            )
        object.__setattr__(self, "base_url", base)

    @property
    def cache_key(self) -> str:
        """The token store key of these credentials (a hash: the secret never shows)."""
        return token_cache_key(self.base_url, self.consumer_key, self.consumer_secret)


@dataclass(frozen=True)
class StkPushResult:
    """Daraja accepted the push.  Accepted is not paid: the callback or a query says if it was."""

    merchant_request_id: str
    checkout_request_id: str
    response_code: str
    response_description: str
    customer_message: str
    raw: dict[str, Any]


@dataclass(frozen=True)
class StkQueryResult:
    """What Daraja knows about one push; ``result_code`` is None while it is being processed."""

    checkout_request_id: str
    merchant_request_id: str | None
    result_code: str | None
    result_desc: str
    outcome: Outcome
    raw: dict[str, Any]
    result: ResultCode | None = None


@dataclass(frozen=True)
class Exchange:
    """One HTTP exchange with Daraja, redacted, for the audit log."""

    operation: str  # "token" | "stk_push" | "stk_query" | "reversal" | "transaction_status" | "c2b_..." | "pull_..." |
    # "b2b_checkout"
    method: str
    url: str
    request_body: dict[str, Any] | None
    status: int | None
    response_body: dict[str, Any] | str | None
    duration_ms: float
    error: str | None


class _TokenRejected(DarajaAuthError):
    """Daraja refused the bearer token (before processing the request): refresh once and resend."""


class _ProductMismatch(DarajaApiError):
    """401.003.01 "no apiproduct match": this app has the other version of the API (not a token problem)."""


_ACTION = {
    "token": "the access token request",
    "stk_push": "the STK push",
    "stk_query": "the STK push query",
    "reversal": "the reversal request",
    "transaction_status": "the transaction status query",
    "c2b_register": "the C2B URL registration",
    "c2b_simulate": "the C2B payment simulation",
    "pull_register": "the Pull Transactions registration",
    "pull_query": "the Pull Transactions query",
    "b2b_checkout": "the B2B Express Checkout request",
    "qr_generate": "the Dynamic QR request",
}


def _may_have_reached(exc: requests.RequestException) -> bool:
    """False only when the request surely never left: refused, unreachable, DNS, TLS, proxy."""
    if isinstance(exc, (requests.exceptions.ConnectTimeout, requests.exceptions.SSLError,
                        requests.exceptions.ProxyError)):
        return False
    if isinstance(exc, requests.exceptions.ConnectionError):
        reason = exc.args[0] if exc.args else None
        if isinstance(reason, urllib3.exceptions.MaxRetryError):
            reason = reason.reason
        if isinstance(
            reason, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError)
        ):
            return False
    return True


def _connection_error(operation: str, exc: requests.RequestException) -> DarajaConnectionError:
    action = _ACTION[operation]
    kind = type(exc).__name__
    if _may_have_reached(exc):
        return DarajaConnectionError(
            f"The connection to Daraja failed after {action} was sent ({kind}): Daraja may have "
            "received and processed it.",
            request_may_have_reached=True,
        )
    return DarajaConnectionError(
        f"Could not connect to Daraja ({kind}): {action} was not sent.",
        request_may_have_reached=False,
    )


def _text(value: Any) -> str | None:
    """A non-empty string from a JSON value, or None."""
    if value is None or isinstance(value, (dict, list, bool)):
        return None
    text = str(value).strip()
    return text or None


def _detail(status: int | None, code: str | None, daraja_message: str | None) -> str:
    """What Daraja said, as a suffix for people and logs: " (HTTP 401, 404.001.03: Invalid ...)"."""
    said = ": ".join(part for part in (code, daraja_message) if part)
    return f" (HTTP {status}{', ' + said if said else ''})"


def _refusal(
    cls: type[_E], message: str, status: int, body: dict[str, Any] | None, *, retryable: bool
) -> _E:
    """A ``cls`` error carrying Daraja's {requestId, errorCode, errorMessage} answer."""
    body = body or {}
    code = _text(body.get("errorCode"))
    daraja_message = _text(body.get("errorMessage"))
    return cls(
        message + _detail(status, code, daraja_message),
        http_status=status,
        error_code=code,
        error_message=daraja_message,
        request_id=_text(body.get("requestId")),
        retryable=retryable,
    )


def _api_error(
    operation: str, status: int, body: dict[str, Any], *, unknown_retryable: bool
) -> DarajaApiError:
    """Daraja refused: the catalogue says what it means and whether to try again later."""
    entry = describe_api_error(_text(body.get("errorCode")), _text(body.get("errorMessage")))
    if entry is None:
        message, retryable = f"Daraja refused {_ACTION[operation]}.", unknown_retryable
    else:
        message, retryable = entry.message, entry.retryable
    return _refusal(DarajaApiError, message, status, body, retryable=retryable)


def _token_rejected(status: int, body: dict[str, Any] | None) -> bool:
    code = _text(body.get("errorCode")) if body else None
    return status == 401 or code in INVALID_TOKEN_CODES


def _rejected_token(status: int, body: dict[str, Any] | None) -> _TokenRejected:
    return _refusal(
        _TokenRejected, "Daraja refused the access token; a new token is needed.", status, body,
        retryable=True,
    )


def _refused_fresh_token(rejected: _TokenRejected) -> DarajaAuthError:
    return DarajaAuthError(
        "Daraja refused a freshly fetched access token. Check that the Daraja app has the "
        "M-Pesa Express product and that the credentials belong to this environment "
        "(sandbox or production)."
        + _detail(rejected.http_status, rejected.error_code, rejected.error_message),
        http_status=rejected.http_status,
        error_code=rejected.error_code,
        error_message=rejected.error_message,
        request_id=rejected.request_id,
        retryable=False,
    )


def _expires_in(value: Any) -> int | None:
    """Seconds from Daraja's ``expires_in`` (often the string "3599"), or None if unusable."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        seconds = Decimal(str(value).strip())
    except InvalidOperation:
        return None
    if not seconds.is_finite() or seconds <= 0:
        return None
    return int(seconds)


class DarajaClient:
    """Talks to one Daraja environment for one shortcode.

    Share ``token_store`` between clients (and, in Odoo, between workers) that use the same
    credentials: Daraja may invalidate a token when another one is fetched.  The default store
    belongs to this client only.  Give a ``session`` that never retries POST requests by itself.
    """

    def __init__(
        self,
        credentials: DarajaCredentials,
        shortcode: ShortcodeConfig,
        *,
        session: requests.Session | None = None,
        token_store: TokenStore | None = None,
        timeout: tuple[float, float] = (5.0, 30.0),
        max_amount: int = DEFAULT_MAX_AMOUNT,
        observer: Callable[[Exchange], None] | None = None,
        clock: Callable[[], datetime] | None = None,
        token_margin: timedelta = DEFAULT_TOKEN_MARGIN,
    ) -> None:
        check_amount(MIN_AMOUNT, max_amount)  # refuses an unusable limit now, not at payment time
        self.credentials = credentials
        self.shortcode = shortcode
        self.session = session if session is not None else requests.Session()
        self.clock = clock or _utc_now
        self.token_margin = token_margin
        self.token_store: TokenStore = (
            token_store
            if token_store is not None
            else MemoryTokenStore(clock=self.clock, margin=token_margin)
        )
        self.timeout = timeout
        self.max_amount = max_amount
        self.observer = observer
        self._token_key = credentials.cache_key

    def __repr__(self) -> str:
        return (
            f"DarajaClient(base_url={self.credentials.base_url!r}, "
            f"shortcode={self.shortcode.business_shortcode!r})"
        )

    # -- HTTP ----------------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return self.credentials.base_url + path

    def _report(self, exchange: Exchange) -> None:
        if self.observer is None:
            return
        try:
            self.observer(exchange)
        except Exception:  # noqa: BLE001 - the audit log must never break a payment
            _log.warning("The Daraja exchange observer failed; the exchange goes on.", exc_info=True)

    def _exchange(
        self,
        operation: str,
        method: str,
        path: str,
        interpret: Callable[[int, dict[str, Any] | None], _T],
        *,
        body: dict[str, Any] | None = None,
        token: AccessToken | None = None,
        report: Callable[[Exchange], None] | None = None,
    ) -> _T:
        """Send one request (never retried here), interpret the answer, report the exchange (to
        ``report`` when given, else to the observer)."""
        url = self._url(path)
        headers = {"Accept": "application/json"}
        auth = None
        if token is not None:
            headers["Authorization"] = f"Bearer {token.value}"
        else:
            auth = (self.credentials.consumer_key, self.credentials.consumer_secret)
        status: int | None = None
        shown: dict[str, Any] | str | None = None
        error: str | None = None
        started = time.monotonic()
        try:
            try:
                response = self.session.request(
                    method, url, json=body, headers=headers, auth=auth,
                    timeout=self.timeout, allow_redirects=False,
                )
            except requests.RequestException as exc:
                raise _connection_error(operation, exc) from exc
            status = response.status_code
            text = response.content.decode("utf-8", "replace")
            try:
                parsed = json.loads(text) if text.strip() else None
            except ValueError:
                parsed = None
            data = parsed if isinstance(parsed, dict) else None
            shown = redact(data) if data is not None else (text[:_MAX_TEXT] or None)
            return interpret(status, data)
        except DarajaError as exc:
            error = str(exc)
            raise
        finally:
            (report or self._report)(
                Exchange(
                    operation=operation,
                    method=method,
                    url=url,
                    request_body=redact(body) if body is not None else None,
                    status=status,
                    response_body=shown,
                    duration_ms=(time.monotonic() - started) * 1000.0,
                    error=error,
                )
            )

    def _with_token(self, send: Callable[[AccessToken], _T]) -> _T:
        """Send with the shared token; if Daraja refuses it, refresh it once and send again."""
        token = self.access_token()
        try:
            return send(token)
        except _TokenRejected as rejected:
            _log.info("Daraja refused the access token (%s); fetching a new one.", rejected.error_code)
            fresh = self.access_token(stale=token)
        try:
            return send(fresh)
        except _TokenRejected as again:
            raise _refused_fresh_token(again) from None

    # -- token ---------------------------------------------------------------------------------

    def fetch_token(self, *, report: Callable[[Exchange], None] | None = None) -> AccessToken:
        """Ask Daraja for a new access token (TokenStore.refresh calls this under its lock).

        The exchange, refused or not, goes to ``report`` when given, else to the observer.
        """
        # Counted from before the request, in whole seconds (databases may drop microseconds).
        requested_at = self.clock().replace(microsecond=0)

        def interpret(status: int, data: dict[str, Any] | None) -> AccessToken:
            if status in (400, 401, 403):
                raise _refusal(
                    DarajaAuthError,
                    "Daraja refused the consumer key and secret. Check the M-Pesa credentials and "
                    "that they belong to this environment (sandbox or production).",
                    status,
                    data,
                    retryable=False,
                )
            if data is not None and _text(data.get("errorCode")):
                raise _api_error("token", status, data, unknown_retryable=status >= 500)
            if status != 200 or data is None:
                raise DarajaProtocolError(
                    f"Daraja answered the access token request with HTTP {status} and a body that "
                    "is not Daraja's JSON.",
                    http_status=status,
                )
            value = data.get("access_token")
            seconds = _expires_in(data.get("expires_in"))
            if not isinstance(value, str) or not value.strip() or seconds is None:
                raise DarajaProtocolError(
                    "Daraja's access token answer has no usable access_token and expires_in.",
                    http_status=status,
                )
            return AccessToken(value.strip(), requested_at + timedelta(seconds=seconds))

        token = self._exchange("token", "GET", TOKEN_PATH, interpret, report=report)
        _log.info("Fetched a Daraja access token valid until %s.", token.expires_at.isoformat())
        return token

    def access_token(self, *, stale: AccessToken | None = None) -> AccessToken:
        """The shared token if it is fresh (and not ``stale``), else a refreshed one."""
        token = self.token_store.load(self._token_key)
        if (
            token is not None
            and token != stale
            and token.is_fresh(self.clock(), self.token_margin)
        ):
            return token
        # The store fetches under its lock, maybe in a transaction of its own that a refused
        # request rolls back (Odoo's does): the exchange is reported once the store has let go,
        # so that a refused token request is kept in the audit log like any other exchange.
        exchanges: list[Exchange] = []
        try:
            return self.token_store.refresh(
                self._token_key, lambda: self.fetch_token(report=exchanges.append), stale
            )
        finally:
            for exchange in exchanges:
                self._report(exchange)

    # -- STK push ------------------------------------------------------------------------------

    def stk_push(
        self,
        *,
        phone: str | int,
        amount: Decimal | float | str,
        reference: str,
        description: str | None,
        callback_url: str,
    ) -> StkPushResult:
        """Send one STK push.  Accepted is not paid.

        Raises DarajaValidationError (nothing sent), DarajaApiError (refused; see ``retryable``),
        DarajaConnectionError (``request_may_have_reached`` True: outcome unknown) or
        DarajaProtocolError (an answer came but not Daraja's: outcome unknown).
        """
        payload = build_stk_push_payload(
            self.shortcode,
            phone=phone,
            amount=amount,
            reference=reference,
            description=description,
            callback_url=callback_url,
            max_amount=self.max_amount,
            now=self.clock(),
        )
        shown = (
            f"{mask_msisdn(payload['PartyA'])}, KES {payload['Amount']:,}, "
            f"reference {payload['AccountReference']}"
        )

        def interpret(status: int, data: dict[str, Any] | None) -> StkPushResult:
            if _token_rejected(status, data):
                raise _rejected_token(status, data)
            if data is not None and _text(data.get("errorCode")):
                raise _api_error("stk_push", status, data, unknown_retryable=False)
            response_code = _text(data.get("ResponseCode")) if data is not None else None
            if status != 200 or data is None or response_code is None:
                raise DarajaProtocolError(
                    f"Daraja answered the STK push with HTTP {status} and a body that is not "
                    "Daraja's; the push may or may not have been accepted.",
                    http_status=status,
                )
            description_text = _text(data.get("ResponseDescription")) or ""
            if response_code != REQUEST_ACCEPTED:
                raise DarajaApiError(
                    f"Daraja did not accept the STK push (ResponseCode {response_code}"
                    f"{': ' + description_text if description_text else ''}).",
                    http_status=status,
                    error_code=response_code,
                    error_message=description_text or None,
                    retryable=False,
                )
            merchant = _text(data.get("MerchantRequestID"))
            checkout = _text(data.get("CheckoutRequestID"))
            if merchant is None or checkout is None:
                raise DarajaProtocolError(
                    "Daraja accepted the STK push but did not say its MerchantRequestID and "
                    "CheckoutRequestID.",
                    http_status=status,
                )
            return StkPushResult(
                merchant_request_id=merchant,
                checkout_request_id=checkout,
                response_code=response_code,
                response_description=description_text,
                customer_message=_text(data.get("CustomerMessage")) or "",
                raw=data,
            )

        def send(token: AccessToken) -> StkPushResult:
            return self._exchange(
                "stk_push", "POST", STK_PUSH_PATH, interpret, body=payload, token=token
            )

        try:
            result = self._with_token(send)
        except DarajaError as exc:
            _log.warning("STK push to %s failed: %s", shown, exc)
            raise
        _log.info("STK push to %s accepted: CheckoutRequestID %s.", shown,
                  result.checkout_request_id)
        return result

    # -- STK query -----------------------------------------------------------------------------

    def stk_query(self, checkout_request_id: str) -> StkQueryResult:
        """Ask Daraja where one push stands.  "Being processed" returns PENDING, it does not raise."""
        payload = build_stk_query_payload(self.shortcode, checkout_request_id, now=self.clock())
        checkout = payload["CheckoutRequestID"]

        def interpret(status: int, data: dict[str, Any] | None) -> StkQueryResult:
            if _token_rejected(status, data):
                raise _rejected_token(status, data)
            if data is not None and _text(data.get("errorCode")):
                code = _text(data.get("errorCode"))
                daraja_message = _text(data.get("errorMessage"))
                if is_being_processed(code, daraja_message):
                    return StkQueryResult(
                        checkout_request_id=checkout,
                        merchant_request_id=None,
                        result_code=None,
                        result_desc=daraja_message or "",
                        outcome=Outcome.PENDING,
                        raw=data,
                    )
                raise _api_error("stk_query", status, data, unknown_retryable=status >= 500)
            if status != 200 or data is None:
                raise DarajaProtocolError(
                    f"Daraja answered the STK push query with HTTP {status} and a body that is not "
                    "Daraja's.",
                    http_status=status,
                )
            result_code = _text(data.get("ResultCode"))
            if result_code is None:
                response_code = _text(data.get("ResponseCode"))
                if response_code not in (None, REQUEST_ACCEPTED):
                    description_text = _text(data.get("ResponseDescription"))
                    raise DarajaApiError(
                        f"Daraja did not accept the STK push query (ResponseCode {response_code}"
                        f"{': ' + description_text if description_text else ''}).",
                        http_status=status,
                        error_code=response_code,
                        error_message=description_text,
                        retryable=False,
                    )
                raise DarajaProtocolError(
                    "Daraja's STK push query answer has no ResultCode.", http_status=status
                )
            result = classify_result(result_code)
            return StkQueryResult(
                checkout_request_id=_text(data.get("CheckoutRequestID")) or checkout,
                merchant_request_id=_text(data.get("MerchantRequestID")),
                result_code=result_code,
                result_desc=_text(data.get("ResultDesc")) or "",
                outcome=result.outcome,
                raw=data,
                result=result,
            )

        def send(token: AccessToken) -> StkQueryResult:
            return self._exchange(
                "stk_query", "POST", STK_QUERY_PATH, interpret, body=payload, token=token
            )

        result = self._with_token(send)
        _log.info("STK query of %s: %s (%s).", checkout, result.outcome.value, result.result_code)
        return result

    # -- initiator APIs (Reversal, Transaction Status) -----------------------------------------------------------

    def _initiator_request(
        self, operation: str, path: str, payload: dict[str, Any], shown: str
    ) -> InitiatorAck:
        """Send one initiator request; only a refused token is resent (Daraja refuses it before processing)."""

        def interpret(status: int, data: dict[str, Any] | None) -> InitiatorAck:
            if _token_rejected(status, data):
                raise _rejected_token(status, data)
            if data is not None and _text(data.get("errorCode")):
                raise _api_error(operation, status, data, unknown_retryable=False)
            response_code = _text(data.get("ResponseCode")) if data is not None else None
            if status != 200 or data is None or response_code is None:
                raise DarajaProtocolError(
                    f"Daraja answered {_ACTION[operation]} with HTTP {status} and a body that is not Daraja's; "
                    "it may or may not have been accepted.",
                    http_status=status,
                )
            description_text = _text(data.get("ResponseDescription")) or ""
            if response_code != REQUEST_ACCEPTED:
                raise DarajaApiError(
                    f"Daraja did not accept {_ACTION[operation]} (ResponseCode {response_code}"
                    f"{': ' + description_text if description_text else ''}).",
                    http_status=status,
                    error_code=response_code,
                    error_message=description_text or None,
                    retryable=False,
                )
            return InitiatorAck(
                originator_conversation_id=_text(data.get("OriginatorConversationID")) or "",
                conversation_id=_text(data.get("ConversationID")) or "",
                response_code=response_code,
                description=description_text,
                raw=data,
            )

        def send(token: AccessToken) -> InitiatorAck:
            return self._exchange(operation, "POST", path, interpret, body=payload, token=token)

        try:
            ack = self._with_token(send)
        except DarajaError as exc:
            _log.warning("%s of %s failed: %s", _ACTION[operation].capitalize(), shown, exc)
            raise
        _log.info(
            "%s of %s accepted: ConversationID %s.", _ACTION[operation].capitalize(), shown, ack.conversation_id
        )
        return ack

    def reverse(
        self,
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
    ) -> InitiatorAck:
        """Ask M-Pesa to reverse a whole payment.  Accepted is not reversed: the Result says so later.

        Never resent automatically after it left (a read timeout raises DarajaConnectionError with
        ``request_may_have_reached`` True): ask Transaction Status first, a second reversal answers R000001.
        """
        payload = build_reversal_payload(
            initiator=initiator,
            security_credential=security_credential,
            transaction_id=transaction_id,
            amount=amount,
            receiver_party=receiver_party,
            result_url=result_url,
            timeout_url=timeout_url,
            remarks=remarks,
            occasion=occasion,
        )
        shown = f"{payload['TransactionID']} (KES {payload['Amount']:,})"
        return self._initiator_request("reversal", REVERSAL_PATH, payload, shown)

    def transaction_status(
        self,
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
    ) -> InitiatorAck:
        """Ask M-Pesa where a receipt stands; the Result (ReceiptNo, Amount, TransactionStatus...) comes later.

        Without the receipt (its result was lost), name the payment by ``original_conversation_id``: the
        identifier of the request that made it (a B2B Express Checkout's RequestRefID).
        """
        payload = build_transaction_status_payload(
            initiator=initiator,
            security_credential=security_credential,
            transaction_id=transaction_id,
            party_a=party_a,
            identifier_type=identifier_type,
            result_url=result_url,
            timeout_url=timeout_url,
            remarks=remarks,
            occasion=occasion,
            original_conversation_id=original_conversation_id,
        )
        shown = payload.get("TransactionID") or f"the request {payload['OriginalConversationID']}"
        return self._initiator_request("transaction_status", TRANSACTION_STATUS_PATH, payload, shown)

    # -- C2B -----------------------------------------------------------------------------------------------------

    def _plain_request(
        self,
        operation: str,
        path: str,
        payload: dict[str, Any],
        accept: Callable[[int, dict[str, Any]], _T],
    ) -> _T:
        """A request whose 200 answer ``accept`` reads; token refusals are refreshed once, errors raised."""

        def interpret(status: int, data: dict[str, Any] | None) -> _T:
            code = _text(data.get("errorCode")) if data is not None else None
            if code == PRODUCT_MISMATCH_CODE:  # checked before the 401 rule: no new token helps here
                raise _refusal(
                    _ProductMismatch, f"Daraja refused {_ACTION[operation]}: the app has no matching API product.",
                    status, data, retryable=False,
                )
            if _token_rejected(status, data):
                raise _rejected_token(status, data)
            if data is not None and code:
                raise _api_error(operation, status, data, unknown_retryable=False)
            if status != 200 or data is None:
                raise DarajaProtocolError(
                    f"Daraja answered {_ACTION[operation]} with HTTP {status} and a body that is not Daraja's.",
                    http_status=status,
                )
            return accept(status, data)

        def send(token: AccessToken) -> _T:
            return self._exchange(operation, "POST", path, interpret, body=payload, token=token)

        return self._with_token(send)

    def register_c2b_urls(
        self, shortcode: str, response_type: str, confirmation_url: str, validation_url: str
    ) -> C2BRegistration:
        """Register the ConfirmationURL and ValidationURL: v2 first, v1 when the app has the v1 product.

        "Urls are already registered" (production registers once) is returned with ``already_registered``;
        every other refusal raises.
        """
        payload = build_c2b_register_payload(shortcode, response_type, confirmation_url, validation_url)
        mismatch: _ProductMismatch | None = None
        for version in ("v2", "v1"):

            def accept(status: int, data: dict[str, Any], version: str = version) -> C2BRegistration:
                code = _text(data.get("ResponseCode")) or ""
                description = _text(data.get("ResponseDescription")) or ""
                if is_already_registered(code, description):
                    return C2BRegistration(version, True, code, description)
                if code != REQUEST_ACCEPTED:
                    raise DarajaApiError(
                        f"Daraja did not accept the C2B URL registration (ResponseCode {code or 'none'}"
                        f"{': ' + description if description else ''}).",
                        http_status=status, error_code=code or None, error_message=description or None,
                    )
                return C2BRegistration(version, False, code, description)

            try:
                registration = self._plain_request("c2b_register", C2B_REGISTER_PATHS[version], payload, accept)
            except _ProductMismatch as exc:
                mismatch = exc
                _log.info("C2B URL registration %s: no API product match; trying the other version.", version)
                continue
            except DarajaApiError as exc:
                if is_already_registered(exc.error_code, exc.error_message):
                    _log.info("C2B URLs of %s were already registered (%s).", payload["ShortCode"], version)
                    return C2BRegistration(version, True, exc.error_code or "", exc.error_message or "")
                raise
            _log.info("C2B URLs of %s registered (%s).", payload["ShortCode"], version)
            return registration
        assert mismatch is not None
        raise DarajaApiError(
            "Daraja refused both C2B registration versions (v2 and v1): add the C2B API product to the Daraja "
            "app." + _detail(mismatch.http_status, mismatch.error_code, mismatch.error_message),
            http_status=mismatch.http_status, error_code=mismatch.error_code,
            error_message=mismatch.error_message, request_id=mismatch.request_id,
        )

    def simulate_c2b(
        self,
        shortcode: str,
        amount: Decimal | int | str,
        msisdn: str | int,
        bill_ref: str,
        command_id: str = PAYBILL,
    ) -> dict[str, Any]:
        """Sandbox only: make Daraja play a customer paying from the phone's menu (the answer, as sent)."""
        payload = build_c2b_simulate_payload(shortcode, amount, msisdn, bill_ref, command_id)

        def accept(status: int, data: dict[str, Any]) -> dict[str, Any]:
            code = _text(data.get("ResponseCode"))
            if code not in (None, REQUEST_ACCEPTED):
                raise DarajaApiError(
                    f"Daraja did not accept the C2B simulation (ResponseCode {code}).",
                    http_status=status, error_code=code, error_message=_text(data.get("ResponseDescription")),
                )
            return data

        return self._plain_request("c2b_simulate", C2B_SIMULATE_PATH, payload, accept)

    # -- Pull Transactions -----------------------------------------------------------------------------------------

    def pull_register(self, shortcode: str, nominated_number: str | int, callback_url: str) -> dict[str, Any]:
        """Register the shortcode for Pull Transactions (once); the answer, as sent."""
        payload = build_pull_register_payload(shortcode, nominated_number, callback_url)

        def accept(status: int, data: dict[str, Any]) -> dict[str, Any]:
            code = _text(data.get("ResponseStatus")) or _text(data.get("ResponseCode"))
            if code not in (None, REQUEST_ACCEPTED, PULL_SUCCESS):
                raise DarajaApiError(
                    f"Daraja did not register the shortcode for Pull Transactions (ResponseCode {code}).",
                    http_status=status, error_code=code, error_message=_text(data.get("ResponseDescription")),
                )
            return data

        return self._plain_request("pull_register", PULL_REGISTER_PATH, payload, accept)

    def pull_query(
        self, shortcode: str, start: datetime, end: datetime, offset: int = 0
    ) -> tuple[list[PullTransaction], bool]:
        """One page of Pull Transactions from ``offset``; ``more`` is True when the page had rows (ask again
        from ``offset + len(rows)``; Daraja answers 1001 when nothing is left)."""
        payload = build_pull_query_payload(shortcode, start, end, offset)

        def accept(status: int, data: dict[str, Any]) -> tuple[list[PullTransaction], bool]:
            try:
                code, rows = parse_pull_rows(data)
            except CallbackParseError as exc:
                raise DarajaProtocolError(
                    f"Daraja's Pull Transactions answer cannot be read: {exc}", http_status=status
                ) from None
            if code == PULL_NONE_FOUND:
                return [], False
            if code != PULL_SUCCESS:
                raise DarajaApiError(
                    f"Daraja refused the Pull Transactions query (ResponseCode {code}).",
                    http_status=status, error_code=code, error_message=_text(data.get("ResponseMessage")),
                )
            return rows, bool(rows)

        return self._plain_request("pull_query", PULL_QUERY_PATH, payload, accept)

    def pull_transactions(
        self, shortcode: str, start: datetime, end: datetime, *, max_pages: int = 1000
    ) -> PullListing:
        """Every row from ``start`` to ``end`` (Daraja keeps 48 hours), page after page, each receipt once, and
        whether the whole window was read: a page that brings nothing new (a Daraja that ignores OffSetValue)
        or ``max_pages`` pages cut the run short, and the listing says up to when it read."""
        offset = 0
        seen: set[str] = set()
        rows: list[PullTransaction] = []
        for _page in range(max_pages):
            page, more = self.pull_query(shortcode, start, end, offset)
            fresh = [row for row in page if row.transaction_id not in seen]
            seen.update(row.transaction_id for row in fresh)
            rows.extend(fresh)
            if not more:
                return PullListing.of(rows, start, end)
            if not fresh:  # the same page again: this Daraja ignores OffSetValue, asking more would loop
                _log.warning("Pull Transactions of %s: page at offset %s repeats earlier rows; cut short.",
                             shortcode, offset)
                return PullListing.of(rows, start, end, PULL_CUT_REPEATED_PAGE)
            offset += len(page)
        _log.warning("Pull Transactions of %s cut short after %s pages.", shortcode, max_pages)
        return PullListing.of(rows, start, end, PULL_CUT_PAGE_LIMIT)

    # -- B2B Express Checkout ------------------------------------------------------------------------------------

    def b2b_checkout(
        self,
        *,
        till: str,
        amount: Decimal | int | str,
        reference: str,
        callback_url: str,
        partner_name: str,
        request_id: str | None = None,
        receiver_shortcode: str | None = None,
    ) -> B2BCheckoutAck:
        """Ask Daraja to prompt ``till`` (the distributor's till) to pay our paybill (``receiver_shortcode``,
        default the client's business shortcode).  Started is not paid: the result comes to ``callback_url``.

        Raises DarajaValidationError (nothing sent), DarajaApiError (refused: the prompt was not started; see
        ``retryable``), DarajaConnectionError or DarajaProtocolError (the outcome is unknown: never send it again
        blindly, a second request is a second prompt).  An http:// callback URL is taken only when Daraja itself
        is reached over http://, which only a local simulator is.
        """
        request = B2BCheckoutRequest(
            primary_shortcode=till,
            receiver_shortcode=(
                receiver_shortcode if receiver_shortcode is not None else self.shortcode.business_shortcode
            ),
            amount=amount,  # type: ignore[arg-type]  # validated (and made an int) by the request
            payment_ref=reference,
            callback_url=callback_url,
            partner_name=partner_name,
            max_amount=self.max_amount,
            allow_http=urlsplit(self.credentials.base_url).scheme == "http",
            **({"request_id": request_id} if request_id is not None else {}),
        )
        payload = request.payload()
        shown = f"till {request.primary_shortcode}, KES {request.amount:,}, reference {request.payment_ref}"

        def interpret(status: int, data: dict[str, Any] | None) -> B2BCheckoutAck:
            if _token_rejected(status, data):
                raise _rejected_token(status, data)
            if data is not None and _text(data.get("errorCode")):
                raise _api_error("b2b_checkout", status, data, unknown_retryable=False)
            code = _text(data.get("code")) if data is not None else None
            if data is None or code is None:
                raise DarajaProtocolError(
                    f"Daraja answered the B2B Express Checkout request with HTTP {status} and a body that is not "
                    "Daraja's; the prompt may or may not have been started.",
                    http_status=status,
                )
            said = _text(data.get("status")) or ""
            if code != REQUEST_ACCEPTED:
                known = B2B_RESULT_CODES.get(code)
                message = known.message if known is not None else "Daraja did not start the B2B checkout."
                raise DarajaApiError(
                    f"{message} (code {code}{': ' + said if said else ''})",
                    http_status=status,
                    error_code=code,
                    error_message=said or None,
                    retryable=code in B2B_RETRYABLE_CODES,
                )
            if status != 200:
                raise DarajaProtocolError(
                    f"Daraja answered the B2B Express Checkout request with HTTP {status} and code 0; the prompt "
                    "may or may not have been started.",
                    http_status=status,
                )
            return B2BCheckoutAck(request_id=request.request_id, code=code, status=said, request=request, raw=data)

        def send(token: AccessToken) -> B2BCheckoutAck:
            return self._exchange("b2b_checkout", "POST", B2B_CHECKOUT_PATH, interpret, body=payload, token=token)

        try:
            ack = self._with_token(send)
        except DarajaError as exc:
            _log.warning("B2B checkout of %s failed: %s", shown, exc)
            raise
        _log.info("B2B checkout of %s started: RequestRefID %s.", shown, ack.request_id)
        return ack

    # -- Dynamic QR ----------------------------------------------------------------------------------------------

    def generate_qr(
        self,
        merchant_name: str,
        ref_no: str,
        amount: Decimal | int | str,
        cpi: str | int,
        trx_code: str = "PB",
        size: int = 300,
    ) -> QrCode:
        """A QR code the M-Pesa app scans to pay ``amount`` into ``cpi`` with ``ref_no`` as the account number."""
        payload = build_qr_payload(merchant_name, ref_no, amount, trx_code, cpi, size)

        def accept(status: int, data: dict[str, Any]) -> QrCode:
            return parse_qr_answer(data, status)

        return self._plain_request("qr_generate", QR_PATH, payload, accept)
