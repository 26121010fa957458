"""The pure C2B and Pull layer: bodies, hashing, answers, payloads, and hostile input."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from decimal import Decimal

import pytest

from muchiri_mpesa.daraja import (
    C2B_CONFIRMATION_ACK,
    C2B_INVALID_ACCOUNT,
    PULL_WINDOW,
    CallbackParseError,
    DarajaValidationError,
    InvalidConfiguration,
    InvalidPhoneNumber,
    c2b_validation_accept,
    c2b_validation_reject,
    hash_msisdn,
    parse_c2b_payment,
    parse_pull_rows,
    pull_date,
)
from muchiri_mpesa.daraja.c2b import build_c2b_register_payload, build_c2b_simulate_payload, is_already_registered
from muchiri_mpesa.daraja.pull import (
    PULL_CUT_PAGE_LIMIT,
    PullListing,
    build_pull_query_payload,
    build_pull_register_payload,
)

HASH = hashlib.sha256(b"254708374149").hexdigest()
CONFIRMATION = {
    "TransactionType": "Pay Bill",
    "TransID": "RKTQDM7W6S",
    "TransTime": "20191122063845",
    "TransAmount": "10.00",
    "BusinessShortCode": "600638",
    "BillRefNumber": "invoice008",
    "InvoiceNumber": "",
    "OrgAccountBalance": "49197.00",
    "ThirdPartyTransID": "",
    "MSISDN": HASH,
    "FirstName": "John",
    "MiddleName": "",
    "LastName": "Doe",
}
URL = "https://shop.example.com/payment/lnm/s3cr3t/c2b_confirmation"


def test_parses_a_confirmation_with_a_hashed_msisdn():
    payment = parse_c2b_payment(json.dumps(CONFIRMATION).encode())
    assert payment.trans_id == "RKTQDM7W6S" and payment.transaction_type == "Pay Bill"
    assert payment.trans_time == datetime(2019, 11, 22, 3, 38, 45, tzinfo=timezone.utc)  # 06:38:45 in Nairobi
    assert payment.amount == Decimal("10") and payment.shortcode == "600638"
    assert payment.bill_ref == "invoice008" and payment.org_balance == "49197.00"
    assert payment.msisdn == HASH and payment.msisdn_hash == HASH and payment.phone is None
    assert payment.payer_name == "John Doe"
    assert payment.matches_phone("0708 374 149") and not payment.matches_phone("0712345678")
    assert not payment.matches_phone("not a phone")


def test_a_validation_body_has_no_balance_and_numbers_may_be_numbers():
    body = {**CONFIRMATION, "OrgAccountBalance": "", "TransAmount": 10.5, "BusinessShortCode": 600638,
            "TransTime": 20191122063845, "MSISDN": 254708374149, "MiddleName": None}
    payment = parse_c2b_payment(body)
    assert payment.org_balance is None and payment.amount == Decimal("10.5") and payment.shortcode == "600638"
    assert payment.phone == "254708374149" and payment.msisdn_hash is None
    assert payment.matches_phone("+254708374149")


def test_uppercase_hashes_and_masked_numbers():
    upper = parse_c2b_payment({**CONFIRMATION, "MSISDN": HASH.upper()})
    assert upper.msisdn_hash == HASH
    masked = parse_c2b_payment({**CONFIRMATION, "MSISDN": "2547 ***** 149"})
    assert masked.phone is None and masked.msisdn_hash is None and not masked.matches_phone("0708374149")


def test_names_may_be_unicode_and_bill_refs_empty():
    payment = parse_c2b_payment({**CONFIRMATION, "FirstName": "Wanjikũ", "BillRefNumber": "", "MSISDN": ""})
    assert payment.first_name == "Wanjikũ" and payment.bill_ref == "" and payment.msisdn == ""


def _with(**changes):
    return json.dumps({**CONFIRMATION, **changes}).encode()


@pytest.mark.parametrize("body", [
    b"\xff not utf-8", b"{", b"[]", b"null", b'{"TransAmount": NaN}', b"[" * 50_000 + b"]" * 50_000,
    b" " * (2 << 20),
    _with(TransID=""), _with(TransID="RKT-QDM"), _with(TransID="R" * 200), _with(TransID=None),
    _with(TransTime="2019-11-22"), _with(TransTime="99991122063845"), _with(TransTime=True),
    _with(TransAmount="0.00"), _with(TransAmount="-5"), _with(TransAmount="1e12"), _with(TransAmount="ten"),
    _with(TransAmount=[10]), _with(BusinessShortCode="abc"), _with(BusinessShortCode=""),
    _with(BillRefNumber="x" * 101), _with(BillRefNumber="a\u0000b"), _with(FirstName="\ud800"),
    _with(FirstName={"a": 1}), _with(MSISDN="2547" * 30), _with(MSISDN="ü" * 10),
    json.dumps({k: v for k, v in CONFIRMATION.items() if k != "TransAmount"}).encode(),
    b'{"TransAmount": ' + b"1" * 5000 + b"}",
])
def test_hostile_c2b_bodies_raise_callback_parse_error(body):
    with pytest.raises(CallbackParseError):
        parse_c2b_payment(body)


def test_hash_msisdn_normalises_first():
    assert hash_msisdn("0708374149") == hash_msisdn("+254 708 374 149") == hash_msisdn(254708374149) == HASH
    assert len(HASH) == 64 and HASH == HASH.lower()
    # Any Kenyan mobile number hashes: a line ported to Safaricom keeps its 0733 number and pays with M-Pesa.
    assert hash_msisdn("0733000000") == hashlib.sha256(b"254733000000").hexdigest()
    with pytest.raises(InvalidPhoneNumber):
        hash_msisdn("0203000000")  # a Nairobi landline: no M-Pesa payer


def test_validation_and_confirmation_answers():
    assert c2b_validation_accept() == {"ResultCode": "0", "ResultDesc": "Accepted"}
    assert c2b_validation_reject(C2B_INVALID_ACCOUNT) == {"ResultCode": "C2B00012", "ResultDesc": "Rejected"}
    assert c2b_validation_reject()["ResultCode"] == "C2B00016"
    with pytest.raises(ValueError):
        c2b_validation_reject("C2B00099")
    assert C2B_CONFIRMATION_ACK == {"ResultCode": 0, "ResultDesc": "Accepted"}


def test_register_and_simulate_payloads():
    assert build_c2b_register_payload("174379", "Completed", URL, URL) == {
        "ShortCode": "174379", "ResponseType": "Completed", "ConfirmationURL": URL, "ValidationURL": URL}
    with pytest.raises(InvalidConfiguration, match="Completed or Cancelled"):
        build_c2b_register_payload("174379", "completed", URL, URL)
    with pytest.raises(InvalidConfiguration, match="sql"):
        build_c2b_register_payload("174379", "Cancelled", URL, "https://shop.example.com/mysql/validate")
    assert build_c2b_simulate_payload("174379", "99.5", "0708374149", " S00042 ") == {
        "ShortCode": "174379", "CommandID": "CustomerPayBillOnline", "Amount": 100, "Msisdn": "254708374149",
        "BillRefNumber": "S00042"}
    with pytest.raises(DarajaValidationError):
        build_c2b_simulate_payload("174379", 1, "0708374149", "")
    assert build_c2b_simulate_payload("600980", 1, "0708374149", "", "CustomerBuyGoodsOnline")["BillRefNumber"] == ""


def test_already_registered_is_recognised():
    assert is_already_registered("500.003.1001", "Urls are already registered")
    assert is_already_registered("", "Validation and Confirmation URLs are already registered")
    assert not is_already_registered("500.003.1001", "Internal Server Error")
    assert not is_already_registered("400.002.02", "already registered")


# -- Pull -------------------------------------------------------------------------------------------------------
def test_pull_dates_are_kenya_time():
    assert pull_date(datetime(2024, 1, 1, 21, 30, tzinfo=timezone.utc)) == "2024-01-02 00:30:00"
    assert pull_date(datetime(2024, 1, 1, 21, 30)) == "2024-01-02 00:30:00"  # naive is UTC
    assert PULL_WINDOW.total_seconds() == 48 * 3600


def test_pull_payloads():
    start, end = datetime(2024, 1, 1, tzinfo=timezone.utc), datetime(2024, 1, 2, tzinfo=timezone.utc)
    assert build_pull_query_payload("174379", start, end, 20) == {
        "ShortCode": "174379", "StartDate": "2024-01-01 03:00:00", "EndDate": "2024-01-02 03:00:00",
        "OffSetValue": "20"}
    with pytest.raises(InvalidConfiguration):
        build_pull_query_payload("174379", end, start)
    with pytest.raises(InvalidConfiguration):
        build_pull_query_payload("174379", start, end, -1)
    assert build_pull_register_payload("174379", "0708374149", URL)["NominatedNumber"] == "254708374149"


ROW = {"transactionId": "RKTQDM7W6S", "trxDate": "2020-08-05T10:13:00.000+03:00", "msisdn": 254708374149,
       "sender": "UAT2", "transactiontype": "c2b-pay-bill-debit", "billreference": "S00042", "amount": "1.0",
       "organizationname": "Org"}


def test_pull_rows_nested_or_flat():
    code, rows = parse_pull_rows({"ResponseCode": "1000", "Response": [[ROW, {**ROW, "transactionId": "RKT2"}]]})
    assert code == "1000" and [r.transaction_id for r in rows] == ["RKTQDM7W6S", "RKT2"]
    assert rows[0].trx_date == datetime(2020, 8, 5, 7, 13, tzinfo=timezone.utc)
    assert rows[0].msisdn == "254708374149" and rows[0].amount == Decimal("1") and rows[0].bill_reference == "S00042"
    _, flat = parse_pull_rows(json.dumps({"ResponseCode": 1000, "Response": [{**ROW, "trxDate": "20200805101300"}]}))
    assert flat[0].trx_date == rows[0].trx_date
    _, spaced = parse_pull_rows({"ResponseCode": "1000", "Response": [{**ROW, "trxDate": "2020-08-05 10:13:00"}]})
    assert spaced[0].trx_date == rows[0].trx_date
    assert parse_pull_rows({"ResponseCode": "1001", "Response": [[]]}) == ("1001", [])


@pytest.mark.parametrize("body", [
    {"Response": [[ROW]]},
    {"ResponseCode": "1000", "Response": "rows"},
    {"ResponseCode": "1000", "Response": [[{**ROW, "transactionId": ""}]]},
    {"ResponseCode": "1000", "Response": [[{**ROW, "amount": "NaN"}]]},
    {"ResponseCode": "1000", "Response": [[{**ROW, "trxDate": "yesterday"}]]},
    {"ResponseCode": "1000", "Response": [[{**ROW, "trxDate": "9999-01-01T00:00:00+03:00"}]]},
    {"ResponseCode": "1000", "Response": [[{**ROW, "billreference": "\u0000"}]]},
    {"ResponseCode": "1000", "Response": [[ROW] * 10_001]},
    {"ResponseCode": "1000", "Response": [[1]]},
])
def test_hostile_pull_answers_are_refused_whole(body):
    with pytest.raises(CallbackParseError):
        parse_pull_rows(body)


# -- Pull: money in, and only money in ---------------------------------------------------------------------------
def test_pull_rows_that_are_not_money_in_are_read_never_payments():
    """A reversal or a settlement listed by Pull is no payment, and never makes the whole answer unreadable."""
    rows = [
        ROW,
        {**ROW, "transactionId": "RKTREV0001", "transactiontype": "reversal", "amount": "-1.0"},
        {**ROW, "transactionId": "RKTREV0002", "transactiontype": "c2b-pay-bill-debit", "amount": -168},
        {**ROW, "transactionId": "RKTSET0001", "transactiontype": "merchant-to-organization-settlement",
         "amount": "22779.95"},
        {**ROW, "transactionId": "RKTTIL0001", "transactiontype": "C2B-Buy-Goods-Debit", "amount": "5"},
        {**ROW, "transactionId": "RKTNIL0001", "transactiontype": "", "amount": "5"},
    ]
    code, parsed = parse_pull_rows({"ResponseCode": "1000", "Response": [rows]})
    assert code == "1000"
    assert [(r.transaction_id, r.amount, r.is_payment) for r in parsed] == [
        ("RKTQDM7W6S", Decimal(1), True),
        ("RKTREV0001", Decimal(-1), False),
        ("RKTREV0002", Decimal(-168), False),  # a payment's type, but money going out
        ("RKTSET0001", Decimal("22779.95"), False),  # money out of a till, listed positive
        ("RKTTIL0001", Decimal(5), True),
        ("RKTNIL0001", Decimal(5), False),  # no type: not known to be money in
    ]


@pytest.mark.parametrize("amount", ["--1", "-NaN", "-", "-1e999", "-0.001", "- 1"])
def test_a_signed_pull_amount_is_as_hardened_as_any(amount):
    with pytest.raises(CallbackParseError):
        parse_pull_rows({"ResponseCode": "1000", "Response": [[{**ROW, "transactiontype": "reversal",
                                                                   "amount": amount}]]})


def _pulled(receipt, minute):
    _, [row] = parse_pull_rows({"ResponseCode": "1000", "Response": [[
        {**ROW, "transactionId": receipt, "trxDate": f"2024-01-22T10:{minute:02d}:00.000+03:00"}]]})
    return row


def test_a_pull_listing_says_up_to_when_it_read():
    start = datetime(2024, 1, 22, 6, 0, tzinfo=timezone.utc)
    end = datetime(2024, 1, 22, 8, 0, tzinfo=timezone.utc)
    rows = [_pulled("RKT0000001", 5), _pulled("RKT0000002", 20)]
    complete = PullListing.of(rows, start, end)
    assert (complete.complete, complete.read_until, complete.cut_short) == (True, end, "")
    cut = PullListing.of(rows, start, end, PULL_CUT_PAGE_LIMIT)
    assert (cut.complete, cut.cut_short) == (False, PULL_CUT_PAGE_LIMIT)
    assert cut.read_until == datetime(2024, 1, 22, 7, 20, tzinfo=timezone.utc)  # the last row read
    # Rows out of time order: nothing past the start is known to be read.
    assert PullListing.of(rows[::-1], start, end, PULL_CUT_PAGE_LIMIT).read_until == start
    assert PullListing.of([], start, end, PULL_CUT_PAGE_LIMIT).read_until == start
    # Never past the window asked.
    assert PullListing.of(rows, start, datetime(2024, 1, 22, 7, 10, tzinfo=timezone.utc),
                          PULL_CUT_PAGE_LIMIT).read_until == datetime(2024, 1, 22, 7, 10, tzinfo=timezone.utc)
    assert [r.transaction_id for r in cut.payments] == ["RKT0000001", "RKT0000002"] and cut.others == ()
