"""The Daraja simulator over real loopback HTTP, driven with plain ``requests`` (no Daraja client).

Fixtures (tests/conftest.py): ``daraja_sim`` / ``make_simulator`` (fast delays, see FAST_SIMULATOR) and
``callback_listener`` (a local CallBackURL).
"""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import requests
from freezegun import freeze_time

from muchiri_mpesa.daraja.simulator import (
    DEFAULT_CONSUMER_KEY,
    DEFAULT_CONSUMER_SECRET,
    DEFAULT_SHORTCODE,
    DEFAULT_TILL,
    KENYA_TZ,
    MAGIC_NUMBERS,
    OAUTH_PATH,
    PAYBILL,
    SANDBOX_PASSKEY,
    SANDBOX_TEST_MSISDN,
    STK_PUSH_PATH,
    STK_QUERY_PATH,
    TILL,
    CallbackListener,
    DarajaSimulator,
    magic_numbers_table,
)
from muchiri_mpesa.daraja.simulator import __main__ as cli
from muchiri_mpesa.daraja.simulator.server import _monotonic

REPO = Path(__file__).resolve().parent.parent
SIMULATOR_DIR = REPO / "muchiri_mpesa" / "daraja" / "simulator"

CHECKOUT_ID = re.compile(r"^ws_CO_\d{14}\d{3}\d{9}$")
MERCHANT_ID = re.compile(r"^\d{4,5}-\d{8}-\d+$")
REQUEST_ID = re.compile(r"^\d{4,5}-\d{7,8}-\d+$")
RECEIPT = re.compile(r"^[A-Z][A-L][1-9A-V][A-Z0-9]{7}$")
TOKEN = re.compile(r"^[A-Za-z0-9]{28}$")

PENDING_BODY_KEYS = {"requestId", "errorCode", "errorMessage"}


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def get_token(sim: DarajaSimulator, session: requests.Session | None = None) -> str:
    response = (session or requests).get(
        f"{sim.base_url}{OAUTH_PATH}?grant_type=client_credentials",
        auth=(DEFAULT_CONSUMER_KEY, DEFAULT_CONSUMER_SECRET),
        timeout=5,
    )
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


def password(timestamp: str, shortcode: str = DEFAULT_SHORTCODE, passkey: str = SANDBOX_PASSKEY) -> str:
    return base64.b64encode(f"{shortcode}{passkey}{timestamp}".encode()).decode()


def kenya_timestamp() -> str:
    return datetime.now(KENYA_TZ).strftime("%Y%m%d%H%M%S")


def push_payload(callback_url: str, phone: str = SANDBOX_TEST_MSISDN, amount: object = 1, **overrides) -> dict:
    timestamp = kenya_timestamp()
    payload = {
        "BusinessShortCode": DEFAULT_SHORTCODE,
        "Password": password(timestamp),
        "Timestamp": timestamp,
        "TransactionType": PAYBILL,
        "Amount": amount,
        "PartyA": phone,
        "PartyB": DEFAULT_SHORTCODE,
        "PhoneNumber": phone,
        "CallBackURL": callback_url,
        "AccountReference": "S00042",
        "TransactionDesc": "Payment",
    }
    payload.update(overrides)
    return {k: v for k, v in payload.items() if v is not DROP}


DROP = object()  # push_payload(..., Field=DROP) leaves the field out


def post(sim: DarajaSimulator, path: str, payload: object, token: str | None, **kwargs) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return requests.post(f"{sim.base_url}{path}", json=payload, headers=headers, timeout=5, **kwargs)


def query_payload(checkout_request_id: str, **overrides) -> dict:
    timestamp = kenya_timestamp()
    payload = {
        "BusinessShortCode": DEFAULT_SHORTCODE,
        "Password": password(timestamp),
        "Timestamp": timestamp,
        "CheckoutRequestID": checkout_request_id,
    }
    payload.update(overrides)
    return {k: v for k, v in payload.items() if v is not DROP}


def push(sim, token, callback_url, phone=SANDBOX_TEST_MSISDN, **overrides) -> requests.Response:
    return post(sim, STK_PUSH_PATH, push_payload(callback_url, phone, **overrides), token)


def query(sim, token, checkout_request_id, **overrides) -> requests.Response:
    return post(sim, STK_QUERY_PATH, query_payload(checkout_request_id, **overrides), token)


def wait_until_final(sim: DarajaSimulator, checkout_request_id: str) -> None:
    """Sleep until the simulator knows the result (its query stops answering "being processed")."""
    delay = sim.transaction(checkout_request_id).result_at - _monotonic()
    if delay > 0:
        time.sleep(delay + 0.02)


def assert_error(response: requests.Response, status: int, code: str, message: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == PENDING_BODY_KEYS, body
    assert body["errorCode"] == code
    assert body["errorMessage"] == message
    assert REQUEST_ID.match(body["requestId"]), body["requestId"]


def assert_pending(response: requests.Response) -> None:
    assert_error(response, 500, "500.001.1001", "The transaction is being processed")


def assert_final_query(response, push_body, result_code: str, result_desc: str) -> None:
    assert response.status_code == 200, response.text
    assert response.json() == {
        "ResponseCode": "0",
        "ResponseDescription": "The service request has been accepted successsfully",
        "MerchantRequestID": push_body["MerchantRequestID"],
        "CheckoutRequestID": push_body["CheckoutRequestID"],
        "ResultCode": result_code,
        "ResultDesc": result_desc,
    }


def assert_success_callback(body: dict, push_body: dict, phone: str, amount: int = 1) -> str:
    """The exact Daraja success callback shape; returns the receipt."""
    callback = body["Body"]["stkCallback"]
    items = callback["CallbackMetadata"]["Item"]
    receipt = items[1].get("Value")
    date = items[3].get("Value")
    assert body == {
        "Body": {
            "stkCallback": {
                "MerchantRequestID": push_body["MerchantRequestID"],
                "CheckoutRequestID": push_body["CheckoutRequestID"],
                "ResultCode": 0,
                "ResultDesc": "The service request is processed successfully.",
                "CallbackMetadata": {
                    "Item": [
                        {"Name": "Amount", "Value": float(amount)},
                        {"Name": "MpesaReceiptNumber", "Value": receipt},
                        {"Name": "Balance"},
                        {"Name": "TransactionDate", "Value": date},
                        {"Name": "PhoneNumber", "Value": int(phone)},
                    ]
                },
            }
        }
    }
    assert type(callback["ResultCode"]) is int
    assert type(items[0]["Value"]) is float
    assert type(items[4]["Value"]) is int
    assert isinstance(receipt, str) and RECEIPT.match(receipt), receipt
    assert type(date) is int
    paid_at = datetime.strptime(str(date), "%Y%m%d%H%M%S").replace(tzinfo=KENYA_TZ)
    assert abs((datetime.now(KENYA_TZ) - paid_at).total_seconds()) < 10, "TransactionDate is not Kenya time"
    return receipt


def assert_failure_callback(body: dict, push_body: dict, code: int, desc: str) -> None:
    assert body == {
        "Body": {
            "stkCallback": {
                "MerchantRequestID": push_body["MerchantRequestID"],
                "CheckoutRequestID": push_body["CheckoutRequestID"],
                "ResultCode": code,
                "ResultDesc": desc,
            }
        }
    }
    assert type(body["Body"]["stkCallback"]["ResultCode"]) is int


# ----------------------------------------------------------------------------------------------------------------
# OAuth
# ----------------------------------------------------------------------------------------------------------------
def test_oauth_issues_a_token_with_a_string_expires_in(daraja_sim):
    response = requests.get(
        f"{daraja_sim.base_url}{OAUTH_PATH}?grant_type=client_credentials",
        auth=(DEFAULT_CONSUMER_KEY, DEFAULT_CONSUMER_SECRET),
        timeout=5,
    )
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"access_token", "expires_in"}
    assert body["expires_in"] == "3599"
    assert TOKEN.match(body["access_token"])
    assert daraja_sim.tokens_issued == 1
    assert daraja_sim.token_requests == 1
    assert daraja_sim.valid_tokens == 1
    # The token is not kept in clear in the request log.
    assert body["access_token"] not in json.dumps([r.response_body for r in daraja_sim.requests])


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic " + base64.b64encode(b"sim-consumer-key:wrong-secret").decode()},
        {"Authorization": "Basic " + base64.b64encode(b"other-key:sim-consumer-secret").decode()},
        {"Authorization": "Basic " + base64.b64encode(b"sim-consumer-keysim-consumer-secret").decode()},
        {"Authorization": "Basic !!!not-base64!!!"},
        {"Authorization": "Bearer " + base64.b64encode(b"sim-consumer-key:sim-consumer-secret").decode()},
    ],
    ids=["missing", "wrong-secret", "wrong-key", "no-colon", "garbage", "bearer-scheme"],
)
def test_oauth_refuses_bad_credentials(daraja_sim, headers):
    response = requests.get(
        f"{daraja_sim.base_url}{OAUTH_PATH}?grant_type=client_credentials", headers=headers, timeout=5
    )
    assert_error(response, 400, "400.008.01", "Invalid Authentication passed")
    assert daraja_sim.tokens_issued == 0
    assert daraja_sim.token_requests == 1


@pytest.mark.parametrize(
    "query_string", ["", "?grant_type=password", "?grant_type=", "?grant_type=client_credentials%20"]
)
def test_oauth_requires_the_client_credentials_grant(daraja_sim, query_string):
    response = requests.get(
        f"{daraja_sim.base_url}{OAUTH_PATH}{query_string}",
        auth=(DEFAULT_CONSUMER_KEY, DEFAULT_CONSUMER_SECRET),
        timeout=5,
    )
    assert_error(response, 400, "400.008.02", "Invalid grant type passed")
    assert daraja_sim.tokens_issued == 0


def test_custom_credentials(make_simulator):
    sim = make_simulator(consumer_key="k", consumer_secret="s")
    url = f"{sim.base_url}{OAUTH_PATH}?grant_type=client_credentials"
    assert requests.get(url, auth=("k", "s"), timeout=5).status_code == 200
    assert requests.get(url, auth=(DEFAULT_CONSUMER_KEY, DEFAULT_CONSUMER_SECRET), timeout=5).status_code == 400


def test_a_new_token_invalidates_the_previous_one(daraja_sim, callback_listener):
    first = get_token(daraja_sim)
    second = get_token(daraja_sim)
    assert first != second
    assert_error(push(daraja_sim, first, callback_listener.url), 401, "404.001.03", "Invalid Access Token")
    assert push(daraja_sim, second, callback_listener.url).status_code == 200
    assert daraja_sim.tokens_issued == 2
    assert daraja_sim.valid_tokens == 1


def test_previous_tokens_can_be_kept(make_simulator, callback_listener):
    sim = make_simulator(invalidate_previous_tokens=False)
    first, second = get_token(sim), get_token(sim)
    assert push(sim, first, callback_listener.url).status_code == 200
    assert push(sim, second, callback_listener.url, phone="254711000001").status_code == 200


def test_expire_tokens_revokes_every_token(daraja_sim, callback_listener):
    token = get_token(daraja_sim)
    assert daraja_sim.expire_tokens() == 1
    assert_error(push(daraja_sim, token, callback_listener.url), 401, "404.001.03", "Invalid Access Token")
    assert_error(query(daraja_sim, token, "ws_CO_x"), 401, "404.001.03", "Invalid Access Token")
    assert daraja_sim.valid_tokens == 0


def test_token_expires_after_expires_in_seconds(make_simulator, callback_listener):
    now = [1_700_000_000.0]
    sim = make_simulator(clock=lambda: now[0])
    token = get_token(sim)
    now[0] += 3598
    assert push(sim, token, callback_listener.url).status_code == 200
    now[0] += 1  # 3599 s after issue: expired
    assert_error(push(sim, token, callback_listener.url, phone="254711000002"), 401, "404.001.03",
                 "Invalid Access Token")


def test_token_lifetime_is_configurable(make_simulator):
    sim = make_simulator(token_lifetime=60)
    response = requests.get(
        f"{sim.base_url}{OAUTH_PATH}?grant_type=client_credentials",
        auth=(DEFAULT_CONSUMER_KEY, DEFAULT_CONSUMER_SECRET),
        timeout=5,
    )
    assert response.json()["expires_in"] == "60"


def test_token_expiry_follows_freezegun(daraja_sim, callback_listener):
    with freeze_time("2025-03-01 06:00:00") as frozen:
        token = get_token(daraja_sim)
        frozen.tick(timedelta(seconds=3000))
        assert push(daraja_sim, token, callback_listener.url).status_code == 200
        frozen.tick(timedelta(seconds=600))
        assert_error(push(daraja_sim, token, callback_listener.url, phone="254711000003"), 401, "404.001.03",
                     "Invalid Access Token")
    # The scheduler runs on the real clock: the callback of the push made under freezegun still comes.
    assert daraja_sim.wait_for_callback(count=1, timeout=3)[0].delivered


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Basic abc", "Bearer unknown-token-0000000000000"],
    ids=["missing", "empty", "no-token", "blank-token", "basic", "unknown"],
)
@pytest.mark.parametrize("path", [STK_PUSH_PATH, STK_QUERY_PATH])
def test_posts_need_a_valid_bearer_token(daraja_sim, callback_listener, authorization, path):
    get_token(daraja_sim)
    headers = {} if authorization is None else {"Authorization": authorization}
    payload = push_payload(callback_listener.url) if path == STK_PUSH_PATH else query_payload("ws_CO_1")
    response = requests.post(f"{daraja_sim.base_url}{path}", json=payload, headers=headers, timeout=5)
    assert_error(response, 401, "404.001.03", "Invalid Access Token")
    assert daraja_sim.pushes == []


# ----------------------------------------------------------------------------------------------------------------
# STK Push validation
# ----------------------------------------------------------------------------------------------------------------
INVALID_PUSH_FIELDS = [
    ("BusinessShortCode", DROP),
    ("BusinessShortCode", "600000"),
    ("BusinessShortCode", "17437A"),
    ("BusinessShortCode", None),
    ("Timestamp", DROP),
    ("Timestamp", "2025-01-01 10:00:00"),
    ("Timestamp", "20251301100000"),
    ("Timestamp", "202501011000"),
    ("Password", DROP),
    ("Password", ""),
    ("TransactionType", DROP),
    ("TransactionType", "CustomerPayBill"),
    ("TransactionType", "customerpaybillonline"),
    ("Amount", DROP),
    ("Amount", 1.5),
    ("Amount", "1.5"),
    ("Amount", 0),
    ("Amount", -10),
    ("Amount", "ten"),
    ("Amount", None),
    ("Amount", True),
    ("PartyA", DROP),
    ("PartyA", "0708374149"),
    ("PartyA", "25470837414"),
    ("PartyB", DROP),
    ("PartyB", "600000"),
    ("PartyB", DEFAULT_TILL),
    ("PartyB", "abc"),
    ("PhoneNumber", DROP),
    ("PhoneNumber", "0708374149"),
    ("PhoneNumber", "+254708374149"),
    ("PhoneNumber", "2547083741490"),
    ("PhoneNumber", 25470837414),
    ("PhoneNumber", "255708374149"),
    ("PhoneNumber", "254208374149"),
    ("CallBackURL", DROP),
    ("CallBackURL", ""),
    ("CallBackURL", "ftp://example.com/cb"),
    ("CallBackURL", "example.com/cb"),
    ("CallBackURL", "http:///cb"),
    ("CallBackURL", " https://example.com/cb"),
    ("CallBackURL", "https://exa mple.com/cb"),
    ("AccountReference", DROP),
    ("AccountReference", ""),
    ("AccountReference", "S00042-2-2025"),  # 13 characters
    ("TransactionDesc", DROP),
    ("TransactionDesc", ""),
    ("TransactionDesc", "Payment order1"),  # 14 characters
]


@pytest.mark.parametrize(("field_name", "value"), INVALID_PUSH_FIELDS)
def test_push_refuses_an_invalid_field(daraja_sim, callback_listener, field_name, value):
    token = get_token(daraja_sim)
    response = push(daraja_sim, token, callback_listener.url, **{field_name: value})
    assert_error(response, 400, "400.002.02", f"Bad Request - Invalid {field_name}")
    assert daraja_sim.pushes == []
    assert daraja_sim.callbacks == []


@pytest.mark.parametrize(
    "overrides",
    [
        {"Amount": "1"},
        {"Amount": 1.0},
        {"Amount": 250_000},
        {"PhoneNumber": 254708374149, "PartyA": 254708374149},
        {"PhoneNumber": "254110000001", "PartyA": "254110000001"},
        {"BusinessShortCode": 174379, "PartyB": 174379},
        {"AccountReference": "S00042-2-202"},  # 12 characters
        {"TransactionDesc": "Payment order"},  # 13 characters
        {"CallBackURL": "https://shop.example.co.ke/payment/daraja/notify/abc?x=1"},
    ],
    ids=["amount-text", "amount-float", "amount-max", "phone-int", "phone-2541", "shortcode-int",
         "reference-12", "desc-13", "https-url"],
)
def test_push_accepts_what_daraja_accepts(daraja_sim, callback_listener, overrides):
    token = get_token(daraja_sim)
    response = push(daraja_sim, token, callback_listener.url, **overrides)
    assert response.status_code == 200, response.text
    assert len(daraja_sim.pushes) == 1


def test_till_push_needs_the_till_as_party_b(daraja_sim, callback_listener):
    token = get_token(daraja_sim)
    response = push(daraja_sim, token, callback_listener.url, TransactionType=TILL, PartyB=DEFAULT_TILL)
    assert response.status_code == 200, response.text
    assert daraja_sim.pushes[0].transaction_type == TILL
    # The common misconfiguration: a till push with the store number as PartyB.
    response = push(daraja_sim, token, callback_listener.url, phone="254711000004", TransactionType=TILL,
                    PartyB=DEFAULT_SHORTCODE)
    assert_error(response, 400, "400.002.02", "Bad Request - Invalid PartyB")


def test_till_can_be_configured(make_simulator, callback_listener):
    sim = make_simulator(till_number="5123456")
    token = get_token(sim)
    assert push(sim, token, callback_listener.url, TransactionType=TILL, PartyB="5123456").status_code == 200
    response = push(sim, token, callback_listener.url, phone="254711000005", TransactionType=TILL,
                    PartyB=DEFAULT_TILL)
    assert_error(response, 400, "400.002.02", "Bad Request - Invalid PartyB")


def test_without_a_till_buy_goods_pushes_are_refused(make_simulator, callback_listener):
    sim = make_simulator(till_number=None)
    response = push(sim, get_token(sim), callback_listener.url, TransactionType=TILL, PartyB=DEFAULT_TILL)
    assert_error(response, 400, "400.002.02", "Bad Request - Invalid PartyB")


@pytest.mark.parametrize(
    "password_of",
    [
        lambda ts: password(ts, passkey="0" * 64),  # wrong passkey
        lambda ts: password("20200101000000"),  # another Timestamp than the one sent
        lambda ts: password(ts, shortcode="600000"),  # another shortcode
        lambda ts: base64.b64encode(f"{DEFAULT_SHORTCODE}{SANDBOX_PASSKEY}".encode()).decode(),  # no Timestamp
        lambda ts: "not base64 at all",
    ],
    ids=["passkey", "timestamp", "shortcode", "no-timestamp", "garbage"],
)
def test_push_refuses_a_wrong_password(daraja_sim, callback_listener, password_of):
    timestamp = kenya_timestamp()
    response = push(daraja_sim, get_token(daraja_sim), callback_listener.url, Timestamp=timestamp,
                    Password=password_of(timestamp))
    assert_error(response, 500, "500.001.1001", "Wrong credentials")
    assert daraja_sim.pushes == []


def test_push_accepts_any_valid_timestamp_with_its_password(daraja_sim, callback_listener):
    # Daraja checks the Password against the Timestamp sent, not the Timestamp against the clock.
    timestamp = "20191219102115"
    response = push(daraja_sim, get_token(daraja_sim), callback_listener.url, Timestamp=timestamp,
                    Password=password(timestamp))
    assert response.status_code == 200, response.text
    assert daraja_sim.pushes[0].payload["Timestamp"] == timestamp


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b"", b"\xff\xfe"], ids=["text", "array", "empty", "bytes"])
def test_push_refuses_a_body_that_is_not_a_json_object(daraja_sim, body):
    response = requests.post(
        f"{daraja_sim.base_url}{STK_PUSH_PATH}",
        data=body,
        headers={"Authorization": f"Bearer {get_token(daraja_sim)}", "Content-Type": "application/json"},
        timeout=5,
    )
    assert_error(response, 400, "400.002.01", "Invalid Request Payload")


def test_callback_url_keyword_filter_is_optional(make_simulator, callback_listener):
    url = callback_listener.url.replace("/callback", "/payment/mpesa/callback")
    lenient = make_simulator()
    assert push(lenient, get_token(lenient), url).status_code == 200
    strict = make_simulator(reject_mpesa_in_callback_url=True)
    token = get_token(strict)
    for bad in (url, callback_listener.url + "/M-Pesa", callback_listener.url + "?by=safaricom"):
        assert_error(push(strict, token, bad), 400, "400.002.02", "Bad Request - Invalid CallBackURL")
    assert push(strict, token, callback_listener.url.replace("/callback", "/payment/daraja/notify")).ok


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/"), ("GET", "/mpesa/stkpush/v2/processrequest"), ("GET", STK_PUSH_PATH), ("POST", OAUTH_PATH),
     ("DELETE", STK_QUERY_PATH)],
)
def test_unknown_resources_answer_404(daraja_sim, method, path):
    response = requests.request(method, f"{daraja_sim.base_url}{path}", timeout=5)
    assert_error(response, 404, "404.001.01", "Resource not found")


def test_push_response_and_ids(daraja_sim, callback_listener):
    token = get_token(daraja_sim)
    bodies = []
    for index in range(5):
        before = datetime.now(KENYA_TZ)
        phone = f"25471100010{index}"
        response = push(daraja_sim, token, callback_listener.url, phone=phone)
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("application/json")
        body = response.json()
        assert set(body) == {"MerchantRequestID", "CheckoutRequestID", "ResponseCode", "ResponseDescription",
                             "CustomerMessage"}
        assert body["ResponseCode"] == "0"
        assert body["ResponseDescription"] == body["CustomerMessage"] == "Success. Request accepted for processing"
        assert CHECKOUT_ID.match(body["CheckoutRequestID"]), body["CheckoutRequestID"]
        assert MERCHANT_ID.match(body["MerchantRequestID"]), body["MerchantRequestID"]
        # ddmmyyyyHHMMSS in Kenya time, then the phone's last 9 digits.
        stamp = body["CheckoutRequestID"][6:20]
        sent = datetime.strptime(stamp, "%d%m%Y%H%M%S").replace(tzinfo=KENYA_TZ)
        assert abs((sent - before).total_seconds()) < 5
        assert body["CheckoutRequestID"].endswith(phone[-9:])
        bodies.append(body)
    assert len({b["CheckoutRequestID"] for b in bodies}) == 5
    assert len({b["MerchantRequestID"] for b in bodies}) == 5
    assert [t.checkout_request_id for t in daraja_sim.pushes] == [b["CheckoutRequestID"] for b in bodies]


# ----------------------------------------------------------------------------------------------------------------
# STK Push Query validation
# ----------------------------------------------------------------------------------------------------------------
def test_query_validation(daraja_sim, callback_listener):
    token = get_token(daraja_sim)
    checkout_id = push(daraja_sim, token, callback_listener.url).json()["CheckoutRequestID"]
    invalid = "Bad Request - Invalid"
    assert_error(query(daraja_sim, token, "ws_CO_01012025000000000708374149"), 400, "400.002.02",
                 f"{invalid} CheckoutRequestID")
    assert_error(query(daraja_sim, token, checkout_id, CheckoutRequestID=DROP), 400, "400.002.02",
                 f"{invalid} CheckoutRequestID")
    assert_error(query(daraja_sim, token, checkout_id, BusinessShortCode="600000"), 400, "400.002.02",
                 f"{invalid} BusinessShortCode")
    assert_error(query(daraja_sim, token, checkout_id, Timestamp="2025"), 400, "400.002.02", f"{invalid} Timestamp")
    assert_error(query(daraja_sim, token, checkout_id, Password=DROP), 400, "400.002.02", f"{invalid} Password")
    assert_error(query(daraja_sim, token, checkout_id, Password=password("20200101000000")), 500, "500.001.1001",
                 "Wrong credentials")
    assert_pending(query(daraja_sim, token, checkout_id))
    assert daraja_sim.transaction(checkout_id).queries == 1  # refused queries are not counted


# ----------------------------------------------------------------------------------------------------------------
# The magic phone numbers, end to end
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("phone", [SANDBOX_TEST_MSISDN, "254722000123", "254110000001", "254700000010"])
def test_success(daraja_sim, callback_listener, phone):
    token = get_token(daraja_sim)
    response = push(daraja_sim, token, callback_listener.url, phone=phone, Amount=5)
    assert response.status_code == 200
    push_body = response.json()
    checkout_id = push_body["CheckoutRequestID"]
    assert_pending(query(daraja_sim, token, checkout_id))
    assert callback_listener.received == []

    received = callback_listener.wait_for(1, timeout=3)
    assert len(received) == 1
    assert received[0].path == "/callback"
    assert received[0].headers["Content-Type"] == "application/json"
    assert b'"Value": 5.0' in received[0].body  # Amount on the wire as a float
    receipt = assert_success_callback(received[0].json(), push_body, phone, amount=5)
    assert_final_query(query(daraja_sim, token, checkout_id), push_body, "0",
                       "The service request is processed successfully.")
    [delivery] = daraja_sim.wait_for_callback(checkout_id, timeout=3)
    assert delivery.delivered and delivery.status == 200 and len(delivery.attempts) == 1
    assert daraja_sim.transaction(checkout_id).receipt == receipt
    time.sleep(0.2)
    assert len(callback_listener.received) == 1  # exactly once


@pytest.mark.parametrize(
    ("phone", "code", "desc"),
    [
        ("254700000001", 1032, "Request cancelled by user"),
        ("254700000003", 1, "The balance is insufficient for the transaction."),
        ("254700000004", 2001, "The initiator information is invalid."),
    ],
    ids=["cancelled-1032", "insufficient-1", "wrong-pin-2001"],
)
def test_failures_after_the_callback_delay(daraja_sim, callback_listener, phone, code, desc):
    token = get_token(daraja_sim)
    push_body = push(daraja_sim, token, callback_listener.url, phone=phone).json()
    checkout_id = push_body["CheckoutRequestID"]
    assert_pending(query(daraja_sim, token, checkout_id))
    received = callback_listener.wait_for(1, timeout=3)
    assert_failure_callback(received[0].json(), push_body, code, desc)
    assert_final_query(query(daraja_sim, token, checkout_id), push_body, str(code), desc)
    assert daraja_sim.transaction(checkout_id).receipt is None


def test_no_answer_1037_after_the_prompt_timeout(daraja_sim, callback_listener):
    token = get_token(daraja_sim)
    started = _monotonic()
    push_body = push(daraja_sim, token, callback_listener.url, phone="254700000002").json()
    checkout_id = push_body["CheckoutRequestID"]
    time.sleep(daraja_sim.callback_delay + 0.1)  # an ordinary answer would be known by now
    assert _monotonic() - started < daraja_sim.prompt_timeout
    assert_pending(query(daraja_sim, token, checkout_id))
    assert callback_listener.received == []
    received = callback_listener.wait_for(1, timeout=3)
    assert received[0].received_at - started >= daraja_sim.prompt_timeout
    assert_failure_callback(received[0].json(), push_body, 1037, "DS timeout user cannot be reached")
    assert_final_query(query(daraja_sim, token, checkout_id), push_body, "1037", "DS timeout user cannot be reached")


def test_lost_callback_only_the_query_knows(daraja_sim, callback_listener):
    token = get_token(daraja_sim)
    push_body = push(daraja_sim, token, callback_listener.url, phone="254700000005").json()
    checkout_id = push_body["CheckoutRequestID"]
    assert_pending(query(daraja_sim, token, checkout_id))
    wait_until_final(daraja_sim, checkout_id)
    assert_final_query(query(daraja_sim, token, checkout_id), push_body, "0",
                       "The service request is processed successfully.")
    time.sleep(daraja_sim.late_callback_delay)
    assert callback_listener.received == []
    assert daraja_sim.callbacks_for(checkout_id) == []
    assert daraja_sim.transaction(checkout_id).receipt  # paid all the same


def test_duplicate_callback_is_sent_twice(daraja_sim, callback_listener):
    token = get_token(daraja_sim)
    push_body = push(daraja_sim, token, callback_listener.url, phone="254700000006").json()
    checkout_id = push_body["CheckoutRequestID"]
    received = callback_listener.wait_for(2, timeout=3)
    assert len(received) == 2
    assert received[0].body == received[1].body
    assert_success_callback(received[0].json(), push_body, "254700000006")
    deliveries = daraja_sim.wait_for_callback(checkout_id, count=2, timeout=3)
    assert sorted(d.copy_number for d in deliveries) == [1, 2]
    assert all(d.delivered for d in deliveries)
    time.sleep(0.2)
    assert len(callback_listener.received) == 2


def test_duplicate_gap_is_configurable(make_simulator, callback_listener):
    sim = make_simulator(duplicate_callback_gap=0.3)
    get_token(sim)
    push(sim, get_token(sim), callback_listener.url, phone="254700000006")
    first, second = callback_listener.wait_for(2, timeout=3)
    assert second.received_at - first.received_at >= 0.25


def test_late_callback_comes_after_the_query_answers(daraja_sim, callback_listener):
    token = get_token(daraja_sim)
    started = _monotonic()
    push_body = push(daraja_sim, token, callback_listener.url, phone="254700000007").json()
    checkout_id = push_body["CheckoutRequestID"]
    assert_pending(query(daraja_sim, token, checkout_id))
    wait_until_final(daraja_sim, checkout_id)
    assert_final_query(query(daraja_sim, token, checkout_id), push_body, "0",
                       "The service request is processed successfully.")
    assert callback_listener.received == []  # the query knows, the callback has not come yet
    received = callback_listener.wait_for(1, timeout=3)
    assert received[0].received_at - started >= daraja_sim.late_callback_delay
    assert_success_callback(received[0].json(), push_body, "254700000007")


def test_late_callback_delay_defaults_to_three_callback_delays(make_simulator):
    sim = make_simulator(callback_delay=0.2, late_callback_delay=None)
    assert sim.late_callback_delay == pytest.approx(0.6)


def test_early_callback_arrives_before_the_push_response(daraja_sim, callback_listener):
    token = get_token(daraja_sim)
    response = push(daraja_sim, token, callback_listener.url, phone="254700000008")
    # Already there when the push's HTTP response is read: delivered and answered first.
    received = callback_listener.received
    assert len(received) == 1
    push_body = response.json()
    assert_success_callback(received[0].json(), push_body, "254700000008")
    [delivery] = daraja_sim.callbacks_for(push_body["CheckoutRequestID"])
    assert delivery.delivered and delivery.status == 200
    assert_final_query(query(daraja_sim, token, push_body["CheckoutRequestID"]), push_body, "0",
                       "The service request is processed successfully.")


def test_early_callback_is_written_before_the_push_response(daraja_sim):
    """Even when the CallBackURL is slow, the push's response waits for the callback's answer."""
    with CallbackListener(delay=0.3) as slow:
        started = _monotonic()
        response = push(daraja_sim, get_token(daraja_sim), slow.url, phone="254700000008")
        answered = _monotonic()
        assert response.status_code == 200
        assert answered - started >= 0.3
        assert slow.received[0].received_at <= answered


def test_subscriber_lock_phone_refuses_the_push(daraja_sim, callback_listener):
    response = push(daraja_sim, get_token(daraja_sim), callback_listener.url, phone="254700000009")
    assert_error(response, 500, "500.001.1001",
                 "Unable to lock subscriber, a transaction is already in process for the current subscriber")
    assert daraja_sim.pushes == []
    time.sleep(daraja_sim.callback_delay + 0.1)
    assert callback_listener.received == []


def test_a_second_push_to_a_pending_phone_is_refused(daraja_sim, callback_listener):
    token = get_token(daraja_sim)
    first = push(daraja_sim, token, callback_listener.url).json()
    assert_error(push(daraja_sim, token, callback_listener.url), 500, "500.001.1001",
                 "Unable to lock subscriber, a transaction is already in process for the current subscriber")
    # Another phone is not locked.
    assert push(daraja_sim, token, callback_listener.url, phone="254711000009").status_code == 200
    wait_until_final(daraja_sim, first["CheckoutRequestID"])
    assert push(daraja_sim, token, callback_listener.url).status_code == 200  # free again once answered
    assert len(daraja_sim.pushes) == 3


def test_unanswered_prompt_locks_the_phone_until_the_prompt_timeout(daraja_sim, callback_listener):
    token = get_token(daraja_sim)
    push(daraja_sim, token, callback_listener.url, phone="254700000002")
    time.sleep(daraja_sim.callback_delay + 0.05)
    assert push(daraja_sim, token, callback_listener.url, phone="254700000002").status_code == 500


def test_amount_above_250000_is_accepted_then_declined_with_result_code_3(daraja_sim, callback_listener):
    token = get_token(daraja_sim)
    response = push(daraja_sim, token, callback_listener.url, Amount=250_001)
    assert response.status_code == 200
    push_body = response.json()
    received = callback_listener.wait_for(1, timeout=3)
    desc = "Declined due to limit rule: greater than the maximum transaction amount."
    assert_failure_callback(received[0].json(), push_body, 3, desc)
    assert_final_query(query(daraja_sim, token, push_body["CheckoutRequestID"]), push_body, "3", desc)


def test_magic_numbers_table_lists_every_number():
    table = magic_numbers_table()
    assert SANDBOX_TEST_MSISDN in table
    for number in [f"25470000000{i}" for i in range(1, 10)]:
        assert number in table
        assert number in MAGIC_NUMBERS
    assert len(MAGIC_NUMBERS) == 9


def test_kenya_time_on_the_wire(daraja_sim, callback_listener):
    # The contract's sample: 2019-12-19 10:21:15 in Nairobi is 07:21:15 UTC.
    with freeze_time("2019-12-19 07:21:15"):
        push_body = push(daraja_sim, get_token(daraja_sim), callback_listener.url).json()
        tx = daraja_sim.transaction(push_body["CheckoutRequestID"])
    assert push_body["CheckoutRequestID"].startswith("ws_CO_19122019102115")
    assert tx.transaction_date == 20191219102115
    assert tx.receipt.startswith("NLJ")  # year N (2019), month L (December), day J (19)
    body = callback_listener.wait_for(1, timeout=3)[0].json()
    assert body["Body"]["stkCallback"]["CallbackMetadata"]["Item"][3] == {
        "Name": "TransactionDate", "Value": 20191219102115}


def test_receipts_are_unique(daraja_sim, callback_listener):
    token = get_token(daraja_sim)
    for index in range(20):
        assert push(daraja_sim, token, callback_listener.url, phone=f"2547120000{index:02d}").status_code == 200
    receipts = [t.receipt for t in daraja_sim.pushes]
    assert len(set(receipts)) == 20 and all(RECEIPT.match(r) for r in receipts)


# ----------------------------------------------------------------------------------------------------------------
# Callback delivery: retries
# ----------------------------------------------------------------------------------------------------------------
def test_callback_is_retried_after_a_500(daraja_sim, callback_listener):
    callback_listener.answer_next(500)
    push_body = push(daraja_sim, get_token(daraja_sim), callback_listener.url).json()
    [delivery] = daraja_sim.wait_for_callback(push_body["CheckoutRequestID"], timeout=3)
    assert [a.status for a in delivery.attempts] == [500, 200]
    assert delivery.delivered
    received = callback_listener.received
    assert len(received) == 2 and received[0].body == received[1].body
    assert received[1].received_at - received[0].received_at >= daraja_sim.callback_retry_delays[0]


def test_callback_gives_up_after_the_retries(daraja_sim, callback_listener):
    callback_listener.answer_next(500, 502, 503, 504, 500)
    push_body = push(daraja_sim, get_token(daraja_sim), callback_listener.url).json()
    [delivery] = daraja_sim.wait_for_callback(push_body["CheckoutRequestID"], timeout=3)
    assert [a.status for a in delivery.attempts] == [500, 502, 503, 504]
    assert delivery.state == "failed" and not delivery.delivered
    assert len(callback_listener.received) == 4


def test_callback_is_retried_when_the_connection_is_refused(daraja_sim):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{dead_port}/callback"
    push_body = push(daraja_sim, get_token(daraja_sim), url).json()
    [delivery] = daraja_sim.wait_for_callback(push_body["CheckoutRequestID"], timeout=3)
    assert len(delivery.attempts) == 1 + len(daraja_sim.callback_retry_delays)
    assert all(a.status is None and a.error == "connection refused" for a in delivery.attempts)
    assert delivery.state == "failed"


def test_callback_retry_reaches_a_listener_that_comes_up_later(daraja_sim):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    push_body = push(daraja_sim, get_token(daraja_sim), f"http://127.0.0.1:{port}/callback").json()
    checkout_id = push_body["CheckoutRequestID"]
    deadline = _monotonic() + 3
    while not daraja_sim.callbacks_for(checkout_id)[0].attempts and _monotonic() < deadline:
        time.sleep(0.01)
    with CallbackListener(port=port) as late:
        [delivery] = daraja_sim.wait_for_callback(checkout_id, timeout=3)
        assert delivery.delivered
        assert delivery.attempts[0].error == "connection refused"
        assert len(late.received) == 1


@pytest.mark.parametrize("status", [400, 403, 404, 302])
def test_callback_is_not_retried_after_a_4xx_or_3xx(daraja_sim, callback_listener, status):
    callback_listener.answer_next(status)
    push_body = push(daraja_sim, get_token(daraja_sim), callback_listener.url).json()
    [delivery] = daraja_sim.wait_for_callback(push_body["CheckoutRequestID"], timeout=3)
    assert [a.status for a in delivery.attempts] == [status]
    assert delivery.state == "refused"
    time.sleep(sum(daraja_sim.callback_retry_delays[:1]) + 0.1)
    assert len(callback_listener.received) == 1


def test_callback_timeout_is_retried(make_simulator):
    sim = make_simulator(callback_timeout=0.1, callback_retry_delays=(0.05,))
    with CallbackListener(delay=0.3) as slow:
        push_body = push(sim, get_token(sim), slow.url).json()
        [delivery] = sim.wait_for_callback(push_body["CheckoutRequestID"], timeout=3)
        assert len(delivery.attempts) == 2
        assert all(a.status is None and "timed out" in (a.error or "") for a in delivery.attempts)
        assert delivery.state == "failed"


def test_wait_for_callback_times_out(daraja_sim):
    with pytest.raises(TimeoutError):
        daraja_sim.wait_for_callback("ws_CO_nothing", timeout=0.1)


# ----------------------------------------------------------------------------------------------------------------
# Injected gateway errors
# ----------------------------------------------------------------------------------------------------------------
def test_spike_arrest_answers_the_next_push(daraja_sim, callback_listener):
    token = get_token(daraja_sim)
    daraja_sim.fail_next(1, "spike_arrest")
    assert_error(push(daraja_sim, token, callback_listener.url), 500, "500.003.02", "Spike arrest violation")
    assert daraja_sim.pushes == []
    assert push(daraja_sim, token, callback_listener.url).status_code == 200


def test_quota_violation_on_queries_only(daraja_sim, callback_listener):
    token = get_token(daraja_sim)
    daraja_sim.fail_next(2, "quota", operations=["stk_query"])
    checkout_id = push(daraja_sim, token, callback_listener.url).json()["CheckoutRequestID"]
    for _ in range(2):
        assert_error(query(daraja_sim, token, checkout_id), 500, "500.003.03", "Quota violation")
    assert_pending(query(daraja_sim, token, checkout_id))


def test_gateway_errors_come_before_the_token_check(daraja_sim, callback_listener):
    daraja_sim.fail_next(1, "spike_arrest")
    assert_error(push(daraja_sim, "not-a-token", callback_listener.url), 500, "500.003.02", "Spike arrest violation")


def test_unavailable_answers_html(daraja_sim):
    daraja_sim.fail_next(1, "unavailable", operations=["token"])
    response = requests.get(
        f"{daraja_sim.base_url}{OAUTH_PATH}?grant_type=client_credentials",
        auth=(DEFAULT_CONSUMER_KEY, DEFAULT_CONSUMER_SECRET),
        timeout=5,
    )
    assert response.status_code == 503
    assert response.headers["Content-Type"].startswith("text/html")
    assert daraja_sim.tokens_issued == 0 and daraja_sim.token_requests == 1
    get_token(daraja_sim)


def test_fail_next_checks_its_arguments(daraja_sim):
    with pytest.raises(ValueError):
        daraja_sim.fail_next(1, "teapot")
    with pytest.raises(ValueError):
        daraja_sim.fail_next(1, "quota", operations=["refund"])


# ----------------------------------------------------------------------------------------------------------------
# Server life cycle, keep-alive, control API, CLI
# ----------------------------------------------------------------------------------------------------------------
def test_keep_alive_reuses_one_connection(daraja_sim, callback_listener):
    session = requests.Session()
    token = get_token(daraja_sim, session)
    for index in range(10):
        response = session.post(
            f"{daraja_sim.base_url}{STK_PUSH_PATH}",
            json=push_payload(callback_listener.url, phone=f"2547130000{index:02d}"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=5,
        )
        assert response.status_code == 200
    assert daraja_sim.connections_opened == 1
    session.close()


def test_stop_joins_every_thread_even_with_open_connections_and_scheduled_callbacks(callback_listener):
    before = set(threading.enumerate())
    sim = DarajaSimulator(port=0, callback_delay=30).start()
    session = requests.Session()
    push_body = push(sim, get_token(sim, session), callback_listener.url).json()
    session.get(f"{sim.base_url}/__sim__/health", timeout=5)  # an idle keep-alive connection stays open
    port = sim.port
    started = _monotonic()
    sim.stop()
    assert _monotonic() - started < 2
    assert set(threading.enumerate()) - before == set()
    assert sim.callbacks_for(push_body["CheckoutRequestID"])[0].state == "cancelled"
    assert not sim.running
    sim.stop()  # idempotent
    with socket.socket() as again:  # the port is released
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
    session.close()
    assert callback_listener.received == []


def test_life_cycle_errors():
    sim = DarajaSimulator(port=0)
    with pytest.raises(RuntimeError):
        _ = sim.base_url
    with sim, pytest.raises(RuntimeError):
        sim.start()
    with pytest.raises(ValueError):
        DarajaSimulator(callback_delay=-1)


def test_context_manager_restarts_cleanly():
    for _ in range(3):
        with DarajaSimulator(port=0) as sim:
            assert requests.get(f"{sim.base_url}/__sim__/health", timeout=5).json() == {"status": "ok"}
    assert [t.name for t in threading.enumerate() if t.name.startswith("daraja-sim")] == []


def test_control_api(daraja_sim, callback_listener):
    base = f"{daraja_sim.base_url}/__sim__"
    token = get_token(daraja_sim)
    push_body = push(daraja_sim, token, callback_listener.url).json()
    state = requests.get(f"{base}/state", timeout=5).json()
    assert state["tokens_issued"] == 1
    assert state["pushes"][0]["CheckoutRequestID"] == push_body["CheckoutRequestID"]
    assert state["pushes"][0]["final"] is False
    assert requests.post(f"{base}/expire-tokens", timeout=5).json() == {"expired": 1}
    assert push(daraja_sim, token, callback_listener.url, phone="254711000011").status_code == 401
    token = get_token(daraja_sim)
    assert requests.post(f"{base}/fail-next", json={"error": "spike_arrest", "operations": ["stk_push"]},
                         timeout=5).ok
    assert push(daraja_sim, token, callback_listener.url, phone="254711000012").json()["errorCode"] == "500.003.02"
    assert requests.post(f"{base}/fail-next", json={"error": "teapot"}, timeout=5).status_code == 400
    assert requests.post(f"{base}/delay-next", json={"seconds": 0.2, "operations": ["stk_query"]}, timeout=5).ok
    started = _monotonic()
    query(daraja_sim, token, push_body["CheckoutRequestID"])
    assert _monotonic() - started >= 0.2
    assert requests.post(f"{base}/delay-next", json={"operations": ["refund"]}, timeout=5).status_code == 400
    assert requests.post(f"{base}/reset", timeout=5).ok
    assert daraja_sim.pushes == [] and daraja_sim.tokens_issued == 0
    assert requests.get(f"{base}/nothing", timeout=5).status_code == 404


def test_cli_runs_and_stops_on_sigterm():
    process = subprocess.Popen(
        [sys.executable, "-m", "muchiri_mpesa.daraja.simulator", "--port", "0", "--callback-delay", "0.1"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        banner = []
        for line in process.stdout:
            banner.append(line)
            if line.startswith("Ctrl-C to stop"):
                break
        banner_text = "".join(banner)
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", banner_text)
        assert match, banner_text
        for number in MAGIC_NUMBERS:  # the banner lists the magic numbers
            assert number in banner_text
        assert "-----BEGIN CERTIFICATE-----" in banner_text and "testapi" in banner_text
        base_url = match.group(1)
        response = requests.get(
            f"{base_url}{OAUTH_PATH}?grant_type=client_credentials",
            auth=("sim-consumer-key", "sim-consumer-secret"),
            timeout=5,
        )
        assert response.status_code == 200
        assert response.json()["expires_in"] == "3599"
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=10)
        assert process.returncode == 0, err
        assert "stopped" in out
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_cli_flags():
    result = subprocess.run(
        [sys.executable, "-m", "muchiri_mpesa.daraja.simulator", "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 0
    for flag in ("--host", "--port", "--consumer-key", "--consumer-secret", "--shortcode", "--passkey", "--till",
                 "--callback-delay", "--prompt-timeout", "--late-callback-delay"):
        assert flag in result.stdout
    assert SANDBOX_PASSKEY[:8] in result.stdout and "174379" in result.stdout and "sim-consumer-key" in result.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "muchiri_mpesa.daraja.simulator", "--callback-delay", "-1"],
        cwd=REPO, capture_output=True, text=True, timeout=30, check=False,
    )
    assert bad.returncode == 2


def test_cli_options_reach_the_simulator(monkeypatch):
    seen = {}

    class Recorder(DarajaSimulator):
        def start(self):
            seen.update(vars(self.settings))
            raise OSError("not really")

    monkeypatch.setattr(cli, "DarajaSimulator", Recorder)
    code = cli.main(["--port", "0", "--consumer-key", "k", "--consumer-secret", "s", "--shortcode", "600111",
                     "--passkey", "p", "--till", "7654321", "--callback-delay", "0.5", "--prompt-timeout", "4",
                     "--late-callback-delay", "9", "--callback-retry-delays", "0.1,0.2", "--keep-previous-tokens",
                     "--reject-mpesa-urls", "-q"])
    assert code == 2
    assert seen["consumer_key"] == "k" and seen["consumer_secret"] == "s"
    assert seen["shortcode"] == "600111" and seen["passkey"] == "p" and seen["till_number"] == "7654321"
    assert seen["callback_delay"] == 0.5 and seen["prompt_timeout"] == 4 and seen["late_callback_delay"] == 9
    assert seen["callback_retry_delays"] == (0.1, 0.2)
    assert seen["invalidate_previous_tokens"] is False and seen["reject_mpesa_in_callback_url"] is True


LAZY_IMPORTS = {"keys.py": {"cryptography"}, "qr.py": {"qrcode"}}


def test_simulator_uses_the_standard_library_only():
    """Only keys.py (the initiator APIs' RSA) may use cryptography, and qr.py (the Dynamic QR image) qrcode,
    each only inside its functions."""
    stdlib = set(sys.stdlib_module_names)
    for path in SIMULATOR_DIR.glob("*.py"):
        if path.name == "demo.py":  # the demo drives the DarajaClient (requests) against the simulator
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                allowed = stdlib | {"__future__"} | LAZY_IMPORTS.get(path.name, set())
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
        for lazy in LAZY_IMPORTS.get(path.name, ()):  # lazily: a bare Python still runs OAuth, STK and C2B
            assert all(not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith(lazy)
                       for node in tree.body)
            assert all(not isinstance(node, ast.Import) or not any(a.name.startswith(lazy) for a in node.names)
                       for node in tree.body)


def test_simulator_does_not_import_odoo():
    code = "import sys, muchiri_mpesa.daraja.simulator.server; sys.exit('odoo' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert result.returncode == 0, result.stderr


def test_delay_next_processes_the_push_then_answers_late(daraja_sim, callback_listener):
    token = get_token(daraja_sim)
    daraja_sim.delay_next(0.3)
    started = _monotonic()
    with pytest.raises(requests.ReadTimeout):
        requests.post(f"{daraja_sim.base_url}{STK_PUSH_PATH}", json=push_payload(callback_listener.url),
                      headers={"Authorization": f"Bearer {token}"}, timeout=(2, 0.1))
    assert len(daraja_sim.pushes) == 1  # processed although the client saw no answer
    time.sleep(max(0.0, 0.35 - (_monotonic() - started)))
    assert push(daraja_sim, token, callback_listener.url, phone="254711000013").status_code == 200  # one delay only
    with pytest.raises(ValueError):
        daraja_sim.delay_next(1, operations=["refund"])


def test_stop_interrupts_a_delayed_answer(make_simulator, callback_listener):
    sim = make_simulator()
    sim.delay_next(30)
    token = get_token(sim)
    worker = threading.Thread(target=lambda: push_quietly(sim, token, callback_listener.url))
    worker.start()
    deadline = _monotonic() + 3
    while not sim.pushes and _monotonic() < deadline:
        time.sleep(0.01)
    started = _monotonic()
    sim.stop()
    worker.join(5)
    assert _monotonic() - started < 2


def push_quietly(sim, token, url):
    try:
        push(sim, token, url)
    except requests.RequestException:
        pass
