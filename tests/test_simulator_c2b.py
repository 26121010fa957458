"""C2B and Pull Transactions over real loopback HTTP: DarajaClient -> simulator -> listeners.

Fixtures (tests/conftest.py): ``make_simulator``, ``callback_listener``, ``daraja_client``.
"""

from __future__ import annotations

import hashlib
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
import requests

from muchiri_mpesa.daraja import (
    PULL_CUT_PAGE_LIMIT,
    PULL_CUT_REPEATED_PAGE,
    DarajaApiError,
    InvalidConfiguration,
    c2b_validation_reject,
    hash_msisdn,
    parse_c2b_payment,
)
from muchiri_mpesa.daraja.simulator import (
    C2B_CONFIRMATION,
    C2B_MAGIC_NUMBERS,
    C2B_REGISTER_V1_PATH,
    C2B_REGISTER_V2_PATH,
    C2B_VALIDATION,
    DEFAULT_SHORTCODE,
    DEFAULT_TILL,
    INITIATOR_RESULT,
    SANDBOX_TEST_MSISDN,
    TILL,
    CallbackListener,
)
from muchiri_mpesa.daraja.simulator import __main__ as cli

PHONE = SANDBOX_TEST_MSISDN


def register(client, listener, response_type="Completed", shortcode=DEFAULT_SHORTCODE):
    return client.register_c2b_urls(shortcode, response_type, listener.url + "/confirmation",
                                    listener.url + "/validation")


def token(sim, client) -> dict[str, str]:
    return {"Authorization": f"Bearer {client.access_token().value}"}


def window():
    now = datetime.now(timezone.utc)
    return now - timedelta(hours=47), now + timedelta(minutes=1)


# -- registration -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("versions", "used"), [(("v1", "v2"), "v2"), (("v2",), "v2"), (("v1",), "v1")])
def test_register_uses_v2_and_falls_back_to_v1(make_simulator, callback_listener, daraja_client, versions, used):
    sim = make_simulator(c2b_versions=versions)
    registration = register(daraja_client(sim), callback_listener)
    assert (registration.version, registration.already_registered, registration.response_code) == (used, False, "0")
    assert sim.c2b_registrations[DEFAULT_SHORTCODE]["version"] == used
    refused = [r for r in sim.requests_for("c2b_register") if r.status == 401]
    assert [r.error_code for r in refused] == (["401.003.01"] if used == "v1" else [])
    assert sim.tokens_issued == 1  # the product mismatch is no token problem: no refresh


def test_wrong_version_answers_no_apiproduct_match_on_the_wire(make_simulator, daraja_client):
    sim = make_simulator(c2b_versions=("v2",))
    client = daraja_client(sim)
    body = {"ShortCode": DEFAULT_SHORTCODE, "ResponseType": "Completed", "ConfirmationURL": "https://a.example/c",
            "ValidationURL": "https://a.example/v"}
    answer = requests.post(sim.base_url + C2B_REGISTER_V1_PATH, json=body, headers=token(sim, client), timeout=5)
    assert answer.status_code == 401
    assert answer.json()["errorCode"] == "401.003.01" and "no apiproduct match" in answer.json()["errorMessage"]
    assert requests.post(sim.base_url + C2B_REGISTER_V2_PATH, json=body, timeout=5).status_code == 401  # no token


def test_production_like_registration_is_one_time_and_a_result(make_simulator, callback_listener, daraja_client):
    sim = make_simulator(c2b_register_once=True)
    client = daraja_client(sim)
    assert not register(client, callback_listener).already_registered
    again = register(client, callback_listener, "Cancelled")
    assert again.already_registered and again.response_code == "500.003.1001"
    assert "already registered" in again.description
    assert sim.c2b_registrations[DEFAULT_SHORTCODE]["ResponseType"] == "Completed"  # unchanged
    sandbox = make_simulator()
    register(daraja_client(sandbox), callback_listener)
    assert not register(daraja_client(sandbox), callback_listener, "Cancelled").already_registered
    assert sandbox.c2b_registrations[DEFAULT_SHORTCODE]["ResponseType"] == "Cancelled"


@pytest.mark.parametrize("url", ["https://a.example/mpesa/c", "https://a.example/M-PESA", "https://a.example/c.exe",
                                 "https://a.example/sqlite", "https://a.example/c?query=1", "https://x.ngrok.io/c",
                                 "https://webhook.site/abc", "https://a.example/safaricom"])
def test_urls_with_a_banned_word_are_refused(make_simulator, daraja_client, url):
    sim = make_simulator()
    client = daraja_client(sim)
    body = {"ShortCode": DEFAULT_SHORTCODE, "ResponseType": "Completed", "ConfirmationURL": url,
            "ValidationURL": "https://a.example/v"}
    answer = requests.post(sim.base_url + C2B_REGISTER_V2_PATH, json=body, headers=token(sim, client), timeout=5)
    assert answer.status_code == 400
    assert answer.json()["errorMessage"] == "Bad Request - Invalid ConfirmationURL"
    with pytest.raises(InvalidConfiguration):  # the client never sends it
        client.register_c2b_urls(DEFAULT_SHORTCODE, "Completed", url, "https://a.example/v")
    assert sim.c2b_registrations == {}


def test_register_refuses_other_shortcodes_and_response_types(make_simulator, daraja_client):
    sim = make_simulator()
    client = daraja_client(sim)
    base = {"ShortCode": DEFAULT_SHORTCODE, "ResponseType": "Completed", "ConfirmationURL": "https://a.example/c",
            "ValidationURL": "https://a.example/v"}
    for name, value in (("ShortCode", "600111"), ("ResponseType", "completed"), ("ValidationURL", "nope")):
        answer = requests.post(sim.base_url + C2B_REGISTER_V2_PATH, json={**base, name: value},
                               headers=token(sim, client), timeout=5)
        assert answer.json()["errorMessage"] == f"Bad Request - Invalid {name}"
    with pytest.raises(DarajaApiError) as caught:
        client.register_c2b_urls("600111", "Completed", "https://a.example/c", "https://a.example/v")
    assert caught.value.error_code == "400.002.02"


def test_both_versions_refused_says_so(make_simulator, callback_listener, daraja_client):
    sim = make_simulator(c2b_versions=())
    with pytest.raises(DarajaApiError, match="both C2B registration versions") as caught:
        register(daraja_client(sim), callback_listener)
    assert caught.value.error_code == "401.003.01"


# -- payments, validation and confirmation ----------------------------------------------------------------------
def test_simulate_confirms_with_a_hashed_msisdn(make_simulator, callback_listener, daraja_client):
    sim = make_simulator()
    client = daraja_client(sim)
    register(client, callback_listener)
    answer = client.simulate_c2b(DEFAULT_SHORTCODE, 1500, "0708374149", "S00042")
    assert answer["ResponseCode"] == "0" and answer["OriginatorCoversationID"]
    delivery = sim.wait_for_deliveries(C2B_CONFIRMATION, timeout=5)[0]
    assert delivery.url.endswith("/confirmation") and sim.deliveries(C2B_VALIDATION) == []  # validation off
    payment = parse_c2b_payment(callback_listener.wait_for(1)[0].body)
    assert payment.trans_id == delivery.reference and payment.amount == Decimal(1500)
    assert payment.msisdn == hashlib.sha256(PHONE.encode()).hexdigest() == hash_msisdn("0708374149")
    assert payment.bill_ref == "S00042" and payment.transaction_type == "Pay Bill"
    assert payment.org_balance == "1500.00" and payment.shortcode == DEFAULT_SHORTCODE
    assert abs(payment.trans_time - datetime.now(timezone.utc)) < timedelta(seconds=5)
    assert sim.payment(payment.trans_id).source == "c2b"


def test_simulate_validates_its_fields(make_simulator, daraja_client):
    sim = make_simulator()
    client = daraja_client(sim)
    base = {"ShortCode": DEFAULT_SHORTCODE, "CommandID": "CustomerPayBillOnline", "Amount": 10, "Msisdn": PHONE,
            "BillRefNumber": "S1"}
    url = sim.base_url + "/mpesa/c2b/v1/simulate"
    for name, value in (("ShortCode", DEFAULT_TILL), ("CommandID", "Pay"), ("Amount", 250_001), ("Amount", "x"),
                        ("Msisdn", "0708374149"), ("BillRefNumber", ""), ("BillRefNumber", "x" * 21)):
        answer = requests.post(url, json={**base, name: value}, headers=token(sim, client), timeout=5)
        assert answer.status_code == 400 and answer.json()["errorMessage"] == f"Bad Request - Invalid {name}", name
    assert sim.c2b_payments == []


def test_till_payments_go_to_the_till(make_simulator, callback_listener, daraja_client):
    sim = make_simulator()
    client = daraja_client(sim)
    register(client, callback_listener, shortcode=DEFAULT_TILL)
    client.simulate_c2b(DEFAULT_TILL, 20, PHONE, "", command_id=TILL)
    sim.wait_for_deliveries(C2B_CONFIRMATION, timeout=5)
    payment = parse_c2b_payment(callback_listener.wait_for(1)[0].body)
    assert payment.shortcode == DEFAULT_TILL and payment.transaction_type == "Buy Goods" and payment.bill_ref == ""


@pytest.mark.parametrize(("answer", "state", "decided_by"), [
    ({"ResultCode": "0", "ResultDesc": "Accepted"}, "completed", "validation"),
    ({"ResultCode": 0, "ResultDesc": "Accepted"}, "completed", "validation"),
    (c2b_validation_reject("C2B00012"), "cancelled", "validation"),
])
def test_external_validation_decides(make_simulator, daraja_client, answer, state, decided_by):
    sim = make_simulator(c2b_external_validation=True)
    with Validator(answer) as validator:
        register(daraja_client(sim), validator.listener, "Completed")
        trans_id = sim.c2b_pay(300, PHONE, "S00042")
        outcome = sim.wait_for_c2b(trans_id)
        assert (outcome["state"], outcome["decided_by"]) == (state, decided_by)
        validation = sim.deliveries(C2B_VALIDATION, trans_id)[0]
        body = parse_c2b_payment(validation.body)
        assert body.trans_id == trans_id and body.org_balance is None
        if state == "completed":
            sim.wait_for_deliveries(C2B_CONFIRMATION, reference=trans_id)
            assert sim.payment(trans_id).amount == 300
        else:
            time.sleep(0.2)
            assert sim.deliveries(C2B_CONFIRMATION, trans_id) == []
            with pytest.raises(KeyError):
                sim.payment(trans_id)


@pytest.mark.parametrize(("response_type", "state"), [("Completed", "completed"), ("Cancelled", "cancelled")])
def test_a_slow_validation_url_times_out_and_response_type_decides(make_simulator, daraja_client, response_type,
                                                                     state):
    sim = make_simulator(c2b_external_validation=True, c2b_validation_timeout=0.3)
    with CallbackListener(delay=0.8) as slow:
        register(daraja_client(sim), slow, response_type)
        started = time.monotonic()
        trans_id = sim.c2b_pay(300, PHONE, "S00042")
        outcome = sim.wait_for_c2b(trans_id, timeout=5)
        assert 0.3 <= time.monotonic() - started < 0.8  # decided at the timeout, not at the late answer
        assert (outcome["state"], outcome["decided_by"], outcome["validation"]) == (state, "response_type", None)
        assert sim.deliveries(C2B_VALIDATION, trans_id)[0].attempts[0].error == "timed out"


def test_an_unusable_validation_answer_lets_response_type_decide(make_simulator, daraja_client):
    sim = make_simulator(c2b_external_validation=True)
    with CallbackListener(statuses=[500]) as failing:
        register(daraja_client(sim), failing, "Cancelled")
        trans_id = sim.c2b_pay(300, PHONE, "S00042")
        assert sim.wait_for_c2b(trans_id)["decided_by"] == "response_type"
        assert len(sim.deliveries(C2B_VALIDATION, trans_id)[0].attempts) == 1  # asked once, never retried


def test_magic_slow_validation_ignores_the_answer(make_simulator, daraja_client):
    sim = make_simulator(c2b_external_validation=True)
    with Validator(c2b_validation_reject()) as validator:
        register(daraja_client(sim), validator.listener, "Completed")
        trans_id = sim.c2b_pay(300, "254700000103", "S00042")
        assert sim.wait_for_c2b(trans_id)["state"] == "completed"  # the rejection came "too late"


def test_magic_lost_confirmation_is_only_in_pull(make_simulator, callback_listener, daraja_client):
    sim = make_simulator()
    client = daraja_client(sim)
    register(client, callback_listener)
    client.pull_register(DEFAULT_SHORTCODE, PHONE, callback_listener.url + "/pull")
    trans_id = sim.c2b_pay(700, "254700000101", "S00042")
    assert sim.wait_for_c2b(trans_id)["state"] == "completed"
    time.sleep(0.2)
    assert sim.deliveries(C2B_CONFIRMATION, trans_id) == [] and callback_listener.received == []
    rows = list(client.pull_transactions(DEFAULT_SHORTCODE, *window()).rows)
    assert [(r.transaction_id, r.amount, r.bill_reference) for r in rows] == [(trans_id, Decimal(700), "S00042")]


def test_magic_duplicate_confirmation(make_simulator, callback_listener, daraja_client):
    sim = make_simulator(duplicate_callback_gap=0.05)
    register(daraja_client(sim), callback_listener)
    trans_id = sim.c2b_pay(700, "254700000102", "S00042")
    sim.wait_for_deliveries(C2B_CONFIRMATION, count=2, reference=trans_id)
    bodies = [r.body for r in callback_listener.wait_for(2)]
    assert bodies[0] == bodies[1] and parse_c2b_payment(bodies[0]).trans_id == trans_id
    assert set(C2B_MAGIC_NUMBERS) == {"254700000101", "254700000102", "254700000103"}


@pytest.mark.parametrize(("form", "expected"), [("plain", PHONE), ("masked", "254708***149")])
def test_msisdn_format_is_configurable(make_simulator, callback_listener, daraja_client, form, expected):
    sim = make_simulator(c2b_msisdn_format=form)
    register(daraja_client(sim), callback_listener)
    sim.c2b_pay(10, PHONE, "S1")
    assert parse_c2b_payment(callback_listener.wait_for(1)[0].body).msisdn == expected


def test_without_registered_urls_the_money_still_arrives(make_simulator):
    sim = make_simulator()
    trans_id = sim.c2b_pay(10, PHONE, "S1")
    assert sim.wait_for_c2b(trans_id)["state"] == "completed" and sim.deliveries() == []


def test_c2b_pay_control_endpoint(make_simulator, callback_listener, daraja_client):
    sim = make_simulator()
    register(daraja_client(sim), callback_listener)
    answer = requests.post(f"{sim.base_url}/__sim__/c2b-pay", json={"amount": 5, "msisdn": PHONE, "bill_ref": "X"},
                           timeout=5)
    trans_id = answer.json()["TransID"]
    sim.wait_for_deliveries(C2B_CONFIRMATION, reference=trans_id)
    assert requests.post(f"{sim.base_url}/__sim__/c2b-pay", json={"msisdn": PHONE}, timeout=5).status_code == 400
    with pytest.raises(ValueError):
        sim.c2b_pay(0, PHONE, "X")
    # A phone pays whole shillings: an amount with cents is refused and pays nothing, never cut to 9658.
    before = len(sim.c2b_payments)
    for amount in ("9658.30", '"9658"', "true", "null", "1e400", "NaN", "250001", "1000000000"):
        cents = requests.post(f"{sim.base_url}/__sim__/c2b-pay", headers={"Content-Type": "application/json"},
                              data=f'{{"amount": {amount}, "msisdn": "{PHONE}", "bill_ref": "X"}}', timeout=5)
        assert cents.status_code == 400 and "whole number of shillings" in cents.json()["error"], cents.text
    assert len(sim.c2b_payments) == before
    assert requests.post(f"{sim.base_url}/__sim__/c2b-pay", json={"amount": 9658.0, "msisdn": PHONE, "bill_ref": "X"},
                         timeout=5).status_code == 200


# -- Pull Transactions ------------------------------------------------------------------------------------------
def test_pull_pages_through_every_c2b_and_stk_payment(make_simulator, callback_listener, daraja_client):
    sim = make_simulator(pull_page_size=2)
    client = daraja_client(sim)
    client.pull_register(DEFAULT_SHORTCODE, "0708374149", callback_listener.url + "/pull")
    push = client.stk_push(phone=PHONE, amount=42, reference="S7", description=None, callback_url=callback_listener.url)
    sim.wait_for_callback(push.checkout_request_id)
    paid = [sim.c2b_pay(10 + i, PHONE, f"INV{i}") for i in range(4)]
    for trans_id in paid:
        sim.wait_for_c2b(trans_id)
    first, more = client.pull_query(DEFAULT_SHORTCODE, *window())
    assert len(first) == 2 and more
    third, _ = client.pull_query(DEFAULT_SHORTCODE, *window(), offset=4)
    assert len(third) == 1
    assert client.pull_query(DEFAULT_SHORTCODE, *window(), offset=5) == ([], False)
    rows = list(client.pull_transactions(DEFAULT_SHORTCODE, *window()).rows)
    receipt = sim.transaction(push.checkout_request_id).receipt
    assert [r.transaction_id for r in rows] == [receipt, *paid]  # oldest first
    assert rows[0].amount == Decimal(42) and rows[0].msisdn == PHONE
    assert len(sim.requests_for("pull_query")) == 3 + 4  # 3 pages of 2, 2, 1 and the 1001 that ends them


def test_pull_keeps_48_hours_and_the_dates_asked(make_simulator, callback_listener, daraja_client):
    sim = make_simulator()
    client = daraja_client(sim)
    client.pull_register(DEFAULT_SHORTCODE, PHONE, callback_listener.url + "/pull")
    old, recent, fresh = (sim.c2b_pay(a, PHONE, "S1") for a in (1, 2, 3))
    for trans_id in (old, recent, fresh):
        sim.wait_for_c2b(trans_id)
    sim.age_transaction(old, 49)
    sim.age_transaction(recent, 47)
    now = datetime.now(timezone.utc)
    everything = client.pull_transactions(DEFAULT_SHORTCODE, now - timedelta(days=5), now + timedelta(hours=1)).rows
    assert [r.transaction_id for r in everything] == [recent, fresh]
    last_hour = client.pull_transactions(DEFAULT_SHORTCODE, now - timedelta(hours=1), now + timedelta(hours=1)).rows
    assert [r.transaction_id for r in last_hour] == [fresh]
    assert requests.post(f"{sim.base_url}/__sim__/age", json={"receipt": fresh, "hours": 50}, timeout=5).ok
    assert client.pull_transactions(DEFAULT_SHORTCODE, now - timedelta(days=5), now).rows == tuple(
        r for r in everything if r.transaction_id == recent)


def test_pull_answers_1001_when_empty_and_refuses_unregistered_or_bad_dates(make_simulator, callback_listener,
                                                                             daraja_client):
    sim = make_simulator()
    client = daraja_client(sim)
    with pytest.raises(DarajaApiError) as caught:
        client.pull_query(DEFAULT_SHORTCODE, *window())
    assert caught.value.error_code == "400.002.02"
    assert client.pull_register(DEFAULT_SHORTCODE, PHONE, callback_listener.url + "/pull")["ResponseStatus"] == "1000"
    assert client.pull_query(DEFAULT_SHORTCODE, *window()) == ([], False)
    none = sim.requests_for("pull_query")[-1].response_body
    assert none["ResponseCode"] == "1001" and none["ResponseRefID"]
    url = f"{sim.base_url}/pulltransactions/v1/query"
    for name, value in (("StartDate", "2024-01-01"), ("EndDate", "2000-01-01 00:00:00"), ("OffSetValue", "-1")):
        body = {"ShortCode": DEFAULT_SHORTCODE, "StartDate": "2024-01-01 00:00:00", "EndDate": "2024-01-02 00:00:00",
                "OffSetValue": "0", name: value}
        answer = requests.post(url, json=body, headers=token(sim, client), timeout=5)
        assert answer.json()["errorMessage"] == f"Bad Request - Invalid {name}", name


def test_cli_c2b_flags_reach_the_simulator(monkeypatch):
    seen = {}

    class Recorder(cli.DarajaSimulator):
        def start(self):
            seen.update(vars(self.settings))
            raise OSError("not really")

    monkeypatch.setattr(cli, "DarajaSimulator", Recorder)
    assert cli.main(["--c2b-versions", "v2", "--c2b-register-once", "--c2b-external-validation",
                     "--validation-timeout", "3", "--pull-page-size", "5", "--c2b-msisdn-format", "plain", "-q"]) == 2
    assert seen["c2b_versions"] == ("v2",) and seen["c2b_register_once"] and seen["c2b_external_validation"]
    assert (seen["c2b_validation_timeout"], seen["pull_page_size"], seen["c2b_msisdn_format"]) == (3, 5, "plain")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--c2b-versions", "v3"])


class Validator:
    """A ValidationURL answering ``answer`` (a C2B validation JSON) to every POST; 200 {"ResultCode": 0} else."""

    def __init__(self, answer):
        import json  # noqa: PLC0415
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: PLC0415
        from threading import Thread  # noqa: PLC0415

        payload = json.dumps(answer).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = payload if self.path.endswith("/validation") else b'{"ResultCode": 0}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.listener = type("L", (), {"url": f"http://127.0.0.1:{self._server.server_address[1]}/cb"})()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


# -- Pull Transactions: a run says whether it read the whole window -------------------------------------------
def _pull_setup(make_simulator, callback_listener, daraja_client, count, **settings):
    sim = make_simulator(**settings)
    client = daraja_client(sim)
    client.pull_register(DEFAULT_SHORTCODE, PHONE, callback_listener.url + "/pull")
    paid = []
    for i in range(count):
        paid.append(sim.c2b_pay(10 + i, PHONE, f"INV{i}"))
        sim.wait_for_c2b(paid[-1])
        sim.age_transaction(paid[-1], (count - i) / 10)  # a tenth of an hour apart, oldest first
    return sim, client, paid


def test_magic_repeat_page_cuts_the_run_short(make_simulator, callback_listener, daraja_client):
    sim, client, paid = _pull_setup(make_simulator, callback_listener, daraja_client, 5, pull_page_size=2)
    sim.pull_next("repeat_page", count=2)
    listing = client.pull_transactions(DEFAULT_SHORTCODE, *window())
    assert [r.transaction_id for r in listing.rows] == paid[:2]
    assert (listing.complete, listing.cut_short) == (False, PULL_CUT_REPEATED_PAGE)
    assert listing.read_until == listing.rows[1].trx_date  # read up to its second row
    assert abs(listing.read_until - sim.payment(paid[1]).at) < timedelta(seconds=1)
    assert [q.request_body["OffSetValue"] for q in sim.requests_for("pull_query")] == ["0", "2"]
    again = client.pull_transactions(DEFAULT_SHORTCODE, *window())  # Daraja pages again: the whole window
    assert ([r.transaction_id for r in again.rows], again.complete, again.read_until) == (paid, True, again.end)
    # The same quirk from another process, through the control API.
    assert requests.post(f"{sim.base_url}/__sim__/pull-next", json={"outcome": "repeat_page", "count": 2},
                         timeout=5).ok
    assert not client.pull_transactions(DEFAULT_SHORTCODE, *window()).complete
    refused = requests.post(f"{sim.base_url}/__sim__/pull-next", json={"outcome": "nonsense"}, timeout=5)
    assert refused.status_code == 400


def test_a_run_past_its_page_limit_says_so(make_simulator, callback_listener, daraja_client):
    _sim, client, paid = _pull_setup(make_simulator, callback_listener, daraja_client, 5, pull_page_size=2)
    listing = client.pull_transactions(DEFAULT_SHORTCODE, *window(), max_pages=2)
    assert ([r.transaction_id for r in listing.rows], listing.complete) == (paid[:4], False)
    assert listing.cut_short == PULL_CUT_PAGE_LIMIT
    assert listing.read_until == listing.rows[3].trx_date


def test_magic_with_reversals_lists_money_going_out(make_simulator, callback_listener, daraja_client):
    sim, client, paid = _pull_setup(make_simulator, callback_listener, daraja_client, 2)
    ack = client.reverse(
        initiator=sim.initiator_name, security_credential=sim.security_credential(), transaction_id=paid[0],
        amount=10, receiver_party=DEFAULT_SHORTCODE, remarks="Refund", occasion="",
        result_url=callback_listener.url + "/result", timeout_url=callback_listener.url + "/timeout")
    sim.wait_for_deliveries(INITIATOR_RESULT, reference=ack.conversation_id)
    reversal = sim.payment(paid[0]).reversed_by
    assert [r.transaction_id for r in client.pull_transactions(DEFAULT_SHORTCODE, *window()).rows] == paid
    sim.pull_next("with_reversals")
    listing = client.pull_transactions(DEFAULT_SHORTCODE, *window())
    assert listing.complete  # the rows of money going out do not make the answer unreadable
    assert [r.transaction_id for r in listing.payments] == paid
    [row] = listing.others
    assert (row.transaction_id, row.amount, row.transaction_type, row.is_payment) == (
        reversal, Decimal(-10), "reversal", False)
    with pytest.raises(ValueError):
        sim.pull_next("ignore_everything")
