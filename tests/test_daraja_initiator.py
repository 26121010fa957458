"""The pure initiator layer: SecurityCredential, certificates, request bodies and the hardened Result parser."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from muchiri_mpesa.daraja import (
    CallbackParseError,
    DarajaValidationError,
    InvalidConfiguration,
    build_reversal_payload,
    build_transaction_status_payload,
    certificate_summary,
    check_daraja_url,
    describe_initiator_result,
    parse_initiator_result,
    security_credential,
)

URL = "https://shop.example.com/payment/lnm/s3cr3t/reversal_result"
TIMEOUT_URL = "https://shop.example.com/payment/lnm/s3cr3t/reversal_timeout"


def _certificate(key, *, days: int = 30, common_name: str = "apicrypt.safaricom.co.ke") -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_pem(rsa_key) -> str:
    return _certificate(rsa_key).decode()


# -- SecurityCredential -----------------------------------------------------------------------------------------
def test_security_credential_decrypts_to_the_password_with_pkcs1_v15(rsa_key, rsa_pem):
    credential = security_credential("Safaricom999!*!", rsa_pem)
    encrypted = base64.b64decode(credential, validate=True)
    assert len(encrypted) == 256  # one RSA 2048 block
    assert rsa_key.decrypt(encrypted, padding.PKCS1v15()) == b"Safaricom999!*!"


def test_security_credential_is_randomised_and_accepts_bytes_and_der(rsa_key, rsa_pem):
    first = security_credential("pw", rsa_pem)
    assert first != security_credential("pw", rsa_pem.encode())  # random padding
    der = x509.load_pem_x509_certificate(rsa_pem.encode()).public_bytes(serialization.Encoding.DER)
    again = security_credential("pw", der)
    assert rsa_key.decrypt(base64.b64decode(again), padding.PKCS1v15()) == b"pw"


def test_another_key_cannot_read_the_credential(rsa_pem):
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    encrypted = base64.b64decode(security_credential("pw", rsa_pem))
    try:
        plain = other.decrypt(encrypted, padding.PKCS1v15())
    except ValueError:  # cryptography 3.4.8 / OpenSSL < 3.2
        return
    assert plain != b"pw"  # OpenSSL 3.2+ "implicit rejection": random bytes instead of an error (Marvin)


@pytest.mark.parametrize("bad", [
    "", "   ", "not a certificate", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----", b"\x00\x01\x02",
])
def test_bad_certificates_are_refused_as_configuration(bad):
    with pytest.raises(InvalidConfiguration) as caught:
        security_credential("pw", bad)
    assert caught.value.field == "certificate"
    with pytest.raises(InvalidConfiguration):
        certificate_summary(bad)


def test_a_certificate_without_an_rsa_key_is_refused():
    pem = _certificate(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(InvalidConfiguration, match="RSA"):
        certificate_summary(pem)
    with pytest.raises(InvalidConfiguration, match="RSA"):
        security_credential("pw", pem)


def test_empty_or_too_long_passwords_are_refused(rsa_pem):
    with pytest.raises(InvalidConfiguration):
        security_credential("", rsa_pem)
    with pytest.raises(InvalidConfiguration, match="too long"):
        security_credential("x" * 300, rsa_pem)


def test_certificate_summary_gives_subject_and_aware_expiry(rsa_key):
    summary = certificate_summary(_certificate(rsa_key, days=10, common_name="sandbox.safaricom.co.ke"))
    assert summary.subject == "CN=sandbox.safaricom.co.ke"
    assert summary.not_after.tzinfo is not None
    assert timedelta(days=9) < summary.not_after - datetime.now(timezone.utc) <= timedelta(days=10)


# -- request bodies ---------------------------------------------------------------------------------------------
def _reversal(**overrides):
    values = {"initiator": "testapi", "security_credential": "Q1JFRA==", "transaction_id": "UL168ZQ364",
              "amount": "10.00", "receiver_party": "174379", "result_url": URL, "timeout_url": TIMEOUT_URL,
              "remarks": "Refund of S00042"}
    values.update(overrides)
    return build_reversal_payload(**values)


def test_reversal_payload_is_darajas_exact_body():
    assert _reversal(occasion="S00042") == {
        "Initiator": "testapi",
        "SecurityCredential": "Q1JFRA==",
        "CommandID": "TransactionReversal",
        "TransactionID": "UL168ZQ364",
        "Amount": 10,
        "ReceiverParty": "174379",
        "RecieverIdentifierType": "11",
        "ResultURL": URL,
        "QueueTimeOutURL": TIMEOUT_URL,
        "Remarks": "Refund of S00042",
        "Occasion": "S00042",
    }


def test_transaction_status_payload():
    body = build_transaction_status_payload(
        initiator="testapi", security_credential="Q1JFRA==", transaction_id="UL168ZQ364", party_a="174379",
        identifier_type="4", result_url=URL, timeout_url=TIMEOUT_URL, remarks="Status")
    assert body["CommandID"] == "TransactionStatusQuery"
    assert body["PartyA"] == "174379" and body["IdentifierType"] == "4" and body["Occasion"] == ""
    with pytest.raises(InvalidConfiguration):
        build_transaction_status_payload(
            initiator="testapi", security_credential="x", transaction_id="UL168ZQ364", party_a="174379",
            identifier_type="11", result_url=URL, timeout_url=TIMEOUT_URL, remarks="Status")


@pytest.mark.parametrize(("overrides", "error_field"), [
    ({"initiator": ""}, "initiator"),
    ({"security_credential": " "}, "security_credential"),
    ({"transaction_id": "UL-168"}, "transaction_id"),
    ({"transaction_id": ""}, "transaction_id"),
    ({"amount": "0"}, "amount"),
    ({"amount": "250001"}, "amount"),
    ({"receiver_party": "17a379"}, "receiver_party"),
    ({"result_url": "ftp://x.example/r"}, "result_url"),
    ({"timeout_url": "https://x.example/mpesa/timeout"}, "timeout_url"),
    ({"remarks": " x "}, "remarks"),
])
def test_reversal_payload_refuses_bad_input_before_sending(overrides, error_field):
    with pytest.raises(DarajaValidationError) as caught:
        _reversal(**overrides)
    assert caught.value.field == error_field


def test_long_remarks_are_cut_not_refused():
    body = _reversal(remarks="r" * 150, occasion="o" * 150)
    assert len(body["Remarks"]) == 100 and len(body["Occasion"]) == 100


# -- check_daraja_url -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("url", "named"), [
    ("https://shop.example.com/MPesa/callback", "mpesa"),
    ("https://shop.example.com/m-pesa/cb", "m-pesa"),
    ("https://safaricom-shop.example.com/cb", "safaricom"),
    ("https://shop.example.com/run.exe", "exe"),
    ("https://shop.example.com/exec/cb", "exec"),
    ("https://shop.example.com/cmd", "cmd"),
    ("https://shop.example.com/mysql/cb", "sql"),
    ("https://shop.example.com/cb?QUERY=1", "query"),
    ("https://abc123.ngrok-free.app/cb", "ngrok-free.app"),
    ("https://webhook.site/abc", "webhook.site"),
    ("https://x.trycloudflare.com/cb", "trycloudflare.com"),
])
def test_check_daraja_url_names_the_banned_word_or_host(url, named):
    with pytest.raises(InvalidConfiguration) as caught:
        check_daraja_url(url)
    assert named in str(caught.value)
    assert "shop.example.com" not in str(caught.value)  # the URL (and its secret path) is never quoted


@pytest.mark.parametrize("url", ["", "shop.example.com/cb", "https:///cb", "https://a b.example/cb", None, 42])
def test_check_daraja_url_needs_an_absolute_http_url(url):
    with pytest.raises(InvalidConfiguration):
        check_daraja_url(url)


def test_check_daraja_url_accepts_neutral_urls():
    assert check_daraja_url(f" {URL} ") == URL
    assert check_daraja_url("http://127.0.0.1:8069/payment/lnm/x/c2b_confirmation")


# -- parse_initiator_result -------------------------------------------------------------------------------------
STATUS_RESULT = {
    "Result": {
        "ResultType": 0,
        "ResultCode": 0,
        "ResultDesc": "The service request is processed successfully.",
        "OriginatorConversationID": "10816-694520-2",
        "ConversationID": "AG_20170727_000059c52529a8e080bd",
        "TransactionID": "LGR0000000",
        "ResultParameters": {"ResultParameter": [
            {"Key": "ReceiptNo", "Value": "LGR919G2AV"},
            {"Key": "Conversation ID", "Value": "AG_20170727_00004492b1b6d0078fbe"},
            {"Key": "FinalisedTime", "Value": 20170727101415},
            {"Key": "Amount", "Value": 10},
            {"Key": "TransactionStatus", "Value": "Completed"},
            {"Key": "TransactionReason"},
            {"Key": "DebitPartyName", "Value": "254708374149 - John Doe"},
            {"Key": "DebitPartyName", "Value": "ignored duplicate"},
            {"Key": "CreditPartyName", "Value": "174379 - Safaricom157"},
        ]},
        "ReferenceData": {"ReferenceItem": {"Key": "Occasion", "Value": "aaaa"}},
    }
}


def test_parses_a_transaction_status_result():
    result = parse_initiator_result(json.dumps(STATUS_RESULT).encode())
    assert result.result_code == "0" and result.result_type == "0" and result.is_success
    assert result.originator_conversation_id == "10816-694520-2"
    assert result.transaction_id == "LGR0000000"
    assert result.parameters["TransactionReason"] == ""
    assert result.parameters["DebitPartyName"] == "254708374149 - John Doe"
    assert result.parameters["Conversation ID"] == "AG_20170727_00004492b1b6d0078fbe"
    assert result.reference == {"Occasion": "aaaa"}
    assert result.receipt_no == "LGR919G2AV" and result.amount == Decimal("10")
    assert result.transaction_status == "Completed" and result.credit_party_shortcode == "174379"
    assert result.finalised_at == datetime(2017, 7, 27, 7, 14, 15, tzinfo=timezone.utc)
    assert not result.is_timeout


@pytest.mark.parametrize(("code", "words"), [
    ("R000001", "already reversed"), ("R000002", "original transaction"), ("2001", "initiator"),
    (2001, "initiator"), ("0", "completed"),
])
def test_failure_codes_are_text_and_described(code, words):
    body = {"Result": {**STATUS_RESULT["Result"], "ResultCode": code}}
    del body["Result"]["ResultParameters"]
    result = parse_initiator_result(body)
    assert result.result_code == str(code)
    assert result.parameters == {}
    assert words in result.description.casefold()
    assert result.is_success is (str(code) == "0")


def test_unknown_codes_are_not_success():
    assert "code X9" in describe_initiator_result("X9")
    assert "none" in describe_initiator_result(None)


def test_timeout_bodies_are_read_leniently():
    result = parse_initiator_result(b'{"Result": {"ResultType": 1, "ResultDesc": "timed out"}}', timeout=True)
    assert result.is_timeout and not result.is_success and result.result_code == ""
    assert "queue" in result.description
    with pytest.raises(CallbackParseError):
        parse_initiator_result(b'{"Result": {"ResultType": 1}}')  # as a Result, a ResultCode is required
    with pytest.raises(CallbackParseError):
        parse_initiator_result(b'{"nothing": 1}', timeout=True)


def _with(**changes):
    body = json.loads(json.dumps(STATUS_RESULT))
    body["Result"].update(changes)
    return body


@pytest.mark.parametrize("body", [
    b"\xff\xfe not utf-8",
    b"{not json",
    b'{"Result": NaN}',
    b'{"Result": {"ResultCode": Infinity}}',
    b"[" * 100_000 + b"]" * 100_000,
    b'{"Result": {"ResultCode": ' + b"9" * 5000 + b"}}",
    b"[]",
    b'"text"',
    b"x" * (2 << 20),
    json.dumps(_with(ResultCode=True)).encode(),
    json.dumps(_with(ResultCode=None)).encode(),
    json.dumps(_with(ResultCode={"a": 1})).encode(),
    json.dumps(_with(ResultCode="0\u0000")).encode(),
    json.dumps(_with(ResultDesc="bad \ud800 surrogate")).encode(),
    json.dumps(_with(ResultDesc="x" * 5000)).encode(),
    json.dumps(_with(OriginatorConversationID="")).encode(),
    json.dumps(_with(OriginatorConversationID="é-non-ascii")).encode(),
    json.dumps(_with(TransactionID=["LGR"])).encode(),
    json.dumps(_with(ResultParameters=[1, 2])).encode(),
    json.dumps(_with(ResultParameters={"ResultParameter": [{"Value": 1}]})).encode(),
    json.dumps(_with(ResultParameters={"ResultParameter": [{"Key": "A", "Value": "\u0000"}]})).encode(),
    json.dumps(_with(ResultParameters={"ResultParameter": [{"Key": "A", "Value": True}]})).encode(),
    json.dumps(_with(ResultParameters={"ResultParameter": [{"Key": str(i)} for i in range(101)]})).encode(),
    json.dumps(_with(ReferenceData="text")).encode(),
])
def test_hostile_bodies_raise_callback_parse_error(body):
    with pytest.raises(CallbackParseError):
        parse_initiator_result(body)


def test_structured_values_are_kept_as_compact_json():
    body = _with(ResultParameters={"ResultParameter": [{"Key": "Balance", "Value": {"Amount": 1}}]})
    assert parse_initiator_result(body).parameters == {"Balance": '{"Amount":1}'}


def test_an_absurd_amount_parameter_reads_as_none():
    body = _with(ResultParameters={"ResultParameter": [{"Key": "Amount", "Value": "1e999"}]})
    assert parse_initiator_result(body).amount is None
