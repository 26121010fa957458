"""The organisation statement (GET /__sim__/statement), sweeps, and the state file, over real loopback HTTP.

Fixtures (tests/conftest.py): ``make_simulator``, ``callback_listener``, ``daraja_client``.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import requests

from muchiri_mpesa.daraja import security_credential
from muchiri_mpesa.daraja.simulator import (
    B2B_RESULT,
    DEFAULT_INITIATOR_NAME,
    DEFAULT_INITIATOR_PASSWORD,
    DEFAULT_SHORTCODE,
    DETAILS,
    INITIATOR_RESULT,
    KENYA_TZ,
    REASON_TYPES,
    SANDBOX_TEST_MSISDN,
    STATEMENT_HEADER,
    DarajaSimulator,
    StateFileError,
    paybill_charge,
)
from muchiri_mpesa.daraja.simulator.c2b import LOST_CONFIRMATION

REPO = Path(__file__).resolve().parent.parent
FAST = {"callback_delay": 0.1, "callback_retry_delays": (0.05,), "callback_timeout": 2.0}


def statement(sim, **params):
    answer = requests.get(f"{sim.base_url}/__sim__/statement", params=params, timeout=5)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith("text/csv")
    lines = answer.text.splitlines()
    blank = lines.index("")
    preamble = {row[0]: row[1] for row in csv.reader(lines[:blank])}
    table = list(csv.reader(lines[blank + 1:]))
    assert tuple(table[0]) == STATEMENT_HEADER
    return preamble, [dict(zip(table[0], row, strict=True)) for row in table[1:]], answer.text


def amount(text: str) -> Decimal:
    return Decimal(text.replace(",", "")) if text else Decimal(0)


def stk_paid(sim, client, listener, phone=SANDBOX_TEST_MSISDN, amount=1500, reference="S00042"):
    push = client.stk_push(phone=phone, amount=amount, reference=reference, description="Order",
                           callback_url=listener.url)
    sim.wait_for_callback(push.checkout_request_id, timeout=5)
    return sim.transaction(push.checkout_request_id)


def c2b_paid(sim, amount, msisdn, bill_ref, **names):
    trans_id = sim.c2b_pay(amount, msisdn, bill_ref, **names)
    assert sim.wait_for_c2b(trans_id)["state"] == "completed"
    return trans_id


def reverse(client, sim, listener, receipt, amount):
    ack = client.reverse(
        initiator=DEFAULT_INITIATOR_NAME,
        security_credential=security_credential(DEFAULT_INITIATOR_PASSWORD, sim.certificate_pem),
        transaction_id=receipt, amount=amount, receiver_party=DEFAULT_SHORTCODE, remarks="Refund S00042",
        result_url=listener.url + "/result", timeout_url=listener.url + "/timeout")
    return sim.wait_for_deliveries(INITIATOR_RESULT, reference=ack.conversation_id, timeout=5)[0].body


# -- the statement ----------------------------------------------------------------------------------------------
def test_a_day_of_the_paybill_in_the_org_portal_format(make_simulator, callback_listener, daraja_client):
    sim = make_simulator(**FAST)
    client = daraja_client(sim)
    stk = stk_paid(sim, client, callback_listener, amount=12_500)
    c2b = c2b_paid(sim, 4_500, "254712340111", "INV/2026/00001", first_name="Wanjiku", last_name="Kamau")
    lost = c2b_paid(sim, 300, LOST_CONFIRMATION, "INV/2026/00002")
    ack = client.b2b_checkout(till="600100", amount=2_000, reference="S00043", callback_url=callback_listener.url,
                              partner_name="Muchiri Distributors")
    b2b = sim.wait_for_deliveries(B2B_RESULT, reference=ack.request_id, timeout=5)[0].body["transactionId"]
    failed = client.stk_push(phone="254700000003", amount=800, reference="S00044", description="Order",
                             callback_url=callback_listener.url)
    sim.wait_for_callback(failed.checkout_request_id, timeout=5)
    result = reverse(client, sim, callback_listener, c2b, 4_500)
    reversal = result["Result"]["TransactionID"]
    sweep = requests.post(f"{sim.base_url}/__sim__/sweep", json={"amount": 10_000}, timeout=5)
    assert sweep.status_code == 200, sweep.text

    today = datetime.now(KENYA_TZ).date().isoformat()
    preamble, rows, text = statement(sim, **{"from": today, "to": today})
    assert preamble["Organisation Name:"] == "Simulated Business"
    assert preamble["Organisation Short Code:"] == DEFAULT_SHORTCODE
    assert preamble["Time Period:"] == f"{today} 00:00:00 - {today} 23:59:59"
    assert preamble["Account Type:"] == "Utility Account"
    assert preamble["Opening Balance:"] == "0.00"

    by_kind = {(row["Receipt No."], row["Reason Type"]): row for row in rows}
    assert len(by_kind) == len(rows) == 11  # 4 payments, their 4 charges, a reversal, a failure and a sweep
    paid = by_kind[(stk.receipt, "Pay Bill Online")]
    assert paid["Details"] == "Pay Bill Online from 2547****4149 - JOHN DOE Acc. S00042"
    assert (paid["Paid In"], paid["Withdrawn"], paid["Transaction Status"]) == ("12,500.00", "", "Completed")
    assert paid["Other Party Info"] == "2547****4149 - JOHN DOE" and paid["A/C No."] == "S00042"
    assert '"12,500.00"' in text  # thousands separators, so quoted
    charge = by_kind[(stk.receipt, "Pay Bill Charge")]
    assert (charge["Details"], charge["Withdrawn"], charge["Paid In"]) == ("Pay Bill Charge", "-57.00", "")
    assert charge["Linked Transaction ID"] == stk.receipt
    assert by_kind[(c2b, "Pay Bill")]["Details"] == "Pay Bill from 2547****0111 - WANJIKU KAMAU Acc. INV/2026/00001"
    assert by_kind[(lost, "Pay Bill")]["Paid In"] == "300.00"  # the lost confirmation's money is there
    assert by_kind[(lost, "Pay Bill Charge")]["Withdrawn"] == "-5.00"
    assert by_kind[(b2b, "Business Pay Bill")]["Other Party Info"] == "600100 - DISTRIBUTOR TILL"
    assert by_kind[(b2b, "Business Pay Bill Charge")]["Withdrawn"] == "-20.00"
    back = by_kind[(reversal, "Reversal")]
    assert (back["Withdrawn"], back["Linked Transaction ID"]) == ("-4,500.00", c2b)
    assert back["Details"] == f"Reversal of {c2b} to 2547****0111 - WANJIKU KAMAU"
    fail = next(row for row in rows if row["Transaction Status"] == "Failed")
    assert (fail["Paid In"], fail["A/C No."], fail["Reason Type"]) == ("800.00", "S00044", "Pay Bill Online")
    settled = by_kind[(sweep.json()["receipt"], "Business Settlement")]
    assert settled["Withdrawn"] == "-10,000.00" and settled["Details"].startswith("Funds transfer to bank")
    assert by_kind[(c2b, "Pay Bill Charge")]["Withdrawn"] == "-34.00"  # the reversal gives no charge back

    # Newest first, times Kenya time, the Balance running row by row (Failed rows move nothing).
    stamps = [row["Completion Time"] for row in rows]
    assert all(re.fullmatch(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}", s) for s in stamps)
    assert stamps == sorted(stamps, reverse=True)
    balance = amount(preamble["Opening Balance:"])
    for row in reversed(rows):
        if row["Transaction Status"] == "Completed":
            balance += amount(row["Paid In"]) + amount(row["Withdrawn"])
        assert amount(row["Balance"]) == balance, row
    expected = 12_500 + 4_500 + 300 + 2_000 - (57 + 34 + 5 + 20) - 4_500 - 10_000
    assert balance == expected == amount(preamble["Closing Balance:"])
    assert sweep.json()["balance"] == expected

    ascending = statement(sim, order="asc")[1]
    assert ascending == list(reversed(rows))


def test_the_period_bounds_and_the_opening_balance(make_simulator):
    sim = make_simulator(**FAST)
    first = c2b_paid(sim, 1_000, "254712340111", "A1")
    cut = datetime.now(KENYA_TZ)
    c2b_paid(sim, 2_000, "254712340222", "A2")
    preamble, rows, _ = statement(sim, **{"from": cut.isoformat()})
    assert {row["A/C No."] for row in rows if row["Reason Type"] == "Pay Bill"} == {"A2"}
    assert preamble["Opening Balance:"] == "990.00" and first not in {row["Receipt No."] for row in rows}
    naive = cut.replace(tzinfo=None).isoformat(timespec="seconds")  # a naive datetime is Kenya time
    assert statement(sim, to=(cut - timedelta(days=1)).date().isoformat())[1] == []
    assert len(statement(sim, **{"from": naive})[1]) in (2, 4)
    tomorrow = (cut + timedelta(days=1)).date().isoformat()
    preamble, rows, _ = statement(sim, **{"from": tomorrow})
    assert rows == [] and preamble["Opening Balance:"] == preamble["Closing Balance:"] == "2,970.00"


@pytest.mark.parametrize("params", [{"format": "xlsx"}, {"from": "yesterday"}, {"order": "random"}])
def test_a_statement_request_it_cannot_answer_is_a_400(daraja_sim, params):
    answer = requests.get(f"{daraja_sim.base_url}/__sim__/statement", params=params, timeout=5)
    assert answer.status_code == 400 and "error" in answer.json()


def test_a_sweep_takes_whole_shillings_up_to_the_balance(make_simulator):
    sim = make_simulator(**FAST)
    c2b_paid(sim, 600, "254712340111", "A1")  # 600 - 10 charge = 590
    for body in ({"amount": 591}, {"amount": 0}, {"amount": "1.5"}, {}):
        assert requests.post(f"{sim.base_url}/__sim__/sweep", json=body, timeout=5).status_code == 400
    assert sim.sweep(590)["balance"] == 0


def test_the_tariff_and_the_wordings_are_one_catalogue():
    assert [paybill_charge(a) for a in (1, 100, 101, 500, 501, 1_500, 2_500, 7_500, 45_001, 250_000)] == [
        0, 0, 5, 5, 10, 15, 20, 42, 108, 108]
    assert set(DETAILS) == set(REASON_TYPES)
    assert REASON_TYPES["charge"] == "Pay Bill Charge" and DETAILS["sweep"].startswith("Funds transfer to bank")


# -- the state file ---------------------------------------------------------------------------------------------
def test_a_restart_with_the_state_file_keeps_urls_certificate_and_receipts(tmp_path, callback_listener, daraja_client):
    path = str(tmp_path / "daraja-state.json")
    with DarajaSimulator(port=0, state_file=path, **FAST) as sim:
        client = daraja_client(sim)
        client.register_c2b_urls(DEFAULT_SHORTCODE, "Completed", callback_listener.url + "/confirmation",
                                 callback_listener.url + "/validation")
        receipt = stk_paid(sim, client, callback_listener, amount=250).receipt
        certificate = sim.certificate_pem
        credential = security_credential(DEFAULT_INITIATOR_PASSWORD, certificate)
        sim.sweep(100)
        before = statement(sim)[2]
        port = sim.port
    saved = json.loads(Path(path).read_text(encoding="utf-8"))
    assert saved["format"] == "daraja-simulator-state" and "PRIVATE KEY" in saved["identity"]["private_key_pem"]

    with DarajaSimulator(port=port, state_file=path, **FAST) as again:
        assert again.certificate_pem == certificate
        registration = requests.get(f"{again.base_url}/__sim__/c2b/registrations",
                                    params={"shortcode": DEFAULT_SHORTCODE}, timeout=5).json()
        assert registration["registered"] and registration["persistent"]
        assert registration["ConfirmationURL"] == callback_listener.url + "/confirmation"
        assert again.payment(receipt).amount == 250
        assert statement(again)[2] == before

        # A paybill payment still reaches the registered ConfirmationURL; a refund with the old credential works.
        client = daraja_client(again)
        trans_id = c2b_paid(again, 700, "254712340111", "INV/2026/00003")
        confirmation = again.wait_for_deliveries("c2b_confirmation", reference=trans_id, timeout=5)[0]
        assert confirmation.delivered and confirmation.url.endswith("/confirmation")
        ack = client.reverse(initiator=DEFAULT_INITIATOR_NAME, security_credential=credential,
                             transaction_id=receipt, amount=250, receiver_party=DEFAULT_SHORTCODE,
                             remarks="Refund", result_url=callback_listener.url + "/result",
                             timeout_url=callback_listener.url + "/timeout")
        result = again.wait_for_deliveries(INITIATOR_RESULT, reference=ack.conversation_id, timeout=5)[0]
        assert result.body["Result"]["ResultCode"] == 0
        assert trans_id != receipt  # the receipts made before the restart are never made again


def test_without_a_state_file_a_restart_forgets_and_says_so(make_simulator, callback_listener, daraja_client):
    sim = make_simulator(**FAST)
    daraja_client(sim).register_c2b_urls(DEFAULT_SHORTCODE, "Completed", callback_listener.url + "/c",
                                         callback_listener.url + "/v")
    fresh = make_simulator(**FAST)
    answer = requests.get(f"{fresh.base_url}/__sim__/c2b/registrations", timeout=5).json()
    assert answer == {"shortcode": DEFAULT_SHORTCODE, "registered": False, "persistent": False}
    assert requests.get(f"{sim.base_url}/__sim__/c2b/registrations", timeout=5).json()["registered"]


@pytest.mark.parametrize("content", ["{not json", '{"format": "something else", "version": 1}',
                                     '{"format": "daraja-simulator-state", "version": 1, "ledger": [{"x": 1}]}'])
def test_a_corrupt_state_file_stops_the_start_and_is_left_as_it_was(tmp_path, content):
    path = tmp_path / "daraja-state.json"
    path.write_text(content, encoding="utf-8")
    sim = DarajaSimulator(port=0, state_file=str(path), **FAST)
    with pytest.raises(StateFileError, match=re.escape(str(path))):
        sim.start()
    assert not sim.running and path.read_text(encoding="utf-8") == content

    cli = subprocess.run(
        [sys.executable, "-m", "muchiri_mpesa.daraja.simulator", "--port", "0", "--state-file", str(path)],
        cwd=REPO, capture_output=True, text=True, timeout=30, check=False,
    )
    assert cli.returncode == 2 and "Cannot start" in cli.stderr and str(path) in cli.stderr
