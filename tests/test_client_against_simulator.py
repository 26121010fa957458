"""The DarajaClient against the Daraja simulator over real loopback HTTP: no mock of the network.

Fixtures (tests/conftest.py): ``daraja_sim`` / ``make_simulator`` and ``callback_listener``.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from freezegun import freeze_time

from muchiri_mpesa.daraja import (
    DarajaApiError,
    DarajaAuthError,
    DarajaClient,
    DarajaConnectionError,
    DarajaCredentials,
    DarajaProtocolError,
    DarajaValidationError,
    MemoryTokenStore,
    Outcome,
    ShortcodeConfig,
    parse_stk_callback,
    stk_callback_body,
)
from muchiri_mpesa.daraja.codes import SUBSCRIBER_LOCKED_MESSAGE
from muchiri_mpesa.daraja.simulator import (
    DEFAULT_CONSUMER_KEY,
    DEFAULT_CONSUMER_SECRET,
    DEFAULT_SHORTCODE,
    DEFAULT_TILL,
    KENYA_TZ,
    PAYBILL,
    SANDBOX_PASSKEY,
    SANDBOX_TEST_MSISDN,
    TILL,
    CallbackListener,
    demo,
)
from muchiri_mpesa.daraja.simulator.server import _monotonic

REPO = Path(__file__).resolve().parent.parent
SUCCESS_DESC = "The service request is processed successfully."


def make_client(sim, *, secret=DEFAULT_CONSUMER_SECRET, passkey=SANDBOX_PASSKEY, transaction_type=PAYBILL,
                till_number=None, base_url=None, **kwargs) -> DarajaClient:
    return DarajaClient(
        DarajaCredentials(DEFAULT_CONSUMER_KEY, secret, base_url=base_url or sim.base_url),
        ShortcodeConfig(DEFAULT_SHORTCODE, passkey, transaction_type=transaction_type, till_number=till_number),
        **{"timeout": (2.0, 5.0), **kwargs},
    )


@pytest.fixture
def exchanges():
    return []


@pytest.fixture
def client(daraja_sim, exchanges):
    return make_client(daraja_sim, observer=exchanges.append)


def pay(client, listener, phone=SANDBOX_TEST_MSISDN, amount=1, reference="S00042-2-20251126"):
    return client.stk_push(phone=phone, amount=amount, reference=reference, description="Order S00042",
                           callback_url=listener.url)


def wait_until_final(sim, checkout_request_id):
    delay = sim.transaction(checkout_request_id).result_at - _monotonic()
    if delay > 0:
        time.sleep(delay + 0.02)


# ----------------------------------------------------------------------------------------------------------------
# Every magic number, end to end through the client and parse_stk_callback
# ----------------------------------------------------------------------------------------------------------------
SCENARIOS = [
    # phone, result code, outcome, result desc
    (SANDBOX_TEST_MSISDN, "0", Outcome.SUCCESS, SUCCESS_DESC),
    ("254722000123", "0", Outcome.SUCCESS, SUCCESS_DESC),
    ("254700000001", "1032", Outcome.CANCELED, "Request cancelled by user"),
    ("254700000002", "1037", Outcome.FAILED, "DS timeout user cannot be reached"),
    ("254700000003", "1", Outcome.FAILED, "The balance is insufficient for the transaction."),
    ("254700000004", "2001", Outcome.FAILED, "The initiator information is invalid."),
]


@pytest.mark.parametrize(("phone", "code", "outcome", "desc"), SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_push_query_and_callback(daraja_sim, callback_listener, client, phone, code, outcome, desc):
    result = pay(client, callback_listener, phone=phone, amount=Decimal("99.20"))  # rounded up to 100
    assert result.response_code == "0"
    assert result.checkout_request_id.startswith("ws_CO_")
    tx = daraja_sim.transaction(result.checkout_request_id)
    assert tx.amount == 100 and tx.phone == phone and tx.account_reference == tx.payload["AccountReference"]
    assert len(tx.account_reference) <= 12 and len(tx.transaction_desc) <= 13

    pending = client.stk_query(result.checkout_request_id)
    assert pending.outcome is Outcome.PENDING
    assert pending.result_code is None

    [received] = callback_listener.wait_for(1, timeout=3)
    callback = parse_stk_callback(received.body)
    assert callback.checkout_request_id == result.checkout_request_id
    assert callback.merchant_request_id == result.merchant_request_id
    assert callback.result_code == code
    assert callback.outcome is outcome
    assert callback.result_desc == desc
    if code == "0":
        assert callback.is_success
        assert callback.amount == Decimal(100)
        assert callback.receipt_number == tx.receipt
        assert callback.phone_number == phone
        assert callback.balance is None
        assert callback.transaction_date == datetime.strptime(str(tx.transaction_date), "%Y%m%d%H%M%S").replace(
            tzinfo=KENYA_TZ)
    else:
        assert not callback.is_success and callback.receipt_number is None and callback.amount is None

    final = client.stk_query(result.checkout_request_id)
    assert final.result_code == code
    assert final.outcome is outcome
    assert final.result_desc == desc
    assert final.merchant_request_id == result.merchant_request_id


def test_lost_callback_query_recovers_the_payment(daraja_sim, callback_listener, client):
    result = pay(client, callback_listener, phone="254700000005")
    assert client.stk_query(result.checkout_request_id).outcome is Outcome.PENDING
    wait_until_final(daraja_sim, result.checkout_request_id)
    final = client.stk_query(result.checkout_request_id)
    assert final.outcome is Outcome.SUCCESS and final.result_code == "0"
    time.sleep(daraja_sim.late_callback_delay)
    assert callback_listener.received == []


def test_duplicate_callback_parses_to_the_same_payment(daraja_sim, callback_listener, client):
    result = pay(client, callback_listener, phone="254700000006")
    first, second = (parse_stk_callback(r.body) for r in callback_listener.wait_for(2, timeout=3))
    assert first == second
    assert first.checkout_request_id == result.checkout_request_id and first.is_success
    assert first.receipt_number == daraja_sim.transaction(result.checkout_request_id).receipt


def test_late_callback_after_the_query(daraja_sim, callback_listener, client):
    result = pay(client, callback_listener, phone="254700000007")
    wait_until_final(daraja_sim, result.checkout_request_id)
    assert client.stk_query(result.checkout_request_id).outcome is Outcome.SUCCESS
    assert callback_listener.received == []
    [received] = callback_listener.wait_for(1, timeout=3)
    assert parse_stk_callback(received.body).is_success


def test_early_callback_before_the_push_returns(daraja_sim, callback_listener, client):
    result = pay(client, callback_listener, phone="254700000008")
    [received] = callback_listener.received  # already there when stk_push returns
    callback = parse_stk_callback(received.body)
    assert callback.checkout_request_id == result.checkout_request_id and callback.is_success
    assert client.stk_query(result.checkout_request_id).outcome is Outcome.SUCCESS


@pytest.mark.parametrize("second_push", [False, True], ids=["magic-number", "pending-phone"])
def test_locked_subscriber_is_a_final_refusal(daraja_sim, callback_listener, client, second_push):
    phone = "254700000009"
    if second_push:
        phone = SANDBOX_TEST_MSISDN
        pay(client, callback_listener, phone=phone)
    with pytest.raises(DarajaApiError) as caught:
        pay(client, callback_listener, phone=phone)
    error = caught.value
    assert error.http_status == 500
    assert error.error_code == "500.001.1001"
    assert error.error_message.startswith("Unable to lock subscriber")
    assert error.retryable is False
    assert str(error).startswith(SUBSCRIBER_LOCKED_MESSAGE)
    assert len(daraja_sim.requests_for("stk_push")) == (2 if second_push else 1)  # not resent


def test_amount_above_daraja_limit_never_leaves_the_client(daraja_sim, callback_listener):
    client = make_client(daraja_sim, max_amount=250_000)
    with pytest.raises(DarajaValidationError):
        pay(client, callback_listener, amount=250_001)
    assert daraja_sim.requests == []


# ----------------------------------------------------------------------------------------------------------------
# Tokens
# ----------------------------------------------------------------------------------------------------------------
def test_one_token_for_many_calls(daraja_sim, callback_listener, client):
    for index in range(10):
        result = pay(client, callback_listener, phone=f"2547140000{index:02d}")
        client.stk_query(result.checkout_request_id)
    assert daraja_sim.token_requests == 1
    assert len(daraja_sim.requests_for("stk_push")) == 10


def test_refresh_and_retry_once_after_the_token_was_revoked(daraja_sim, callback_listener, client, exchanges):
    pay(client, callback_listener)
    daraja_sim.expire_tokens()
    result = pay(client, callback_listener, phone="254711000020")
    assert result.response_code == "0"
    assert daraja_sim.token_requests == 2
    assert [r.status for r in daraja_sim.requests_for("stk_push")] == [200, 401, 200]
    assert [(e.operation, e.status) for e in exchanges] == [
        ("token", 200), ("stk_push", 200), ("stk_push", 401), ("token", 200), ("stk_push", 200)]
    # The query refreshes the same way.
    daraja_sim.expire_tokens()
    assert client.stk_query(result.checkout_request_id).outcome is Outcome.PENDING
    assert [r.status for r in daraja_sim.requests_for("stk_query")] == [401, 500]
    assert daraja_sim.token_requests == 3


def test_token_invalidated_by_another_fetch_is_refreshed(daraja_sim, callback_listener, client):
    other = make_client(daraja_sim)  # same credentials, its own token store: its fetch revokes ours
    pay(client, callback_listener)
    pay(other, callback_listener, phone="254711000021")
    pay(client, callback_listener, phone="254711000022")
    assert daraja_sim.token_requests == 3
    assert [r.status for r in daraja_sim.requests_for("stk_push")] == [200, 200, 401, 200]


def test_a_shared_token_store_means_one_token(daraja_sim, callback_listener):
    store = MemoryTokenStore()
    first = make_client(daraja_sim, token_store=store)
    second = make_client(daraja_sim, token_store=store)
    pay(first, callback_listener)
    pay(second, callback_listener, phone="254711000023")
    assert daraja_sim.token_requests == 1


def test_refresh_happens_only_once(make_simulator, callback_listener):
    now = [1_700_000_000.0]

    def leaping_clock():  # every token is already expired when it is checked
        now[0] += 4000
        return now[0]

    sim = make_simulator(clock=leaping_clock)
    client = make_client(sim)
    with pytest.raises(DarajaAuthError):
        pay(client, callback_listener)
    assert sim.token_requests == 2
    assert [r.status for r in sim.requests_for("stk_push")] == [401, 401]
    assert sim.pushes == []


def test_wrong_consumer_secret(daraja_sim, callback_listener):
    client = make_client(daraja_sim, secret="wrong-secret")
    with pytest.raises(DarajaAuthError) as caught:
        pay(client, callback_listener)
    assert caught.value.http_status == 400
    assert caught.value.error_code == "400.008.01"
    assert "wrong-secret" not in str(caught.value)
    assert daraja_sim.requests_for("stk_push") == []


class RollingBackStore(MemoryTokenStore):
    """Fetches in a transaction of its own, as Odoo's database store does: what was written while it
    held its lock is undone when the fetch fails."""

    def __init__(self, log):
        super().__init__()
        self.log = log
        self.holding = False

    def refresh(self, key, fetch, stale):
        kept = len(self.log)
        self.holding = True
        try:
            return super().refresh(key, fetch, stale)
        except Exception:
            del self.log[kept:]
            raise
        finally:
            self.holding = False


def test_a_refused_token_request_reaches_the_observer(daraja_sim, callback_listener, exchanges):
    client = make_client(daraja_sim, secret="wrong-secret", observer=exchanges.append)
    with pytest.raises(DarajaAuthError):
        pay(client, callback_listener)
    [exchange] = exchanges
    assert (exchange.operation, exchange.method, exchange.status) == ("token", "GET", 400)
    assert exchange.response_body["errorCode"] == "400.008.01"
    assert exchange.error.startswith("Daraja refused the consumer key and secret.")
    assert "wrong-secret" not in json.dumps(vars(exchange), default=str)


def test_token_exchanges_are_reported_once_the_store_let_go(daraja_sim):
    """A store that rolls back a failed fetch must not take the refused request's record with it."""
    log = []
    store = RollingBackStore(log)
    refused = make_client(daraja_sim, secret="wrong-secret", token_store=store,
                          observer=lambda exchange: log.append((exchange, store.holding)))
    with pytest.raises(DarajaAuthError):
        refused.access_token()
    assert [(exchange.operation, exchange.status, holding) for exchange, holding in log] == [
        ("token", 400, False)
    ]
    log.clear()
    accepted = make_client(daraja_sim, token_store=store,
                           observer=lambda exchange: log.append((exchange, store.holding)))
    accepted.access_token()
    assert [(exchange.operation, exchange.status, holding) for exchange, holding in log] == [
        ("token", 200, False)
    ]


def test_token_expiry_is_anticipated_with_freezegun(daraja_sim, callback_listener, client):
    with freeze_time("2025-03-01 06:00:00") as frozen:
        pay(client, callback_listener)
        frozen.tick(timedelta(seconds=3599 - 30))  # inside the client's safety margin
        pay(client, callback_listener, phone="254711000024")
        frozen.tick(timedelta(seconds=3600))  # the second token has expired on both sides
        pay(client, callback_listener, phone="254711000025")
    assert daraja_sim.token_requests == 3
    assert all(r.status == 200 for r in daraja_sim.requests_for("stk_push"))  # never a 401


def test_timestamp_and_password_in_kenya_time(daraja_sim, callback_listener, client):
    with freeze_time("2025-06-01 21:30:00"):  # 00:30 the next day in Nairobi
        result = pay(client, callback_listener)
        tx = daraja_sim.transaction(result.checkout_request_id)
        query = client.stk_query(result.checkout_request_id)
    assert tx.payload["Timestamp"] == "20250602003000"
    assert result.checkout_request_id.startswith("ws_CO_02062025003000")
    assert query.outcome is Outcome.PENDING  # the simulator accepted the query's password too


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------
def test_wrong_passkey(daraja_sim, callback_listener):
    client = make_client(daraja_sim, passkey="0" * 64)
    with pytest.raises(DarajaApiError) as caught:
        pay(client, callback_listener)
    assert caught.value.error_code == "500.001.1001"
    assert caught.value.error_message == "Wrong credentials"
    assert caught.value.retryable is False
    assert "0" * 64 not in str(caught.value)
    assert len(daraja_sim.requests_for("stk_push")) == 1


@pytest.mark.parametrize(("error", "code"), [("spike_arrest", "500.003.02"), ("quota", "500.003.03")])
def test_spike_arrest_and_quota_are_retryable_but_not_retried(daraja_sim, callback_listener, client, error,
                                                              code):
    daraja_sim.fail_next(1, error, operations=["stk_push"])
    with pytest.raises(DarajaApiError) as caught:
        pay(client, callback_listener)
    assert caught.value.error_code == code
    assert caught.value.retryable is True
    assert caught.value.http_status == 500
    assert len(daraja_sim.requests_for("stk_push")) == 1
    assert daraja_sim.pushes == []
    result = pay(client, callback_listener)  # the caller may send it again later
    daraja_sim.fail_next(1, error, operations=["stk_query"])
    with pytest.raises(DarajaApiError) as caught:
        client.stk_query(result.checkout_request_id)
    assert caught.value.error_code == code and caught.value.retryable is True


def test_invalid_field_from_daraja_is_final(daraja_sim, callback_listener):
    # A till configured with the store number as till: the simulator refuses PartyB.
    client = make_client(daraja_sim, transaction_type=TILL, till_number=DEFAULT_SHORTCODE)
    with pytest.raises(DarajaApiError) as caught:
        pay(client, callback_listener)
    assert caught.value.http_status == 400
    assert caught.value.error_code == "400.002.02"
    assert caught.value.error_message == "Bad Request - Invalid PartyB"
    assert caught.value.retryable is False


def test_till_push(daraja_sim, callback_listener):
    client = make_client(daraja_sim, transaction_type=TILL, till_number=DEFAULT_TILL)
    result = pay(client, callback_listener)
    tx = daraja_sim.transaction(result.checkout_request_id)
    assert tx.transaction_type == TILL and tx.party_b == DEFAULT_TILL and tx.business_shortcode == DEFAULT_SHORTCODE
    assert parse_stk_callback(callback_listener.wait_for(1, timeout=3)[0].body).is_success


def test_unknown_checkout_request_id(daraja_sim, client):
    with pytest.raises(DarajaApiError) as caught:
        client.stk_query("ws_CO_01012025000000000708374149")
    assert caught.value.error_code == "400.002.02" and caught.value.retryable is False


def test_validation_happens_before_anything_is_sent(daraja_sim, callback_listener, client):
    for kwargs in ({"phone": "0800123456"}, {"amount": 0}, {"amount": 250_001}, {"phone": "12345"}):
        with pytest.raises(DarajaValidationError):
            pay(client, callback_listener, **kwargs)
    with pytest.raises(DarajaValidationError):
        client.stk_push(phone=SANDBOX_TEST_MSISDN, amount=1, reference="S1", description="x",
                        callback_url="ftp://example.com/cb")
    assert daraja_sim.requests == []


def test_phone_formats_reach_daraja_as_msisdn(daraja_sim, callback_listener, client):
    for index, raw in enumerate(["0712 345 670", "+254-712-345-671", "712345672", "254712345673", "0110345674"]):
        result = pay(client, callback_listener, phone=raw)
        tx = daraja_sim.transaction(result.checkout_request_id)
        assert tx.payload["PhoneNumber"] == tx.payload["PartyA"] == tx.phone
        assert tx.phone.startswith("254") and len(tx.phone) == 12, (index, tx.phone)


def test_read_timeout_on_a_push_is_not_resent(daraja_sim, callback_listener):
    client = make_client(daraja_sim, timeout=(2.0, 0.2))
    client.access_token()
    daraja_sim.delay_next(0.6)
    with pytest.raises(DarajaConnectionError) as caught:
        pay(client, callback_listener)
    assert caught.value.request_may_have_reached is True
    time.sleep(0.6)
    assert len(daraja_sim.requests_for("stk_push")) == 1, "the push was sent again"
    assert len(daraja_sim.pushes) == 1  # Daraja did process it: the prompt is on the phone


def test_connection_refused_says_nothing_was_sent(make_simulator, callback_listener):
    sim = make_simulator()
    client = make_client(sim)
    client.access_token()
    sim.stop()  # nothing listens on the port any more
    with pytest.raises(DarajaConnectionError) as caught:
        pay(client, callback_listener)
    assert caught.value.request_may_have_reached is False


def test_connection_refused_on_the_token(daraja_sim, callback_listener):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    client = make_client(daraja_sim, base_url=dead)
    with pytest.raises(DarajaConnectionError) as caught:
        pay(client, callback_listener)
    assert caught.value.request_may_have_reached is False


def test_html_answer_is_a_protocol_error_and_not_resent(daraja_sim, callback_listener, client):
    client.access_token()
    daraja_sim.fail_next(1, "unavailable", operations=["stk_push"])
    with pytest.raises(DarajaProtocolError) as caught:
        pay(client, callback_listener)
    assert caught.value.http_status == 503
    assert len(daraja_sim.requests_for("stk_push")) == 1


def test_observer_never_sees_secrets(daraja_sim, callback_listener, client, exchanges):
    result = pay(client, callback_listener)
    client.stk_query(result.checkout_request_id)
    token = client.token_store.load(client.credentials.cache_key).value
    password = daraja_sim.transaction(result.checkout_request_id).payload["Password"]
    dumped = json.dumps([vars(e) for e in exchanges], default=str)
    for secret in (token, password, SANDBOX_PASSKEY, DEFAULT_CONSUMER_SECRET):
        assert secret not in dumped
    assert [e.operation for e in exchanges] == ["token", "stk_push", "stk_query"]


# ----------------------------------------------------------------------------------------------------------------
# The scripted demo
# ----------------------------------------------------------------------------------------------------------------
def run_demo(*args):
    return subprocess.run(
        [sys.executable, "-m", "muchiri_mpesa.daraja.simulator.demo", "--callback-delay", "0.2", *args],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )


def test_demo_succeeds():
    result = run_demo()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    assert "MpesaReceiptNumber" in result.stdout


def test_demo_reports_a_cancelled_payment():
    result = run_demo("--phone", "254700000001")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1032" in result.stdout


def test_demo_against_a_running_simulator(daraja_sim):
    result = run_demo("--base-url", daraja_sim.base_url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(daraja_sim.pushes) == 1


def test_demo_in_process_returns_the_exit_code(capsys):
    assert demo.main(["--callback-delay", "0.1", "--phone", "254700000003"]) == 1
    assert demo.main(["--callback-delay", "0.1", "--phone", "254700000008"]) == 0
    # A lost callback: only the query knows (4, not argparse's 2 for a bad command line).
    lost = demo.main(["--callback-delay", "0.1", "--phone", "254700000005", "--timeout", "0.5"])
    assert lost == demo.NO_CALLBACK == 4
    out = capsys.readouterr().out
    assert "insufficient" in out.lower()


def test_listener_helper_answers_and_records():
    with CallbackListener(statuses=[503]) as listener:
        request = urllib.request.Request(listener.url, data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(request, timeout=5)
        with urllib.request.urlopen(request, timeout=5) as response:
            assert json.loads(response.read()) == {"ResultCode": 0, "ResultDesc": "Accepted"}
        assert [r.answered_status for r in listener.received] == [503, 200]


@pytest.mark.parametrize("phone", [SANDBOX_TEST_MSISDN, "254700000001"])
def test_simulator_and_library_agree_on_the_callback_wire_format(daraja_sim, callback_listener, client, phone):
    """Two independent writers of the stkCallback JSON (the simulator, daraja.stk_callback_body) must agree."""
    result = pay(client, callback_listener, phone=phone, amount=7)
    received = callback_listener.wait_for(1, timeout=3)[0].json()
    tx = daraja_sim.transaction(result.checkout_request_id)
    if tx.result_code == 0:
        paid_at = datetime.strptime(str(tx.transaction_date), "%Y%m%d%H%M%S").replace(tzinfo=KENYA_TZ)
        expected = stk_callback_body(result.merchant_request_id, result.checkout_request_id, 0, tx.result_desc,
                                     amount=Decimal(7), receipt=tx.receipt, transaction_date=paid_at, phone=phone)
    else:
        expected = stk_callback_body(result.merchant_request_id, result.checkout_request_id, tx.result_code,
                                     tx.result_desc)
    assert received == expected
    assert json.dumps(received) == json.dumps(expected)  # same key order and number types too
