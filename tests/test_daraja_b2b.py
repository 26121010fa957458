"""The pure B2B Express Checkout layer: the request, its acknowledgement, the result posted to callbackUrl, codes.

The client's answers are read from a loopback stub that answers as told (shapes the simulator never sends); the
simulator itself is driven in tests/test_simulator_b2b.py.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from muchiri_mpesa.daraja import (
    B2B_CANCELLED_CODE,
    B2B_CHECKOUT_PATH,
    B2B_KYC_FAILED_CODE,
    B2B_NO_NOMINATED_NUMBER_CODE,
    B2B_RESULT_CODES,
    B2B_RETRYABLE_CODES,
    B2B_USSD_ERROR_CODE,
    B2B_USSD_NETWORK_ERROR_CODE,
    B2BCheckoutRequest,
    CallbackParseError,
    DarajaApiError,
    DarajaAuthError,
    DarajaClient,
    DarajaCredentials,
    DarajaProtocolError,
    DarajaValidationError,
    Exchange,
    InvalidAmount,
    InvalidConfiguration,
    Outcome,
    ShortcodeConfig,
    build_transaction_status_payload,
    classify_b2b_result,
    parse_b2b_checkout_result,
)

URL = "https://shop.example.com/payment/lnm/s3cr3t/b2b_result"
SUCCESS = {
    "resultCode": "0",
    "resultDesc": "The service request is processed successfully.",
    "amount": "71.0",
    "requestId": "404e1aec-19e0-4ce3-973d-bd92e94c8021",
    "resultType": "0",
    "conversationID": "AG_20230426_2010434680d9f5a73766",
    "transactionId": "RDQ01NFT1Q",
    "status": "SUCCESS",
}
CANCELLED = {
    "resultCode": "4001",
    "resultDesc": "User cancelled transaction",
    "requestId": "c2a9ba32-9e11-4b90-892c-7bc54944609a",
    "amount": "71.0",
    "paymentReference": "MAndbubry3hi",
}


def _request(**overrides: Any) -> B2BCheckoutRequest:
    fields: dict[str, Any] = {
        "primary_shortcode": "600100", "receiver_shortcode": "174379", "amount": 71, "payment_ref": "S00042",
        "callback_url": URL, "partner_name": "Muchiri Distributors",
    }
    fields.update(overrides)
    return B2BCheckoutRequest(**fields)


# -- the request ------------------------------------------------------------------------------------------------
def test_the_payload_is_darajas_exact_body() -> None:
    request = _request(request_id="550E8400-E29B-41D4-A716-446655440000", partner_name="  Muchiri   Distributors ")
    assert request.payload() == {
        "primaryShortCode": "600100",
        "receiverShortCode": "174379",
        "amount": "71",
        "paymentRef": "S00042",
        "callbackUrl": URL,
        "partnerName": "Muchiri Distributors",
        "RequestRefID": "550e8400-e29b-41d4-a716-446655440000",
    }
    assert list(request.payload()) == [
        "primaryShortCode", "receiverShortCode", "amount", "paymentRef", "callbackUrl", "partnerName", "RequestRefID",
    ]
    assert URL not in repr(request)  # the callback URL holds the provider's secret path


def test_each_request_gets_its_own_uuid() -> None:
    first, second = _request(), _request()
    assert first.request_id != second.request_id
    assert str(uuid.UUID(first.request_id)) == first.request_id


@pytest.mark.parametrize("amount, shillings", [(71, 71), ("71", 71), (Decimal("71.00"), 71), (71.0, 71),
                                               (1, 1), (250_000, 250_000)])
def test_whole_shillings_are_taken(amount: object, shillings: int) -> None:
    assert _request(amount=amount).amount == shillings


@pytest.mark.parametrize("amount", [Decimal("70.5"), "71.01", 0.5, 0, -5, "abc", None, True, float("nan"),
                                    250_001, "1e999"])
def test_fractions_and_amounts_out_of_limits_are_refused(amount: object) -> None:
    with pytest.raises(InvalidAmount):
        _request(amount=amount)


def test_the_limit_is_the_clients_and_never_above_daraja() -> None:
    assert _request(amount=250_000, max_amount=250_000).amount == 250_000
    with pytest.raises(InvalidConfiguration):
        _request(amount=100, max_amount=250_001)


@pytest.mark.parametrize("field, value", [
    ("primary_shortcode", "6001"), ("primary_shortcode", "60010000"), ("primary_shortcode", "60O100"),
    ("primary_shortcode", None), ("primary_shortcode", True), ("receiver_shortcode", ""),
    ("primary_shortcode", "174379"),  # a paybill paying itself
])
def test_shortcodes_are_5_to_7_digits_and_distinct(field: str, value: object) -> None:
    with pytest.raises(InvalidConfiguration) as caught:
        _request(**{field: value})
    assert caught.value.field == field


def test_shortcodes_may_be_numbers() -> None:
    assert _request(primary_shortcode=600100, receiver_shortcode=174379).payload()["primaryShortCode"] == "600100"


@pytest.mark.parametrize("reference", ["", "   ", "S00042-2-20251126", "INV/2025/42", "S 42", "Sö42", None, 42])
def test_the_payment_reference_is_1_to_12_letters_digits_or_dashes(reference: object) -> None:
    with pytest.raises(DarajaValidationError) as caught:
        _request(payment_ref=reference)
    assert caught.value.field == "payment_ref"


def test_a_reference_of_12_fits() -> None:
    assert _request(payment_ref=" INV-2025-042 ").payment_ref == "INV-2025-042"


@pytest.mark.parametrize("url", [
    "http://shop.example.com/cb",  # Daraja is reached over https: so is our callback
    "https://shop.example.com/mpesa/cb", "https://abc.ngrok-free.app/cb", "shop.example.com/cb", "", None,
    "https://shop.example.com/c b",
])
def test_the_callback_url_is_https_and_free_of_banned_words(url: object) -> None:
    with pytest.raises(InvalidConfiguration) as caught:
        _request(callback_url=url)
    assert caught.value.field == "callback_url"


def test_a_local_simulator_may_be_called_back_over_http() -> None:
    assert _request(callback_url="http://odoo:8069/cb", allow_http=True).callback_url == "http://odoo:8069/cb"


@pytest.mark.parametrize("name", ["", "   ", "x" * 101, "Muchiri\x00", "Muchiri\u202e", None])
def test_the_partner_name_is_printable_and_short(name: object) -> None:
    with pytest.raises(DarajaValidationError) as caught:
        _request(partner_name=name)
    assert caught.value.field == "partner_name"


@pytest.mark.parametrize("request_id", ["", "S00042", "404e1aec", None, 42])
def test_the_request_id_is_a_uuid(request_id: object) -> None:
    with pytest.raises(DarajaValidationError) as caught:
        _request(request_id=request_id)
    assert caught.value.field == "request_id"


# -- the result -------------------------------------------------------------------------------------------------
def test_a_success_result() -> None:
    result = parse_b2b_checkout_result(json.dumps(SUCCESS).encode())
    assert result.is_success and result.outcome is Outcome.SUCCESS
    assert result.transaction_id == "RDQ01NFT1Q" and result.amount == Decimal(71)
    assert result.request_id == SUCCESS["requestId"] and result.conversation_id == SUCCESS["conversationID"]
    assert (result.status, result.result_type, result.payment_reference) == ("SUCCESS", "0", None)
    assert result.description == B2B_RESULT_CODES["0"].message and result.raw == SUCCESS


def test_a_cancelled_result() -> None:
    result = parse_b2b_checkout_result(json.dumps(CANCELLED))
    assert not result.is_success and result.outcome is Outcome.CANCELED
    assert result.result_code == B2B_CANCELLED_CODE and result.transaction_id is None
    assert result.payment_reference == "MAndbubry3hi" and result.amount == Decimal(71)
    assert "cancelled" in result.description


@pytest.mark.parametrize("code", [B2B_KYC_FAILED_CODE, B2B_NO_NOMINATED_NUMBER_CODE, B2B_USSD_NETWORK_ERROR_CODE,
                                  B2B_USSD_ERROR_CODE])
def test_documented_failures_are_failed(code: str) -> None:
    result = parse_b2b_checkout_result({**CANCELLED, "resultCode": code, "resultDesc": "x"})
    assert result.outcome is Outcome.FAILED and "No money was taken" in result.description


def test_an_unknown_code_is_pending_never_failed() -> None:
    result = parse_b2b_checkout_result({**CANCELLED, "resultCode": "4999"})
    assert result.outcome is Outcome.PENDING
    assert classify_b2b_result(None).outcome is Outcome.PENDING


def test_numbers_where_daraja_writes_text_are_read() -> None:
    result = parse_b2b_checkout_result({**SUCCESS, "resultCode": 0, "amount": 71, "resultType": 0})
    assert result.is_success and result.amount == Decimal(71) and result.result_type == "0"
    assert parse_b2b_checkout_result({**SUCCESS, "amount": 71.0, "status": "success"}).amount == Decimal(71)


def test_extra_keys_are_kept_in_raw_only() -> None:
    result = parse_b2b_checkout_result({**SUCCESS, "junk": {"deep": [1, 2]}, "Amount": "1"})
    assert result.amount == Decimal(71) and result.raw["junk"] == {"deep": [1, 2]}


def _refused(body: Any) -> str:
    with pytest.raises(CallbackParseError) as caught:
        parse_b2b_checkout_result(body)
    return str(caught.value)


def test_duplicate_keys_are_refused() -> None:
    text = json.dumps(SUCCESS)[:-1] + ', "amount": "1.0"}'
    assert "not valid JSON" in _refused(text)
    forged = '{"resultCode": "4001", "resultCode": "0", ' + json.dumps(SUCCESS)[1:].replace('"resultCode": "0", ', "")
    _refused(forged)


@pytest.mark.parametrize("name", ["resultCode", "resultDesc", "requestId", "amount"])
def test_absent_fields_are_refused(name: str) -> None:
    _refused({k: v for k, v in SUCCESS.items() if k != name})
    _refused({k: v for k, v in CANCELLED.items() if k != name})


@pytest.mark.parametrize("name, value", [
    ("resultCode", True), ("resultCode", None), ("resultCode", ""), ("resultCode", {"0": 0}), ("resultCode", [0]),
    ("resultCode", 0.5),
    ("resultDesc", 0), ("resultDesc", None), ("resultDesc", ["x"]),
    ("requestId", ""), ("requestId", None), ("requestId", {"id": 1}), ("requestId", "a b"), ("requestId", "x" * 101),
    ("amount", True), ("amount", None), ("amount", "71.5"), ("amount", "0.0"), ("amount", "-71.0"), ("amount", 0),
    ("amount", "NaN"), ("amount", "Infinity"), ("amount", "7l"), ("amount", [71]), ("amount", "1e12"),
    ("amount", "71.001"),
    ("transactionId", None), ("transactionId", ""), ("transactionId", "RDQ 01NFT1Q"), ("transactionId", True),
    ("transactionId", {"receipt": "RDQ01NFT1Q"}), ("transactionId", "R\x00Q01NFT1Q"),
    ("status", "FAILED"), ("status", {"s": 1}),
    ("conversationID", ["AG_1"]), ("resultType", {"t": 0}),
])
def test_forged_or_short_success_fields_are_refused(name: str, value: object) -> None:
    _refused({**SUCCESS, name: value})


def test_a_success_without_its_receipt_is_refused() -> None:
    assert "transactionId" in _refused({k: v for k, v in SUCCESS.items() if k != "transactionId"})


def test_a_failure_claiming_success_is_refused() -> None:
    assert "SUCCESS" in _refused({**CANCELLED, "status": "SUCCESS"})


@pytest.mark.parametrize("body", [b"", b"[]", b'"x"', b"\xff\xfe", b"{", b'{"resultCode": NaN}', "[" * 100_000,
                                  b"{}" * 10, 42, None])
def test_what_is_not_a_json_object_is_refused(body: Any) -> None:
    _refused(body)


def test_hostile_text_is_refused() -> None:
    _refused({**CANCELLED, "resultDesc": "x" * 1001})
    _refused({**CANCELLED, "resultDesc": "cancelled\x00"})
    _refused('{"resultCode": "4001", "resultDesc": "\\ud800", "requestId": "r-1", "amount": "71.0"}')
    _refused({**CANCELLED, "paymentReference": {"ref": 1}})


# -- codes ------------------------------------------------------------------------------------------------------
def test_the_catalogue() -> None:
    assert classify_b2b_result("0").outcome is Outcome.SUCCESS
    assert classify_b2b_result(4001).outcome is Outcome.CANCELED
    assert B2B_RETRYABLE_CODES == {B2B_USSD_NETWORK_ERROR_CODE, B2B_USSD_ERROR_CODE}
    for code, entry in B2B_RESULT_CODES.items():
        assert entry.code == code and entry.message.endswith(".")


# -- Transaction Status by the request ---------------------------------------------------------------------------
def _status_payload(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "initiator": "testapi", "security_credential": "Q1JFRA==", "party_a": "174379", "identifier_type": "4",
        "result_url": URL, "timeout_url": URL, "remarks": "Status",
    }
    fields.update(overrides)
    return build_transaction_status_payload(**fields)


def test_transaction_status_by_the_request_that_made_the_payment() -> None:
    body = _status_payload(original_conversation_id=SUCCESS["requestId"])
    assert body["OriginalConversationID"] == SUCCESS["requestId"] and "TransactionID" not in body
    both = _status_payload(original_conversation_id=SUCCESS["requestId"], transaction_id="RDQ01NFT1Q")
    assert (both["TransactionID"], both["OriginalConversationID"]) == ("RDQ01NFT1Q", SUCCESS["requestId"])
    assert "OriginalConversationID" not in _status_payload(transaction_id="RDQ01NFT1Q")
    by_conversation = _status_payload(original_conversation_id=SUCCESS["conversationID"])
    assert by_conversation["OriginalConversationID"] == "AG_20230426_2010434680d9f5a73766"


@pytest.mark.parametrize("overrides, field", [
    ({}, "transaction_id"), ({"original_conversation_id": "a b c d"}, "original_conversation_id"),
    ({"original_conversation_id": "abc"}, "original_conversation_id"),
])
def test_transaction_status_needs_a_receipt_or_a_request(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(DarajaValidationError) as caught:
        _status_payload(**overrides)
    assert caught.value.field == field


# -- the acknowledgement, from a stub that answers as told --------------------------------------------------------
class _Stub(BaseHTTPRequestHandler):
    answers: list[tuple[int, Any]] = []
    bodies: list[dict[str, Any]] = []

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: Any) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send(200, {"access_token": f"token-{uuid.uuid4().hex}", "expires_in": "3599"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        type(self).bodies.append({"path": self.path, **json.loads(self.rfile.read(length))})
        self._send(*type(self).answers.pop(0))


@contextmanager
def _stub(*answers: tuple[int, Any]) -> Iterator[tuple[DarajaClient, list[Exchange]]]:
    _Stub.answers = list(answers)
    _Stub.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    exchanges: list[Exchange] = []
    try:
        yield DarajaClient(
            DarajaCredentials("key", "secret", base_url=f"http://127.0.0.1:{server.server_address[1]}"),
            ShortcodeConfig("174379", "passkey"),
            timeout=(2.0, 5.0),
            observer=exchanges.append,
        ), exchanges
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _checkout(client: DarajaClient, **overrides: Any) -> Any:
    fields: dict[str, Any] = {"till": "600100", "amount": 71, "reference": "S00042", "callback_url": URL,
                              "partner_name": "Muchiri Distributors"}
    fields.update(overrides)
    return client.b2b_checkout(**fields)


def test_the_acknowledgement_starts_the_prompt() -> None:
    with _stub((200, {"code": "0", "status": "USSD Initiated Successfully"})) as (client, exchanges):
        ack = _checkout(client, request_id="550e8400-e29b-41d4-a716-446655440000")
    assert (ack.code, ack.status, ack.request_id) == ("0", "USSD Initiated Successfully",
                                                      "550e8400-e29b-41d4-a716-446655440000")
    assert ack.request.receiver_shortcode == "174379" and ack.request.amount == 71
    sent = _Stub.bodies[0]
    assert sent.pop("path") == B2B_CHECKOUT_PATH and sent == ack.request.payload()
    assert [e.operation for e in exchanges] == ["token", "b2b_checkout"] and exchanges[1].status == 200


def test_a_number_code_0_is_an_acknowledgement_too() -> None:
    with _stub((200, {"code": 0, "status": "USSD Initiated Successfully"})) as (client, _):
        assert _checkout(client).code == "0"


@pytest.mark.parametrize("code, retryable", [("4104", False), ("4102", False), ("4201", True), ("4203", True),
                                             ("4999", False)])
def test_any_other_code_is_a_refusal(code: str, retryable: bool) -> None:
    with _stub((200, {"code": code, "status": "Missing Nominated Number"})) as (client, exchanges), \
            pytest.raises(DarajaApiError) as caught:
        _checkout(client)
    error = caught.value
    assert (error.error_code, error.retryable, error.http_status) == (code, retryable, 200)
    assert error.error_message == "Missing Nominated Number" and f"code {code}" in str(error)
    assert exchanges[-1].error == str(error)


def test_an_api_error_is_a_refusal() -> None:
    body = {"requestId": "1-2-3", "errorCode": "400.002.02", "errorMessage": "Bad Request - Invalid amount"}
    with _stub((400, body)) as (client, _), pytest.raises(DarajaApiError) as caught:
        _checkout(client)
    assert caught.value.error_code == "400.002.02" and not caught.value.retryable


def test_a_refused_token_is_refreshed_once_then_the_request_is_sent_again() -> None:
    refused = {"requestId": "1-2-3", "errorCode": "404.001.03", "errorMessage": "Invalid Access Token"}
    with _stub((401, refused), (200, {"code": "0", "status": "USSD Initiated Successfully"})) as (client, exchanges):
        ack = _checkout(client)
    assert ack.code == "0" and [e.operation for e in exchanges].count("token") == 2
    assert _Stub.bodies[0]["RequestRefID"] == _Stub.bodies[1]["RequestRefID"] == ack.request_id
    with _stub((401, refused), (401, refused)) as (client, _), pytest.raises(DarajaAuthError):
        _checkout(client)


@pytest.mark.parametrize("status, body", [(200, {"status": "USSD Initiated Successfully"}), (200, b"<html/>"),
                                          (502, b""), (500, {"code": "0", "status": "?"}), (200, {"code": True}),
                                          (200, [{"code": "0"}])])
def test_an_answer_that_is_not_darajas_leaves_the_outcome_unknown(status: int, body: Any) -> None:
    with _stub((status, body)) as (client, _), pytest.raises(DarajaProtocolError) as caught:
        _checkout(client)
    assert "may or may not" in str(caught.value)


def test_nothing_is_sent_for_an_invalid_request_and_https_is_only_waived_for_an_http_daraja() -> None:
    with _stub() as (client, exchanges):
        with pytest.raises(InvalidAmount):
            _checkout(client, amount="70.5")
        with pytest.raises(InvalidAmount):
            _checkout(client, amount=250_001)  # above the client's limit
        assert exchanges == [] and _Stub.bodies == []
    production = DarajaClient(DarajaCredentials("key", "secret"), ShortcodeConfig("174379", "passkey"))
    with pytest.raises(InvalidConfiguration):
        _checkout(production, callback_url="http://shop.example.com/cb")
