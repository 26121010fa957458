"""Dynamic QR: the request's checks, the answer's reading, and the simulator's code over real loopback HTTP,
read back from the image and paid as the phone pays it (a C2B payment with the code's reference).

Fixtures (tests/conftest.py): ``make_simulator``, ``callback_listener``, ``daraja_client``.
"""

from __future__ import annotations

import base64
import io
import json

import pytest

from muchiri_mpesa.daraja import (
    DarajaApiError,
    DarajaProtocolError,
    DarajaValidationError,
    InvalidConfiguration,
    build_qr_payload,
    parse_c2b_payment,
    parse_qr_answer,
)
from muchiri_mpesa.daraja.simulator import (
    C2B_CONFIRMATION,
    DEFAULT_SHORTCODE,
    DEFAULT_TILL,
    SANDBOX_TEST_MSISDN,
    read_qr_content,
)

PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def decode(image: bytes) -> str:
    """What a phone's camera reads in the image (zxing-cpp, a real decoder)."""
    zxingcpp = pytest.importorskip("zxingcpp")
    from PIL import Image  # noqa: PLC0415

    found = zxingcpp.read_barcodes(Image.open(io.BytesIO(image)))
    assert len(found) == 1, "exactly one QR code in the image"
    return found[0].text


# -- the request ------------------------------------------------------------------------------------------------
def test_payload_in_daraja_shape():
    assert build_qr_payload(" Duka ", "INV/2026/00001", "4500.00", "PB", 174379, size=400) == {
        "MerchantName": "Duka", "RefNo": "INV/2026/00001", "Amount": 4500, "TrxCode": "PB", "CPI": "174379",
        "Size": "400",
    }


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("Duka", "S00012", 4500, "XX", "174379"), InvalidConfiguration),  # unknown TrxCode
        (("Duka", "S00012", 4500, "PB", "17a379"), InvalidConfiguration),  # CPI not a shortcode
        (("Duka", "S00012", 4500, "SM", "174379"), InvalidConfiguration),  # SM wants a phone
        (("", "S00012", 4500, "PB", "174379"), InvalidConfiguration),
        (("Duka", "", 4500, "PB", "174379"), DarajaValidationError),
        (("Duka", "X" * 21, 4500, "PB", "174379"), DarajaValidationError),  # the phone sends back 20
        (("Duka", "S00012", 0, "PB", "174379"), DarajaValidationError),
        (("Duka", "S00012", 250_001, "PB", "174379"), DarajaValidationError),
    ],
)
def test_payload_refuses_what_daraja_cannot_take(args, error):
    with pytest.raises(error):
        build_qr_payload(*args)


def test_payload_asks_whole_shillings_as_the_phone_does():
    assert build_qr_payload("Duka", "S00012", "4500.50", "PB", "174379")["Amount"] == 4501


@pytest.mark.parametrize("size", [99, 1001, True, "300"])
def test_payload_refuses_odd_sizes(size):
    with pytest.raises(InvalidConfiguration):
        build_qr_payload("Duka", "S00012", 10, "PB", "174379", size=size)


# -- the answer -------------------------------------------------------------------------------------------------
def test_answer_gives_the_image():
    code = parse_qr_answer({"ResponseCode": "AG_20191219_000043fdf61864fe9ff5", "RequestID": "16738-27456357-1",
                            "ResponseDescription": "QR Code Successfully Generated.",
                            "QRCode": base64.b64encode(PNG_1PX).decode()})
    assert code.image == PNG_1PX
    assert code.request_id == "16738-27456357-1"
    assert base64.b64decode(code.base64) == PNG_1PX


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        {},
        {"QRCode": ""},
        {"QRCode": 42},
        {"QRCode": "not base64!"},
        {"QRCode": base64.b64encode(b"<script>alert(1)</script>").decode()},  # base64, but no image
    ],
)
def test_answer_without_an_image_is_refused(body):
    with pytest.raises(DarajaProtocolError):
        parse_qr_answer(body)


# -- the simulator, over loopback -------------------------------------------------------------------------------
def test_simulator_code_decodes_to_the_request(daraja_client):
    client = daraja_client()
    code = client.generate_qr("Muchiri Wholesale", "INV/2026/00042", 123_456, DEFAULT_SHORTCODE)
    assert code.image.startswith(b"\x89PNG")
    assert read_qr_content(decode(code.image)) == {
        "Amount": 123456, "CPI": DEFAULT_SHORTCODE, "MerchantName": "Muchiri Wholesale", "RefNo": "INV/2026/00042",
        "TrxCode": "PB",
    }


def test_simulator_refuses_a_shortcode_it_does_not_own(daraja_client):
    client = daraja_client()
    with pytest.raises(DarajaApiError) as caught:
        client.generate_qr("Duka", "S00012", 100, "600999")
    assert caught.value.error_code == "400.002.02"


def test_simulator_refuses_raw_bad_fields(make_simulator, daraja_client):
    sim = make_simulator()
    client = daraja_client(sim)
    headers = {"Authorization": f"Bearer {client.access_token().value}"}
    import requests  # noqa: PLC0415

    good = {"MerchantName": "Duka", "RefNo": "S00012", "Amount": 100, "TrxCode": "PB", "CPI": DEFAULT_SHORTCODE,
            "Size": "300"}
    for field, value in [("Amount", 100.5), ("Amount", "ten"), ("Amount", 0), ("RefNo", "X" * 21),
                         ("TrxCode", "pb"), ("CPI", "abc"), ("Size", "5000"), ("MerchantName", "")]:
        answer = requests.post(sim.base_url + "/mpesa/qrcode/v1/generate", json={**good, field: value},
                               headers=headers, timeout=5)
        assert answer.status_code == 400, (field, value)
        assert answer.json()["errorMessage"] == f"Bad Request - Invalid {field}"
    assert sim.qr_codes == []
    assert requests.post(sim.base_url + "/mpesa/qrcode/v1/generate", json=good, timeout=5).status_code == 401


@pytest.mark.parametrize(("trx_code", "cpi"), [("PB", DEFAULT_SHORTCODE), ("BG", DEFAULT_TILL)])
def test_scanning_the_code_is_a_c2b_payment_with_its_reference(
    make_simulator, callback_listener, daraja_client, trx_code, cpi
):
    sim = make_simulator(till_number=DEFAULT_TILL)
    client = daraja_client(sim)
    client.register_c2b_urls(cpi, "Completed", callback_listener.url + "/confirmation",
                             callback_listener.url + "/validation")
    code = client.generate_qr("Duka", "S00012", 4500, cpi, trx_code=trx_code)
    content = decode(code.image)
    trans_id = sim.pay_qr(content, SANDBOX_TEST_MSISDN)
    assert sim.wait_for_c2b(trans_id)["state"] == "completed"
    sim.wait_for_deliveries(C2B_CONFIRMATION, reference=trans_id)
    payment = parse_c2b_payment(callback_listener.wait_for(1)[0].body)
    assert payment.trans_id == trans_id
    assert payment.amount == 4500
    assert payment.shortcode == cpi
    assert payment.bill_ref == ("S00012" if trx_code == "PB" else "")
    assert sim.qr_codes[0]["paid"] == [trans_id]


def test_a_code_the_simulator_did_not_make_pays_nothing(make_simulator):
    sim = make_simulator()
    forged = json.dumps({"Amount": 1, "CPI": DEFAULT_SHORTCODE, "MerchantName": "X", "RefNo": "S1", "TrxCode": "PB"},
                        sort_keys=True, separators=(",", ":"))
    with pytest.raises(ValueError):
        sim.pay_qr(forged, SANDBOX_TEST_MSISDN)
    with pytest.raises(ValueError):
        sim.pay_qr("hello", SANDBOX_TEST_MSISDN)
    assert sim.c2b_payments == []
