"""Reading (and, for the simulator and tests, writing) Daraja's stkCallback body.

Daraja posts plain JSON whose types drift (docs/design.md, 3. Daraja facts): ResultCode is a number
or a word (``SFC_IC0003``), Amount a float (1.00), TransactionDate a number in Kenya time, Balance
often has no Value.  ``parse_stk_callback`` turns all of it into one typed, frozen object or raises
CallbackParseError saying what is missing; it does not judge the payment (a success without a
receipt is parsed, and the Odoo layer refuses it).  The body is read by ``_inbound``, as every
body Daraja posts us: a hostile body is refused here exactly as a C2B or initiator one is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from . import _inbound
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

_WHAT = "stkCallback"
# Identifiers, receipts and phones are indexed by the Odoo layer: _inbound.MAX_ID_LENGTH keeps them
# far below what a btree entry holds (2,704 bytes).
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


def _required_id(callback: dict[str, Any], name: str) -> str:
    value = callback.get(name)
    if not isinstance(value, str) or not value.strip():
        raise CallbackParseError(f"The stkCallback has no {name} (a non-empty string is required).")
    return _inbound.clean(value.strip(), _WHAT, name, _inbound.MAX_ID_LENGTH, ascii_only=True)


def _result_code(callback: dict[str, Any]) -> str:
    if "ResultCode" not in callback:
        raise CallbackParseError("The stkCallback has no ResultCode.")
    return _inbound.result_code(callback["ResultCode"], _WHAT)


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
    return None if value is None else _inbound.amount(value, _WHAT)


def _transaction_date(value: Any) -> datetime | None:
    """The TransactionDate in Kenya time, as Daraja wrote it; None when absent or not such a date.

    An odd date does not refuse the callback: the receipt it carries matters more.
    """
    moment = _inbound.kenya_time(value)
    return None if moment is None else moment.astimezone(KENYA_TZ)


def _optional_text(value: Any, name: str, limit: int = _inbound.MAX_TEXT_LENGTH) -> str | None:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if value is None or isinstance(value, (dict, list)):
        return None
    text = _inbound.clean(str(value).strip(), _WHAT, name, limit, ascii_only=True)
    return text or None


def _receipt(value: Any) -> str | None:
    receipt = _optional_text(value, "MpesaReceiptNumber", _inbound.MAX_ID_LENGTH)
    if receipt is not None and not _RECEIPT.fullmatch(receipt):
        raise CallbackParseError("The stkCallback MpesaReceiptNumber is not a Daraja value.")
    return receipt


def parse_stk_callback(body: bytes | str | dict[str, Any]) -> StkCallback:
    """Parse a Daraja stkCallback (JSON text, bytes or an already decoded dict)."""
    data = _inbound.load_object(body, "The callback body")
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
    desc = _inbound.clean(desc.strip(), _WHAT, "ResultDesc")
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
        balance=None if balance is None else _inbound.clean(str(balance), _WHAT, "Balance"),
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
            stamp = moment.astimezone(KENYA_TZ).strftime(_inbound.DATE_FORMAT)
            items.append({"Name": "TransactionDate", "Value": int(stamp)})
        if phone is not None:
            text = str(phone).strip()
            items.append({"Name": "PhoneNumber", "Value": int(text) if text.isdigit() else text})
        callback["CallbackMetadata"] = {"Item": items}
    return {"Body": {"stkCallback": callback}}
