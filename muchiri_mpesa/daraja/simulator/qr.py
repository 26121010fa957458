"""Dynamic QR: ``/mpesa/qrcode/v1/generate``, with a real, scannable image.

The request is checked as Daraja checks it (400.002.02 "Bad Request - Invalid <Field>"): MerchantName, RefNo
(at most 20 characters, what the phone sends back as the account number), a whole Amount of 1 to 250,000,
TrxCode (PB, BG, WA, SM, SB), a CPI of that kind (the simulator's paybill or till for PB and BG) and Size in
pixels.  The answer carries the PNG as base64, as Daraja's does.

What Safaricom's code holds is the M-Pesa app's business; the simulator's holds the request itself, as compact
JSON with sorted keys (``qr_content``), so that a test reads the code back and ``sim.pay_qr(content, msisdn)``
pays it as the phone would: a C2B payment into CPI with RefNo as its BillRefNumber.  It needs the ``qrcode``
package (with Pillow), which Odoo already depends on; without it the API answers 500 and says so.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

from .state import (
    PAYBILL,
    TILL,
    SimState,
    _invalid,
    _now_utc,
    _Refusal,
    _Response,
    check_whole_amount,
    text_of,
)

QR_PATH = "/mpesa/qrcode/v1/generate"
QR_TRX_CODES = ("PB", "BG", "WA", "SM", "SB")
QR_DESC = "QR Code Successfully Generated."
_REFERENCE_LIMIT = 20
_MAX_AMOUNT = 250_000
_NO_QRCODE_PACKAGE = (500, "500.001.1001", "The simulator needs the qrcode package (pip install qrcode pillow)")


def qr_content(trx_code: str, cpi: str, ref_no: str, amount: int, merchant_name: str) -> str:
    """What the simulator's QR image encodes."""
    return json.dumps(
        {"Amount": amount, "CPI": cpi, "MerchantName": merchant_name, "RefNo": ref_no, "TrxCode": trx_code},
        sort_keys=True, separators=(",", ":"),
    )


def read_qr_content(content: str) -> dict[str, Any]:
    """The request a simulator QR code was made for; ValueError for anything else."""
    data = json.loads(content)
    if not isinstance(data, dict) or set(data) != {"Amount", "CPI", "MerchantName", "RefNo", "TrxCode"}:
        raise ValueError("not a QR code of this simulator")
    return data


def png(content: str, size: int) -> bytes:
    """A QR image of ``content``, about ``size`` pixels square."""
    import qrcode  # noqa: PLC0415 - optional: only this API needs it

    code = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_M, border=4)
    code.add_data(content)
    code.make(fit=True)
    code.box_size = max(1, size // (code.modules_count + 2 * code.border))
    buffer = io.BytesIO()
    code.make_image().save(buffer, format="PNG")
    return buffer.getvalue()


class QrApi:
    """Dynamic QR over the shared state: every code made is kept (``state.qr_codes``, by its content)."""

    def __init__(self, state: SimState) -> None:
        self.state = state

    def generate(self, body: dict[str, Any]) -> _Response:
        state = self.state
        name = body.get("MerchantName")
        if not isinstance(name, str) or not name.strip() or len(name) > 100:
            raise _invalid("MerchantName")
        reference = body.get("RefNo")
        if not isinstance(reference, str) or not reference.strip() or len(reference.strip()) > _REFERENCE_LIMIT:
            raise _invalid("RefNo")
        amount = check_whole_amount(body)
        if not 1 <= amount <= _MAX_AMOUNT:
            raise _invalid("Amount")
        trx_code = body.get("TrxCode")
        if trx_code not in QR_TRX_CODES:
            raise _invalid("TrxCode")
        cpi = text_of(body.get("CPI"))
        if not cpi.isdigit() or (trx_code in ("PB", "BG") and not state.owns_shortcode(cpi)):
            raise _invalid("CPI")
        size_text = text_of(body.get("Size", "300"))
        if not size_text.isdigit() or not 100 <= int(size_text) <= 1000:
            raise _invalid("Size")
        content = qr_content(trx_code, cpi, reference.strip(), amount, name.strip())
        try:
            image = png(content, int(size_text))
        except ImportError:
            raise _Refusal(*_NO_QRCODE_PACKAGE) from None
        request_id = state.request_id()
        with state.lock:
            state.qr_codes[content] = {"RequestID": request_id, "content": content, "paid": []}
        stamp = _now_utc().strftime("%Y%m%d")
        return _Response(
            200,
            {
                "ResponseCode": f"AG_{stamp}_{state.random.getrandbits(80):020x}",
                "RequestID": request_id,
                "ResponseDescription": QR_DESC,
                "QRCode": base64.b64encode(image).decode("ascii"),
            },
        )

    def command_of(self, content: str) -> tuple[dict[str, Any], str]:
        """The request of a code this simulator made, and the C2B command its scan pays with."""
        with self.state.lock:
            known = content in self.state.qr_codes
        data = read_qr_content(content)
        if not known:
            raise ValueError("this simulator made no such QR code")
        if data["TrxCode"] not in ("PB", "BG"):
            raise ValueError("only paybill (PB) and buy goods (BG) codes pay a business")
        return data, PAYBILL if data["TrxCode"] == "PB" else TILL
