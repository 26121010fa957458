"""Hostile inputs for the C2B, Pull Transactions and initiator layers: a seeded fuzz, and the regressions a
review found (structured values, duplicate keys, sub-cent amounts, ported numbers, URL tricks, pagination).

Every body Daraja posts is either parsed or refused with CallbackParseError (a ValueError), never anything else.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import warnings
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from muchiri_mpesa.daraja import (
    PULL_CUT_REPEATED_PAGE,
    CallbackParseError,
    DarajaClient,
    DarajaCredentials,
    InvalidConfiguration,
    ShortcodeConfig,
    certificate_summary,
    check_daraja_url,
    hash_msisdn,
    parse_c2b_payment,
    parse_initiator_result,
    parse_pull_rows,
)
from muchiri_mpesa.daraja.c2b import C2BPayment

C2B_BODY = {
    "TransactionType": "Pay Bill",
    "TransID": "RKTQDM7W6S",
    "TransTime": "20240122101010",
    "TransAmount": "150.00",
    "BusinessShortCode": "600984",
    "BillRefNumber": "S00042",
    "InvoiceNumber": "",
    "OrgAccountBalance": "49197.00",
    "ThirdPartyTransID": "",
    "MSISDN": "2e8a5b2bd2c1c4ef8bd1d2a4ab6b6a1ab2dd2c4a6c2c1b5b1f4e2c3a2b1c0d9e",
    "FirstName": "John",
    "MiddleName": "",
    "LastName": "Doe",
}
PULL_BODY = {
    "ResponseRefID": "1234-5678-1",
    "ResponseCode": "1000",
    "ResponseMessage": "Success",
    "Response": [[{
        "transactionId": "RKTQDM7W6S",
        "trxDate": "2024-01-22T10:10:10.000+03:00",
        "msisdn": 254708374149,
        "sender": "MPESA",
        "transactiontype": "c2b-pay-bill-debit",
        "billreference": "S00042",
        "amount": "150.0",
        "organizationname": "Shop",
    }]],
}
RESULT_BODY = {
    "Result": {
        "ResultType": 0,
        "ResultCode": 0,
        "ResultDesc": "The service request is processed successfully.",
        "OriginatorConversationID": "29115-34620561-1",
        "ConversationID": "AG_20240122_00004e4e9b8b9d9e9f9a",
        "TransactionID": "RKT0000000",
        "ResultParameters": {"ResultParameter": [
            {"Key": "ReceiptNo", "Value": "RKTQDM7W6S"},
            {"Key": "Amount", "Value": 150.0},
            {"Key": "DebitAccountBalance", "Value": {"BasicAmount": 1.0}},
        ]},
        "ReferenceData": {"ReferenceItem": {"Key": "QueueTimeoutURL", "Value": "https://example.com/q"}},
    }
}

_WEIRD = [
    None, True, False, 0, -1, 1.5, 1e308, -0.0, 10**40, "", " ", "\x00", "\ud800", "x" * 5000, "NaN", "Infinity",
    "-5", "0", "0.001", "1e-9999", "1E+999999", "\u0665", "1_000", "\uff12\uff10\uff12\uff14",
    [], {}, [[[]]], {"a": {"b": [1]}},
    "20241301000000", "00010101000000", "99991231235959", "RKTQ DM7W6S", "rktqdm7w6s", "A" * 33, "\u202e",
]


def _mutate(rng: random.Random, value, depth: int = 0):
    """A copy of ``value`` with one random change somewhere inside it."""
    if isinstance(value, dict) and value and depth < 6:
        key = rng.choice(list(value))
        copy = dict(value)
        roll = rng.random()
        if roll < 0.15:
            del copy[key]
        elif roll < 0.6:
            copy[key] = _mutate(rng, value[key], depth + 1)
        else:
            copy[key] = rng.choice(_WEIRD)
        return copy
    if isinstance(value, list) and value and depth < 6:
        copy = list(value)
        index = rng.randrange(len(copy))
        copy[index] = _mutate(rng, copy[index], depth + 1) if rng.random() < 0.7 else rng.choice(_WEIRD)
        return copy
    return rng.choice(_WEIRD)


def _mutated_text(rng: random.Random, body: dict) -> str | bytes:
    """The body as JSON text, then damaged: bytes flipped, cut, nested, keys repeated."""
    text = json.dumps(_mutate(rng, body) if rng.random() < 0.5 else body)
    roll = rng.random()
    if roll < 0.25:
        data = bytearray(text.encode())
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if roll < 0.4:
        return text[: rng.randrange(len(text))]
    if roll < 0.55:
        depth = rng.choice((50, 500, 5000, 100_000))
        return text[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}"
    if roll < 0.65:
        return text[:-1] + ', ' + text[1:]  # every key twice
    if roll < 0.75:
        return text.replace("150", rng.choice(("1" * 5000, "1e400", "NaN", "-Infinity", "1.5e-400")), 1)
    return text


def _check_parsed(parsed) -> None:
    """Whatever parses is storable: finite amounts of whole cents, text without NUL or surrogates."""
    if isinstance(parsed, C2BPayment):
        assert parsed.amount.is_finite() and 0 < parsed.amount < 10**9
        assert parsed.amount == parsed.amount.quantize(Decimal("0.01"))
        texts = [v for v in vars(parsed).values() if isinstance(v, str)]
    elif isinstance(parsed, tuple):
        code, rows = parsed
        texts = [code]
        for row in rows:
            # Money going out may be listed negative: storable all the same, and never a payment.
            assert row.amount.is_finite() and abs(row.amount) < 10**9
            assert row.amount == row.amount.quantize(Decimal("0.01"))
            assert row.amount > 0 or not row.is_payment
            texts += [row.transaction_id, row.msisdn, row.transaction_type, row.bill_reference]
    else:
        texts = [parsed.result_code, parsed.result_desc, parsed.originator_conversation_id,
                 *parsed.parameters, *parsed.parameters.values(), *parsed.reference.values()]
    for text in texts:
        assert "\x00" not in text
        text.encode("utf-8")


@pytest.mark.parametrize(
    ("parse", "body"),
    [(parse_c2b_payment, C2B_BODY), (parse_pull_rows, PULL_BODY), (parse_initiator_result, RESULT_BODY)],
    ids=["c2b", "pull", "initiator"],
)
def test_seeded_fuzz_only_parses_or_raises_callback_parse_error(parse, body):
    rng = random.Random(20260101)
    parse(body)  # the seed body itself is valid
    outcomes = {"parsed": 0, "refused": 0}
    for _ in range(2500):
        candidate = _mutated_text(rng, body) if rng.random() < 0.6 else _mutate(rng, body)
        try:
            parsed = parse(candidate)
        except CallbackParseError:
            outcomes["refused"] += 1
            continue
        _check_parsed(parsed)
        outcomes["parsed"] += 1
    assert outcomes["parsed"] > 100 and outcomes["refused"] > 100, outcomes


# -- structured values ------------------------------------------------------------------------------------------
def _result_with_value(value) -> dict:
    result = json.loads(json.dumps(RESULT_BODY))
    result["Result"]["ResultParameters"]["ResultParameter"][2]["Value"] = value
    return result


def test_a_deeply_nested_structured_value_is_a_parse_error_not_a_recursion_error():
    value: list = []
    for _ in range(5000):  # a decoded dict: no json.loads limit protected it
        value = [value]
    with pytest.raises(CallbackParseError):
        parse_initiator_result(_result_with_value(value))


@pytest.mark.parametrize("value", [{"a": {1, 2}}, [object()], {"x": float("nan")}], ids=["set", "object", "nan"])
def test_a_structured_value_json_cannot_write_is_a_parse_error(value):
    with pytest.raises(CallbackParseError):
        parse_initiator_result(_result_with_value(value))


# -- duplicate keys ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("parse", "text"),
    [
        (parse_c2b_payment, json.dumps(C2B_BODY)[:-1] + ', "TransID": "SKTQDM7W6S"}'),
        (parse_c2b_payment, json.dumps(C2B_BODY)[:-1] + ', "TransAmount": "1.00"}'),
        (parse_pull_rows, json.dumps(PULL_BODY).replace('"amount": "150.0"', '"amount": "150.0", "amount": "1"')),
        (parse_initiator_result,
         json.dumps(RESULT_BODY).replace('"ResultCode": 0', '"ResultCode": 0, "ResultCode": 1')),
    ],
    ids=["trans_id", "amount", "pull_amount", "result_code"],
)
def test_a_repeated_key_is_refused(parse, text):
    with pytest.raises(CallbackParseError):
        parse(text)


# -- amounts ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "amount", ["0.001", "1E-999999999", "5.000001", "1_000", "\u0665", "1" * 5000, "0x10", "5.00.1", "1e1000000"]
)
def test_c2b_amounts_are_shillings_and_cents(amount):
    with pytest.raises(CallbackParseError):
        parse_c2b_payment({**C2B_BODY, "TransAmount": amount})


def test_an_int_too_long_for_str_is_a_parse_error():
    with pytest.raises(CallbackParseError):
        parse_c2b_payment({**C2B_BODY, "TransAmount": 10**5000})


@pytest.mark.parametrize(
    ("amount", "expected"),
    [("150.00", Decimal(150)), (150, Decimal(150)), (150.0, Decimal(150)), ("1E+2", Decimal(100)),
     ("5.5", Decimal("5.5")), (" 5.50 ", Decimal("5.50")), ("5.000", Decimal(5))],
)
def test_c2b_amounts_daraja_writes_still_parse(amount, expected):
    assert parse_c2b_payment({**C2B_BODY, "TransAmount": amount}).amount == expected


# -- MSISDN hashes ----------------------------------------------------------------------------------------------
def test_hash_msisdn_matches_the_published_vector():
    # The SHA-256 of the ASCII digits "254712345678", as integrators publish it for Daraja's hashed MSISDN.
    expected = "7132104d6aae9c3fac82095a42c2817952bca48e09d98d5bf4ac08218982fb90"
    assert hashlib.sha256(b"254712345678").hexdigest() == expected
    for typed in ("0712345678", "+254 712 345 678", "254712345678", 254712345678, "712345678"):
        assert hash_msisdn(typed) == expected


@pytest.mark.parametrize("number", ["254733123456", "0733123456", "254101234567", "0119876543"])
def test_any_kenyan_mobile_number_hashes_a_ported_line_pays_too(number):
    normalised = "254" + number[-9:]
    assert hash_msisdn(number) == hashlib.sha256(normalised.encode()).hexdigest()
    payment = parse_c2b_payment({**C2B_BODY, "MSISDN": hash_msisdn(number)})
    assert payment.matches_phone(number)


def test_a_payer_sent_in_full_with_a_ported_number_keeps_the_phone():
    payment = parse_c2b_payment({**C2B_BODY, "MSISDN": "254733123456"})
    assert payment.phone == "254733123456"
    assert payment.matches_phone("0733 123 456")


# -- URLs given to Daraja ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "http://[abc/x",  # urlsplit's ValueError must be our InvalidConfiguration
        "https://example.com:99999/cb",
        "https://example.com/%6Dpesa/cb",
        "https://example.com/M%2DPesa/cb",
        "https://example.com/%2573ql/cb",  # twice encoded "sql"
        "https://\uff4d\uff50\uff45\uff53\uff41.example/cb",  # fullwidth "mpesa": IDNA makes it ASCII
        "https://\uff25\uff38\uff25.example/",  # fullwidth "EXE"
        "https://example.com/m\u00adpesa",  # soft hyphen
        "http://exam\x00ple.com/x",
        "https://example.com/\x7fcb",
    ],
)
def test_check_daraja_url_sees_through_encoding_tricks(url):
    with pytest.raises(InvalidConfiguration):
        check_daraja_url(url)


def test_check_daraja_url_still_accepts_neutral_urls():
    for url in ("https://shop.example.co.ke/payment/lnm/AbC123/c2b_confirmation", "https://xn--caf-dma.example/x",
                "http://127.0.0.1:8069/payment/lnm/s/pull", "https://shop.example/p?a=%20b"):
        assert check_daraja_url(url) == url


# -- certificates -----------------------------------------------------------------------------------------------
def test_certificate_summary_raises_no_deprecation_warning():
    # cryptography 42+ warns on the naive not_valid_after (an error under -W error); 3.4.8 only has that one.
    from muchiri_mpesa.daraja.simulator.keys import new_identity  # noqa: PLC0415

    pem = new_identity("Test").certificate_pem
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = certificate_summary(pem)
    assert summary.not_after.tzinfo is not None
    assert summary.not_after > datetime.now(timezone.utc) + timedelta(days=300)


# -- Pull Transactions pagination against a Daraja that ignores OffSetValue -----------------------------------
class _SamePageForever(BaseHTTPRequestHandler):
    """A loopback Daraja: a token, then the same page of Pull rows whatever the OffSetValue."""

    queries = 0

    def do_GET(self):  # the token
        self._answer({"access_token": "T", "expires_in": "3599"})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).queries += 1
        self._answer(PULL_BODY)

    def _answer(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_pull_transactions_stops_when_daraja_repeats_the_same_page():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SamePageForever)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        client = DarajaClient(
            DarajaCredentials("key", "secret", base_url=f"http://127.0.0.1:{server.server_address[1]}"),
            ShortcodeConfig("600984", "passkey"),
            timeout=(2.0, 5.0),
        )
        now = datetime.now(timezone.utc)
        listing = client.pull_transactions("600984", now - timedelta(hours=1), now)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert [row.transaction_id for row in listing.rows] == ["RKTQDM7W6S"]
    assert _SamePageForever.queries == 2  # the page, then the same page again: stop (not 1,000 requests)
    # ... and say so: the window was not read to its end, only up to the last row read.
    assert (listing.complete, listing.cut_short) == (False, PULL_CUT_REPEATED_PAGE)
    assert listing.read_until == listing.start  # its one row is older than the start: nothing more is known read
