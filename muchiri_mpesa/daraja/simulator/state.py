"""The simulator's one shared state: settings, records, clocks, Daraja's error shape and the field checks.

Every API module (oauth, stk, c2b, pull, initiator) reads and writes this state under ``state.lock`` and nothing
else; ``server.DarajaSimulator`` builds one ``SimState`` and hands it to each of them.
"""

from __future__ import annotations

import itertools
import random
import re
import string
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from .scenarios import Scenario

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
# Safaricom's sandbox initiator is "testapi"; its published sandbox password is this one.
DEFAULT_INITIATOR_NAME = "testapi"
DEFAULT_INITIATOR_PASSWORD = "Safaricom999!*!"
DEFAULT_ORGANIZATION_NAME = "Simulated Business"
# Daraja waits about 8 seconds for the ValidationURL; then the registered ResponseType decides.
DEFAULT_VALIDATION_TIMEOUT = 8.0
DEFAULT_PULL_PAGE_SIZE = 100
PULL_WINDOW = timedelta(hours=48)

PAYBILL = "CustomerPayBillOnline"
TILL = "CustomerBuyGoodsOnline"

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


def _kenya_stamp(moment: datetime) -> str:
    return moment.astimezone(KENYA_TZ).strftime("%Y%m%d%H%M%S")


# ---------------------------------------------------------------------------------------------------------------
# Records (what the inspection helpers return; copies, safe to keep)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class RequestRecord:
    """One HTTP request the simulator answered."""

    operation: str  # "token" | "stk_push" | "stk_query" | "c2b_register" | ... | "control" | "unknown"
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


# The kinds of POST the simulator makes to the merchant's URLs.
STK_CALLBACK = "stk_callback"
C2B_VALIDATION = "c2b_validation"
C2B_CONFIRMATION = "c2b_confirmation"
INITIATOR_RESULT = "initiator_result"
INITIATOR_TIMEOUT = "initiator_timeout"
B2B_RESULT = "b2b_result"
DELIVERY_KINDS = (STK_CALLBACK, C2B_VALIDATION, C2B_CONFIRMATION, INITIATOR_RESULT, INITIATOR_TIMEOUT, B2B_RESULT)


@dataclass
class CallbackDelivery:
    """One POST to a merchant URL (a duplicate is a second delivery) and its delivery attempts.

    ``kind`` says which (STK_CALLBACK, C2B_VALIDATION, ...); ``reference`` is the TransID of a C2B delivery, the
    ConversationID of an initiator result or the RequestRefID of a B2B result.  STK callbacks keep their two
    request ids.
    """

    checkout_request_id: str
    merchant_request_id: str
    url: str
    body: dict[str, Any]
    copy_number: int  # 1, or 2 for a duplicate
    due_at: float  # monotonic
    attempts: list[CallbackAttempt] = field(default_factory=list)
    # "scheduled" -> "sending" -> "delivered" (2xx) | "refused" (answered 3xx/4xx: not retried) |
    # "failed" (5xx / no answer after every retry) | "cancelled" (simulator stopped first)
    state: str = "scheduled"
    kind: str = STK_CALLBACK
    reference: str = ""
    timeout: float | None = None  # None: the simulator's callback_timeout
    retries: bool = True  # False: one attempt only (the ValidationURL)

    @property
    def done(self) -> bool:
        return self.state in ("delivered", "refused", "failed", "cancelled")

    @property
    def delivered(self) -> bool:
        return self.state == "delivered"

    @property
    def status(self) -> int | None:
        return self.attempts[-1].status if self.attempts else None

    @property
    def response_text(self) -> str:
        return self.attempts[-1].response_text if self.attempts else ""


@dataclass
class Payment:
    """One receipt the simulator produced: an STK, C2B or B2B (a till paying) payment into a shortcode, or a
    reversal of one.

    The ledger behind Pull Transactions, Transaction Status and Reversal.  ``at`` is when M-Pesa completed it
    (aware UTC; ``age_transaction`` moves it back for the 48 hours of Pull); ``visible_at`` (monotonic) is when
    it happened for the simulator's clients (an STK payment once the customer has answered).
    """

    receipt: str
    source: str  # "stk" | "c2b" | "b2b" | "reversal"
    shortcode: str  # the paybill, or the till of a Buy Goods payment
    business_shortcode: str  # the paybill, or the store number of a till
    transaction_type: str  # PAYBILL | TILL (for a reversal: that of the original)
    amount: int
    msisdn: str  # the payer: a phone, or the paying till of a B2B payment
    bill_ref: str
    first_name: str
    middle_name: str
    last_name: str
    at: datetime
    visible_at: float
    originator_conversation_id: str = ""  # the request that made it (a B2B RequestRefID): Transaction Status finds it
    reversed_by: str | None = None  # the receipt of its reversal
    reverses: str | None = None  # a reversal: the receipt it reversed

    @property
    def payer_name(self) -> str:
        return " ".join(part for part in (self.first_name, self.middle_name, self.last_name) if part)


# ---------------------------------------------------------------------------------------------------------------
# Daraja's refusals
#
# The simulator plays Safaricom's side: it writes Daraja's codes and wording itself, on purpose, and never takes
# them from the library's catalogue (daraja/codes.py).  A wrong code in the catalogue must then fail the tests run
# against the simulator instead of being echoed by it; tests/test_simulator_codes.py checks that both agree.
# ---------------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------------
# Settings and the shared state
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    """Every knob of the simulator (DarajaSimulator exposes each one as an attribute of the same name)."""

    consumer_key: str = DEFAULT_CONSUMER_KEY
    consumer_secret: str = DEFAULT_CONSUMER_SECRET
    shortcode: str = DEFAULT_SHORTCODE
    passkey: str = SANDBOX_PASSKEY
    till_number: str | None = DEFAULT_TILL
    callback_delay: float = DEFAULT_CALLBACK_DELAY
    prompt_timeout: float = DEFAULT_PROMPT_TIMEOUT
    late_callback_delay: float = 3 * DEFAULT_CALLBACK_DELAY
    duplicate_callback_gap: float = 0.0
    callback_retry_delays: tuple[float, ...] = DEFAULT_CALLBACK_RETRY_DELAYS
    callback_timeout: float = DEFAULT_CALLBACK_TIMEOUT
    token_lifetime: int = TOKEN_LIFETIME
    invalidate_previous_tokens: bool = True
    reject_mpesa_in_callback_url: bool = False
    initiator_name: str = DEFAULT_INITIATOR_NAME
    initiator_password: str = DEFAULT_INITIATOR_PASSWORD
    organization_name: str = DEFAULT_ORGANIZATION_NAME
    result_delay: float = DEFAULT_CALLBACK_DELAY
    c2b_versions: tuple[str, ...] = ("v1", "v2")
    c2b_register_once: bool = False
    c2b_external_validation: bool = False
    c2b_validation_timeout: float = DEFAULT_VALIDATION_TIMEOUT
    c2b_delay: float = 0.0
    c2b_msisdn_format: str = "hash"
    pull_page_size: int = DEFAULT_PULL_PAGE_SIZE


@dataclass
class _Token:
    consumer_key: str
    expires_at: float  # wall clock


class SimState:
    """What the simulator knows, behind one lock; the condition wakes waiters and the scheduler."""

    def __init__(self, settings: Settings, *, clock: Any = None, max_records: int = 10_000) -> None:
        self.settings = settings
        self.clock = clock or _wall_time
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.stopping = False
        self.stop_event = threading.Event()
        self.random = random.Random()
        self.request_seq = itertools.count(1)
        self.merchant_seq = itertools.count(1)
        self.conversation_seq = itertools.count(1)
        self.requests: deque[RequestRecord] = deque(maxlen=max_records)
        self._max_records = max_records
        self.clear()

    def clear(self) -> None:
        """Forget everything but the settings (reset); callers hold the lock or own the state."""
        self.tokens: dict[str, _Token] = {}
        self.token_requests = 0
        self.tokens_issued = 0
        self.transactions: dict[str, StkTransaction] = {}
        self.order: list[str] = []
        self.latest_by_phone: dict[str, str] = {}  # a phone's newest push: the only one that can be pending
        self.deliveries: list[CallbackDelivery] = []
        self.requests.clear()
        self.injected: list[tuple[str, frozenset[str]]] = []
        self.delays: list[tuple[float, frozenset[str]]] = []
        self.receipts: set[str] = set()
        self.ledger: dict[str, Payment] = {}
        self.c2b_urls: dict[str, dict[str, str]] = {}  # shortcode -> ResponseType, ConfirmationURL, ValidationURL
        self.pull_registrations: dict[str, dict[str, str]] = {}
        self.balances: dict[str, int] = {}
        self.c2b_attempts: dict[str, dict[str, Any]] = {}  # TransID -> what became of a C2B payment
        self.initiator_requests: list[dict[str, Any]] = []
        self.initiator_outcomes: list[str] = []
        self.pull_outcomes: list[str] = []  # quirks of the next Pull queries (sim.pull_next)
        self.b2b_checkouts: dict[str, dict[str, Any]] = {}  # RequestRefID -> what became of a B2B checkout
        self.qr_codes: dict[str, dict[str, Any]] = {}  # Dynamic QR content -> its RequestID and payments
        self.failures: dict[str, Payment] = {}  # failed STK payments (statement rows "Failed"), not in the ledger
        self.sweeps: list[dict[str, Any]] = []  # sweeps of the paybill's balance to the bank (statement rows)

    # -- ids ----------------------------------------------------------------------------------------------------
    def request_id(self) -> str:
        # Daraja's requestId looks like "11259-2330641-1".
        first, second = self.random.randint(1000, 99999), self.random.randint(1_000_000, 99_999_999)
        return f"{first}-{second}-{next(self.request_seq)}"

    def originator_conversation_id(self) -> str:
        # Like "29115-34620561-1" (initiator APIs) or "6e86-45dd-...": the dashed numeric form is enough.
        return (
            f"{self.random.randint(1000, 99999)}-{self.random.randint(10_000_000, 99_999_999)}-"
            f"{next(self.conversation_seq)}"
        )

    def conversation_id(self, wall: datetime) -> str:
        # Like "AG_20240122_00004e4e9b8b9d9e9f9g": AG_, the date, 20 hex digits.
        return f"AG_{wall.astimezone(KENYA_TZ):%Y%m%d}_{self.random.getrandbits(80):020x}"

    def receipt(self, moment: datetime) -> str:
        """A new receipt like "NLJ7RT61SV": year letter (N = 2019), month letter (A = January), day, 7 more."""
        local = moment.astimezone(KENYA_TZ)
        year_letter = chr(ord("A") + (local.year - 2006) % 26)
        prefix = year_letter + chr(ord("A") + local.month - 1) + _DAY_CHARS[local.day - 1]
        with self.lock:
            while True:
                candidate = prefix + "".join(self.random.choice(_RECEIPT_ALPHABET) for _ in range(7))
                if candidate not in self.receipts:
                    self.receipts.add(candidate)
                    return candidate

    # -- the ledger ---------------------------------------------------------------------------------------------
    def record_payment(self, payment: Payment) -> None:
        with self.lock:
            self.ledger[payment.receipt] = payment
            if payment.source != "reversal":
                self.balances[payment.shortcode] = self.balances.get(payment.shortcode, 0) + payment.amount

    def record_failure(self, payment: Payment) -> None:
        """A payment the customer confirmed and M-Pesa refused: a Failed statement row, no money, no ledger."""
        with self.lock:
            self.failures[payment.receipt] = payment

    def payment_of_request(self, originator: str, now: float | None = None) -> Payment | None:
        """The visible ledger entry made by the request ``originator`` (a B2B RequestRefID), if any."""
        with self.lock:
            for payment in self.ledger.values():
                if payment.originator_conversation_id == originator and payment.source != "reversal":
                    return self.visible_payment(payment.receipt, now)
            return None

    def visible_payment(self, receipt: str, now: float | None = None) -> Payment | None:
        """The ledger entry of ``receipt`` once it happened (an STK payment after the customer answered)."""
        with self.lock:
            payment = self.ledger.get(receipt)
            if payment is None or payment.visible_at > (_monotonic() if now is None else now):
                return None
            return payment

    def owns_shortcode(self, shortcode: str) -> bool:
        return shortcode in (self.settings.shortcode, self.settings.till_number)


# ---------------------------------------------------------------------------------------------------------------
# Field checks shared by the APIs (Daraja answers 400.002.02 "Bad Request - Invalid <Field>")
# ---------------------------------------------------------------------------------------------------------------
def text_of(value: Any) -> str:
    """A JSON string or integer as stripped text; anything else as ''."""
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value).strip()
    return ""


def check_digits(body: Mapping[str, Any], name: str) -> str:
    text = text_of(body.get(name))
    if not re.fullmatch(r"\d{5,12}", text):
        raise _invalid(name)
    return text


def check_msisdn(body: Mapping[str, Any], name: str) -> str:
    text = text_of(body.get(name))
    if not re.fullmatch(r"254[17]\d{8}", text):
        raise _invalid(name)
    return text


def check_whole_amount(body: Mapping[str, Any], name: str = "Amount") -> int:
    value = body.get(name)
    amount: int | None = None
    if isinstance(value, bool):
        amount = None
    elif isinstance(value, int):
        amount = value
    elif isinstance(value, float) and value.is_integer():
        amount = int(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*[0-9]{1,15}(\.0+)?\s*", value):
        amount = int(value.strip().split(".")[0])  # not float(): "9" * 400 is inf, an OverflowError (HTTP 500)
    if amount is None or amount < 1:
        raise _invalid(name)
    return amount


def check_url(body: Mapping[str, Any], name: str, reject_words: Sequence[str] = ()) -> str:
    value = body.get(name)
    if not isinstance(value, str) or value != value.strip() or any(c.isspace() for c in value):
        raise _invalid(name)
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _invalid(name)
    lowered = value.casefold()
    if any(word in lowered for word in reject_words):
        raise _invalid(name)
    return value


def check_text(body: Mapping[str, Any], name: str, max_length: int, min_length: int = 1) -> str:
    value = body.get(name)
    if not isinstance(value, str) or len(value.strip()) < min_length or len(value) > max_length:
        raise _invalid(name)
    return value


def optional_text(body: Mapping[str, Any], name: str, max_length: int) -> str:
    value = body.get(name, "")
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > max_length:
        raise _invalid(name)
    return value
