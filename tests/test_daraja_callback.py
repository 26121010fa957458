"""Parsing realistic stkCallback bodies, refusing malformed ones, and building them."""

from __future__ import annotations

import copy
import json
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pytest

from muchiri_mpesa.daraja import (
    ACCEPTED_RESPONSE,
    KENYA_TZ,
    RESULT_CODES,
    CallbackParseError,
    Outcome,
    _inbound,
    parse_stk_callback,
    stk_callback_body,
)

UTC = timezone.utc

# Safaricom's documented success sample, byte for byte (Amount 1.00, Balance without Value).
SUCCESS_TEXT = (
    '{"Body":{"stkCallback":{"MerchantRequestID":"29115-34620561-1","CheckoutRequestID":'
    '"ws_CO_191220191020363925","ResultCode":0,"ResultDesc":"The service request is processed '
    'successfully.","CallbackMetadata":{"Item":[{"Name":"Amount","Value":1.00},{"Name":'
    '"MpesaReceiptNumber","Value":"NLJ7RT61SV"},{"Name":"Balance"},{"Name":"TransactionDate",'
    '"Value":20191219102115},{"Name":"PhoneNumber","Value":254708374149}]}}}}'
)


def _failure(code: Any, desc: str) -> dict[str, Any]:
    return {"Body": {"stkCallback": {
        "MerchantRequestID": "29115-34620561-1", "CheckoutRequestID": "ws_CO_191220191020363925",
        "ResultCode": code, "ResultDesc": desc}}}


def _success() -> dict[str, Any]:
    return json.loads(SUCCESS_TEXT)


def test_documented_success_sample() -> None:
    callback = parse_stk_callback(SUCCESS_TEXT)
    assert callback.merchant_request_id == "29115-34620561-1"
    assert callback.checkout_request_id == "ws_CO_191220191020363925"
    assert callback.result_code == "0"
    assert callback.result_desc == "The service request is processed successfully."
    assert callback.amount == Decimal(1) and str(callback.amount) == "1"
    assert callback.receipt_number == "NLJ7RT61SV"
    assert callback.transaction_date == datetime(2019, 12, 19, 10, 21, 15, tzinfo=KENYA_TZ)
    assert callback.transaction_date.utcoffset().total_seconds() == 3 * 3600
    assert callback.phone_number == "254708374149"
    assert callback.balance is None
    assert callback.is_success is True
    assert callback.outcome is Outcome.SUCCESS
    assert callback.result is RESULT_CODES["0"]
    assert callback.raw == _success()


def test_bytes_str_and_dict_give_the_same_result() -> None:
    from_text = parse_stk_callback(SUCCESS_TEXT)
    assert parse_stk_callback(SUCCESS_TEXT.encode()) == from_text
    assert parse_stk_callback(b"\xef\xbb\xbf" + SUCCESS_TEXT.encode()) == from_text
    assert parse_stk_callback(_success()) == from_text


def test_success_with_a_balance_value() -> None:
    body = _success()
    body["Body"]["stkCallback"]["CallbackMetadata"]["Item"][2] = {"Name": "Balance",
                                                                  "Value": 4500.25}
    assert parse_stk_callback(body).balance == "4500.25"


@pytest.mark.parametrize(("value", "expected"), [
    (1.00, Decimal(1)), (1, Decimal(1)), (1.5, Decimal("1.5")), ("100.00", Decimal(100)),
    (149999.99, Decimal("149999.99")), (0.1, Decimal("0.1")),
])
def test_amount_becomes_an_exact_decimal(value: Any, expected: Decimal) -> None:
    body = _success()
    body["Body"]["stkCallback"]["CallbackMetadata"]["Item"][0]["Value"] = value
    amount = parse_stk_callback(body).amount
    assert amount == expected and str(amount) == str(expected)


@pytest.mark.parametrize("value", ["0.001", "5.000001", 0.005, "1_000", "\u0665", "0x10", "1e1000000"])
def test_an_amount_is_shillings_and_cents_as_for_c2b(value: Any) -> None:
    """The same amount rule as every other body Daraja posts (daraja/_inbound.py)."""
    body = _success()
    body["Body"]["stkCallback"]["CallbackMetadata"]["Item"][0]["Value"] = value
    with pytest.raises(CallbackParseError, match="Amount is not"):
        parse_stk_callback(body)


@pytest.mark.parametrize("value", [20191219102115, "20191219102115", 20191219102115.0])
def test_transaction_date_as_number_or_text(value: Any) -> None:
    body = _success()
    body["Body"]["stkCallback"]["CallbackMetadata"]["Item"][3]["Value"] = value
    assert parse_stk_callback(body).transaction_date == datetime(2019, 12, 19, 10, 21, 15,
                                                                 tzinfo=KENYA_TZ)


@pytest.mark.parametrize("value", ["yesterday", 2019121910, "20191319102115", None, True])
def test_an_odd_transaction_date_does_not_lose_the_receipt(value: Any) -> None:
    body = _success()
    body["Body"]["stkCallback"]["CallbackMetadata"]["Item"][3]["Value"] = value
    callback = parse_stk_callback(body)
    assert callback.transaction_date is None
    assert callback.receipt_number == "NLJ7RT61SV"


def test_masked_phone_number_is_kept_as_text() -> None:
    body = _success()
    body["Body"]["stkCallback"]["CallbackMetadata"]["Item"][4]["Value"] = "2547*****149"
    assert parse_stk_callback(body).phone_number == "2547*****149"


def test_success_without_amount_or_receipt_is_parsed_with_none() -> None:
    body = _success()
    body["Body"]["stkCallback"]["CallbackMetadata"]["Item"] = [{"Name": "Balance"}]
    callback = parse_stk_callback(body)
    assert callback.is_success
    assert (callback.amount, callback.receipt_number, callback.transaction_date,
            callback.phone_number) == (None, None, None, None)


@pytest.mark.parametrize(("code", "desc", "text", "outcome"), [
    (1032, "Request cancelled by user", "1032", Outcome.CANCELED),
    ("1032", "Request cancelled by user", "1032", Outcome.CANCELED),
    (1037, "DS timeout user cannot be reached", "1037", Outcome.FAILED),
    (1, "The balance is insufficient for the transaction.", "1", Outcome.FAILED),
    (2001, "The initiator information is invalid.", "2001", Outcome.FAILED),
    ("SFC_IC0003", "Operator does not exist", "SFC_IC0003", Outcome.FAILED),
    (4321, "Something new", "4321", Outcome.PENDING),
])
def test_failures(code: Any, desc: str, text: str, outcome: Outcome) -> None:
    callback = parse_stk_callback(json.dumps(_failure(code, desc)))
    assert callback.result_code == text
    assert callback.result_desc == desc
    assert callback.outcome is outcome
    assert callback.is_success is False
    assert (callback.amount, callback.receipt_number, callback.balance) == (None, None, None)


def test_cancelled_message_for_the_distributor() -> None:
    callback = parse_stk_callback(_failure(1032, "Request cancelled by user"))
    assert callback.result.message == "You cancelled the M-Pesa prompt."


def _without(path: list[str], key: str) -> dict[str, Any]:
    body = _success()
    node = body
    for step in path:
        node = node[step]
    del node[key]
    return body


def _with(path: list[str], key: str, value: Any) -> dict[str, Any]:
    body = _success()
    node = body
    for step in path:
        node = node[step]
    node[key] = value
    return body


CB = ["Body", "stkCallback"]
META = [*CB, "CallbackMetadata"]


@pytest.mark.parametrize(("body", "message"), [
    ("not json at all", "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    ("", "not valid JSON"),
    ("[1, 2]", "JSON array"),
    ('"text"', "JSON string"),
    ("null", "JSON null"),
    ("{}", "no Body"),
    ('{"Body": []}', "no Body"),
    ('{"Body": {}}', "no stkCallback"),
    (_without(CB, "CheckoutRequestID"), "no CheckoutRequestID"),
    (_with(CB, "CheckoutRequestID", ""), "no CheckoutRequestID"),
    (_with(CB, "CheckoutRequestID", 12345), "no CheckoutRequestID"),
    (_without(CB, "MerchantRequestID"), "no MerchantRequestID"),
    (_without(CB, "ResultCode"), "no ResultCode"),
    (_with(CB, "ResultCode", None), "ResultCode is neither"),
    (_with(CB, "ResultCode", True), "ResultCode is neither"),
    (_with(CB, "ResultCode", " "), "ResultCode is neither"),
    (_without(CB, "ResultDesc"), "no ResultDesc"),
    (_with(CB, "CallbackMetadata", []), "CallbackMetadata is not an object"),
    (_with(META, "Item", {"Name": "Amount", "Value": 1}), "Item is not a list"),
    (_with(META, "Item", [{"Value": 1}]), "has no Name"),
    (_with(META, "Item", ["Amount"]), "has no Name"),
    (_with(META, "Item", [{"Name": "Amount", "Value": "ten"}]), "Amount is not a number"),
    (_with(META, "Item", [{"Name": "Amount", "Value": "NaN"}]), "Amount is not a number"),
    (_with(META, "Item", [{"Name": "Amount", "Value": True}]), "Amount is not a number"),
    (12345, "not JSON"),
    # Hostile bodies (docs/design.md, 12. Failure modes: hostile bytes): each of these once reached the database
    # or Decimal and failed there.
    ("[" * 100_000, "not valid JSON"),
    ('{"Body": {"stkCallback": {"ResultCode": NaN}}}', "not valid JSON"),
    ('{"Body": Infinity}', "not valid JSON"),
    (_with(META, "Item", [{"Name": "Amount", "Value": 1e28}]), "not an amount of money"),
    (_with(META, "Item", [{"Name": "Amount", "Value": 10**400}]), "not an amount of money"),
    (_with(META, "Item", [{"Name": "Amount", "Value": -5}]), "not an amount of money"),
    (_with(CB, "CheckoutRequestID", "ws_CO_\x00"), "CheckoutRequestID is not a Daraja value"),
    (_with(CB, "MerchantRequestID", "\ud800"), "MerchantRequestID is not a Daraja value"),
    (_with(CB, "ResultDesc", "ok\x00"), "ResultDesc is not a Daraja value"),
    (_with(CB, "ResultCode", "9" * 500), "ResultCode is not a Daraja value"),
    (_with(CB, "CheckoutRequestID", "x" * 101), "CheckoutRequestID is not a Daraja value"),
    (_with(META, "Item", [{"Name": "MpesaReceiptNumber", "Value": "\udfff"}]), "MpesaReceiptNumber is not"),
    (_with(META, "Item", [{"Name": "PhoneNumber", "Value": "2547\x00"}]), "PhoneNumber is not"),
    (_with(META, "Item", [{"Name": "Balance", "Value": "\x00"}]), "Balance is not"),
    # Indexed in the database: a receipt or phone of 1,000 emoji is past what a btree entry holds.
    (_with(META, "Item", [{"Name": "MpesaReceiptNumber", "Value": "\U0001F600" * 1000}]), "MpesaReceiptNumber is not"),
    (_with(META, "Item", [{"Name": "MpesaReceiptNumber", "Value": "NLJ7 RT61SV"}]), "MpesaReceiptNumber is not"),
    (_with(META, "Item", [{"Name": "PhoneNumber", "Value": "7" * 65}]), "PhoneNumber is not"),
    (_with(CB, "CheckoutRequestID", "ws_CO_\u00e9"), "CheckoutRequestID is not a Daraja value"),
])
def test_malformed_bodies_are_refused_saying_what_is_wrong(body: Any, message: str) -> None:
    with pytest.raises(CallbackParseError, match=message) as caught:
        parse_stk_callback(body)
    assert isinstance(caught.value, ValueError)


FAILURE_TEXT = json.dumps(_failure(1032, "Request cancelled by user"), separators=(",", ":"))
CALLBACK_TEXT = SUCCESS_TEXT[len('{"Body":{"stkCallback":'):-2]
FAILED_CALLBACK_TEXT = FAILURE_TEXT[len('{"Body":{"stkCallback":'):-2]


@pytest.mark.parametrize("text", [
    # Each of these reads as a valid success when the last key wins, and as a failure when the first does.
    '{"Body":' + FAILURE_TEXT[len('{"Body":'):-1] + ',"Body":' + SUCCESS_TEXT[len('{"Body":'):],
    '{"Body":{"stkCallback":' + FAILED_CALLBACK_TEXT + ',"stkCallback":' + CALLBACK_TEXT + "}}",
    SUCCESS_TEXT.replace('"ResultCode":0', '"ResultCode":1032,"ResultCode":0', 1),
    SUCCESS_TEXT.replace('"ResultCode":0', '"ResultCode":0,"ResultCode":1032', 1),
    SUCCESS_TEXT.replace('{"Name":"Amount","Value":1.00}', '{"Name":"Amount","Value":4500,"Value":1.00}', 1),
    SUCCESS_TEXT.replace('{"Name":"Amount","Value":1.00}', '{"Name":"Balance","Name":"Amount","Value":1.00}', 1),
    SUCCESS_TEXT.replace('"CheckoutRequestID":', '"CheckoutRequestID":"ws_CO_0","CheckoutRequestID":', 1),
    SUCCESS_TEXT.replace('"MpesaReceiptNumber","Value":', '"MpesaReceiptNumber","Value":"SIM0000000","Value":', 1),
    SUCCESS_TEXT.replace('"CallbackMetadata":', '"CallbackMetadata":null,"CallbackMetadata":', 1),
    SUCCESS_TEXT[:-1] + ',"Extra":1,"Extra":2}',
], ids=["Body", "stkCallback", "ResultCode_first", "ResultCode_last", "Amount_Value", "item_Name",
        "CheckoutRequestID", "MpesaReceiptNumber_Value", "CallbackMetadata", "unknown_key"])
def test_a_repeated_key_anywhere_is_refused_like_c2b(text: str) -> None:
    """{"ResultCode": 1032, "ResultCode": 0}: which one would the payment believe?  Refused, as the C2B,
    Pull and initiator parsers refuse it (daraja/_inbound.py)."""
    json.loads(text)  # Python's json reads it (the last key wins)...
    for body in (text, text.encode()):
        with pytest.raises(CallbackParseError, match="not valid JSON"):  # ...the parser does not.
            parse_stk_callback(body)


def test_the_stk_and_c2b_parsers_refuse_the_same_repeated_key() -> None:
    text = SUCCESS_TEXT.replace('"ResultCode":0', '"ResultCode":1032,"ResultCode":0', 1)
    with pytest.raises(CallbackParseError) as from_stk:
        parse_stk_callback(text)
    with pytest.raises(CallbackParseError) as from_shared:
        _inbound.load_object(text, "The callback body")
    assert str(from_stk.value) == str(from_shared.value) == "The callback body is not valid JSON."


def test_a_body_larger_than_any_daraja_body_is_refused() -> None:
    body = _success()
    body["Body"]["stkCallback"]["Extra"] = "x" * (1 << 20)
    with pytest.raises(CallbackParseError, match="too large"):
        parse_stk_callback(json.dumps(body))


def test_escaped_nul_and_surrogates_in_json_text_are_refused() -> None:
    """The JSON escapes \\u0000 and \\ud800 decode to what PostgreSQL cannot store."""
    for escape in ("\\u0000", "\\ud800"):
        text = SUCCESS_TEXT.replace('"ws_CO_', f'"ws_CO_{escape}', 1)
        assert text != SUCCESS_TEXT
        with pytest.raises(CallbackParseError, match="CheckoutRequestID is not a Daraja value"):
            parse_stk_callback(text)


def test_a_date_out_of_any_m_pesa_range_is_no_date() -> None:
    """0001-01-01 in Kenya time would overflow on its way to UTC."""
    body = _with(META, "Item", [{"Name": "TransactionDate", "Value": 10101000000}])
    body["Body"]["stkCallback"]["CallbackMetadata"]["Item"][0]["Value"] = "00010101000000"
    assert parse_stk_callback(body).transaction_date is None


def test_parsing_does_not_change_the_given_dict() -> None:
    body = _success()
    before = copy.deepcopy(body)
    parse_stk_callback(body)
    assert body == before


def test_the_callback_is_immutable() -> None:
    callback = parse_stk_callback(SUCCESS_TEXT)
    with pytest.raises(AttributeError):
        callback.result_code = "1032"  # type: ignore[misc]


# -- building ----------------------------------------------------------------------------------

def test_builder_reproduces_the_documented_success_sample() -> None:
    body = stk_callback_body(
        "29115-34620561-1", "ws_CO_191220191020363925", 0,
        "The service request is processed successfully.",
        amount=Decimal("1.00"), receipt="NLJ7RT61SV",
        transaction_date=datetime(2019, 12, 19, 10, 21, 15, tzinfo=KENYA_TZ), phone="254708374149",
    )
    assert body == _success()
    assert json.dumps(body, separators=(",", ":")) == SUCCESS_TEXT.replace("1.00", "1.0")


def test_builder_failure_has_no_metadata() -> None:
    body = stk_callback_body("m-1", "ws_1", "1032", "Request cancelled by user")
    assert body["Body"]["stkCallback"] == {
        "MerchantRequestID": "m-1", "CheckoutRequestID": "ws_1", "ResultCode": 1032,
        "ResultDesc": "Request cancelled by user"}


def test_builder_keeps_a_word_code_as_text() -> None:
    body = stk_callback_body("m-1", "ws_1", "SFC_IC0003", "Operator does not exist")
    assert body["Body"]["stkCallback"]["ResultCode"] == "SFC_IC0003"


def test_builder_reads_a_naive_date_as_utc() -> None:
    body = stk_callback_body("m", "c", 0, "ok", amount=5,
                             transaction_date=datetime(2019, 12, 19, 7, 21, 15))
    items = body["Body"]["stkCallback"]["CallbackMetadata"]["Item"]
    assert {"Name": "TransactionDate", "Value": 20191219102115} in items


@pytest.mark.parametrize("balance", [None, "", "1200.00"])
def test_round_trip_through_json(balance: str | None) -> None:
    moment = datetime(2025, 11, 26, 23, 59, 59, tzinfo=KENYA_TZ)
    body = stk_callback_body("m-7", "ws_CO_7", 0, "The service request is processed successfully.",
                             amount=Decimal("1500.50"), receipt="TK1ABC2DEF", transaction_date=moment,
                             phone=254712345678, balance=balance)
    callback = parse_stk_callback(json.dumps(body))
    assert (callback.merchant_request_id, callback.checkout_request_id) == ("m-7", "ws_CO_7")
    assert callback.result_code == "0" and callback.is_success
    assert callback.amount == Decimal("1500.50")
    assert callback.receipt_number == "TK1ABC2DEF"
    assert callback.transaction_date == moment
    assert callback.phone_number == "254712345678"
    assert callback.balance == balance


@pytest.mark.parametrize(("code", "text"), [(1032, "1032"), ("1037", "1037"),
                                             ("SFC_IC0003", "SFC_IC0003"), (0, "0")])
def test_round_trip_of_codes(code: Any, text: str) -> None:
    callback = parse_stk_callback(stk_callback_body("m", "c", code, "desc"))
    assert callback.result_code == text
    assert callback.amount is None


def test_accepted_response() -> None:
    assert ACCEPTED_RESPONSE == {"ResultCode": 0, "ResultDesc": "Accepted"}
    assert json.dumps(ACCEPTED_RESPONSE) == '{"ResultCode": 0, "ResultDesc": "Accepted"}'
