"""Dynamic QR: a code the M-Pesa app scans to pay a paybill (or a till) a given amount, with a reference.

``POST /mpesa/qrcode/v1/generate`` with ``{MerchantName, RefNo, Amount, TrxCode, CPI, Size}`` answers
``{ResponseCode, RequestID, ResponseDescription, QRCode}``: the image, base64.  A payment made by scanning it is
an ordinary C2B payment into CPI, with RefNo as its account number (BillRefNumber), so it is matched as one.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from .errors import DarajaProtocolError, DarajaValidationError, InvalidConfiguration
from .money import DARAJA_MAX_AMOUNT, check_amount

__all__ = [
    "QR_PATH",
    "QR_TRX_CODES",
    "QrCode",
    "build_qr_payload",
    "parse_qr_answer",
]

QR_PATH = "/mpesa/qrcode/v1/generate"
# TrxCode: what the scan does.  CPI (credit party identifier) is the paybill, the till, the agent or the phone.
QR_TRX_CODES: dict[str, str] = {
    "PB": "Pay Bill (CPI: the paybill; RefNo: the account number)",
    "BG": "Buy Goods (CPI: the till)",
    "WA": "Withdraw cash at an agent (CPI: the agent till)",
    "SM": "Send money (CPI: the phone)",
    "SB": "Send to business (CPI: the business number, as an MSISDN)",
}
_SHORTCODE = re.compile(r"[0-9]{5,12}")
_PHONE = re.compile(r"254[17][0-9]{8}")
_REFERENCE_LIMIT = 20  # What the phone sends as BillRefNumber (Daraja keeps 20 characters).
_NAME_LIMIT = 40
_SIZES = range(100, 1001)
# The images Daraja has been seen to return (PNG; some integrators' samples render it as JPEG).
_IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")


@dataclass(frozen=True)
class QrCode:
    """Daraja's answer to a Dynamic QR request: the image (PNG bytes) and its request's identifiers."""

    image: bytes
    request_id: str
    response_code: str
    description: str

    @property
    def base64(self) -> str:
        return base64.b64encode(self.image).decode("ascii")


def build_qr_payload(
    merchant_name: str,
    ref_no: str,
    amount: Decimal | int | str,
    trx_code: str,
    cpi: str | int,
    size: int = 300,
) -> dict[str, Any]:
    """The Dynamic QR request body, checked: whole shillings within Daraja's limits, a reference the phone
    can send back (20 characters), a CPI of the TrxCode's kind and a square size in pixels."""
    if trx_code not in QR_TRX_CODES:
        raise InvalidConfiguration(f"TrxCode must be one of {', '.join(QR_TRX_CODES)}.", field="trx_code")
    party = str(cpi).strip() if isinstance(cpi, (str, int)) and not isinstance(cpi, bool) else ""
    pattern = _PHONE if trx_code in ("SM", "SB") else _SHORTCODE
    if not pattern.fullmatch(party):
        raise InvalidConfiguration(f"CPI is not a valid credit party for TrxCode {trx_code}.", field="cpi")
    name = merchant_name.strip() if isinstance(merchant_name, str) else ""
    if not name or not name.isprintable():
        raise InvalidConfiguration("MerchantName is required (the name the phone shows).", field="merchant_name")
    reference = ref_no.strip() if isinstance(ref_no, str) else ""
    if not reference or not reference.isprintable() or len(reference) > _REFERENCE_LIMIT:
        raise DarajaValidationError(
            f"RefNo must be 1 to {_REFERENCE_LIMIT} printable characters: the phone sends it back as the"
            " account number.",
            field="ref_no",
        )
    if isinstance(size, bool) or not isinstance(size, int) or size not in _SIZES:
        raise InvalidConfiguration(f"Size must be {_SIZES.start} to {_SIZES.stop - 1} pixels.", field="size")
    return {
        "MerchantName": name[:_NAME_LIMIT],
        "RefNo": reference,
        "Amount": check_amount(amount, DARAJA_MAX_AMOUNT),
        "TrxCode": trx_code,
        "CPI": party,
        "Size": str(size),
    }


def parse_qr_answer(data: Any, http_status: int | None = 200) -> QrCode:
    """The QR image of Daraja's answer; DarajaProtocolError when it holds no image we can show (a body that
    is not base64, or not a PNG or JPEG, is never put on a customer's document)."""
    if not isinstance(data, dict):
        raise DarajaProtocolError("Daraja's Dynamic QR answer is not a JSON object.", http_status=http_status)
    encoded = data.get("QRCode")
    if not isinstance(encoded, str) or not encoded.strip():
        raise DarajaProtocolError("Daraja's Dynamic QR answer holds no QRCode.", http_status=http_status)
    try:
        image = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise DarajaProtocolError("Daraja's QRCode is not base64.", http_status=http_status) from None
    if not image.startswith(_IMAGE_SIGNATURES):
        raise DarajaProtocolError("Daraja's QRCode is not a PNG or JPEG image.", http_status=http_status)
    return QrCode(
        image=image,
        request_id=_text(data.get("RequestID")),
        response_code=_text(data.get("ResponseCode")),
        description=_text(data.get("ResponseDescription")),
    )


def _text(value: Any) -> str:
    return str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
