"""Reading (and, for the simulator and tests, writing) Daraja's stkCallback body.

Daraja posts plain JSON whose types drift (failure mode 12): ResultCode is a number or a word
(``SFC_IC0003``), Amount a float (1.00), TransactionDate a number in Kenya time, Balance often
has no Value.  ``parse_stk_callback`` turns all of it into one typed, frozen object or raises
CallbackParseError saying what is missing; it does not judge the payment (a success without a
receipt is parsed, and the Odoo layer refuses it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from .codes import Outcome, ResultCode, classify_result
from .errors import CallbackParseError
from .stk import KENYA_TZ
from .tokens import UTC

__all__ = [
    "ACCEPTED_RESPONSE",
    "StkCallback",
    "parse_stk_callback",
    "stk_callback_body",
]

# What the callback route answers to anything shaped like a Daraja callback (copy before changing).
ACCEPTED_RESPONSE: dict[str, Any] = {"ResultCode": 0, "ResultDesc": "Accepted"}

_DATE_FORMAT = "%Y%m%d%H%M%S"

# Far above any M-Pesa amount (250,000 per payment): a larger number is not a Daraja callback, and
# Decimal arithmetic on it would fail later (failure mode 18).
_MAX_AMOUNT = Decimal(10) ** 9
# Daraja's identifiers are about 30 characters of ASCII and its descriptions a sentence; the
# Odoo layer indexes identifiers, receipts and phones (a btree entry holds at most 2,704 bytes).
_MAX_ID_LENGTH = 100
_MAX_TEXT_LENGTH = 1000
_MAX_PHONE_LENGTH = 64  # A SHA-256 hex digest, the longest form Daraja reports a payer in.
# M-Pesa receipts are about 10 letters and digits (e.g. NLJ7RT61SV).
_RECEIPT = re.compile(r"[A-Za-z0-9]{4,32}")


@dataclass(frozen=True)
class StkCallback:
    """One parsed stkCallback; metadata fields are None when Daraja did not send them."""

    merchant_request_id: str
    checkout_request_id: str
    result_code: str
    result_desc: str
    amount: Decimal | None
    receipt_number: str | None
    transaction_date: datetime | None
    phone_number: str | None
    balance: str | None
    raw: dict[str, Any]

    @property
    def result(self) -> ResultCode:
        return classify_result(self.result_code)

    @property
    def outcome(self) -> Outcome:
        return self.result.outcome

    @property
    def is_success(self) -> bool:
        return self.result_code == "0"


def _load(body: bytes | str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(body, dict):
        return body
    if isinstance(body, (bytes, bytearray)):
        try:
            body = bytes(body).decode("utf-8-sig")
        except UnicodeDecodeError:
            raise CallbackParseError("The callback body is not UTF-8 text.") from None
    if not isinstance(body, str):
        raise CallbackParseError(f"The callback body is a {type(body).__name__}, not JSON.")
    try:
        data = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):  # RecursionError: nesting past the interpreter's limit.
        raise CallbackParseError("The callback body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise CallbackParseError(
            f"The callback body is a JSON {_json_type(data)}, not an object with a Body."
        )
    return data


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN and Infinity: Python's json accepts them, JSON does not.


def _clean(text: str, name: str, limit: int = _MAX_TEXT_LENGTH, ascii_only: bool = False) -> str:
    """A text field as a database can store it: no NUL, no lone surrogate, of a sane length
    (identifiers: printable ASCII)."""
    if "\x00" in text or len(text) > limit or (ascii_only and not (text.isascii() and text.isprintable())):
        raise CallbackParseError(f"The stkCallback {name} is not a Daraja value.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # A lone surrogate, from a \ud800 escape.
        raise CallbackParseError(f"The stkCallback {name} is not a Daraja value.") from None
    return text


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return "number"


def _required_id(callback: dict[str, Any], name: str) -> str:
    value = callback.get(name)
    if not isinstance(value, str) or not value.strip():
        raise CallbackParseError(f"The stkCallback has no {name} (a non-empty string is required).")
    return _clean(value.strip(), name, _MAX_ID_LENGTH, ascii_only=True)


def _result_code(callback: dict[str, Any]) -> str:
    if "ResultCode" not in callback:
        raise CallbackParseError("The stkCallback has no ResultCode.")
    value = callback["ResultCode"]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip():
        raise CallbackParseError("The stkCallback ResultCode is neither a number nor a code.")
    return _clean(str(value).strip(), "ResultCode", _MAX_ID_LENGTH, ascii_only=True)


def _items(callback: dict[str, Any]) -> dict[str, Any]:
    """CallbackMetadata.Item as {Name: Value}; an item without Value maps to None."""
    metadata = callback.get("CallbackMetadata")
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise CallbackParseError("The stkCallback CallbackMetadata is not an object.")
    items = metadata.get("Item", [])
    if not isinstance(items, list):
        raise CallbackParseError("The stkCallback CallbackMetadata.Item is not a list.")
    values: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("Name"), str):
            raise CallbackParseError(
                "An item of the stkCallback CallbackMetadata has no Name."
            )
        values.setdefault(item["Name"], item.get("Value"))
    return values


def _amount(value: Any) -> Decimal | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise CallbackParseError("The stkCallback Amount is not a number.")
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise CallbackParseError("The stkCallback Amount is not a number.") from None
    if not amount.is_finite():
        raise CallbackParseError("The stkCallback Amount is not a number.")
    if not 0 <= amount < _MAX_AMOUNT:
        raise CallbackParseError("The stkCallback Amount is not an amount of money.")
    if amount == amount.to_integral_value():
        amount = amount.quantize(Decimal(1))  # 1.00 -> Decimal("1")
    return amount


def _transaction_date(value: Any) -> datetime | None:
    """YYYYMMDDHHmmss (number or text) in Kenya time; None when absent or not such a date.

    An odd date does not refuse the callback: the receipt it carries matters more.
    """
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    text = str(value).strip()
    if len(text) != 14 or not text.isdigit():
        return None
    try:
        moment = datetime.strptime(text, _DATE_FORMAT).replace(tzinfo=KENYA_TZ)
    except ValueError:
        return None
    # Years a conversion to UTC could overflow (0001, 9999) are no M-Pesa date either.
    return moment if 2000 <= moment.year <= 2200 else None


def _optional_text(value: Any, name: str, limit: int = _MAX_TEXT_LENGTH) -> str | None:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if value is None or isinstance(value, (dict, list)):
        return None
    text = _clean(str(value).strip(), name, limit, ascii_only=True)
    return text or None


def _receipt(value: Any) -> str | None:
    receipt = _optional_text(value, "MpesaReceiptNumber", _MAX_ID_LENGTH)
    if receipt is not None and not _RECEIPT.fullmatch(receipt):
        raise CallbackParseError("The stkCallback MpesaReceiptNumber is not a Daraja value.")
    return receipt


def parse_stk_callback(body: bytes | str | dict[str, Any]) -> StkCallback:
    """Parse a Daraja stkCallback (JSON text, bytes or an already decoded dict)."""
    data = _load(body)
    envelope = data.get("Body")
    if not isinstance(envelope, dict):
        raise CallbackParseError("The callback has no Body object.")
    callback = envelope.get("stkCallback")
    if not isinstance(callback, dict):
        raise CallbackParseError("The callback Body has no stkCallback object.")
    merchant = _required_id(callback, "MerchantRequestID")
    checkout = _required_id(callback, "CheckoutRequestID")
    code = _result_code(callback)
    desc = callback.get("ResultDesc")
    if not isinstance(desc, str):
        raise CallbackParseError("The stkCallback has no ResultDesc.")
    desc = _clean(desc.strip(), "ResultDesc")
    items = _items(callback)
    balance = items.get("Balance")
    return StkCallback(
        merchant_request_id=merchant,
        checkout_request_id=checkout,
        result_code=code,
        result_desc=desc,
        amount=_amount(items.get("Amount")),
        receipt_number=_receipt(items.get("MpesaReceiptNumber")),
        transaction_date=_transaction_date(items.get("TransactionDate")),
        phone_number=_optional_text(items.get("PhoneNumber"), "PhoneNumber", _MAX_PHONE_LENGTH),
        balance=None if balance is None else _clean(str(balance), "Balance"),
        raw=data,
    )


def stk_callback_body(
    merchant_request_id: str,
    checkout_request_id: str,
    result_code: int | str,
    result_desc: str,
    *,
    amount: Decimal | float | str | None = None,
    receipt: str | None = None,
    transaction_date: datetime | None = None,
    phone: str | int | None = None,
    balance: str | float | None = None,
) -> dict[str, Any]:
    """Build the exact JSON Daraja posts (for the simulator and tests).

    ResultCode is a number unless it is a word; CallbackMetadata appears when any of amount,
    receipt, transaction_date or phone is given, with Daraja's item order and a Balance item that
    has no Value unless ``balance`` is given.  A naive ``transaction_date`` is read as UTC.
    """
    code: int | str = result_code
    if isinstance(code, str) and code.strip().isdigit():
        code = int(code.strip())
    callback: dict[str, Any] = {
        "MerchantRequestID": merchant_request_id,
        "CheckoutRequestID": checkout_request_id,
        "ResultCode": code,
        "ResultDesc": result_desc,
    }
    if any(v is not None for v in (amount, receipt, transaction_date, phone)):
        items: list[dict[str, Any]] = []
        if amount is not None:
            items.append({"Name": "Amount", "Value": float(Decimal(str(amount)))})
        if receipt is not None:
            items.append({"Name": "MpesaReceiptNumber", "Value": receipt})
        items.append({"Name": "Balance"} if balance is None else {"Name": "Balance", "Value": balance})
        if transaction_date is not None:
            moment = transaction_date
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            stamp = moment.astimezone(KENYA_TZ).strftime(_DATE_FORMAT)
            items.append({"Name": "TransactionDate", "Value": int(stamp)})
        if phone is not None:
            text = str(phone).strip()
            items.append({"Name": "PhoneNumber", "Value": int(text) if text.isdigit() else text})
        callback["CallbackMetadata"] = {"Item": items}
    return {"Body": {"stkCallback": callback}}
