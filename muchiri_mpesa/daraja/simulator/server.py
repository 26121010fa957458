"""A local HTTP server that plays Safaricom's Daraja API with its exact wire format.

Standard library only (no ``requests``, no ``odoo``): it runs on a bare Python >= 3.10 and inside the Odoo image.

Served at Daraja's paths:

- ``GET  /oauth/v1/generate?grant_type=client_credentials`` (Basic auth) -> ``{"access_token", "expires_in": "3599"}``
- ``POST /mpesa/stkpush/v1/processrequest`` (Bearer) -> accepted, then the stkCallback is POSTed to CallBackURL
- ``POST /mpesa/stkpushquery/v1/query`` (Bearer) -> HTTP 500 "being processed" until the result is known

and, for tools that cannot call the Python API (the simulator run as a separate process or container):

- ``GET  /__sim__/health``, ``GET /__sim__/state``, ``POST /__sim__/expire-tokens``, ``POST /__sim__/reset``,
  ``POST /__sim__/fail-next`` with ``{"count": 1, "error": "spike_arrest", "operations": ["stk_push"]}``,
  ``POST /__sim__/delay-next`` with ``{"seconds": 5, "count": 1, "operations": ["stk_push"]}``.
"""

from __future__ import annotations

import base64
import binascii
import copy
import heapq
import hmac
import itertools
import json
import logging
import random
import re
import secrets
import socket
import string
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .scenarios import (
    LOCKED_SUBSCRIBER_MESSAGE,
    CallbackMode,
    ResultTiming,
    Scenario,
    scenario_for,
)

_logger = logging.getLogger(__name__)

try:  # Kenya has been UTC+3 without DST since 1942: the fixed offset is the fallback without tzdata.
    from zoneinfo import ZoneInfo

    KENYA_TZ: Any = ZoneInfo("Africa/Nairobi")
except (ImportError, KeyError, OSError, ValueError):  # pragma: no cover - no tz database on the machine
    KENYA_TZ = timezone(timedelta(hours=3), "EAT")

# ---------------------------------------------------------------------------------------------------------------
# Documented defaults
# ---------------------------------------------------------------------------------------------------------------
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8089
DEFAULT_CONSUMER_KEY = "sim-consumer-key"
DEFAULT_CONSUMER_SECRET = "sim-consumer-secret"
DEFAULT_SHORTCODE = "174379"
# Safaricom's published Lipa Na M-Pesa Online passkey for the sandbox shortcode 174379.
SANDBOX_PASSKEY = "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919"
DEFAULT_TILL = "600980"
DEFAULT_CALLBACK_DELAY = 2.0
DEFAULT_PROMPT_TIMEOUT = 10.0
DEFAULT_CALLBACK_RETRY_DELAYS: tuple[float, ...] = (1.0, 2.0, 4.0)
DEFAULT_CALLBACK_TIMEOUT = 10.0
TOKEN_LIFETIME = 3599

OAUTH_PATH = "/oauth/v1/generate"
STK_PUSH_PATH = "/mpesa/stkpush/v1/processrequest"
STK_QUERY_PATH = "/mpesa/stkpushquery/v1/query"
CONTROL_PREFIX = "/__sim__/"

PAYBILL = "CustomerPayBillOnline"
TILL = "CustomerBuyGoodsOnline"

PUSH_ACCEPTED_DESC = "Success. Request accepted for processing"
# Safaricom's own typo ("successsfully") is part of the wire format.
QUERY_ACCEPTED_DESC = "The service request has been accepted successsfully"
BEING_PROCESSED_MESSAGE = "The transaction is being processed"

# The injectable gateway errors (fail_next): HTTP status, errorCode, errorMessage.
INJECTABLE_ERRORS: dict[str, tuple[int, str, str]] = {
    "spike_arrest": (500, "500.003.02", "Spike arrest violation"),
    "quota": (500, "500.003.03", "Quota violation"),
    "unavailable": (503, "", "Service Unavailable"),  # an HTML page, as a load balancer answers
    "invalid": (400, "400.002.02", "Bad Request - Invalid CheckoutRequestID"),  # refused for good
}
OPERATIONS = ("token", "stk_push", "stk_query")

_MAX_BODY = 1 << 20
_TOKEN_ALPHABET = string.ascii_letters + string.digits
_RECEIPT_ALPHABET = string.ascii_uppercase + string.digits
_DAY_CHARS = "123456789" + string.ascii_uppercase  # receipt day letter: 1-9 then A=10 ... V=31


class _RealClock:
    """time.monotonic captured at import: freezegun, which tests use for token expiry, leaves it alone."""

    monotonic = staticmethod(time.monotonic)


def _monotonic() -> float:
    return _RealClock.monotonic()


def _wall_time() -> float:
    # Looked up at each call so that freezegun moves token expiry along with the client's clock.
    return time.time()


def _now_utc() -> datetime:
    return datetime.now(timezone.utc)


# ---------------------------------------------------------------------------------------------------------------
# Records (what the inspection helpers return; copies, safe to keep)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class RequestRecord:
    """One HTTP request the simulator answered."""

    operation: str  # "token" | "stk_push" | "stk_query" | "control" | "unknown"
    method: str
    path: str
    status: int
    error_code: str | None
    request_body: Any  # the parsed JSON body (or None)
    response_body: Any
    at: float  # monotonic


@dataclass
class StkTransaction:
    """An accepted STK Push and what became of it."""

    checkout_request_id: str
    merchant_request_id: str
    phone: str
    amount: int
    business_shortcode: str
    transaction_type: str
    party_b: str
    account_reference: str
    transaction_desc: str
    callback_url: str
    payload: dict[str, Any]
    scenario: Scenario
    result_code: int
    result_desc: str
    accepted_at: float  # monotonic
    result_at: float  # monotonic: from then on the query answers the final result
    transaction_date: int  # YYYYMMDDHHmmss, Kenya time of the result
    receipt: str | None
    callback_body: dict[str, Any] | None
    queries: int = 0

    def is_final(self, now: float | None = None) -> bool:
        return (_monotonic() if now is None else now) >= self.result_at

    @property
    def result_code_text(self) -> str:
        return str(self.result_code)


@dataclass
class CallbackAttempt:
    number: int
    status: int | None  # HTTP status answered, None when no answer (refused, timeout)
    error: str | None
    response_text: str
    started_at: float  # monotonic
    duration: float


@dataclass
class CallbackDelivery:
    """One stkCallback (a duplicate is a second delivery) and its delivery attempts."""

    checkout_request_id: str
    merchant_request_id: str
    url: str
    body: dict[str, Any]
    copy_number: int  # 1, or 2 for the duplicate of CallbackMode.TWICE
    due_at: float  # monotonic
    attempts: list[CallbackAttempt] = field(default_factory=list)
    # "scheduled" -> "sending" -> "delivered" (2xx) | "refused" (answered 3xx/4xx: not retried) |
    # "failed" (5xx / no answer after every retry) | "cancelled" (simulator stopped first)
    state: str = "scheduled"

    @property
    def done(self) -> bool:
        return self.state in ("delivered", "refused", "failed", "cancelled")

    @property
    def delivered(self) -> bool:
        return self.state == "delivered"

    @property
    def status(self) -> int | None:
        return self.attempts[-1].status if self.attempts else None


class _Refusal(Exception):
    """An error answer in Daraja's shape."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code} {message}")
        self.status = status
        self.code = code
        self.message = message


def _invalid(field_name: str) -> _Refusal:
    return _Refusal(400, "400.002.02", f"Bad Request - Invalid {field_name}")


_INVALID_TOKEN = (401, "404.001.03", "Invalid Access Token")
_INVALID_AUTH = (400, "400.008.01", "Invalid Authentication passed")
_INVALID_GRANT = (400, "400.008.02", "Invalid grant type passed")
_INVALID_PAYLOAD = (400, "400.002.01", "Invalid Request Payload")
_WRONG_CREDENTIALS = (500, "500.001.1001", "Wrong credentials")
_NOT_FOUND = (404, "404.001.01", "Resource not found")


@dataclass
class _Response:
    status: int
    body: Any  # dict -> JSON, bytes -> as is
    content_type: str = "application/json;charset=UTF-8"
    error_code: str | None = None
    close: bool = False


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Safaricom does not follow redirects: a 3xx is an answer (not retried)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


# No proxies (a callback to 127.0.0.1 or a compose service must go straight there), no redirects.
_CALLBACK_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)


def _post_json(url: str, body: bytes, timeout: float) -> tuple[int | None, str | None, str]:
    """POST `body` to `url`: (HTTP status or None, error text or None, response text)."""
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "Daraja-Simulator/1.0"},
    )
    try:
        with _CALLBACK_OPENER.open(request, timeout=timeout) as response:
            return response.status, None, response.read(4096).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        try:
            text = exc.read(4096).decode("utf-8", "replace")
        except Exception:  # noqa: BLE001 - the body of an error answer is informative only
            text = ""
        return exc.code, None, text
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ConnectionRefusedError):
            return None, "connection refused", ""
        return None, str(reason), ""
    except TimeoutError:
        return None, "timed out", ""
    except OSError as exc:  # reset by peer, dropped connection, ...
        return None, f"{type(exc).__name__}: {exc}", ""


def _kenya_stamp(moment: datetime) -> str:
    return moment.astimezone(KENYA_TZ).strftime("%Y%m%d%H%M%S")


# ---------------------------------------------------------------------------------------------------------------
# HTTP plumbing
# ---------------------------------------------------------------------------------------------------------------
class _HttpServer(ThreadingHTTPServer):
    """One daemon thread per connection, tracked here so that stop() joins every one of them.

    (socketserver's own bookkeeping skips daemon threads, and non-daemon ones would keep a process whose
    simulator was never stopped alive while a client holds a keep-alive connection.)
    """

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], simulator: DarajaSimulator) -> None:
        self.simulator = simulator
        self._live: set[socket.socket] = set()
        self._handler_threads: set[threading.Thread] = set()
        self._live_lock = threading.Lock()
        self.connections_opened = 0
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name="daraja-sim-request",
            daemon=True,
        )
        with self._live_lock:
            self._live.add(request)
            self._handler_threads.add(thread)
            self.connections_opened += 1
        thread.start()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._live_lock:
                self._handler_threads.discard(threading.current_thread())

    def shutdown_request(self, request: Any) -> None:
        with self._live_lock:
            self._live.discard(request)
        super().shutdown_request(request)

    def close_live_connections(self) -> None:
        """Wake the threads waiting on idle keep-alive connections so that they end."""
        with self._live_lock:
            live = list(self._live)
        for sock in live:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def join_handler_threads(self) -> None:
        while True:
            with self._live_lock:
                threads = list(self._handler_threads)
            if not threads:
                return
            for thread in threads:
                thread.join()
                with self._live_lock:
                    self._handler_threads.discard(thread)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Daraja's gateway
    server_version = "Daraja-Simulator/1.0"
    sys_version = ""
    timeout = 120  # an idle keep-alive connection is closed after this many seconds
    disable_nagle_algorithm = True
    server: _HttpServer

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        length_text = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or (
            length_text is not None and not length_text.strip().isdigit()
        ):
            self._write(_Response(400, {"errorMessage": "Content-Length required"}, close=True))
            return
        length = int(length_text or 0)
        if length > _MAX_BODY:
            self._write(_Response(413, {"errorMessage": "Request too large"}, close=True))
            return
        raw = self.rfile.read(length) if length else b""
        try:
            response = self.server.simulator._dispatch(method, self.path, self.headers, raw)
        except Exception:  # a bug must answer 500, not hang the client
            _logger.exception("Daraja simulator: error while answering %s %s", method, self.path)
            response = _Response(500, {"errorCode": "500.000.00", "errorMessage": "Internal Server Error"})
        self._write(response)

    def _write(self, response: _Response) -> None:
        if isinstance(response.body, bytes):
            payload = response.body
        else:
            payload = json.dumps(response.body).encode("utf-8")
        head = [
            f"{self.protocol_version} {response.status} {self.responses.get(response.status, ('',))[0]}",
            f"Server: {self.server_version}",
            f"Date: {self.date_time_string()}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(payload)}",
        ]
        if response.close:
            head.append("Connection: close")
            self.close_connection = True
        # One write for headers and body: no Nagle / delayed-ACK stall on keep-alive connections.
        try:
            self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)
        except OSError:
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        _logger.debug("%s - %s", self.address_string(), format % args)


# ---------------------------------------------------------------------------------------------------------------
# The simulator
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Token:
    consumer_key: str
    expires_at: float  # wall clock


class DarajaSimulator:
    """Safaricom's Daraja (OAuth, STK Push, STK Push Query, callbacks) on a local port.

    Use it as a context manager (``with DarajaSimulator(port=0) as sim: ... sim.base_url``) or start()/stop().
    Port 0 picks a free port.  Outcomes are chosen by the phone number (see ``scenarios.MAGIC_NUMBERS``).
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = 0,
        *,
        consumer_key: str = DEFAULT_CONSUMER_KEY,
        consumer_secret: str = DEFAULT_CONSUMER_SECRET,
        shortcode: str = DEFAULT_SHORTCODE,
        passkey: str = SANDBOX_PASSKEY,
        till_number: str | None = DEFAULT_TILL,
        callback_delay: float = DEFAULT_CALLBACK_DELAY,
        prompt_timeout: float = DEFAULT_PROMPT_TIMEOUT,
        late_callback_delay: float | None = None,
        duplicate_callback_gap: float = 0.0,
        callback_retry_delays: Sequence[float] = DEFAULT_CALLBACK_RETRY_DELAYS,
        callback_timeout: float = DEFAULT_CALLBACK_TIMEOUT,
        token_lifetime: int = TOKEN_LIFETIME,
        invalidate_previous_tokens: bool = True,
        reject_mpesa_in_callback_url: bool = False,
        clock: Callable[[], float] | None = None,
        max_records: int = 10_000,
    ) -> None:
        """
        :param callback_delay: seconds from an accepted push to the customer's answer (result known, callback sent)
        :param prompt_timeout: seconds before an unanswered prompt ends with 1037 (254700000002)
        :param late_callback_delay: seconds from the push to the late callback of 254700000007 (default
            3 x callback_delay); the query knows the result after callback_delay already
        :param duplicate_callback_gap: seconds between the two deliveries of 254700000006 (0: they race)
        :param callback_retry_delays: back-off before each retry of a callback answered 5xx or not answered
        :param callback_timeout: seconds to wait for the CallBackURL's answer
        :param token_lifetime: seconds a token lives; sent as the *string* expires_in, like Daraja
        :param invalidate_previous_tokens: issuing a token revokes the previous ones of the same consumer key
        :param reject_mpesa_in_callback_url: refuse CallBackURLs containing "mpesa"/"safaricom" (integrators
            report Daraja's filter on such keywords; it is documented for C2B URL registration)
        :param clock: wall clock (seconds) for token expiry; default time.time, looked up at each call
        """
        if callback_delay < 0 or prompt_timeout < 0 or callback_timeout <= 0:
            raise ValueError("delays must be >= 0 and callback_timeout > 0")
        self.host = host
        self._requested_port = port
        self.consumer_key = consumer_key
        self.consumer_secret = consumer_secret
        self.shortcode = str(shortcode)
        self.passkey = passkey
        self.till_number = str(till_number) if till_number else None
        self.callback_delay = float(callback_delay)
        self.prompt_timeout = float(prompt_timeout)
        self.late_callback_delay = (
            float(late_callback_delay) if late_callback_delay is not None else 3 * self.callback_delay
        )
        self.duplicate_callback_gap = float(duplicate_callback_gap)
        self.callback_retry_delays = tuple(float(d) for d in callback_retry_delays)
        self.callback_timeout = float(callback_timeout)
        self.token_lifetime = int(token_lifetime)
        self.invalidate_previous_tokens = invalidate_previous_tokens
        self.reject_mpesa_in_callback_url = reject_mpesa_in_callback_url
        self._clock = clock or _wall_time

        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._tokens: dict[str, _Token] = {}
        self._token_requests = 0
        self._tokens_issued = 0
        self._transactions: dict[str, StkTransaction] = {}
        self._order: list[str] = []
        self._latest_by_phone: dict[str, str] = {}  # a phone's newest push: the only one that can be pending
        self._deliveries: list[CallbackDelivery] = []
        self._requests: deque[RequestRecord] = deque(maxlen=max_records)
        self._injected: list[tuple[str, frozenset[str]]] = []
        self._delays: list[tuple[float, frozenset[str]]] = []
        self._stop_event = threading.Event()
        self._receipts: set[str] = set()
        self._request_seq = itertools.count(1)
        self._merchant_seq = itertools.count(1)
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._heap_seq = itertools.count()
        self._random = random.Random()

        self._httpd: _HttpServer | None = None
        self._serve_thread: threading.Thread | None = None
        self._scheduler_thread: threading.Thread | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stopping = False

    # -- life cycle --------------------------------------------------------------------------------------------
    def start(self) -> DarajaSimulator:
        if self._httpd is not None:
            raise RuntimeError("the Daraja simulator is already started")
        self._stopping = False
        self._stop_event.clear()
        self._httpd = _HttpServer((self.host, self._requested_port), self)
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="daraja-sim-callback")
        self._scheduler_thread = threading.Thread(
            target=self._run_scheduler, name="daraja-sim-scheduler", daemon=True
        )
        self._scheduler_thread.start()
        self._serve_thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="daraja-sim-http", daemon=True
        )
        self._serve_thread.start()
        _logger.info("Daraja simulator listening on %s", self.base_url)
        return self

    def stop(self) -> None:
        """Stop serving, drop the callbacks not sent yet and join every thread the simulator started."""
        httpd = self._httpd
        if httpd is None:
            return
        self._stop_event.set()  # ends the sleeps of delay_next
        with self._cond:
            self._stopping = True
            for delivery in self._deliveries:
                if delivery.state == "scheduled":
                    delivery.state = "cancelled"
            self._heap.clear()
            self._cond.notify_all()
        httpd.shutdown()
        httpd.server_close()
        httpd.close_live_connections()
        httpd.join_handler_threads()
        if self._serve_thread is not None:
            self._serve_thread.join()
        if self._scheduler_thread is not None:
            self._scheduler_thread.join()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        self._httpd = None
        self._serve_thread = self._scheduler_thread = None
        self._executor = None
        _logger.info("Daraja simulator stopped")

    def __enter__(self) -> DarajaSimulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._httpd is not None

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the Daraja simulator is not started")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """What a DarajaClient uses instead of https://sandbox.safaricom.co.ke."""
        host = self.host
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        return f"http://{host}:{self.port}"

    # -- inspection and control (tests, benchmark, demo) --------------------------------------------------------
    @property
    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return copy.deepcopy(list(self._requests))

    def requests_for(self, operation: str) -> list[RequestRecord]:
        return [r for r in self.requests if r.operation == operation]

    @property
    def pushes(self) -> list[StkTransaction]:
        """The accepted STK pushes, oldest first."""
        with self._lock:
            return [copy.deepcopy(self._transactions[c]) for c in self._order]

    def transaction(self, checkout_request_id: str) -> StkTransaction:
        with self._lock:
            return copy.deepcopy(self._transactions[checkout_request_id])

    @property
    def callbacks(self) -> list[CallbackDelivery]:
        """Every callback delivery (scheduled, in flight or done), in the order they were planned."""
        with self._lock:
            return copy.deepcopy(self._deliveries)

    def callbacks_for(self, checkout_request_id: str) -> list[CallbackDelivery]:
        return [d for d in self.callbacks if d.checkout_request_id == checkout_request_id]

    @property
    def token_requests(self) -> int:
        """OAuth requests received (answered or refused)."""
        with self._lock:
            return self._token_requests

    @property
    def tokens_issued(self) -> int:
        with self._lock:
            return self._tokens_issued

    @property
    def valid_tokens(self) -> int:
        with self._lock:
            now = self._clock()
            return sum(1 for t in self._tokens.values() if t.expires_at > now)

    @property
    def connections_opened(self) -> int:
        """TCP connections accepted so far (keep-alive reuse shows as few connections for many requests)."""
        return self._httpd.connections_opened if self._httpd is not None else 0

    def expire_tokens(self) -> int:
        """Revoke every issued token (Daraja then answers 401 404.001.03); return how many were valid."""
        with self._lock:
            now = self._clock()
            count = sum(1 for t in self._tokens.values() if t.expires_at > now)
            self._tokens.clear()
            return count

    def fail_next(
        self,
        count: int = 1,
        error: str = "spike_arrest",
        operations: Iterable[str] = ("stk_push", "stk_query"),
    ) -> None:
        """Answer the next `count` requests of `operations` with a gateway error, before any other check.

        error: "spike_arrest" (HTTP 500, 500.003.02), "quota" (HTTP 500, 500.003.03), "unavailable" (HTTP 503,
        an HTML page) or "invalid" (HTTP 400, 400.002.02: a request Daraja refuses for good).
        operations: any of "token", "stk_push", "stk_query".
        """
        if error not in INJECTABLE_ERRORS:
            raise ValueError(f"unknown error {error!r}; expected one of {sorted(INJECTABLE_ERRORS)}")
        ops = frozenset(operations)
        if not ops or not ops <= set(OPERATIONS):
            raise ValueError(f"operations must be among {OPERATIONS}")
        with self._lock:
            self._injected.extend([(error, ops)] * int(count))

    def delay_next(
        self, seconds: float, count: int = 1, operations: Iterable[str] = ("stk_push",)
    ) -> None:
        """Process the next `count` requests of `operations` normally, then wait `seconds` before answering.

        With a client read timeout below `seconds` this is the dangerous case of an STK push that Daraja
        processed (the prompt is on the phone) while the client saw no answer.
        """
        ops = frozenset(operations)
        if not ops or not ops <= set(OPERATIONS) or seconds < 0:
            raise ValueError(f"operations must be among {OPERATIONS} and seconds >= 0")
        with self._lock:
            self._delays.extend([(float(seconds), ops)] * int(count))

    def wait_for_callback(
        self, checkout_request_id: str | None = None, *, count: int = 1, timeout: float = 5.0
    ) -> list[CallbackDelivery]:
        """Wait until `count` deliveries (of that CheckoutRequestID, or any) are done: delivered, refused by the
        listener, or given up after the retries.  Returns the done deliveries; raises TimeoutError."""
        deadline = _monotonic() + timeout
        with self._cond:
            while True:
                done = [
                    d
                    for d in self._deliveries
                    if d.done and (checkout_request_id is None or d.checkout_request_id == checkout_request_id)
                ]
                if len(done) >= count:
                    return copy.deepcopy(done)
                remaining = deadline - _monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{len(done)} of {count} callback(s) done for {checkout_request_id or 'any push'} "
                        f"after {timeout} s"
                    )
                self._cond.wait(remaining)

    def reset(self) -> None:
        """Forget pushes, callbacks, tokens, counters and injected errors (the server keeps running)."""
        with self._cond:
            for delivery in self._deliveries:
                if delivery.state == "scheduled":
                    delivery.state = "cancelled"
            self._heap.clear()
            self._tokens.clear()
            self._token_requests = self._tokens_issued = 0
            self._transactions.clear()
            self._order.clear()
            self._latest_by_phone.clear()
            self._deliveries.clear()
            self._requests.clear()
            self._injected.clear()
            self._delays.clear()
            self._cond.notify_all()

    def state(self) -> dict[str, Any]:
        """A JSON-able summary (served at GET /__sim__/state)."""
        now = _monotonic()
        with self._lock:
            return {
                "base_url": self.base_url if self.running else None,
                "token_requests": self._token_requests,
                "tokens_issued": self._tokens_issued,
                "pushes": [
                    {
                        "CheckoutRequestID": t.checkout_request_id,
                        "MerchantRequestID": t.merchant_request_id,
                        "PhoneNumber": t.phone,
                        "Amount": t.amount,
                        "AccountReference": t.account_reference,
                        "final": t.is_final(now),
                        "ResultCode": t.result_code_text if t.is_final(now) else None,
                        "MpesaReceiptNumber": t.receipt if t.is_final(now) else None,
                        "queries": t.queries,
                    }
                    for t in (self._transactions[c] for c in self._order)
                ],
                "callbacks": [
                    {
                        "CheckoutRequestID": d.checkout_request_id,
                        "url": d.url,
                        "copy": d.copy_number,
                        "state": d.state,
                        "attempts": [{"status": a.status, "error": a.error} for a in d.attempts],
                    }
                    for d in self._deliveries
                ],
            }

    # -- request dispatch ---------------------------------------------------------------------------------------
    def _dispatch(self, method: str, target: str, headers: Mapping[str, str], raw: bytes) -> _Response:
        parsed = urllib.parse.urlsplit(target)
        path = parsed.path
        if path.startswith(CONTROL_PREFIX):
            return self._control(method, path[len(CONTROL_PREFIX):], raw)
        routes = {
            ("GET", OAUTH_PATH): "token",
            ("POST", STK_PUSH_PATH): "stk_push",
            ("POST", STK_QUERY_PATH): "stk_query",
        }
        operation = routes.get((method, path.rstrip("/") or "/"), "unknown")
        body: Any = None
        try:
            if operation == "unknown":
                raise _Refusal(*_NOT_FOUND)
            injected = self._take_injected(operation)
            if operation == "token":
                with self._lock:
                    self._token_requests += 1
            if injected is not None:
                status, code, message = INJECTABLE_ERRORS[injected]
                if not code:
                    response = _Response(
                        status, b"<html><body><h1>503 Service Unavailable</h1></body></html>", "text/html"
                    )
                    self._record(operation, method, path, response, None)
                    return response
                raise _Refusal(status, code, message)
            if operation == "token":
                response = self._oauth(parsed.query, headers)
            else:
                self._check_bearer(headers)
                body = self._json_body(raw)
                response = self._stk_push(body) if operation == "stk_push" else self._stk_query(body)
        except _Refusal as refusal:
            response = _Response(
                refusal.status,
                {"requestId": self._request_id(), "errorCode": refusal.code, "errorMessage": refusal.message},
                error_code=refusal.code,
            )
        self._record(operation, method, path, response, body)
        delay = self._take_delay(operation)
        if delay:
            self._stop_event.wait(delay)
        if operation != "unknown":
            _logger.info(
                "%s %s -> %s %s",
                method,
                path,
                response.status,
                response.error_code
                or (response.body.get("CheckoutRequestID", "") if isinstance(response.body, dict) else ""),
            )
        return response

    def _record(self, operation: str, method: str, path: str, response: _Response, body: Any) -> None:
        response_body: Any = response.body
        if operation == "token" and isinstance(response_body, dict) and "access_token" in response_body:
            response_body = {**response_body, "access_token": "***"}
        with self._lock:
            self._requests.append(
                RequestRecord(
                    operation=operation,
                    method=method,
                    path=path,
                    status=response.status,
                    error_code=response.error_code,
                    request_body=copy.deepcopy(body),
                    response_body=response_body
                    if isinstance(response_body, bytes)
                    else copy.deepcopy(response_body),
                    at=_monotonic(),
                )
            )

    def _take_injected(self, operation: str) -> str | None:
        with self._lock:
            for index, (error, ops) in enumerate(self._injected):
                if operation in ops:
                    del self._injected[index]
                    return error
        return None

    def _take_delay(self, operation: str) -> float:
        with self._lock:
            for index, (seconds, ops) in enumerate(self._delays):
                if operation in ops:
                    del self._delays[index]
                    return seconds
        return 0.0

    def _request_id(self) -> str:
        # Daraja's requestId looks like "11259-2330641-1".
        first, second = self._random.randint(1000, 99999), self._random.randint(1_000_000, 99_999_999)
        return f"{first}-{second}-{next(self._request_seq)}"

    @staticmethod
    def _json_body(raw: bytes) -> dict[str, Any]:
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise _Refusal(*_INVALID_PAYLOAD) from None
        if not isinstance(body, dict):
            raise _Refusal(*_INVALID_PAYLOAD)
        return body

    # -- OAuth --------------------------------------------------------------------------------------------------
    def _oauth(self, query: str, headers: Mapping[str, str]) -> _Response:
        grant = urllib.parse.parse_qs(query).get("grant_type", [None])[0]
        if grant != "client_credentials":
            raise _Refusal(*_INVALID_GRANT)
        scheme, _, encoded = (headers.get("Authorization") or "").strip().partition(" ")
        if scheme.lower() != "basic":
            raise _Refusal(*_INVALID_AUTH)
        try:
            key, sep, secret = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise _Refusal(*_INVALID_AUTH) from None
        if not (
            sep
            and hmac.compare_digest(key.encode(), self.consumer_key.encode())
            and hmac.compare_digest(secret.encode(), self.consumer_secret.encode())
        ):
            raise _Refusal(*_INVALID_AUTH)
        value = "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(28))
        with self._lock:
            if self.invalidate_previous_tokens:
                for old in [v for v, t in self._tokens.items() if t.consumer_key == key]:
                    del self._tokens[old]
            self._tokens[value] = _Token(key, self._clock() + self.token_lifetime)
            self._tokens_issued += 1
        return _Response(200, {"access_token": value, "expires_in": str(self.token_lifetime)})

    def _check_bearer(self, headers: Mapping[str, str]) -> None:
        # Missing header, another scheme, unknown, revoked or expired token: all 401 404.001.03.
        scheme, _, value = (headers.get("Authorization") or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise _Refusal(*_INVALID_TOKEN)
        with self._lock:
            token = self._tokens.get(value.strip())
            if token is None or token.expires_at <= self._clock():
                raise _Refusal(*_INVALID_TOKEN)

    # -- field checks -------------------------------------------------------------------------------------------
    def _check_shortcode(self, body: Mapping[str, Any]) -> str:
        value = body.get("BusinessShortCode")
        text = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
        if not text.isdigit() or text != self.shortcode:
            raise _invalid("BusinessShortCode")
        return text

    @staticmethod
    def _check_timestamp(body: Mapping[str, Any]) -> str:
        value = body.get("Timestamp")
        text = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
        if not re.fullmatch(r"\d{14}", text):
            raise _invalid("Timestamp")
        try:
            datetime.strptime(text, "%Y%m%d%H%M%S")
        except ValueError:
            raise _invalid("Timestamp") from None
        return text

    def _check_password(self, body: Mapping[str, Any], shortcode: str, timestamp: str) -> None:
        password = body.get("Password")
        if not isinstance(password, str) or not password.strip():
            raise _invalid("Password")
        expected = base64.b64encode(f"{shortcode}{self.passkey}{timestamp}".encode()).decode("ascii")
        if not hmac.compare_digest(password.strip().encode(), expected.encode()):
            raise _Refusal(*_WRONG_CREDENTIALS)

    @staticmethod
    def _check_msisdn(body: Mapping[str, Any], name: str) -> str:
        value = body.get(name)
        text = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
        if not re.fullmatch(r"254[17]\d{8}", text):
            raise _invalid(name)
        return text

    @staticmethod
    def _check_amount(body: Mapping[str, Any]) -> int:
        value = body.get("Amount")
        amount: int | None = None
        if isinstance(value, bool):
            amount = None
        elif isinstance(value, int):
            amount = value
        elif (isinstance(value, float) and value.is_integer()) or (
            isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value)
        ):
            amount = int(value)
        if amount is None or amount < 1:
            raise _invalid("Amount")
        return amount

    def _check_callback_url(self, body: Mapping[str, Any]) -> str:
        value = body.get("CallBackURL")
        if not isinstance(value, str) or value != value.strip() or any(c.isspace() for c in value):
            raise _invalid("CallBackURL")
        parts = urllib.parse.urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _invalid("CallBackURL")
        if self.reject_mpesa_in_callback_url and re.search(r"m-?pesa|safaricom", value, re.IGNORECASE):
            raise _invalid("CallBackURL")
        return value

    @staticmethod
    def _check_text(body: Mapping[str, Any], name: str, max_length: int) -> str:
        value = body.get(name)
        if not isinstance(value, str) or not value.strip() or len(value) > max_length:
            raise _invalid(name)
        return value

    # -- STK Push -----------------------------------------------------------------------------------------------
    def _stk_push(self, body: dict[str, Any]) -> _Response:
        shortcode = self._check_shortcode(body)
        timestamp = self._check_timestamp(body)
        password = body.get("Password")
        if not isinstance(password, str) or not password.strip():
            raise _invalid("Password")
        transaction_type = body.get("TransactionType")
        if transaction_type not in (PAYBILL, TILL):
            raise _invalid("TransactionType")
        amount = self._check_amount(body)
        self._check_msisdn(body, "PartyA")
        party_b_value = body.get("PartyB")
        party_b = (
            str(party_b_value).strip()
            if isinstance(party_b_value, (str, int)) and not isinstance(party_b_value, bool)
            else ""
        )
        expected_party_b = shortcode if transaction_type == PAYBILL else self.till_number
        if not party_b.isdigit() or party_b != expected_party_b:
            raise _invalid("PartyB")
        phone = self._check_msisdn(body, "PhoneNumber")
        callback_url = self._check_callback_url(body)
        account_reference = self._check_text(body, "AccountReference", 12)
        transaction_desc = self._check_text(body, "TransactionDesc", 13)
        self._check_password(body, shortcode, timestamp)

        scenario = scenario_for(phone, amount)
        if scenario.refuses_push:
            raise _Refusal(500, "500.001.1001", LOCKED_SUBSCRIBER_MESSAGE)

        now = _monotonic()
        wall = _now_utc()
        with self._lock:
            if self._stopping:
                raise _Refusal(503, "503.001.01", "Service Unavailable")
            latest = self._transactions.get(self._latest_by_phone.get(phone, ""))
            if latest is not None and not latest.is_final(now):
                raise _Refusal(500, "500.001.1001", LOCKED_SUBSCRIBER_MESSAGE)
            if scenario.timing is ResultTiming.IMMEDIATE:
                wait = 0.0
            elif scenario.timing is ResultTiming.PROMPT_TIMEOUT:
                wait = self.prompt_timeout
            else:
                wait = self.callback_delay
            result_moment = wall + timedelta(seconds=wait)
            checkout_id = self._checkout_request_id(wall, phone)
            merchant_id = (
                f"{self._random.randint(1000, 99999)}-{self._random.randint(10_000_000, 99_999_999)}-"
                f"{next(self._merchant_seq)}"
            )
            receipt = self._receipt(result_moment) if scenario.is_success else None
            transaction_date = int(_kenya_stamp(result_moment))
            tx = StkTransaction(
                checkout_request_id=checkout_id,
                merchant_request_id=merchant_id,
                phone=phone,
                amount=amount,
                business_shortcode=shortcode,
                transaction_type=str(transaction_type),
                party_b=party_b,
                account_reference=account_reference,
                transaction_desc=transaction_desc,
                callback_url=callback_url,
                payload=copy.deepcopy(body),
                scenario=scenario,
                result_code=int(scenario.result_code or 0),
                result_desc=scenario.result_desc,
                accepted_at=now,
                result_at=now + wait,
                transaction_date=transaction_date,
                receipt=receipt,
                callback_body=None,
            )
            tx.callback_body = self._callback_body(tx)
            self._transactions[checkout_id] = tx
            self._order.append(checkout_id)
            self._latest_by_phone[phone] = checkout_id
            deliveries = self._plan_callbacks(tx, now + wait)
            self._cond.notify_all()

        for delivery in deliveries:
            if scenario.callback is CallbackMode.BEFORE_RESPONSE:
                # Delivered (and answered) by this very request thread before the push's answer is written.
                with self._lock:
                    delivery.state = "sending"
                self._attempt(delivery, 1)
            else:
                self._schedule(delivery.due_at, lambda d=delivery: self._start(d))
        return _Response(
            200,
            {
                "MerchantRequestID": merchant_id,
                "CheckoutRequestID": checkout_id,
                "ResponseCode": "0",
                "ResponseDescription": PUSH_ACCEPTED_DESC,
                "CustomerMessage": PUSH_ACCEPTED_DESC,
            },
        )

    def _checkout_request_id(self, wall: datetime, phone: str) -> str:
        # Like Daraja's "ws_CO_23052022122137653708374149": ddmmyyyyHHMMSS in Kenya time, 3 digits of
        # milliseconds, then the phone's last 9 digits.  A collision (same phone, same millisecond) bumps
        # the milliseconds.
        local = wall.astimezone(KENYA_TZ)
        millis = local.microsecond // 1000
        while True:
            candidate = f"ws_CO_{local.strftime('%d%m%Y%H%M%S')}{millis % 1000:03d}{phone[-9:]}"
            if candidate not in self._transactions:
                return candidate
            millis += 1

    def _receipt(self, moment: datetime) -> str:
        # Like "NLJ7RT61SV": year letter (N = 2019), month letter (A = January), day (1-9 then A = 10), 7 more.
        local = moment.astimezone(KENYA_TZ)
        year_letter = chr(ord("A") + (local.year - 2006) % 26)
        prefix = year_letter + chr(ord("A") + local.month - 1) + _DAY_CHARS[local.day - 1]
        while True:
            candidate = prefix + "".join(self._random.choice(_RECEIPT_ALPHABET) for _ in range(7))
            if candidate not in self._receipts:
                self._receipts.add(candidate)
                return candidate

    @staticmethod
    def _callback_body(tx: StkTransaction) -> dict[str, Any]:
        callback: dict[str, Any] = {
            "MerchantRequestID": tx.merchant_request_id,
            "CheckoutRequestID": tx.checkout_request_id,
            "ResultCode": tx.result_code,
            "ResultDesc": tx.result_desc,
        }
        if tx.result_code == 0:
            callback["CallbackMetadata"] = {
                "Item": [
                    {"Name": "Amount", "Value": float(tx.amount)},
                    {"Name": "MpesaReceiptNumber", "Value": tx.receipt},
                    {"Name": "Balance"},
                    {"Name": "TransactionDate", "Value": tx.transaction_date},
                    {"Name": "PhoneNumber", "Value": int(tx.phone)},
                ]
            }
        return {"Body": {"stkCallback": callback}}

    def _plan_callbacks(self, tx: StkTransaction, result_at: float) -> list[CallbackDelivery]:
        mode = tx.scenario.callback
        if mode is CallbackMode.NEVER:
            return []
        due = [result_at]
        if mode is CallbackMode.LATE:
            due = [max(result_at, tx.accepted_at + self.late_callback_delay)]
        elif mode is CallbackMode.TWICE:
            due = [result_at, result_at + self.duplicate_callback_gap]
        deliveries = []
        for number, at in enumerate(due, start=1):
            delivery = CallbackDelivery(
                checkout_request_id=tx.checkout_request_id,
                merchant_request_id=tx.merchant_request_id,
                url=tx.callback_url,
                body=copy.deepcopy(tx.callback_body or {}),
                copy_number=number,
                due_at=at,
            )
            self._deliveries.append(delivery)
            deliveries.append(delivery)
        return deliveries

    # -- STK Push Query -----------------------------------------------------------------------------------------
    def _stk_query(self, body: dict[str, Any]) -> _Response:
        shortcode = self._check_shortcode(body)
        timestamp = self._check_timestamp(body)
        checkout_id = body.get("CheckoutRequestID")
        if not isinstance(checkout_id, str) or not checkout_id.strip():
            raise _invalid("CheckoutRequestID")
        self._check_password(body, shortcode, timestamp)
        with self._lock:
            tx = self._transactions.get(checkout_id.strip())
            if tx is None or tx.business_shortcode != shortcode:
                raise _invalid("CheckoutRequestID")
            tx.queries += 1
            if not tx.is_final():
                raise _Refusal(500, "500.001.1001", BEING_PROCESSED_MESSAGE)
            return _Response(
                200,
                {
                    "ResponseCode": "0",
                    "ResponseDescription": QUERY_ACCEPTED_DESC,
                    "MerchantRequestID": tx.merchant_request_id,
                    "CheckoutRequestID": tx.checkout_request_id,
                    "ResultCode": tx.result_code_text,
                    "ResultDesc": tx.result_desc,
                },
            )

    # -- callbacks: scheduling and delivery ---------------------------------------------------------------------
    def _schedule(self, at: float, action: Callable[[], None]) -> None:
        with self._cond:
            if self._stopping:
                return
            heapq.heappush(self._heap, (at, next(self._heap_seq), action))
            self._cond.notify_all()

    def _run_scheduler(self) -> None:
        with self._cond:
            while not self._stopping:
                now = _monotonic()
                if self._heap and self._heap[0][0] <= now:
                    _, _, action = heapq.heappop(self._heap)
                    assert self._executor is not None
                    self._executor.submit(action)
                    continue
                self._cond.wait(self._heap[0][0] - now if self._heap else None)

    def _start(self, delivery: CallbackDelivery) -> None:
        with self._lock:
            if self._stopping or delivery.state != "scheduled":
                return
            delivery.state = "sending"
        self._attempt(delivery, 1)

    def _attempt(self, delivery: CallbackDelivery, number: int) -> None:
        body = json.dumps(delivery.body).encode("utf-8")
        started = _monotonic()
        status, error, text = _post_json(delivery.url, body, self.callback_timeout)
        duration = _monotonic() - started
        retry_in: float | None = None
        with self._cond:
            delivery.attempts.append(CallbackAttempt(number, status, error, text, started, duration))
            if status is not None and status < 300:
                delivery.state = "delivered"
            elif status is not None and status < 500:
                delivery.state = "refused"  # 3xx/4xx: Safaricom does not retry
            elif number <= len(self.callback_retry_delays) and not self._stopping:
                retry_in = self.callback_retry_delays[number - 1]
                delivery.state = "sending"
            else:
                delivery.state = "failed"
            self._cond.notify_all()
        _logger.info(
            "callback %s (copy %s, attempt %s) to %s -> %s%s",
            delivery.checkout_request_id,
            delivery.copy_number,
            number,
            delivery.url,
            status if status is not None else error,
            f", retry in {retry_in} s" if retry_in is not None else "",
        )
        if retry_in is not None:
            self._schedule(_monotonic() + retry_in, lambda: self._attempt(delivery, number + 1))
            with self._lock:
                if self._stopping and delivery.state == "sending":
                    delivery.state = "cancelled"
                    self._cond.notify_all()

    # -- control API (HTTP) -------------------------------------------------------------------------------------
    def _control(self, method: str, action: str, raw: bytes) -> _Response:
        action = action.strip("/")
        if method == "GET" and action == "health":
            return _Response(200, {"status": "ok"})
        if method == "GET" and action == "state":
            return _Response(200, self.state())
        if method == "POST" and action == "expire-tokens":
            return _Response(200, {"expired": self.expire_tokens()})
        if method == "POST" and action == "reset":
            self.reset()
            return _Response(200, {"reset": True})
        if method == "POST" and action == "delay-next":
            try:
                options = json.loads(raw.decode("utf-8") or "{}")
                self.delay_next(
                    float(options.get("seconds", 1.0)),
                    int(options.get("count", 1)),
                    options.get("operations", ("stk_push",)),
                )
            except (ValueError, TypeError, AttributeError) as exc:
                return _Response(400, {"error": str(exc)})
            return _Response(200, {"queued": True})
        if method == "POST" and action == "fail-next":
            try:
                options = json.loads(raw.decode("utf-8") or "{}")
                self.fail_next(
                    int(options.get("count", 1)),
                    str(options.get("error", "spike_arrest")),
                    options.get("operations", ("stk_push", "stk_query")),
                )
            except (ValueError, TypeError, AttributeError) as exc:
                return _Response(400, {"error": str(exc)})
            return _Response(200, {"queued": True})
        return _Response(404, {"error": f"unknown simulator control {method} {action}"})
