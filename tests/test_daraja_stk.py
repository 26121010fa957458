"""STK payload building (pure) and the few push failures the simulator cannot produce."""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from freezegun import freeze_time

from muchiri_mpesa.daraja import (
    KENYA_TZ,
    PAYBILL,
    PRODUCTION_URL,
    SANDBOX_URL,
    TILL,
    AccessToken,
    DarajaClient,
    DarajaConnectionError,
    DarajaCredentials,
    DarajaProtocolError,
    DarajaValidationError,
    Exchange,
    InvalidAmount,
    InvalidConfiguration,
    InvalidPhoneNumber,
    MemoryTokenStore,
    ShortcodeConfig,
    account_reference,
    build_stk_push_payload,
    build_stk_query_payload,
    redact,
    timestamp_and_password,
    transaction_desc,
)

UTC = timezone.utc
PASSKEY = "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919"
SECRET = "consumer-secret-value-9f8e7d"
TOKEN_VALUE = "token-value-1a2b3c4d5e"
CALLBACK = "https://shop.example.com/payment/mpesa/callback/s3cr3t-path"
PAYBILL_CONFIG = ShortcodeConfig("174379", PASSKEY)
TILL_CONFIG = ShortcodeConfig("174379", PASSKEY, TILL, "5123456")
PUSH_KEYS = ["BusinessShortCode", "Password", "Timestamp", "TransactionType", "Amount", "PartyA",
             "PartyB", "PhoneNumber", "CallBackURL", "AccountReference", "TransactionDesc"]


def _expected_password(shortcode: str, timestamp: str) -> str:
    return base64.b64encode((shortcode + PASSKEY + timestamp).encode()).decode()


# -- timestamp and password --------------------------------------------------------------------

def test_timestamp_is_kenya_time_across_a_utc_midnight() -> None:
    now = datetime(2025, 11, 26, 21, 30, 5, tzinfo=UTC)
    timestamp, password = timestamp_and_password("174379", PASSKEY, now)
    assert timestamp == "20251127003005"
    assert password == _expected_password("174379", "20251127003005")


def test_naive_now_is_read_as_utc() -> None:
    assert timestamp_and_password("174379", PASSKEY, datetime(2025, 1, 1, 0, 0, 0))[0] == \
        "20250101030000"


def test_aware_now_in_another_zone_is_converted() -> None:
    india = timezone(timedelta(hours=5, minutes=30))
    assert timestamp_and_password("174379", PASSKEY, datetime(2025, 1, 1, 5, 30, tzinfo=india))[0] \
        == "20250101030000"


@freeze_time("2025-12-31 21:00:00")
def test_default_now_is_the_current_instant_in_kenya_after_utc_new_year_eve() -> None:
    timestamp, password = timestamp_and_password("174379", PASSKEY)
    assert timestamp == "20260101000000"
    assert password == _expected_password("174379", timestamp)


@freeze_time("2025-12-31 20:59:59")
def test_default_now_one_second_before_kenya_midnight() -> None:
    assert timestamp_and_password("174379", PASSKEY)[0] == "20251231235959"


def test_timestamp_and_password_come_from_one_instant() -> None:
    """With a clock that moves on every read, both must still agree (docs/design.md, 12. Failure modes)."""
    with freeze_time("2025-11-26 20:59:59", auto_tick_seconds=1):
        timestamp, password = timestamp_and_password("174379", PASSKEY)
        payload = build_stk_push_payload(
            PAYBILL_CONFIG, phone="0712345678", amount=1, reference="S00042", description=None,
            callback_url=CALLBACK,
        )
    assert base64.b64decode(password).decode() == "174379" + PASSKEY + timestamp
    assert base64.b64decode(payload["Password"]).decode() == "174379" + PASSKEY + payload["Timestamp"]


# -- account reference and description ---------------------------------------------------------

@pytest.mark.parametrize(("reference", "expected"), [
    ("S00042", "S00042"),
    ("S00042-1", "S00042-1"),
    ("S00042-12", "S00042-12"),
    ("INV/2025/00042", "INV-2025-42"),
    ("INV/2025/00042-3", "INV-2025-42"),
    ("S00042-2-20251126", "S00042-2"),
    ("S00042,S00043-1", "S00042"),
    ("x" * 40, "x" * 12),
    ("  S00042  ", "S00042"),
    ("S0004\u00e92", "S0004-2"),
    ("SO 42", "SO-42"),
])
def test_account_reference_from_odoo_references(reference: str, expected: str) -> None:
    assert account_reference(reference) == expected


@pytest.mark.parametrize("reference", ["", "   ", "///", "\u00e9\u00e8", None])
def test_account_reference_needs_a_letter_or_digit(reference: object) -> None:
    with pytest.raises(DarajaValidationError) as caught:
        account_reference(reference)  # type: ignore[arg-type]
    assert caught.value.field == "reference"


@pytest.mark.parametrize("reference", [
    "S00042", "INV/2025/00042-3", "a b c d e f g h i j k", "Ω" * 30, "0" * 30, "12345678901234",
    "-a-", "S00042/" * 10, "AB/000000000001/CD", "SUPERLONGPREFIX/1",
])
def test_account_reference_always_fits_daraja(reference: str) -> None:
    result = account_reference("x" + reference)
    assert re.fullmatch(r"[A-Za-z0-9-]{1,12}", result), result
    assert not result.startswith("-") and not result.endswith("-")


@pytest.mark.parametrize(("text", "expected"), [
    (None, "Payment"), ("", "Payment"), ("!!!", "Payment"), ("Order S00042", "Order-S00042"),
    ("Payment for INV/2025/00042", "Payment-for"), ("S00042", "S00042"),
    ("Muchiri Distributors Ltd", "Muchiri"), ("y" * 30, "y" * 13),
])
def test_transaction_desc(text: str | None, expected: str) -> None:
    result = transaction_desc(text)
    assert result == expected
    assert re.fullmatch(r"[A-Za-z0-9-]{1,13}", result)


# -- shortcode configuration -------------------------------------------------------------------

def test_paybill_pays_the_shortcode() -> None:
    assert PAYBILL_CONFIG.transaction_type == PAYBILL == "CustomerPayBillOnline"
    assert PAYBILL_CONFIG.party_b == "174379"


def test_till_pays_the_till_number() -> None:
    assert TILL == "CustomerBuyGoodsOnline"
    assert TILL_CONFIG.business_shortcode == "174379"
    assert TILL_CONFIG.party_b == "5123456"


def test_a_till_number_given_with_a_paybill_is_ignored() -> None:
    config = ShortcodeConfig("600100", PASSKEY, PAYBILL, "5123456")
    assert config.till_number is None
    assert config.party_b == "600100"


def test_settings_are_stripped() -> None:
    config = ShortcodeConfig(" 174379 ", f" {PASSKEY}\n", TILL, " 51234 ")
    assert (config.business_shortcode, config.passkey, config.till_number) == \
        ("174379", PASSKEY, "51234")


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"business_shortcode": "1234"}, "business_shortcode"),
    ({"business_shortcode": "12345678"}, "business_shortcode"),
    ({"business_shortcode": "17437a"}, "business_shortcode"),
    ({"business_shortcode": ""}, "business_shortcode"),
    ({"business_shortcode": None}, "business_shortcode"),
    ({"business_shortcode": 174379}, "business_shortcode"),
    ({"passkey": ""}, "passkey"),
    ({"passkey": "  "}, "passkey"),
    ({"passkey": None}, "passkey"),
    ({"transaction_type": TILL}, "till_number"),
    ({"transaction_type": TILL, "till_number": ""}, "till_number"),
    ({"transaction_type": TILL, "till_number": "12 34"}, "till_number"),
    ({"transaction_type": TILL, "till_number": "12345678"}, "till_number"),
    ({"transaction_type": "CustomerPayBill"}, "transaction_type"),
    ({"transaction_type": ""}, "transaction_type"),
])
def test_bad_shortcode_settings_are_configuration_errors(kwargs: dict, field: str) -> None:
    settings = {"business_shortcode": "174379", "passkey": PASSKEY, **kwargs}
    with pytest.raises(InvalidConfiguration) as caught:
        ShortcodeConfig(**settings)
    assert caught.value.field == field
    assert PASSKEY not in str(caught.value)


def test_the_passkey_never_shows_in_the_repr() -> None:
    assert PASSKEY not in repr(PAYBILL_CONFIG)
    assert PASSKEY not in repr(TILL_CONFIG)


# -- payloads ----------------------------------------------------------------------------------

NOW = datetime(2025, 11, 26, 21, 30, 5, tzinfo=UTC)


def test_push_payload_has_daraja_exact_keys_values_and_types() -> None:
    payload = build_stk_push_payload(
        PAYBILL_CONFIG, phone="0712 345 678", amount=Decimal("100.40"), reference="INV/2025/00042-3",
        description="Order S00042", callback_url=CALLBACK, now=NOW,
    )
    assert list(payload) == PUSH_KEYS
    assert payload == {
        "BusinessShortCode": "174379",
        "Password": _expected_password("174379", "20251127003005"),
        "Timestamp": "20251127003005",
        "TransactionType": "CustomerPayBillOnline",
        "Amount": 101,
        "PartyA": "254712345678",
        "PartyB": "174379",
        "PhoneNumber": "254712345678",
        "CallBackURL": CALLBACK,
        "AccountReference": "INV-2025-42",
        "TransactionDesc": "Order-S00042",
    }
    assert type(payload["Amount"]) is int
    assert all(type(v) is str for k, v in payload.items() if k != "Amount")
    json.dumps(payload)


def test_till_push_payload() -> None:
    payload = build_stk_push_payload(
        TILL_CONFIG, phone=254712345678, amount=5, reference="S00042", description="",
        callback_url="http://127.0.0.1:8069/cb", now=NOW,
    )
    assert payload["BusinessShortCode"] == "174379"
    assert payload["PartyB"] == "5123456"
    assert payload["TransactionType"] == "CustomerBuyGoodsOnline"
    assert payload["Password"] == _expected_password("174379", payload["Timestamp"])
    assert payload["TransactionDesc"] == "Payment"


def _push(**overrides: object) -> dict:
    kwargs: dict = {"phone": "0712345678", "amount": 10, "reference": "S00042",
                    "description": "S00042", "callback_url": CALLBACK, "now": NOW, **overrides}
    return build_stk_push_payload(PAYBILL_CONFIG, **kwargs)


def test_push_payload_validates_phone_and_amount() -> None:
    with pytest.raises(InvalidPhoneNumber):
        _push(phone="0733123456")
    with pytest.raises(InvalidAmount, match="KES 250,000 limit"):
        _push(amount=250_000.5)
    with pytest.raises(InvalidAmount, match="KES 500 limit"):
        _push(amount=501, max_amount=500)
    with pytest.raises(InvalidAmount):
        _push(amount=0)
    with pytest.raises(DarajaValidationError):
        _push(reference="///")


@pytest.mark.parametrize("url", ["", None, "ftp://example.com/cb", "/payment/mpesa/callback",
                                 "https://", "example.com/cb", "https://exa mple.com/cb",
                                 "javascript:alert(1)"])
def test_callback_url_must_be_absolute_http(url: object) -> None:
    with pytest.raises(InvalidConfiguration) as caught:
        _push(callback_url=url)
    assert caught.value.field == "callback_url"
    assert "example" not in str(caught.value) and "mpesa/callback" not in str(caught.value)


def test_query_payload_has_daraja_exact_keys() -> None:
    payload = build_stk_query_payload(TILL_CONFIG, " ws_CO_191220191020363925 ", now=NOW)
    assert payload == {
        "BusinessShortCode": "174379",
        "Password": _expected_password("174379", "20251127003005"),
        "Timestamp": "20251127003005",
        "CheckoutRequestID": "ws_CO_191220191020363925",
    }


@pytest.mark.parametrize("checkout", ["", "   ", None])
def test_query_needs_a_checkout_request_id(checkout: object) -> None:
    with pytest.raises(DarajaValidationError) as caught:
        build_stk_query_payload(PAYBILL_CONFIG, checkout)  # type: ignore[arg-type]
    assert caught.value.field == "checkout_request_id"


def test_redact_hides_secret_looking_keys_at_any_depth() -> None:
    payload = {
        "Password": "abc", "Timestamp": "1", "consumer_secret": "s", "PassKey": "p",
        "access_token": "t", "SecurityCredential": "c", "Amount": 5,
        "nested": {"Token": "t", "keep": "me"}, "items": [{"password": "x"}, "plain"],
    }
    original = json.loads(json.dumps(payload))
    assert redact(payload) == {
        "Password": "***", "Timestamp": "1", "consumer_secret": "***", "PassKey": "***",
        "access_token": "***", "SecurityCredential": "***", "Amount": 5,
        "nested": {"Token": "***", "keep": "me"}, "items": [{"password": "***"}, "plain"],
    }
    assert payload == original


def test_environment_urls() -> None:
    assert SANDBOX_URL == "https://sandbox.safaricom.co.ke"
    assert PRODUCTION_URL == "https://api.safaricom.co.ke"
    assert str(KENYA_TZ) == "Africa/Nairobi"


# -- push failures the simulator cannot produce ------------------------------------------------
# These tests talk to a tiny misbehaving socket server on loopback (or to a closed port): the
# network is faked because the simulator always answers properly and cannot produce them.

class _BadServer:
    """Accepts connections, reads each HTTP request, then misbehaves as told."""

    def __init__(self, behaviour: Callable[[socket.socket], None]) -> None:
        self.behaviour = behaviour
        self.requests: list[bytes] = []
        self.release = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length:\s*(\d+)", head)
                while length and len(body) < int(length.group(1)):
                    body += conn.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + body)
                self.behaviour(conn)

    def close(self) -> None:
        self.release.set()
        self.sock.close()


@contextmanager
def _bad_server(behaviour: Callable[[_BadServer, socket.socket], None]) -> Iterator[_BadServer]:
    server = _BadServer(lambda conn: behaviour(server, conn))
    try:
        yield server
    finally:
        server.close()


def _answer(status: str, content_type: str, body: bytes) -> Callable[[_BadServer, socket.socket], None]:
    def behaviour(server: _BadServer, conn: socket.socket) -> None:
        conn.sendall(
            f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode() + body
        )
    return behaviour


def _client(port: int, exchanges: list[Exchange]) -> DarajaClient:
    """A client whose token is already in its store, so only the push goes on the wire."""
    credentials = DarajaCredentials("consumer-key", SECRET, f"http://127.0.0.1:{port}")
    store = MemoryTokenStore()
    store.refresh(
        credentials.cache_key,
        lambda: AccessToken(TOKEN_VALUE, datetime.now(UTC) + timedelta(hours=1)),
        None,
    )
    return DarajaClient(credentials, PAYBILL_CONFIG, token_store=store, timeout=(2.0, 0.5),
                        observer=exchanges.append)


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


PUSH = {"phone": "0712345678", "amount": 10, "reference": "S00042", "description": "S00042",
        "callback_url": CALLBACK}


def _assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in (PASSKEY, SECRET, TOKEN_VALUE):
            assert secret not in text


def test_read_timeout_after_sending_is_reported_and_never_resent() -> None:
    """Network faked: the server reads the push and never answers (a read timeout)."""
    exchanges: list[Exchange] = []
    with _bad_server(lambda server, conn: server.release.wait(5)) as server:
        client = _client(server.port, exchanges)
        with pytest.raises(DarajaConnectionError) as caught:
            client.stk_push(**PUSH)
        assert len(server.requests) == 1
    error = caught.value
    assert error.request_may_have_reached is True
    assert "may have received and processed it" in str(error)
    assert server.requests[0].startswith(b"POST /mpesa/stkpush/v1/processrequest ")
    assert f"Bearer {TOKEN_VALUE}".encode() in server.requests[0]
    [exchange] = exchanges
    assert (exchange.operation, exchange.method, exchange.status) == ("stk_push", "POST", None)
    assert exchange.request_body is not None and exchange.request_body["Password"] == "***"
    assert exchange.error == str(error)
    _assert_no_secret(str(error), repr(exchange), repr(client))


def test_connection_dropped_after_sending_may_have_reached() -> None:
    """Network faked: the server reads the push and closes without answering."""
    exchanges: list[Exchange] = []
    with _bad_server(lambda server, conn: None) as server:
        with pytest.raises(DarajaConnectionError) as caught:
            _client(server.port, exchanges).stk_push(**PUSH)
        assert len(server.requests) == 1
    assert caught.value.request_may_have_reached is True


def test_connection_refused_never_reached() -> None:
    """Network faked: nothing listens on the port, which the simulator cannot arrange."""
    exchanges: list[Exchange] = []
    with pytest.raises(DarajaConnectionError) as caught:
        _client(_free_port(), exchanges).stk_push(**PUSH)
    assert caught.value.request_may_have_reached is False
    assert "was not sent" in str(caught.value)
    assert len(exchanges) == 1 and exchanges[0].error == str(caught.value)


def test_token_fetch_refused_never_reached_and_stores_nothing() -> None:
    """Network faked: nothing listens on the port."""
    credentials = DarajaCredentials("consumer-key", SECRET, f"http://127.0.0.1:{_free_port()}")
    store = MemoryTokenStore()
    client = DarajaClient(credentials, PAYBILL_CONFIG, token_store=store, timeout=(2.0, 0.5))
    with pytest.raises(DarajaConnectionError) as caught:
        client.stk_push(**PUSH)
    assert caught.value.request_may_have_reached is False
    assert "access token request was not sent" in str(caught.value)
    assert store.load(credentials.cache_key) is None


@pytest.mark.parametrize(("status", "content_type", "body"), [
    ("200 OK", "text/html", b"<html><body>Welcome</body></html>"),
    ("502 Bad Gateway", "text/html", b"<html><body>502 Bad Gateway</body></html>"),
    ("200 OK", "application/json", b"[1, 2, 3]"),
    ("200 OK", "application/json", b""),
])
def test_an_answer_not_in_daraja_shape_is_a_protocol_error(
    status: str, content_type: str, body: bytes
) -> None:
    """Network faked: the simulator always answers in Daraja's shape."""
    exchanges: list[Exchange] = []
    with _bad_server(_answer(status, content_type, body)) as server:
        with pytest.raises(DarajaProtocolError) as caught:
            _client(server.port, exchanges).stk_push(**PUSH)
        assert len(server.requests) == 1
    assert caught.value.http_status == int(status.split(maxsplit=1)[0])
    [exchange] = exchanges
    assert exchange.status == int(status.split(maxsplit=1)[0])
    assert exchange.response_body == (body.decode() or None)


def test_nothing_leaves_when_the_input_is_invalid() -> None:
    """Network faked: a server that records any connection proves nothing was sent."""
    exchanges: list[Exchange] = []
    with _bad_server(_answer("200 OK", "application/json", b"{}")) as server:
        client = _client(server.port, exchanges)
        with pytest.raises(InvalidPhoneNumber):
            client.stk_push(**{**PUSH, "phone": "0733123456"})
        with pytest.raises(InvalidAmount):
            client.stk_push(**{**PUSH, "amount": 250_001})
        with pytest.raises(InvalidConfiguration):
            client.stk_push(**{**PUSH, "callback_url": "/relative"})
        with pytest.raises(DarajaValidationError):
            client.stk_query("  ")
    assert server.requests == [] and exchanges == []
