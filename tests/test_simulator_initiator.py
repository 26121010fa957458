"""Reversal and Transaction Status over real loopback HTTP: DarajaClient -> simulator -> ResultURL listener.

Fixtures (tests/conftest.py): ``daraja_sim`` / ``make_simulator``, ``callback_listener``, ``daraja_client``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest
import requests

from muchiri_mpesa.daraja import (
    DarajaApiError,
    DarajaAuthError,
    InvalidConfiguration,
    certificate_summary,
    parse_initiator_result,
    security_credential,
)
from muchiri_mpesa.daraja.simulator import (
    DEFAULT_INITIATOR_NAME,
    DEFAULT_INITIATOR_PASSWORD,
    DEFAULT_SHORTCODE,
    INITIATOR_RESULT,
    INITIATOR_TIMEOUT,
    REVERSAL_PATH,
    SANDBOX_TEST_MSISDN,
    TRANSACTION_STATUS_PATH,
)
from muchiri_mpesa.daraja.simulator import __main__ as cli
from muchiri_mpesa.daraja.simulator.keys import new_identity

REPO = Path(__file__).resolve().parent.parent


# -- helpers ----------------------------------------------------------------------------------------------------
def paid_receipt(sim, client, listener, phone=SANDBOX_TEST_MSISDN, amount=250) -> str:
    """An STK payment the simulator completed: its receipt."""
    push = client.stk_push(phone=phone, amount=amount, reference="S00042", description="Order",
                           callback_url=listener.url)
    sim.wait_for_callback(push.checkout_request_id, timeout=5)
    return sim.transaction(push.checkout_request_id).receipt


def urls(listener) -> dict[str, str]:
    return {"result_url": listener.url + "/result", "timeout_url": listener.url + "/timeout"}


def reverse(client, sim, listener, receipt, amount=250, *, credential=None, initiator=DEFAULT_INITIATOR_NAME,
            remarks="Refund S00042", receiver=DEFAULT_SHORTCODE, occasion=""):
    return client.reverse(
        initiator=initiator,
        security_credential=credential or security_credential(DEFAULT_INITIATOR_PASSWORD, sim.certificate_pem),
        transaction_id=receipt, amount=amount, receiver_party=receiver, remarks=remarks, occasion=occasion,
        **urls(listener))


def status(client, sim, listener, receipt, *, party_a=DEFAULT_SHORTCODE, identifier_type="4", remarks="Status",
           credential=None):
    return client.transaction_status(
        initiator=DEFAULT_INITIATOR_NAME,
        security_credential=credential or sim.security_credential(),
        transaction_id=receipt, party_a=party_a, identifier_type=identifier_type, remarks=remarks, **urls(listener))


def result_of(sim, ack, kind=INITIATOR_RESULT):
    """Wait for the POST of ``ack``'s ConversationID and parse it as a DarajaClient user would."""
    delivery = sim.wait_for_deliveries(kind, reference=ack.conversation_id, timeout=5)[0]
    assert delivery.delivered
    return parse_initiator_result(delivery.body, timeout=kind == INITIATOR_TIMEOUT), delivery


# -- certificate and credential ---------------------------------------------------------------------------------
def test_the_certificate_is_served_and_is_the_simulators_own(daraja_sim, make_simulator):
    pem = requests.get(f"{daraja_sim.base_url}/__sim__/certificate", timeout=5)
    assert pem.status_code == 200 and pem.headers["Content-Type"] == "application/x-pem-file"
    assert pem.text == daraja_sim.certificate_pem
    assert pem.text.startswith("-----BEGIN CERTIFICATE-----")
    assert "Daraja Simulator" in certificate_summary(pem.text).subject
    assert make_simulator().certificate_pem != daraja_sim.certificate_pem  # each simulator has its own key pair


def test_initiator_defaults_are_safaricoms_sandbox_ones(daraja_sim):
    assert (daraja_sim.initiator_name, daraja_sim.initiator_password) == ("testapi", "Safaricom999!*!")


# -- Reversal ---------------------------------------------------------------------------------------------------
def test_reversal_of_a_real_receipt_then_a_second_one(daraja_sim, callback_listener, daraja_client):
    client = daraja_client()
    receipt = paid_receipt(daraja_sim, client, callback_listener)
    ack = reverse(client, daraja_sim, callback_listener, receipt)
    assert ack.response_code == "0" and ack.conversation_id.startswith("AG_") and ack.originator_conversation_id
    result, delivery = result_of(daraja_sim, ack)
    assert delivery.url.endswith("/result")
    assert result.is_success and result.originator_conversation_id == ack.originator_conversation_id
    assert result.original_transaction_id == receipt
    assert result.amount == Decimal(250) and result.credit_party_shortcode == DEFAULT_SHORTCODE
    assert result.parameters["CreditPartyPublicName"].startswith(SANDBOX_TEST_MSISDN)
    assert result.transaction_id and result.transaction_id != receipt
    assert daraja_sim.payment(receipt).reversed_by == result.transaction_id

    again = reverse(client, daraja_sim, callback_listener, receipt)
    second, _ = result_of(daraja_sim, again)
    assert second.result_code == "R000001" and "already reversed" in second.description


@pytest.mark.parametrize("case", ["unknown", "amount", "shortcode"])
def test_reversal_of_an_unknown_receipt_or_another_amount_or_shortcode_is_r000002(
        daraja_sim, callback_listener, daraja_client, case):
    client = daraja_client()
    receipt = "UL1ZZZZZZZ" if case == "unknown" else paid_receipt(daraja_sim, client, callback_listener)
    ack = reverse(client, daraja_sim, callback_listener, receipt, amount=100 if case == "amount" else 250,
                  receiver="600111" if case == "shortcode" else DEFAULT_SHORTCODE)
    result, _ = result_of(daraja_sim, ack)
    assert result.result_code == "R000002"
    if case != "unknown":
        assert daraja_sim.payment(receipt).reversed_by is None


@pytest.mark.parametrize("wrong", ["password", "certificate", "initiator", "garbage"])
def test_a_wrong_credential_or_initiator_is_2001_and_reverses_nothing(
        daraja_sim, callback_listener, daraja_client, wrong):
    client = daraja_client()
    receipt = paid_receipt(daraja_sim, client, callback_listener)
    credential = {
        "password": security_credential("wrong-password", daraja_sim.certificate_pem),
        "certificate": security_credential(DEFAULT_INITIATOR_PASSWORD, new_identity("other").certificate_pem),
        "initiator": None,
        "garbage": "bm90IGVuY3J5cHRlZA==",
    }[wrong]
    ack = reverse(client, daraja_sim, callback_listener, receipt, credential=credential,
                  initiator="someone" if wrong == "initiator" else DEFAULT_INITIATOR_NAME)
    result, _ = result_of(daraja_sim, ack)
    assert result.result_code == "2001" and "initiator" in result.description
    assert daraja_sim.payment(receipt).reversed_by is None


def test_a_result_that_never_comes_still_reverses_and_status_tells(daraja_sim, callback_listener, daraja_client):
    client = daraja_client()
    receipt = paid_receipt(daraja_sim, client, callback_listener)
    ack = reverse(client, daraja_sim, callback_listener, receipt, remarks="Refund sim-no-result")
    time.sleep(daraja_sim.result_delay + 0.2)
    assert daraja_sim.deliveries(INITIATOR_RESULT, ack.conversation_id) == []
    assert daraja_sim.initiator_requests[-1]["outcome"] == "no_result"
    assert daraja_sim.payment(receipt).reversed_by  # M-Pesa did it; only the news was lost
    checked, _ = result_of(daraja_sim, status(client, daraja_sim, callback_listener, receipt))
    assert checked.transaction_status == "Reversed"


def test_a_queue_timeout_posts_to_the_timeout_url_and_does_nothing(daraja_sim, callback_listener, daraja_client):
    client = daraja_client()
    receipt = paid_receipt(daraja_sim, client, callback_listener)
    ack = reverse(client, daraja_sim, callback_listener, receipt, occasion="SIM-QUEUE-TIMEOUT")
    result, delivery = result_of(daraja_sim, ack, INITIATOR_TIMEOUT)
    assert delivery.url.endswith("/timeout") and result.is_timeout and not result.is_success
    assert result.conversation_id == ack.conversation_id
    assert daraja_sim.deliveries(INITIATOR_RESULT, ack.conversation_id) == []
    assert daraja_sim.payment(receipt).reversed_by is None


def test_initiator_next_plays_outcomes_in_order(daraja_sim, callback_listener, daraja_client):
    client = daraja_client()
    receipt = paid_receipt(daraja_sim, client, callback_listener)
    daraja_sim.initiator_next("queue_timeout")
    first = status(client, daraja_sim, callback_listener, receipt)
    result_of(daraja_sim, first, INITIATOR_TIMEOUT)
    second, _ = result_of(daraja_sim, status(client, daraja_sim, callback_listener, receipt))
    assert second.transaction_status == "Completed"
    with pytest.raises(ValueError):
        daraja_sim.initiator_next("lost")
    assert requests.post(f"{daraja_sim.base_url}/__sim__/initiator-next", json={"outcome": "no_result"},
                         timeout=5).ok
    third = status(client, daraja_sim, callback_listener, receipt)
    time.sleep(daraja_sim.result_delay + 0.2)
    assert daraja_sim.deliveries(reference=third.conversation_id) == []
    assert requests.post(f"{daraja_sim.base_url}/__sim__/initiator-next", json={"outcome": "x"},
                         timeout=5).status_code == 400


# -- Transaction Status -----------------------------------------------------------------------------------------
def test_transaction_status_tells_amount_shortcode_and_status(daraja_sim, callback_listener, daraja_client):
    client = daraja_client()
    receipt = paid_receipt(daraja_sim, client, callback_listener, amount=1234)
    result, _ = result_of(daraja_sim, status(client, daraja_sim, callback_listener, receipt))
    assert result.is_success and result.receipt_no == receipt and result.amount == Decimal(1234)
    assert result.transaction_status == "Completed" and result.credit_party_shortcode == DEFAULT_SHORTCODE
    for key in ("DebitPartyName", "CreditPartyName", "InitiatedTime", "FinalisedTime", "ReasonType"):
        assert result.parameters[key]
    assert result.parameters["DebitPartyName"] == f"{SANDBOX_TEST_MSISDN} - John Doe"
    assert result.finalised_at is not None


def test_transaction_status_of_unknown_receipts_and_other_parties(daraja_sim, callback_listener, daraja_client):
    client = daraja_client()
    receipt = paid_receipt(daraja_sim, client, callback_listener)
    unknown, _ = result_of(daraja_sim, status(client, daraja_sim, callback_listener, "UL1ZZZZZZZ"))
    other, _ = result_of(daraja_sim, status(client, daraja_sim, callback_listener, receipt, party_a="600111"))
    by_phone, _ = result_of(daraja_sim, status(client, daraja_sim, callback_listener, receipt,
                                               party_a=SANDBOX_TEST_MSISDN, identifier_type="1"))
    wrong, _ = result_of(daraja_sim, status(client, daraja_sim, callback_listener, receipt,
                                            credential=security_credential("nope", daraja_sim.certificate_pem)))
    assert (unknown.result_code, other.result_code, by_phone.result_code, wrong.result_code) == (
        "R000002", "R000002", "0", "2001")


def test_status_of_the_reversal_receipt_itself(daraja_sim, callback_listener, daraja_client):
    client = daraja_client()
    receipt = paid_receipt(daraja_sim, client, callback_listener)
    reversal, _ = result_of(daraja_sim, reverse(client, daraja_sim, callback_listener, receipt))
    checked, _ = result_of(daraja_sim, status(client, daraja_sim, callback_listener, reversal.transaction_id))
    assert checked.parameters["ReasonType"] == "Reversal" and checked.transaction_status == "Completed"


# -- the wire ---------------------------------------------------------------------------------------------------
def test_requests_need_a_token_and_valid_fields(daraja_sim, callback_listener, daraja_client):
    client = daraja_client()
    body = {"Initiator": "testapi", "SecurityCredential": daraja_sim.security_credential(),
            "CommandID": "TransactionReversal", "TransactionID": "UL1ZZZZZZZ", "Amount": "1",
            "ReceiverParty": DEFAULT_SHORTCODE, "RecieverIdentifierType": "11",
            "ResultURL": callback_listener.url, "QueueTimeOutURL": callback_listener.url, "Remarks": "ok"}
    url = f"{daraja_sim.base_url}{REVERSAL_PATH}"
    assert requests.post(url, json=body, timeout=5).status_code == 401
    token = client.access_token().value
    headers = {"Authorization": f"Bearer {token}"}
    assert requests.post(url, json=body, headers=headers, timeout=5).status_code == 200
    for name, value in (("CommandID", "TransactionStatusQuery"), ("TransactionID", "UL-1"), ("Amount", 0),
                        ("ReceiverParty", "x"), ("RecieverIdentifierType", "9"), ("ResultURL", "nope"),
                        ("Remarks", "x"), ("Occasion", "o" * 101), ("Initiator", "")):
        answer = requests.post(url, json={**body, name: value}, headers=headers, timeout=5)
        assert answer.status_code == 400, name
        assert answer.json()["errorCode"] == "400.002.02" and name in answer.json()["errorMessage"]
    status_url = f"{daraja_sim.base_url}{TRANSACTION_STATUS_PATH}"
    answer = requests.post(status_url, json={**body, "CommandID": "TransactionStatusQuery", "PartyA": "174379",
                                             "IdentifierType": "3"}, headers=headers, timeout=5)
    assert answer.json()["errorMessage"] == "Bad Request - Invalid IdentifierType"


def test_the_client_reports_redacted_exchanges_and_refuses_bad_urls_before_sending(
        daraja_sim, callback_listener, daraja_client):
    exchanges = []
    client = daraja_client(observer=exchanges.append)
    receipt = paid_receipt(daraja_sim, client, callback_listener)
    credential = daraja_sim.security_credential()
    reverse(client, daraja_sim, callback_listener, receipt, credential=credential)
    sent = next(e for e in exchanges if e.operation == "reversal")
    assert sent.request_body["SecurityCredential"] == "***" and credential not in repr(exchanges)
    assert sent.status == 200 and sent.response_body["ResponseCode"] == "0"
    before = len(daraja_sim.requests_for("reversal"))
    with pytest.raises(InvalidConfiguration, match="mpesa"):
        client.reverse(initiator="testapi", security_credential=credential, transaction_id=receipt, amount=250,
                       receiver_party=DEFAULT_SHORTCODE, result_url=callback_listener.url + "/mpesa/result",
                       timeout_url=callback_listener.url, remarks="Refund")
    assert len(daraja_sim.requests_for("reversal")) == before


def test_gateway_errors_reach_the_caller_and_tokens_are_refreshed(daraja_sim, callback_listener, daraja_client):
    client = daraja_client()
    receipt = paid_receipt(daraja_sim, client, callback_listener)
    daraja_sim.fail_next(1, "spike_arrest", ["reversal"])
    with pytest.raises(DarajaApiError) as caught:
        reverse(client, daraja_sim, callback_listener, receipt)
    assert caught.value.error_code == "500.003.02" and caught.value.retryable
    assert daraja_sim.payment(receipt).reversed_by is None
    daraja_sim.expire_tokens()
    ack = status(client, daraja_sim, callback_listener, receipt)  # refreshed once, then accepted
    assert ack.response_code == "0"
    daraja_sim.fail_next(2, "invalid", ["token"])
    daraja_sim.expire_tokens()
    with pytest.raises(DarajaAuthError):
        status(client, daraja_sim, callback_listener, receipt)


def test_results_are_retried_like_callbacks(daraja_sim, callback_listener, daraja_client):
    client = daraja_client()
    receipt = paid_receipt(daraja_sim, client, callback_listener)
    callback_listener.answer_next(500)
    ack = status(client, daraja_sim, callback_listener, receipt)
    result, delivery = result_of(daraja_sim, ack)
    assert [a.status for a in delivery.attempts] == [500, 200] and result.is_success


def test_cli_has_initiator_flags_and_prints_the_certificate(monkeypatch):
    seen = {}

    class Recorder(cli.DarajaSimulator):
        def start(self):
            seen.update(vars(self.settings))
            raise OSError("not really")

    monkeypatch.setattr(cli, "DarajaSimulator", Recorder)
    assert cli.main(["--initiator-name", "apiop", "--initiator-password", "pw", "--result-delay", "0.5", "-q"]) == 2
    assert (seen["initiator_name"], seen["initiator_password"], seen["result_delay"]) == ("apiop", "pw", 0.5)
    helped = subprocess.run([sys.executable, "-m", "muchiri_mpesa.daraja.simulator", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=30, check=False)
    assert "--initiator-name" in helped.stdout and "testapi" in helped.stdout and "--result-delay" in helped.stdout
