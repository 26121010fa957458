"""A local HTTP server that plays Safaricom's Daraja API with its exact wire format: the façade.

``DarajaSimulator`` owns one shared state (``state.SimState``) and hands it to one module per API: ``oauth``,
``stk`` (M-Pesa Express), ``c2b`` (register URL, simulate, validation and confirmation), ``pull`` (Pull
Transactions), ``initiator`` (Reversal, Transaction Status) and ``b2b`` (B2B Express Checkout).  ``httpd`` is
the HTTP plumbing and ``delivery`` the POSTs to the merchant's URLs.  This module routes requests, keeps the
request log, injects gateway errors and delays, and serves the control API; the package docstring and README.md
list every path, magic value and helper.

Served at Daraja's paths (see each module) and, for tools that cannot call the Python API:

- ``GET  /__sim__/health``, ``GET /__sim__/state``, ``POST /__sim__/expire-tokens``, ``POST /__sim__/reset``,
  ``POST /__sim__/fail-next`` with ``{"count": 1, "error": "spike_arrest", "operations": ["stk_push"]}``,
  ``POST /__sim__/delay-next`` with ``{"seconds": 5, "count": 1, "operations": ["stk_push"]}``,
  ``GET  /__sim__/certificate`` (the PEM certificate that encrypts SecurityCredentials),
  ``POST /__sim__/c2b-pay`` with ``{"amount": 100, "msisdn": "2547...", "bill_ref": "S00042"}``,
  ``POST /__sim__/age`` with ``{"receipt": "...", "hours": 49}``,
  ``POST /__sim__/initiator-next`` with ``{"outcome": "no_result" | "queue_timeout", "count": 1}``,
  ``GET  /__sim__/statement?from=2026-12-07&to=2026-12-07`` (the paybill's organisation statement, CSV; see
  ``statement``), ``POST /__sim__/sweep`` with ``{"amount": 5000}`` (a settlement to the bank),
  ``GET  /__sim__/c2b/registrations?shortcode=174379`` (whether the C2B URLs are known).

With ``state_file`` the state survives a restart (``persist``): registrations, certificate, receipts, balances.

The OAuth, STK and C2B parts use the standard library only; the initiator APIs need ``cryptography`` (imported
when first used, see ``keys``).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any

from . import persist
from .b2b import B2B_CHECKOUT_PATH, B2B_MAGIC_TILLS, B2BApi
from .c2b import (
    C2B_MAGIC_NUMBERS,
    C2B_MAX_AMOUNT,
    C2B_REGISTER_V1_PATH,
    C2B_REGISTER_V2_PATH,
    C2B_SIMULATE_PATH,
    MSISDN_FORMATS,
    C2BApi,
)
from .delivery import Deliverer
from .httpd import _HttpServer
from .initiator import (
    MAGIC_REMARKS,
    OUTCOMES,
    REVERSAL_PATH,
    TRANSACTION_STATUS_PATH,
    InitiatorApi,
)
from .keys import encrypt_credential, identity_pems, load_identity
from .oauth import OAUTH_PATH, OAuthApi
from .pull import PULL_OUTCOMES, PULL_QUERY_PATH, PULL_REGISTER_PATH, PullApi
from .qr import QR_PATH, QrApi
from .state import (
    _INVALID_PAYLOAD,
    _NOT_FOUND,
    DEFAULT_CALLBACK_DELAY,
    DEFAULT_CALLBACK_RETRY_DELAYS,
    DEFAULT_CALLBACK_TIMEOUT,
    DEFAULT_CONSUMER_KEY,
    DEFAULT_CONSUMER_SECRET,
    DEFAULT_HOST,
    DEFAULT_INITIATOR_NAME,
    DEFAULT_INITIATOR_PASSWORD,
    DEFAULT_ORGANIZATION_NAME,
    DEFAULT_PORT,
    DEFAULT_PROMPT_TIMEOUT,
    DEFAULT_PULL_PAGE_SIZE,
    DEFAULT_SHORTCODE,
    DEFAULT_TILL,
    DEFAULT_VALIDATION_TIMEOUT,
    KENYA_TZ,
    PAYBILL,
    SANDBOX_PASSKEY,
    STK_CALLBACK,
    TILL,
    TOKEN_LIFETIME,
    CallbackAttempt,
    CallbackDelivery,
    Payment,
    RequestRecord,
    Settings,
    SimState,
    StkTransaction,
    _monotonic,
    _now_utc,
    _Refusal,
    _Response,
    _wall_time,
)
from .statement import (
    ACCOUNT_TYPE,
    DETAILS,
    PAYBILL_TARIFF,
    REASON_TYPES,
    STATEMENT_HEADER,
    parse_bound,
    paybill_charge,
    record_sweep,
    statement_csv,
)
from .stk import (
    BEING_PROCESSED_MESSAGE,
    PUSH_ACCEPTED_DESC,
    QUERY_ACCEPTED_DESC,
    STK_PUSH_PATH,
    STK_QUERY_PATH,
    StkApi,
)

__all__ = [
    "ACCOUNT_TYPE",
    "B2B_CHECKOUT_PATH",
    "B2B_MAGIC_TILLS",
    "BEING_PROCESSED_MESSAGE",
    "C2B_MAGIC_NUMBERS",
    "C2B_REGISTER_V1_PATH",
    "C2B_REGISTER_V2_PATH",
    "C2B_SIMULATE_PATH",
    "CONTROL_PREFIX",
    "DEFAULT_CALLBACK_DELAY",
    "DEFAULT_CALLBACK_RETRY_DELAYS",
    "DEFAULT_CALLBACK_TIMEOUT",
    "DEFAULT_CONSUMER_KEY",
    "DEFAULT_CONSUMER_SECRET",
    "DEFAULT_HOST",
    "DEFAULT_INITIATOR_NAME",
    "DEFAULT_INITIATOR_PASSWORD",
    "DEFAULT_ORGANIZATION_NAME",
    "DEFAULT_PORT",
    "DEFAULT_PROMPT_TIMEOUT",
    "DEFAULT_PULL_PAGE_SIZE",
    "DEFAULT_SHORTCODE",
    "DEFAULT_TILL",
    "DEFAULT_VALIDATION_TIMEOUT",
    "DETAILS",
    "INJECTABLE_ERRORS",
    "KENYA_TZ",
    "MAGIC_REMARKS",
    "OAUTH_PATH",
    "OPERATIONS",
    "PAYBILL",
    "PAYBILL_TARIFF",
    "PULL_QUERY_PATH",
    "PULL_REGISTER_PATH",
    "PUSH_ACCEPTED_DESC",
    "QR_PATH",
    "QUERY_ACCEPTED_DESC",
    "REASON_TYPES",
    "REVERSAL_PATH",
    "SANDBOX_PASSKEY",
    "STATEMENT_HEADER",
    "STK_PUSH_PATH",
    "STK_QUERY_PATH",
    "TILL",
    "TOKEN_LIFETIME",
    "TRANSACTION_STATUS_PATH",
    "CallbackAttempt",
    "CallbackDelivery",
    "DarajaSimulator",
    "Payment",
    "RequestRecord",
    "StateFileError",
    "StkTransaction",
    "paybill_charge",
]

StateFileError = persist.StateFileError

_logger = logging.getLogger(__name__)

CONTROL_PREFIX = "/__sim__/"

# The injectable gateway errors (fail_next): HTTP status, errorCode, errorMessage.
INJECTABLE_ERRORS: dict[str, tuple[int, str, str]] = {
    "spike_arrest": (500, "500.003.02", "Spike arrest violation"),
    "quota": (500, "500.003.03", "Quota violation"),
    "unavailable": (503, "", "Service Unavailable"),  # an HTML page, as a load balancer answers
    "invalid": (400, "400.002.02", "Bad Request - Invalid CheckoutRequestID"),  # refused for good
}
OPERATIONS = (
    "token", "stk_push", "stk_query", "reversal", "transaction_status", "c2b_register", "c2b_simulate",
    "pull_register", "pull_query", "b2b_checkout", "qr_generate",
)

# (method, path) -> (operation, handler of the parsed JSON body)
_Routes = dict[tuple[str, str], tuple[str, Callable[[dict[str, Any]], _Response]]]


class _Setting:
    """A DarajaSimulator attribute that lives in its Settings (so that every API module reads the same value)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else getattr(obj.settings, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(obj.settings, self.name, value)


class DarajaSimulator:
    """Safaricom's Daraja (OAuth, STK Push, STK Push Query, callbacks) on a local port.

    Use it as a context manager (``with DarajaSimulator(port=0) as sim: ... sim.base_url``) or start()/stop().
    Port 0 picks a free port.  Outcomes are chosen by the phone number (see ``scenarios.MAGIC_NUMBERS``).
    """

    consumer_key = _Setting()
    consumer_secret = _Setting()
    shortcode = _Setting()
    passkey = _Setting()
    till_number = _Setting()
    callback_delay = _Setting()
    prompt_timeout = _Setting()
    late_callback_delay = _Setting()
    duplicate_callback_gap = _Setting()
    callback_retry_delays = _Setting()
    callback_timeout = _Setting()
    token_lifetime = _Setting()
    invalidate_previous_tokens = _Setting()
    reject_mpesa_in_callback_url = _Setting()
    initiator_name = _Setting()
    initiator_password = _Setting()
    organization_name = _Setting()
    result_delay = _Setting()
    c2b_versions = _Setting()
    c2b_register_once = _Setting()
    c2b_external_validation = _Setting()
    c2b_validation_timeout = _Setting()
    c2b_delay = _Setting()
    c2b_msisdn_format = _Setting()
    pull_page_size = _Setting()

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
        initiator_name: str = DEFAULT_INITIATOR_NAME,
        initiator_password: str = DEFAULT_INITIATOR_PASSWORD,
        organization_name: str = DEFAULT_ORGANIZATION_NAME,
        result_delay: float | None = None,
        c2b_versions: Sequence[str] = ("v1", "v2"),
        c2b_register_once: bool = False,
        c2b_external_validation: bool = False,
        c2b_validation_timeout: float = DEFAULT_VALIDATION_TIMEOUT,
        c2b_delay: float = 0.0,
        c2b_msisdn_format: str = "hash",
        pull_page_size: int = DEFAULT_PULL_PAGE_SIZE,
        clock: Callable[[], float] | None = None,
        max_records: int = 10_000,
        state_file: str | None = None,
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
        :param initiator_name: the Initiator the Reversal and Transaction Status APIs accept (Safaricom's sandbox
            initiator "testapi")
        :param initiator_password: the password its SecurityCredential must carry, encrypted with
            ``certificate_pem``
        :param organization_name: the shortcode's name in results ("174379 - Simulated Business")
        :param result_delay: seconds from an accepted initiator request to its Result (default callback_delay)
        :param c2b_versions: the C2B API product(s) of the app: registerurl of another version answers 401.003.01
        :param c2b_register_once: production-like: a second registration of a shortcode answers
            "500.003.1001 Urls are already registered"
        :param c2b_external_validation: Safaricom switched External Validation on: the ValidationURL is asked
        :param c2b_validation_timeout: seconds Daraja waits for the ValidationURL (about 8) before ResponseType
            decides
        :param c2b_delay: seconds from a C2B payment to its validation / confirmation
        :param c2b_msisdn_format: the MSISDN of C2B bodies: "hash" (SHA-256 hex, Daraja's current form),
            "masked" ("254708***149") or "plain"
        :param pull_page_size: rows per Pull Transactions page
        :param clock: wall clock (seconds) for token expiry; default time.time, looked up at each call
        :param state_file: keep the state across restarts in this JSON file (``persist``): loaded at start
            (StateFileError when it is not a state file), written when it changed and at stop
        """
        if callback_delay < 0 or prompt_timeout < 0 or callback_timeout <= 0:
            raise ValueError("delays must be >= 0 and callback_timeout > 0")
        if not set(c2b_versions) <= {"v1", "v2"} or c2b_msisdn_format not in MSISDN_FORMATS or pull_page_size < 1:
            raise ValueError("c2b_versions must be among v1, v2; c2b_msisdn_format among "
                             f"{MSISDN_FORMATS}; pull_page_size >= 1")
        self.host = host
        self._requested_port = port
        self.settings = Settings(
            consumer_key=consumer_key,
            consumer_secret=consumer_secret,
            shortcode=str(shortcode),
            passkey=passkey,
            till_number=str(till_number) if till_number else None,
            callback_delay=float(callback_delay),
            prompt_timeout=float(prompt_timeout),
            late_callback_delay=(
                float(late_callback_delay) if late_callback_delay is not None else 3 * float(callback_delay)
            ),
            duplicate_callback_gap=float(duplicate_callback_gap),
            callback_retry_delays=tuple(float(d) for d in callback_retry_delays),
            callback_timeout=float(callback_timeout),
            token_lifetime=int(token_lifetime),
            invalidate_previous_tokens=invalidate_previous_tokens,
            reject_mpesa_in_callback_url=reject_mpesa_in_callback_url,
            initiator_name=initiator_name,
            initiator_password=initiator_password,
            organization_name=organization_name,
            result_delay=float(result_delay) if result_delay is not None else float(callback_delay),
            c2b_versions=tuple(c2b_versions),
            c2b_register_once=c2b_register_once,
            c2b_external_validation=c2b_external_validation,
            c2b_validation_timeout=float(c2b_validation_timeout),
            c2b_delay=float(c2b_delay),
            c2b_msisdn_format=c2b_msisdn_format,
            pull_page_size=int(pull_page_size),
        )
        self._state = SimState(self.settings, clock=clock or _wall_time, max_records=max_records)
        self._deliverer = Deliverer(self._state)
        self._oauth = OAuthApi(self._state)
        self._stk = StkApi(self._state, self._deliverer)
        self._initiator = InitiatorApi(self._state, self._deliverer)
        self._c2b = C2BApi(self._state, self._deliverer)
        self._pull = PullApi(self._state)
        self._b2b = B2BApi(self._state, self._deliverer)
        self._qr = QrApi(self._state)
        self._routes: _Routes = {
            ("POST", STK_PUSH_PATH): ("stk_push", self._stk.push),
            ("POST", STK_QUERY_PATH): ("stk_query", self._stk.query),
            ("POST", REVERSAL_PATH): ("reversal", self._initiator.reversal),
            ("POST", TRANSACTION_STATUS_PATH): ("transaction_status", self._initiator.status),
            ("POST", C2B_REGISTER_V1_PATH): ("c2b_register", self._c2b.register_v1),
            ("POST", C2B_REGISTER_V2_PATH): ("c2b_register", self._c2b.register_v2),
            ("POST", C2B_SIMULATE_PATH): ("c2b_simulate", self._c2b.simulate),
            ("POST", PULL_REGISTER_PATH): ("pull_register", self._pull.register),
            ("POST", PULL_QUERY_PATH): ("pull_query", self._pull.query),
            ("POST", B2B_CHECKOUT_PATH): ("b2b_checkout", self._b2b.checkout),
            ("POST", QR_PATH): ("qr_generate", self._qr.generate),
        }
        self._httpd: _HttpServer | None = None
        self._serve_thread: threading.Thread | None = None
        self._scheduler_thread: threading.Thread | None = None
        self.state_file = state_file
        self._saver_thread: threading.Thread | None = None
        self._saved_text: str | None = None
        self._save_lock = threading.Lock()

    # -- life cycle --------------------------------------------------------------------------------------------
    def start(self) -> DarajaSimulator:
        if self._httpd is not None:
            raise RuntimeError("the Daraja simulator is already started")
        state = self._state
        if self.state_file:
            self._load_state_file(self.state_file)
        state.stopping = False
        state.stop_event.clear()
        self._httpd = _HttpServer((self.host, self._requested_port), self)
        self._deliverer.open()
        self._scheduler_thread = threading.Thread(
            target=self._deliverer.run, name="daraja-sim-scheduler", daemon=True
        )
        self._scheduler_thread.start()
        self._serve_thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="daraja-sim-http", daemon=True
        )
        self._serve_thread.start()
        if self.state_file:
            self._saver_thread = threading.Thread(target=self._save_loop, name="daraja-sim-saver", daemon=True)
            self._saver_thread.start()
        _logger.info("Daraja simulator listening on %s", self.base_url)
        return self

    def stop(self) -> None:
        """Stop serving, drop the callbacks not sent yet and join every thread the simulator started."""
        httpd = self._httpd
        if httpd is None:
            return
        state = self._state
        state.stop_event.set()  # ends the sleeps of delay_next
        with state.cond:
            state.stopping = True
            self._cancel_scheduled()
            state.cond.notify_all()
        httpd.shutdown()
        httpd.server_close()
        httpd.close_live_connections()
        httpd.join_handler_threads()
        if self._serve_thread is not None:
            self._serve_thread.join()
        if self._scheduler_thread is not None:
            self._scheduler_thread.join()
        if self._saver_thread is not None:
            self._saver_thread.join()
        self._deliverer.close()
        self._httpd = None
        self._serve_thread = self._scheduler_thread = self._saver_thread = None
        if self.state_file:
            self.save_state()
        _logger.info("Daraja simulator stopped")

    # -- the state file (persist.py) ----------------------------------------------------------------------------
    def _load_state_file(self, path: str) -> None:
        data = persist.read(path)
        if data is None:
            _logger.info("No simulator state file at %s yet: a fresh start, saved there from now on", path)
            return
        persist.check(self._state, data, path)
        pems = persist.restore(self._state, data)
        if pems is not None:
            try:
                self._initiator._identity = load_identity(*pems)
            except (ValueError, TypeError) as exc:
                raise StateFileError(f"the certificate in the simulator state file {path} is unusable: {exc}") from None
        self._saved_text = None
        _logger.info("Simulator state loaded from %s: %d receipts, C2B URLs of %s", path, len(self._state.ledger),
                     ", ".join(sorted(self._state.c2b_urls)) or "no shortcode")

    def _save_loop(self) -> None:
        while not self._state.stop_event.wait(persist.SAVE_INTERVAL):
            try:
                self.save_state()
            except (OSError, TypeError, ValueError) as exc:  # a full disk must not stop the simulator: say it
                _logger.warning("Cannot write the simulator state file %s: %s", self.state_file, exc)

    def save_state(self) -> bool:
        """Write the state file now when the state changed since the last write; True when written."""
        if not self.state_file:
            raise RuntimeError("this simulator has no state_file")
        identity = self._initiator._identity
        data = persist.snapshot(self._state, identity_pems(identity) if identity is not None else None)
        text = json.dumps(data, indent=1, sort_keys=True)
        with self._save_lock:
            if text == self._saved_text:
                return False
            persist.write(self.state_file, text)
            self._saved_text = text
            return True

    def _cancel_scheduled(self) -> None:
        for delivery in self._state.deliveries:
            if delivery.state == "scheduled":
                delivery.state = "cancelled"
        self._deliverer.clear()

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
        with self._state.lock:
            return copy.deepcopy(list(self._state.requests))

    def requests_for(self, operation: str) -> list[RequestRecord]:
        return [r for r in self.requests if r.operation == operation]

    @property
    def pushes(self) -> list[StkTransaction]:
        """The accepted STK pushes, oldest first."""
        with self._state.lock:
            return [copy.deepcopy(self._state.transactions[c]) for c in self._state.order]

    def transaction(self, checkout_request_id: str) -> StkTransaction:
        with self._state.lock:
            return copy.deepcopy(self._state.transactions[checkout_request_id])

    @property
    def callbacks(self) -> list[CallbackDelivery]:
        """Every stkCallback delivery (scheduled, in flight or done), in the order they were planned."""
        return self.deliveries(STK_CALLBACK)

    def callbacks_for(self, checkout_request_id: str) -> list[CallbackDelivery]:
        return [d for d in self.callbacks if d.checkout_request_id == checkout_request_id]

    def deliveries(self, kind: str | None = None, reference: str | None = None) -> list[CallbackDelivery]:
        """Every POST to a merchant URL of ``kind`` (state.DELIVERY_KINDS; None: all), for one ``reference``
        (a TransID, a ConversationID) or all, in the order they were planned; copies."""
        with self._state.lock:
            return [
                copy.deepcopy(d)
                for d in self._state.deliveries
                if (kind is None or d.kind == kind) and (reference is None or d.reference == reference)
            ]

    def wait_for_deliveries(
        self, kind: str | None = None, *, count: int = 1, reference: str | None = None, timeout: float = 5.0
    ) -> list[CallbackDelivery]:
        """Wait until ``count`` deliveries of ``kind`` (and ``reference``) are done; raises TimeoutError."""
        deadline = _monotonic() + timeout
        with self._state.cond:
            while True:
                done = [
                    d
                    for d in self._state.deliveries
                    if d.done and (kind is None or d.kind == kind) and (reference is None or d.reference == reference)
                ]
                if len(done) >= count:
                    return copy.deepcopy(done)
                remaining = deadline - _monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{len(done)} of {count} {kind or 'delivery'} deliveries done for {reference or 'any'} "
                        f"after {timeout} s"
                    )
                self._state.cond.wait(remaining)

    @property
    def token_requests(self) -> int:
        """OAuth requests received (answered or refused)."""
        with self._state.lock:
            return self._state.token_requests

    @property
    def tokens_issued(self) -> int:
        with self._state.lock:
            return self._state.tokens_issued

    @property
    def valid_tokens(self) -> int:
        return self._oauth.valid_count()

    @property
    def connections_opened(self) -> int:
        """TCP connections accepted so far (keep-alive reuse shows as few connections for many requests)."""
        return self._httpd.connections_opened if self._httpd is not None else 0

    def expire_tokens(self) -> int:
        """Revoke every issued token (Daraja then answers 401 404.001.03); return how many were valid."""
        return self._oauth.expire_all()

    def fail_next(
        self,
        count: int = 1,
        error: str = "spike_arrest",
        operations: Iterable[str] = ("stk_push", "stk_query"),
    ) -> None:
        """Answer the next `count` requests of `operations` with a gateway error, before any other check.

        error: "spike_arrest" (HTTP 500, 500.003.02), "quota" (HTTP 500, 500.003.03), "unavailable" (HTTP 503,
        an HTML page) or "invalid" (HTTP 400, 400.002.02: a request Daraja refuses for good).
        operations: any of OPERATIONS ("token", "stk_push", "stk_query", ...).
        """
        if error not in INJECTABLE_ERRORS:
            raise ValueError(f"unknown error {error!r}; expected one of {sorted(INJECTABLE_ERRORS)}")
        ops = frozenset(operations)
        if not ops or not ops <= set(self.operations):
            raise ValueError(f"operations must be among {self.operations}")
        with self._state.lock:
            self._state.injected.extend([(error, ops)] * int(count))

    def delay_next(
        self, seconds: float, count: int = 1, operations: Iterable[str] = ("stk_push",)
    ) -> None:
        """Process the next `count` requests of `operations` normally, then wait `seconds` before answering.

        With a client read timeout below `seconds` this is the dangerous case of an STK push that Daraja
        processed (the prompt is on the phone) while the client saw no answer.
        """
        ops = frozenset(operations)
        if not ops or not ops <= set(self.operations) or seconds < 0:
            raise ValueError(f"operations must be among {self.operations} and seconds >= 0")
        with self._state.lock:
            self._state.delays.extend([(float(seconds), ops)] * int(count))

    @property
    def operations(self) -> tuple[str, ...]:
        """The operation names of fail_next / delay_next and of RequestRecord.operation."""
        return ("token", *dict.fromkeys(operation for operation, _ in self._routes.values()))

    def wait_for_callback(
        self, checkout_request_id: str | None = None, *, count: int = 1, timeout: float = 5.0
    ) -> list[CallbackDelivery]:
        """Wait until `count` deliveries (of that CheckoutRequestID, or any) are done: delivered, refused by the
        listener, or given up after the retries.  Returns the done deliveries; raises TimeoutError."""
        deadline = _monotonic() + timeout
        with self._state.cond:
            while True:
                done = [
                    d
                    for d in self._state.deliveries
                    if d.done
                    and d.kind == STK_CALLBACK
                    and (checkout_request_id is None or d.checkout_request_id == checkout_request_id)
                ]
                if len(done) >= count:
                    return copy.deepcopy(done)
                remaining = deadline - _monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{len(done)} of {count} callback(s) done for {checkout_request_id or 'any push'} "
                        f"after {timeout} s"
                    )
                self._state.cond.wait(remaining)

    # -- C2B and Pull Transactions ------------------------------------------------------------------------------
    def c2b_pay(
        self,
        amount: int,
        msisdn: str,
        bill_ref: str = "",
        *,
        command_id: str = PAYBILL,
        first_name: str = "John",
        middle_name: str = "",
        last_name: str = "Doe",
    ) -> str:
        """What a phone paying the paybill (or, with ``command_id=TILL``, the till) does; returns the TransID.

        Validation (when c2b_external_validation is on), then the ledger and the confirmation, happen on the
        simulator's threads: wait with ``wait_for_c2b`` or ``wait_for_deliveries(C2B_CONFIRMATION, ...)``.
        ``msisdn`` is 2547XXXXXXXX; C2B_MAGIC_NUMBERS choose lost / duplicate confirmations, a slow validation.
        """
        if command_id not in (PAYBILL, TILL):
            raise ValueError("command_id must be PAYBILL or TILL")
        # A phone pays whole shillings, at most C2B_MAX_AMOUNT: 9658.30 is refused, never paid as 9658.
        if (isinstance(amount, bool) or not isinstance(amount, (int, float)) or not math.isfinite(amount)
                or amount != int(amount) or not 1 <= amount <= C2B_MAX_AMOUNT):
            raise ValueError(f"amount must be a whole number of shillings from 1 to {C2B_MAX_AMOUNT:,}"
                             f" (a phone pays no cents), not {amount!r}")
        return self._c2b.pay(int(amount), str(msisdn), bill_ref, command_id=command_id, first_name=first_name,
                             middle_name=middle_name, last_name=last_name)

    def pay_qr(self, content: str, msisdn: str) -> str:
        """What a phone scanning a Dynamic QR code of this simulator does: a C2B payment of its Amount into its
        CPI, with its RefNo as the account number; returns the TransID (wait with ``wait_for_c2b``).
        ``content`` is what the image decodes to; ValueError for a code this simulator did not make."""
        data, command_id = self._qr.command_of(content)
        trans_id = self.c2b_pay(int(data["Amount"]), msisdn, data["RefNo"], command_id=command_id)
        with self._state.lock:
            self._state.qr_codes[content]["paid"].append(trans_id)
        return trans_id

    @property
    def qr_codes(self) -> list[dict[str, Any]]:
        """Every Dynamic QR code made: {"RequestID", "content" (what the image decodes to), "paid" (TransIDs)}."""
        with self._state.lock:
            return copy.deepcopy(list(self._state.qr_codes.values()))

    def wait_for_c2b(self, trans_id: str, timeout: float = 5.0) -> dict[str, Any]:
        """The C2B payment once decided: {"TransID", "state": "completed" | "cancelled", "validation" (the
        ResultCode the ValidationURL answered, or None), "decided_by": "validation" | "response_type" |
        "no_validation", "shortcode", "amount", "msisdn", "bill_ref"}; TimeoutError while pending."""
        return self._c2b.wait(trans_id, timeout)

    @property
    def c2b_payments(self) -> list[dict[str, Any]]:
        """Every C2B payment attempted (the dicts of wait_for_c2b, pending ones too), oldest first."""
        with self._state.lock:
            return copy.deepcopy(list(self._state.c2b_attempts.values()))

    @property
    def c2b_registrations(self) -> dict[str, dict[str, str]]:
        """Shortcode -> {"ResponseType", "ConfirmationURL", "ValidationURL", "version"} as registered."""
        with self._state.lock:
            return copy.deepcopy(self._state.c2b_urls)

    @property
    def pull_registrations(self) -> dict[str, dict[str, str]]:
        """Shortcode -> {"NominatedNumber", "CallBackURL"} registered for Pull Transactions."""
        with self._state.lock:
            return copy.deepcopy(self._state.pull_registrations)

    # -- B2B Express Checkout -----------------------------------------------------------------------------------
    @property
    def b2b_checkouts(self) -> list[dict[str, Any]]:
        """Every B2B checkout started, oldest first: RequestRefID, primaryShortCode, receiverShortCode, amount,
        paymentRef, partnerName, callbackUrl, scenario, resultCode (None: never answered), transactionId (the
        receipt when paid), conversationID, result_posted (False when the result is lost or never comes)."""
        records = self._b2b.records()
        for record in records:
            record.pop("result_at", None)
        return records

    def b2b_checkout(self, request_id: str) -> dict[str, Any]:
        """The B2B checkout of ``request_id`` (its RequestRefID); KeyError if none was started."""
        for record in self.b2b_checkouts:
            if record["RequestRefID"] == request_id:
                return record
        raise KeyError(request_id)

    # -- initiator APIs: certificate, credential, outcomes, ledger ----------------------------------------------
    @property
    def certificate_pem(self) -> str:
        """The PEM certificate (RSA 2048, self-signed) that encrypts SecurityCredentials for this simulator;
        also at GET /__sim__/certificate.  Made when first asked for (the CLI asks at start)."""
        return self._initiator.identity.certificate_pem

    def security_credential(self, password: str | None = None) -> str:
        """A SecurityCredential for ``password`` (default: initiator_password), as a client makes it."""
        return encrypt_credential(
            self._initiator.identity, self.settings.initiator_password if password is None else password
        )

    def initiator_next(self, outcome: str, count: int = 1) -> None:
        """The next ``count`` initiator requests play ``outcome``: "no_result" (processed, the Result never
        comes) or "queue_timeout" (not processed; the timeout body goes to QueueTimeOutURL)."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; expected one of {OUTCOMES}")
        with self._state.lock:
            self._state.initiator_outcomes.extend([outcome] * int(count))

    def pull_next(self, outcome: str, count: int = 1) -> None:
        """The next ``count`` Pull Transactions queries play ``outcome``: "repeat_page" (the page from offset 0,
        whatever OffSetValue says) or "with_reversals" (reversals are listed too, negative)."""
        if outcome not in PULL_OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; expected one of {PULL_OUTCOMES}")
        with self._state.lock:
            self._state.pull_outcomes.extend([outcome] * int(count))

    @property
    def initiator_requests(self) -> list[dict[str, Any]]:
        """The accepted Reversal / Transaction Status requests: api, ConversationID, TransactionID, outcome
        ("result", "no_result", "queue_timeout") and the ResultCode decided (None for a queue timeout)."""
        with self._state.lock:
            return copy.deepcopy(self._state.initiator_requests)

    @property
    def payments(self) -> list[Payment]:
        """Every receipt produced so far (STK, C2B and B2B payments, reversals), oldest first; copies."""
        now = _monotonic()
        with self._state.lock:
            return [copy.deepcopy(p) for p in self._state.ledger.values() if p.visible_at <= now]

    def payment(self, receipt: str) -> Payment:
        """The ledger entry of ``receipt`` (KeyError if the simulator never produced it)."""
        with self._state.lock:
            return copy.deepcopy(self._state.ledger[receipt])

    def age_transaction(self, receipt: str, hours: float) -> Payment:
        """Move a receipt ``hours`` into the past (Pull Transactions only returns the last 48 hours)."""
        with self._state.lock:
            payment = self._state.ledger[receipt]
            payment.at -= timedelta(hours=float(hours))
            return copy.deepcopy(payment)

    # -- the organisation statement (statement.py) --------------------------------------------------------------
    def statement(self, start: str | None = None, end: str | None = None, *, newest_first: bool = True) -> str:
        """The paybill's organisation statement as the org portal's CSV, between ``start`` and ``end`` (ISO dates
        or datetimes, Kenya time when naive; a date ``end`` covers its day; None: unbounded); also at
        GET /__sim__/statement?from=...&to=...&order=desc|asc."""
        return statement_csv(self._state, self.settings.shortcode, parse_bound(start, end=False),
                             parse_bound(end, end=True), newest_first=newest_first)

    def sweep(self, amount: int) -> dict[str, Any]:
        """Sweep ``amount`` shillings of the paybill's balance to the bank (a settlement row on the statement);
        {"receipt", "amount", "at", "balance"}; ValueError above the balance.  Also POST /__sim__/sweep."""
        return record_sweep(self._state, amount, _now_utc())

    def c2b_registration(self, shortcode: str) -> dict[str, Any]:
        """What GET /__sim__/c2b/registrations?shortcode=... answers: {"shortcode", "registered", and when
        registered "ConfirmationURL", "ValidationURL", "ResponseType", "version"}, "persistent" (a state file
        keeps it across restarts)."""
        with self._state.lock:
            urls = copy.deepcopy(self._state.c2b_urls.get(str(shortcode)))
        return {"shortcode": str(shortcode), "registered": urls is not None, **(urls or {}),
                "persistent": bool(self.state_file)}

    def reset(self) -> None:
        """Forget pushes, payments, callbacks, tokens, counters and injected errors (the server keeps running)."""
        with self._state.cond:
            self._cancel_scheduled()
            self._state.clear()
            self._state.cond.notify_all()

    def state(self) -> dict[str, Any]:
        """A JSON-able summary (served at GET /__sim__/state)."""
        now = _monotonic()
        state = self._state
        with state.lock:
            return {
                "base_url": self.base_url if self.running else None,
                "token_requests": state.token_requests,
                "tokens_issued": state.tokens_issued,
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
                    for t in (state.transactions[c] for c in state.order)
                ],
                "callbacks": [
                    {
                        "CheckoutRequestID": d.checkout_request_id,
                        "url": d.url,
                        "copy": d.copy_number,
                        "state": d.state,
                        "attempts": [{"status": a.status, "error": a.error} for a in d.attempts],
                    }
                    for d in state.deliveries
                    if d.kind == STK_CALLBACK
                ],
                "deliveries": [
                    {"kind": d.kind, "reference": d.reference, "url": d.url, "state": d.state}
                    for d in state.deliveries
                    if d.kind != STK_CALLBACK
                ],
                "b2b_checkouts": [
                    {key: value for key, value in record.items() if key != "result_at"}
                    for record in state.b2b_checkouts.values()
                ],
                "payments": [
                    {
                        "receipt": p.receipt,
                        "source": p.source,
                        "shortcode": p.shortcode,
                        "amount": p.amount,
                        "bill_ref": p.bill_ref,
                        "at": p.at.isoformat(),
                        "reversed_by": p.reversed_by,
                    }
                    for p in state.ledger.values()
                    if p.visible_at <= now
                ],
            }

    # -- request dispatch ---------------------------------------------------------------------------------------
    def _dispatch(self, method: str, target: str, headers: Mapping[str, str], raw: bytes) -> _Response:
        parsed = urllib.parse.urlsplit(target)
        path = parsed.path
        if path.startswith(CONTROL_PREFIX):
            return self._control(method, path[len(CONTROL_PREFIX):], raw, parsed.query)
        key = (method, path.rstrip("/") or "/")
        route = self._routes.get(key)
        operation = "token" if key == ("GET", OAUTH_PATH) else route[0] if route else "unknown"
        body: Any = None
        try:
            if operation == "unknown":
                raise _Refusal(*_NOT_FOUND)
            injected = self._take_injected(operation)
            if operation == "token":
                with self._state.lock:
                    self._state.token_requests += 1
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
                response = self._oauth.issue(parsed.query, headers)
            else:
                assert route is not None
                self._oauth.check_bearer(headers)
                body = self._json_body(raw)
                response = route[1](body)
        except _Refusal as refusal:
            response = _Response(
                refusal.status,
                {"requestId": self._state.request_id(), "errorCode": refusal.code, "errorMessage": refusal.message},
                error_code=refusal.code,
            )
        self._record(operation, method, path, response, body)
        delay = self._take_delay(operation)
        if delay:
            self._state.stop_event.wait(delay)
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
        with self._state.lock:
            self._state.requests.append(
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
        with self._state.lock:
            for index, (error, ops) in enumerate(self._state.injected):
                if operation in ops:
                    del self._state.injected[index]
                    return error
        return None

    def _take_delay(self, operation: str) -> float:
        with self._state.lock:
            for index, (seconds, ops) in enumerate(self._state.delays):
                if operation in ops:
                    del self._state.delays[index]
                    return seconds
        return 0.0

    @staticmethod
    def _json_body(raw: bytes) -> dict[str, Any]:
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise _Refusal(*_INVALID_PAYLOAD) from None
        if not isinstance(body, dict):
            raise _Refusal(*_INVALID_PAYLOAD)
        return body

    # -- control API (HTTP) -------------------------------------------------------------------------------------
    def _control(self, method: str, action: str, raw: bytes, query: str = "") -> _Response:
        action = action.strip("/")
        if method == "GET" and action == "health":
            return _Response(200, {"status": "ok"})
        if method == "GET" and action in ("statement", "c2b/registrations"):
            return self._control_get(action, urllib.parse.parse_qs(query))
        if method == "GET" and action == "state":
            return _Response(200, self.state())
        if method == "POST" and action == "expire-tokens":
            return _Response(200, {"expired": self.expire_tokens()})
        if method == "POST" and action == "reset":
            self.reset()
            return _Response(200, {"reset": True})
        handlers: dict[tuple[str, str], Callable[[dict[str, Any]], Any]] = {
            ("POST", "delay-next"): lambda o: self.delay_next(
                float(o.get("seconds", 1.0)), int(o.get("count", 1)), o.get("operations", ("stk_push",))
            ),
            ("POST", "fail-next"): lambda o: self.fail_next(
                int(o.get("count", 1)),
                str(o.get("error", "spike_arrest")),
                o.get("operations", ("stk_push", "stk_query")),
            ),
            **self._extra_controls(),
        }
        handler = handlers.get((method, action))
        if handler is None:
            return _Response(404, {"error": f"unknown simulator control {method} {action}"})
        try:
            options = json.loads(raw.decode("utf-8") or "{}")
            if not isinstance(options, dict):
                raise TypeError("the control body must be a JSON object")
            result = handler(options)
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            return _Response(400, {"error": str(exc)})
        if isinstance(result, _Response):
            return result
        return _Response(200, result if isinstance(result, dict) else {"queued": True})

    def _control_get(self, action: str, params: dict[str, list[str]]) -> _Response:
        def param(name: str) -> str | None:
            return params[name][-1] if name in params else None

        if action == "c2b/registrations":
            shortcode = param("shortcode") or self.settings.shortcode
            return _Response(200, self.c2b_registration(shortcode))
        if (param("format") or "csv") != "csv" or (param("order") or "desc") not in ("asc", "desc"):
            return _Response(400, {"error": "format must be csv; order asc or desc"})
        try:
            text = self.statement(param("from"), param("to"), newest_first=param("order") != "asc")
        except ValueError as exc:
            return _Response(400, {"error": str(exc)})
        return _Response(200, text.encode("utf-8"), "text/csv; charset=utf-8")

    def _extra_controls(self) -> dict[tuple[str, str], Callable[[dict[str, Any]], Any]]:
        return {
            ("GET", "certificate"): lambda _: _Response(
                200, self.certificate_pem.encode("ascii"), "application/x-pem-file"
            ),
            ("POST", "c2b-pay"): lambda o: {
                "TransID": self.c2b_pay(
                    o["amount"], str(o["msisdn"]), str(o.get("bill_ref", "")),
                    command_id=str(o.get("command_id", PAYBILL)),
                )
            },
            ("POST", "initiator-next"): lambda o: self.initiator_next(str(o["outcome"]), int(o.get("count", 1))),
            ("POST", "sweep"): lambda o: self.sweep(o["amount"]),
            ("POST", "pull-next"): lambda o: self.pull_next(str(o["outcome"]), int(o.get("count", 1))),
            ("POST", "age"): lambda o: {
                "receipt": o["receipt"],
                "at": self.age_transaction(str(o["receipt"]), float(o.get("hours", 49))).at.isoformat(),
            },
        }

