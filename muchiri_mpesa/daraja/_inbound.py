"""The hardening every body Daraja posts to us goes through (STK callbacks, C2B, Pull, initiator results), in
one place (docs/design.md, 12. Failure modes: hostile bytes).

Any bytes at all are either a JSON object or a ``CallbackParseError``: not UTF-8, invalid JSON, a key repeated in
any object, NaN / Infinity, nesting past the interpreter's limit, integers too long to read, NUL, lone surrogates,
over-long text and absurd amounts are all refused here, so the Odoo layer only ever stores what a database and
Decimal arithmetic can take.  Every parser uses these helpers, never a copy of its own: a rule tightened here is
tightened for all of them.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from .errors import CallbackParseError
from .stk import KENYA_TZ
from .tokens import UTC

# Far above any M-Pesa amount (250,000 per payment): a larger number is not a Daraja body.
MAX_AMOUNT = Decimal(10) ** 9
MAX_ID_LENGTH = 100
MAX_TEXT_LENGTH = 1000
MAX_BODY_BYTES = 1 << 20  # Daraja's bodies are a few hundred bytes.
DATE_FORMAT = "%Y%m%d%H%M%S"  # Kenya time, as Daraja writes TransactionDate, TransTime
# What Daraja writes for money ("5.00", 5, 5.0, "1E+2" from a float): ASCII only, so Decimal's extras (Unicode
# digits, "1_000", "Infinity") never pass, and no exponent long enough to make Decimal work hard.
_AMOUNT = re.compile(r"[+-]?(?:[0-9]{1,30}(?:\.[0-9]{0,30})?|\.[0-9]{1,30})(?:[eE][+-]?[0-9]{1,3})?")
_CENT = Decimal("0.01")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN and Infinity: Python's json accepts them, JSON does not.


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):  # {"TransID": "A", "TransID": "B"}: which one would the ledger believe?
        raise ValueError("a JSON object repeats a key")
    return data


def load_object(body: bytes | str | dict[str, Any], what: str) -> dict[str, Any]:
    """``body`` as a JSON object, or CallbackParseError naming ``what`` ("The C2B body", ...)."""
    if isinstance(body, dict):
        return body
    if isinstance(body, (bytes, bytearray)):
        if len(body) > MAX_BODY_BYTES:
            raise CallbackParseError(f"{what} is too large to be a Daraja body.")
        try:
            body = bytes(body).decode("utf-8-sig")
        except UnicodeDecodeError:
            raise CallbackParseError(f"{what} is not UTF-8 text.") from None
    if not isinstance(body, str):
        raise CallbackParseError(f"{what} is a {type(body).__name__}, not JSON.")
    if len(body) > MAX_BODY_BYTES:
        raise CallbackParseError(f"{what} is too large to be a Daraja body.")
    try:
        data = json.loads(body, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError):  # RecursionError: nesting past the interpreter's limit.
        raise CallbackParseError(f"{what} is not valid JSON.") from None
    if not isinstance(data, dict):
        raise CallbackParseError(f"{what} is a JSON {_json_type(data)}, not an object.")
    return data


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


def clean(text: str, what: str, name: str, limit: int = MAX_TEXT_LENGTH, *, ascii_only: bool = False) -> str:
    """A text field as a database can store it: no NUL, no lone surrogate, of a sane length (identifiers:
    printable ASCII)."""
    refused = CallbackParseError(f"The {what} {name} is not a Daraja value.")
    if "\x00" in text or len(text) > limit or (ascii_only and not (text.isascii() and text.isprintable())):
        raise refused
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # A lone surrogate, from a \ud800 escape.
        raise refused from None
    return text


def scalar_text(value: Any, what: str, name: str, limit: int = MAX_TEXT_LENGTH, *, ascii_only: bool = False) -> str:
    """A JSON string or number as stripped text ('' for null); objects, arrays and booleans are refused."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise CallbackParseError(f"The {what} {name} is not a Daraja value.")
    return clean(str(value).strip(), what, name, limit, ascii_only=ascii_only)


def result_code(value: Any, what: str) -> str:
    """A ResultCode as text: Daraja sends a number (0, 1032.0) or a word (SFC_IC0003, R000001)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip():
        raise CallbackParseError(f"The {what} ResultCode is neither a number nor a code.")
    return clean(str(value).strip(), what, "ResultCode", MAX_ID_LENGTH, ascii_only=True)


def amount(value: Any, what: str, name: str = "Amount") -> Decimal:
    """A non-negative, finite amount below MAX_AMOUNT in whole cents; whole amounts lose their ".00"."""
    not_a_number = CallbackParseError(f"The {what} {name} is not a number.")
    refused = CallbackParseError(f"The {what} {name} is not an amount of money.")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise not_a_number
    text = value.strip() if isinstance(value, str) else repr(value) if isinstance(value, float) else ""
    if isinstance(value, int):
        number = Decimal(value) if abs(value) < MAX_AMOUNT else MAX_AMOUNT  # no str() of a 5,000-digit int
    elif not _AMOUNT.fullmatch(text):  # also nan, inf, Unicode digits and "1_000"
        raise not_a_number
    else:
        try:
            number = Decimal(text)
        except (InvalidOperation, ValueError):
            raise not_a_number from None
    if not number.is_finite() or not 0 <= number < MAX_AMOUNT:
        raise refused
    # Shillings and cents only: "0.001" or "1E-999999999" is no M-Pesa amount (and no database numeric).
    if number != number.quantize(_CENT):
        raise refused
    if number == number.to_integral_value():
        number = number.quantize(Decimal(1))
    return number


def kenya_time(value: Any) -> datetime | None:
    """YYYYMMDDHHmmss (number or text) in Kenya time, as aware UTC; None when it is no such date."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    text = str(value).strip()
    if len(text) != 14 or not text.isdigit():
        return None
    try:
        moment = datetime.strptime(text, DATE_FORMAT).replace(tzinfo=KENYA_TZ)
    except ValueError:
        return None
    # Years a conversion to UTC could overflow (0001, 9999) are no M-Pesa date either.
    return moment.astimezone(UTC) if 2000 <= moment.year <= 2200 else None
