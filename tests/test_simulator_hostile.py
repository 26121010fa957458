"""The simulator under hostile fields and concurrent clients: a 4xx (never a 500) for absurd values, one
reversal per receipt however many threads race for it, unique receipts for concurrent C2B payments.

Fixtures (tests/conftest.py): ``make_simulator``, ``callback_listener``, ``daraja_client``; the conftest also
checks that no simulator thread outlives its test.
"""

from __future__ import annotations

import threading

import pytest
import requests

from muchiri_mpesa.daraja import MemoryTokenStore, security_credential
from muchiri_mpesa.daraja.simulator import (
    C2B_CONFIRMATION,
    C2B_SIMULATE_PATH,
    DEFAULT_SHORTCODE,
    INITIATOR_RESULT,
    PULL_QUERY_PATH,
    REVERSAL_PATH,
    SANDBOX_TEST_MSISDN,
)


def _post(sim, client, path, body):
    headers = {"Authorization": f"Bearer {client.access_token().value}"}
    return requests.post(sim.base_url + path, json=body, headers=headers, timeout=5)


@pytest.mark.parametrize("amount", ["9" * 400, "9" * 5000], ids=["400_digits", "5000_digits"])
def test_absurd_amount_strings_answer_400_not_500(make_simulator, callback_listener, daraja_client, amount):
    sim = make_simulator()
    client = daraja_client(sim)
    simulate = {"ShortCode": DEFAULT_SHORTCODE, "CommandID": "CustomerPayBillOnline", "Amount": amount,
                "Msisdn": SANDBOX_TEST_MSISDN, "BillRefNumber": "S00042"}
    reversal = {"Initiator": sim.initiator_name, "SecurityCredential": sim.security_credential(),
                "CommandID": "TransactionReversal", "TransactionID": "RKTQDM7W6S", "Amount": amount,
                "ReceiverParty": DEFAULT_SHORTCODE, "RecieverIdentifierType": "11",
                "ResultURL": callback_listener.url, "QueueTimeOutURL": callback_listener.url, "Remarks": "refund"}
    for path, body in ((C2B_SIMULATE_PATH, simulate), (REVERSAL_PATH, reversal)):
        answer = _post(sim, client, path, body)
        assert answer.status_code == 400, (path, answer.text)
        assert answer.json()["errorCode"] == "400.002.02"


@pytest.mark.parametrize("offset", ["9" * 5000, "-1", "1.5"], ids=["5000_digits", "negative", "fraction"])
def test_absurd_offsets_answer_400_not_500(make_simulator, callback_listener, daraja_client, offset):
    sim = make_simulator()
    client = daraja_client(sim)
    client.pull_register(DEFAULT_SHORTCODE, SANDBOX_TEST_MSISDN, callback_listener.url)
    answer = _post(sim, client, PULL_QUERY_PATH, {"ShortCode": DEFAULT_SHORTCODE, "StartDate": "2024-01-01 00:00:00",
                                                  "EndDate": "2024-01-02 00:00:00", "OffSetValue": offset})
    assert answer.status_code == 400, answer.text


def test_concurrent_c2b_payments_get_unique_receipts_and_one_confirmation_each(make_simulator, callback_listener,
                                                                             daraja_client):
    sim = make_simulator()
    daraja_client(sim).register_c2b_urls(DEFAULT_SHORTCODE, "Completed", callback_listener.url + "/c",
                                         callback_listener.url + "/v")
    receipts: list[str] = []
    lock = threading.Lock()

    def pay() -> None:
        receipt = sim.c2b_pay(10, SANDBOX_TEST_MSISDN, "S00042")
        with lock:
            receipts.append(receipt)

    threads = [threading.Thread(target=pay) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(receipts)) == 40
    for receipt in receipts:
        assert sim.wait_for_c2b(receipt)["state"] == "completed"
    confirmations = sim.wait_for_deliveries(C2B_CONFIRMATION, count=40, timeout=10)
    assert sorted(d.reference for d in confirmations) == sorted(receipts)


def test_racing_reversals_of_one_receipt_succeed_exactly_once(make_simulator, callback_listener, daraja_client):
    sim = make_simulator(result_delay=0.05)
    store = MemoryTokenStore()  # one token for every thread: a new one would invalidate the others'
    receipt = sim.c2b_pay(10, SANDBOX_TEST_MSISDN, "S00042")
    assert sim.wait_for_c2b(receipt)["state"] == "completed"
    credential = security_credential(sim.initiator_password, sim.certificate_pem)
    barrier = threading.Barrier(8)
    failures: list[BaseException] = []

    def reverse() -> None:
        client = daraja_client(sim, token_store=store)
        client.access_token()
        barrier.wait()
        try:
            client.reverse(initiator=sim.initiator_name, security_credential=credential, transaction_id=receipt,
                           amount=10, receiver_party=DEFAULT_SHORTCODE, result_url=callback_listener.url + "/r",
                           timeout_url=callback_listener.url + "/t", remarks="Refund S00042")
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            failures.append(exc)

    threads = [threading.Thread(target=reverse) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    results = sim.wait_for_deliveries(INITIATOR_RESULT, count=8, timeout=10)
    codes = sorted(str(d.body["Result"]["ResultCode"]) for d in results)
    assert codes == ["0"] + ["R000001"] * 7
    assert len({d.reference for d in results}) == 8  # one Result per request, each delivered once
    reversal = sim.payment(receipt).reversed_by
    assert reversal is not None and sim.payment(reversal).reverses == receipt
