"""B2B Express Checkout over real loopback HTTP: DarajaClient -> simulator -> callbackUrl listener, and the
recovery of a lost result through Transaction Status.

Fixtures (tests/conftest.py): ``daraja_sim`` / ``make_simulator``, ``callback_listener``, ``daraja_client``.
"""

from __future__ import annotations

import time
import uuid
from decimal import Decimal
from pathlib import Path

import pytest
import requests

from muchiri_mpesa.daraja import (
    B2B_CANCELLED_CODE,
    B2B_KYC_FAILED_CODE,
    B2B_NO_NOMINATED_NUMBER_CODE,
    B2B_RESULT_CODES,
    DarajaApiError,
    DarajaAuthError,
    DarajaValidationError,
    InvalidConfiguration,
    Outcome,
    classify_b2b_result,
    parse_b2b_checkout_result,
    parse_initiator_result,
)
from muchiri_mpesa.daraja.simulator import (
    B2B_CHECKOUT_PATH,
    B2B_MAGIC_TILLS,
    B2B_RESULT,
    DEFAULT_INITIATOR_NAME,
    DEFAULT_SHORTCODE,
    INITIATOR_RESULT,
    TRANSACTION_STATUS_PATH,
    b2b_magic_tills_table,
)
from muchiri_mpesa.daraja.simulator import __main__ as cli
from muchiri_mpesa.daraja.simulator import b2b as sim_b2b
from muchiri_mpesa.daraja.simulator.state import _RECEIPT_ALPHABET

PAYS, CANCELS, NEVER_ANSWERS, RESULT_LOST, NO_NOMINATED_NUMBER, KYC_FAILS = (
    "600100", "600101", "600102", "600103", "600104", "600105")


# -- helpers ----------------------------------------------------------------------------------------------------
def checkout(client, listener, till=PAYS, amount=71, reference="S00042", **kwargs):
    return client.b2b_checkout(till=till, amount=amount, reference=reference, callback_url=listener.url + "/b2b",
                               partner_name="Muchiri Distributors", **kwargs)


def result_of(sim, ack, timeout=5):
    """Wait for the result of ``ack`` (by its RequestRefID) and parse it as the addon would."""
    delivery = sim.wait_for_deliveries(B2B_RESULT, reference=ack.request_id, timeout=timeout)[0]
    assert delivery.delivered and delivery.url.endswith("/b2b")
    return parse_b2b_checkout_result(delivery.body), delivery


def status(client, sim, listener, *, receipt="", request_id="", party_a=DEFAULT_SHORTCODE, identifier_type="4"):
    ack = client.transaction_status(
        initiator=DEFAULT_INITIATOR_NAME, security_credential=sim.security_credential(), transaction_id=receipt,
        original_conversation_id=request_id, party_a=party_a, identifier_type=identifier_type, remarks="Status",
        result_url=listener.url + "/result", timeout_url=listener.url + "/timeout")
    delivery = sim.wait_for_deliveries(INITIATOR_RESULT, reference=ack.conversation_id, timeout=5)[0]
    return parse_initiator_result(delivery.body)


def looks_like_a_receipt(receipt: str) -> bool:
    return len(receipt) == 10 and receipt.isupper() and all(c in _RECEIPT_ALPHABET for c in receipt)


# -- the magic tills --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("till", [PAYS, "600980", "5123456"])
def test_a_till_pays_after_the_callback_delay(daraja_sim, callback_listener, daraja_client, till):
    client = daraja_client()
    started = time.monotonic()
    ack = checkout(client, callback_listener, till=till)
    assert (ack.code, ack.status) == ("0", "USSD Initiated Successfully")
    result, delivery = result_of(daraja_sim, ack)
    assert delivery.attempts[0].started_at - started >= daraja_sim.callback_delay * 0.9
    assert result.is_success and result.outcome is Outcome.SUCCESS and result.request_id == ack.request_id
    assert result.amount == Decimal(71) and delivery.body["amount"] == "71.0" and result.status == "SUCCESS"
    assert looks_like_a_receipt(result.transaction_id) and result.conversation_id.startswith("AG_")
    payment = daraja_sim.payment(result.transaction_id)
    assert (payment.source, payment.shortcode, payment.amount, payment.msisdn, payment.bill_ref) == (
        "b2b", DEFAULT_SHORTCODE, 71, till, "S00042")
    record = daraja_sim.b2b_checkout(ack.request_id)
    assert record["transactionId"] == result.transaction_id and record["result_posted"]
    assert callback_listener.wait_for(1)[0].json() == delivery.body
    shown = requests.get(f"{daraja_sim.base_url}/__sim__/state", timeout=5).json()["b2b_checkouts"]
    assert [c["RequestRefID"] for c in shown] == [ack.request_id] and shown[0]["transactionId"] == payment.receipt


def test_a_till_cancels(daraja_sim, callback_listener, daraja_client):
    ack = checkout(daraja_client(), callback_listener, till=CANCELS, reference="INV-2025-042")
    result, delivery = result_of(daraja_sim, ack)
    assert result.result_code == B2B_CANCELLED_CODE and result.outcome is Outcome.CANCELED
    assert delivery.body == {"resultCode": "4001", "resultDesc": "User cancelled transaction",
                             "requestId": ack.request_id, "amount": "71.0", "paymentReference": "INV-2025-042"}
    assert result.transaction_id is None and daraja_sim.payments == []


def test_a_till_whose_kyc_fails(daraja_sim, callback_listener, daraja_client):
    result, _ = result_of(daraja_sim, checkout(daraja_client(), callback_listener, till=KYC_FAILS))
    assert result.result_code == B2B_KYC_FAILED_CODE and result.outcome is Outcome.FAILED
    assert daraja_sim.payments == []


def test_a_till_that_never_answers(daraja_sim, callback_listener, daraja_client):
    ack = checkout(daraja_client(), callback_listener, till=NEVER_ANSWERS)
    with pytest.raises(TimeoutError):
        daraja_sim.wait_for_deliveries(B2B_RESULT, reference=ack.request_id, timeout=daraja_sim.callback_delay * 4)
    record = daraja_sim.b2b_checkout(ack.request_id)
    assert record["resultCode"] is None and record["transactionId"] is None and not record["result_posted"]
    assert daraja_sim.payments == [] and callback_listener.received == []


def test_a_till_without_a_nominated_number_is_refused_at_once(daraja_sim, callback_listener, daraja_client):
    with pytest.raises(DarajaApiError) as caught:
        checkout(daraja_client(), callback_listener, till=NO_NOMINATED_NUMBER)
    error = caught.value
    assert (error.error_code, error.error_message, error.retryable) == (
        B2B_NO_NOMINATED_NUMBER_CODE, "Missing Nominated Number", False)
    assert B2B_RESULT_CODES[B2B_NO_NOMINATED_NUMBER_CODE].message in str(error)
    assert daraja_sim.b2b_checkouts == [] and daraja_sim.deliveries(B2B_RESULT) == []


# -- a lost result, recovered ------------------------------------------------------------------------------------
def test_a_lost_result_is_found_by_transaction_status(make_simulator, callback_listener, daraja_client):
    daraja_sim = make_simulator(callback_delay=1.0, result_delay=0.05)
    client = daraja_client(daraja_sim)
    assert daraja_sim.certificate_pem  # the key pair first: making it takes a while
    ack = checkout(client, callback_listener, till=RESULT_LOST, amount=4500)
    early = status(client, daraja_sim, callback_listener, request_id=ack.request_id)
    assert early.result_code == "R000002"  # the operator has not answered yet: nothing to find
    time.sleep(daraja_sim.callback_delay * 1.5)
    assert daraja_sim.deliveries(B2B_RESULT) == []
    assert [r for r in callback_listener.received if r.path.endswith("/b2b")] == []
    record = daraja_sim.b2b_checkout(ack.request_id)
    assert record["resultCode"] == "0" and not record["result_posted"] and looks_like_a_receipt(
        record["transactionId"])

    # Only the RequestRefID is known: Transaction Status by OriginalConversationID finds the payment.
    found = status(client, daraja_sim, callback_listener, request_id=ack.request_id)
    assert found.is_success and found.receipt_no == record["transactionId"]
    assert found.amount == Decimal(4500) and found.transaction_status == "Completed"
    assert found.parameters["OriginatorConversationID"] == ack.request_id
    assert found.credit_party_shortcode == DEFAULT_SHORTCODE
    assert found.parameters["DebitPartyName"].startswith(f"{RESULT_LOST} - ")
    assert found.parameters["ReasonType"] == "Business Pay Bill"
    # ... and then by its receipt, from our paybill or from the paying till.
    for party_a, kind in ((DEFAULT_SHORTCODE, "4"), (RESULT_LOST, "2")):
        again = status(client, daraja_sim, callback_listener, receipt=found.receipt_no, party_a=party_a,
                       identifier_type=kind)
        assert again.is_success and again.receipt_no == found.receipt_no and again.amount == Decimal(4500)
    both = status(client, daraja_sim, callback_listener, receipt=found.receipt_no, request_id=ack.request_id)
    assert both.is_success


def test_transaction_status_by_request_finds_nothing_unpaid_or_foreign(daraja_sim, callback_listener,
                                                                       daraja_client):
    client = daraja_client()
    cancelled = checkout(client, callback_listener, till=CANCELS)
    paid = checkout(client, callback_listener, till=PAYS)
    result_of(daraja_sim, cancelled)
    receipt = result_of(daraja_sim, paid)[0].transaction_id
    for kwargs in ({"request_id": cancelled.request_id}, {"request_id": str(uuid.uuid4())},
                   {"request_id": paid.request_id, "party_a": "600999"},
                   {"request_id": paid.request_id, "party_a": "254708374149", "identifier_type": "1"},
                   {"receipt": receipt, "request_id": cancelled.request_id}):
        assert status(client, daraja_sim, callback_listener, **kwargs).result_code == "R000002", kwargs
    assert status(client, daraja_sim, callback_listener, request_id=paid.request_id).receipt_no == receipt


# -- the wire ---------------------------------------------------------------------------------------------------
def test_the_request_needs_a_token_and_valid_fields(daraja_sim, callback_listener, daraja_client):
    client = daraja_client()
    body = {"primaryShortCode": PAYS, "receiverShortCode": DEFAULT_SHORTCODE, "amount": "71", "paymentRef": "S00042",
            "callbackUrl": callback_listener.url, "partnerName": "Vendor", "RequestRefID": str(uuid.uuid4())}
    url = f"{daraja_sim.base_url}{B2B_CHECKOUT_PATH}"
    refused = requests.post(url, json=body, timeout=5)
    assert refused.status_code == 401 and refused.json()["errorCode"] == "404.001.03"
    headers = {"Authorization": f"Bearer {client.access_token().value}"}
    for name, value in (("primaryShortCode", "12"), ("primaryShortCode", DEFAULT_SHORTCODE),
                        ("receiverShortCode", "600111"), ("amount", "71.5"), ("amount", 0), ("amount", "250001"),
                        ("paymentRef", ""), ("paymentRef", "x" * 13), ("callbackUrl", "nope"),
                        ("partnerName", ""), ("RequestRefID", None)):
        answer = requests.post(url, json={**body, name: value}, headers=headers, timeout=5)
        assert answer.status_code == 400, (name, value)
        assert answer.json()["errorCode"] == "400.002.02" and name in answer.json()["errorMessage"]
    first = requests.post(url, json=body, headers=headers, timeout=5)
    assert first.status_code == 200 and first.json() == {"code": "0", "status": "USSD Initiated Successfully"}
    again = requests.post(url, json=body, headers=headers, timeout=5)  # one prompt per RequestRefID
    assert again.status_code == 400 and "RequestRefID" in again.json()["errorMessage"]
    assert len(daraja_sim.b2b_checkouts) == 1


def test_gateway_errors_and_token_refresh(daraja_sim, callback_listener, daraja_client):
    client = daraja_client()
    assert "b2b_checkout" in daraja_sim.operations
    daraja_sim.fail_next(1, "spike_arrest", ["b2b_checkout"])
    with pytest.raises(DarajaApiError) as caught:
        checkout(client, callback_listener)
    assert caught.value.error_code == "500.003.02" and caught.value.retryable and daraja_sim.b2b_checkouts == []
    daraja_sim.expire_tokens()
    ack = checkout(client, callback_listener)  # refreshed once, then started
    assert daraja_sim.b2b_checkout(ack.request_id)["RequestRefID"] == ack.request_id
    daraja_sim.fail_next(2, "invalid", ["token"])
    daraja_sim.expire_tokens()
    with pytest.raises(DarajaAuthError):
        checkout(client, callback_listener)


def test_results_are_retried_like_callbacks(daraja_sim, callback_listener, daraja_client):
    callback_listener.answer_next(500)
    result, delivery = result_of(daraja_sim, checkout(daraja_client(), callback_listener))
    assert [a.status for a in delivery.attempts] == [500, 200] and result.is_success


def test_the_client_sends_https_to_daraja_only_and_nothing_when_invalid(daraja_sim, callback_listener,
                                                                        daraja_client):
    client = daraja_client()
    for kwargs in ({"amount": "70.5"}, {"reference": "S00042/2"}, {"till": DEFAULT_SHORTCODE}):
        with pytest.raises(DarajaValidationError):
            checkout(client, callback_listener, **kwargs)
    with pytest.raises(InvalidConfiguration, match="mpesa"):
        client.b2b_checkout(till=PAYS, amount=71, reference="S00042", partner_name="Vendor",
                            callback_url=callback_listener.url + "/mpesa/b2b")
    assert daraja_sim.requests_for("b2b_checkout") == []


def test_the_reject_mpesa_setting_covers_the_callback(make_simulator, callback_listener, daraja_client):
    sim = make_simulator(reject_mpesa_in_callback_url=True)
    client = daraja_client(sim)
    headers = {"Authorization": f"Bearer {client.access_token().value}"}
    body = {"primaryShortCode": PAYS, "receiverShortCode": DEFAULT_SHORTCODE, "amount": 71, "paymentRef": "S1",
            "callbackUrl": "http://127.0.0.1:9/Safaricom/cb", "partnerName": "Vendor", "RequestRefID": "r-1"}
    answer = requests.post(f"{sim.base_url}{B2B_CHECKOUT_PATH}", json=body, headers=headers, timeout=5)
    assert answer.json()["errorMessage"] == "Bad Request - Invalid callbackUrl"


def test_a_b2b_payment_can_be_reversed(daraja_sim, callback_listener, daraja_client):
    client = daraja_client()
    receipt = result_of(daraja_sim, checkout(client, callback_listener))[0].transaction_id
    ack = client.reverse(initiator=DEFAULT_INITIATOR_NAME, security_credential=daraja_sim.security_credential(),
                         transaction_id=receipt, amount=71, receiver_party=DEFAULT_SHORTCODE, remarks="Refund",
                         result_url=callback_listener.url + "/result", timeout_url=callback_listener.url + "/t")
    delivery = daraja_sim.wait_for_deliveries(INITIATOR_RESULT, reference=ack.conversation_id, timeout=5)[0]
    assert parse_initiator_result(delivery.body).original_transaction_id == receipt
    assert status(client, daraja_sim, callback_listener, receipt=receipt).transaction_status == "Reversed"


def test_transaction_status_without_receipt_or_request_is_refused_by_the_simulator(daraja_sim, daraja_client,
                                                                                   callback_listener):
    client = daraja_client()
    body = {"Initiator": "testapi", "SecurityCredential": daraja_sim.security_credential(),
            "CommandID": "TransactionStatusQuery", "PartyA": DEFAULT_SHORTCODE, "IdentifierType": "4",
            "ResultURL": callback_listener.url, "QueueTimeOutURL": callback_listener.url, "Remarks": "Status"}
    headers = {"Authorization": f"Bearer {client.access_token().value}"}
    url = f"{daraja_sim.base_url}{TRANSACTION_STATUS_PATH}"
    answer = requests.post(url, json=body, headers=headers, timeout=5)
    assert answer.json()["errorMessage"] == "Bad Request - Invalid TransactionID"
    answer = requests.post(url, json={**body, "OriginalConversationID": "a b"}, headers=headers, timeout=5)
    assert answer.json()["errorMessage"] == "Bad Request - Invalid OriginalConversationID"
    answer = requests.post(url, json={**body, "OriginalConversationID": str(uuid.uuid4())}, headers=headers,
                           timeout=5)
    assert answer.status_code == 200


# -- codes and documentation ------------------------------------------------------------------------------------
def test_the_simulator_and_the_library_agree_on_the_codes():
    for code, desc in (sim_b2b.CANCELLED, sim_b2b.KYC_FAILED, sim_b2b.NO_NOMINATED_NUMBER):
        assert code in B2B_RESULT_CODES and desc
    assert classify_b2b_result(sim_b2b.CANCELLED[0]).outcome is Outcome.CANCELED
    for till, scenario in B2B_MAGIC_TILLS.items():
        outcome = classify_b2b_result(scenario.result_code).outcome if scenario.result_code else Outcome.PENDING
        assert scenario.till == till and (outcome is Outcome.SUCCESS) == scenario.pays


def test_the_magic_tills_are_documented():
    readme = (Path(cli.__file__).parent / "README.md").read_text(encoding="utf-8")
    assert b2b_magic_tills_table() in readme and B2B_CHECKOUT_PATH in readme
