"""Pull Transactions: every C2B payment into the shortcode in the last 48 hours, for reconciliation.

Register once (``/pulltransactions/v1/register``), then query ``/pulltransactions/v1/query`` with StartDate /
EndDate ("YYYY-MM-DD HH:MM:SS", Kenya time) and OffSetValue, page after page: ResponseCode 1000 has rows,
1001 means none (HTTP 200 both).  Rows are read with the same hardening as callbacks: a hostile row refuses the
whole answer (CallbackParseError), it is never half-read.

Money in, and only money in: Daraja documents one ``transactiontype``, ``c2b-pay-bill-debit`` (the payer's
account debited), and integrators report ``c2b-buy-goods-debit`` for tills and rows of money going out
(``merchant-to-organization-settlement``; a reversal).  A row is a payment only when its type is one of
PULL_PAYMENT_TYPES and its amount is above zero (``PullTransaction.is_payment``); every other row is read, kept
and shown for what it is, never booked as money in, and never makes the whole answer unreadable.

A run (``DarajaClient.pull_transactions``) says whether it read the whole window (``PullListing``): a Daraja
that repeats a page, or more pages than the run may ask for, cuts it short, and ``read_until`` then says up to
when every row was read, so that the caller moves its window no further.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from itertools import pairwise
from typing import Any

from . import _inbound
from .codes import PULL_NONE_FOUND, PULL_SUCCESS  # re-exported: Daraja's codes live in codes.py
from .errors import CallbackParseError, InvalidConfiguration
from .phone import normalize_msisdn
from .stk import KENYA_TZ
from .tokens import UTC
from .urls import check_daraja_url

__all__ = [
    "PULL_CUT_PAGE_LIMIT",
    "PULL_CUT_REPEATED_PAGE",
    "PULL_NONE_FOUND",
    "PULL_PAYMENT_TYPES",
    "PULL_QUERY_PATH",
    "PULL_REGISTER_PATH",
    "PULL_SUCCESS",
    "PULL_WINDOW",
    "PullListing",
    "PullTransaction",
    "build_pull_query_payload",
    "build_pull_register_payload",
    "parse_pull_rows",
    "pull_date",
]

PULL_REGISTER_PATH = "/pulltransactions/v1/register"
PULL_QUERY_PATH = "/pulltransactions/v1/query"
PULL_WINDOW = timedelta(hours=48)  # Daraja keeps the last 48 hours only
_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
_WHAT = "Pull Transactions"
_RECEIPT = re.compile(r"[A-Za-z0-9]{4,32}")
_MAX_ROWS = 10_000
# The transaction types of money paid in to the shortcode ("debit": the payer's account is debited).
PULL_PAYMENT_TYPES = frozenset({"c2b-pay-bill-debit", "c2b-buy-goods-debit"})
# Why a run did not read the whole window (PullListing.cut_short).
PULL_CUT_REPEATED_PAGE = "repeated_page"  # Daraja answered a page already read: it ignores OffSetValue
PULL_CUT_PAGE_LIMIT = "page_limit"  # more pages than the run may ask for


@dataclass(frozen=True)
class PullTransaction:
    """One row of a Pull Transactions answer; ``trx_date`` is aware UTC."""

    transaction_id: str
    trx_date: datetime
    msisdn: str
    transaction_type: str
    bill_reference: str
    amount: Decimal  # signed: money going out may be listed with a minus

    @property
    def is_payment(self) -> bool:
        """Money paid in to the shortcode: a payment type and an amount above zero.  Anything else (a
        reversal, a settlement, a type Daraja may add) is never booked as money in."""
        return self.transaction_type.lower() in PULL_PAYMENT_TYPES and self.amount > 0


@dataclass(frozen=True)
class PullListing:
    """What one Pull Transactions run read from ``start`` to ``end``: its rows (each receipt once, in
    Daraja's order, oldest first), whether it read the whole window, and up to when it read.

    ``read_until`` is ``end`` when ``complete``.  When the run was cut short (``cut_short`` says why), every
    row before ``read_until`` was read: the time of the last row read, if the rows came oldest first as
    Daraja lists them, else ``start`` (nothing is known to be read).  Rows of that very second may be unread.
    """

    rows: tuple[PullTransaction, ...]
    start: datetime
    end: datetime
    complete: bool
    read_until: datetime
    cut_short: str = ""

    @classmethod
    def of(cls, rows: list[PullTransaction], start: datetime, end: datetime, cut_short: str = "") -> PullListing:
        if not cut_short:
            return cls(tuple(rows), start, end, True, end)
        dates = [row.trx_date for row in rows]
        in_order = all(earlier <= later for earlier, later in pairwise(dates))
        read_until = min(max(dates[-1], start), end) if dates and in_order else start
        return cls(tuple(rows), start, end, False, read_until, cut_short)

    @property
    def payments(self) -> tuple[PullTransaction, ...]:
        return tuple(row for row in self.rows if row.is_payment)

    @property
    def others(self) -> tuple[PullTransaction, ...]:
        """The rows that are not money in (reversals, settlements, unknown types)."""
        return tuple(row for row in self.rows if not row.is_payment)


def pull_date(moment: datetime) -> str:
    """StartDate / EndDate: "YYYY-MM-DD HH:MM:SS" in Kenya time (a naive ``moment`` is read as UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(KENYA_TZ).strftime(_DATE_FORMAT)


def _shortcode(value: object) -> str:
    text = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    if not re.fullmatch(r"[0-9]{5,12}", text):
        raise InvalidConfiguration("The M-Pesa shortcode must be 5 to 12 digits.", field="shortcode")
    return text


def build_pull_register_payload(shortcode: str, nominated_number: str | int, callback_url: str) -> dict[str, Any]:
    return {
        "ShortCode": _shortcode(shortcode),
        "RequestType": "Pull",
        "NominatedNumber": normalize_msisdn(nominated_number),
        "CallBackURL": check_daraja_url(callback_url, "callback_url"),
    }


def build_pull_query_payload(shortcode: str, start: datetime, end: datetime, offset: int = 0) -> dict[str, Any]:
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise InvalidConfiguration("The Pull Transactions offset must be a whole number >= 0.", field="offset")
    if pull_date(start) > pull_date(end):
        raise InvalidConfiguration("The Pull Transactions start must not be after its end.", field="start")
    return {
        "ShortCode": _shortcode(shortcode),
        "StartDate": pull_date(start),
        "EndDate": pull_date(end),
        "OffSetValue": str(offset),
    }


def _trx_date(value: Any) -> datetime:
    """ISO with offset ("2020-08-05T10:13:00.000+03:00"), "YYYY-MM-DD HH:MM:SS" or YYYYMMDDHHmmss (Kenya)."""
    text = _inbound.scalar_text(value, _WHAT, "trxDate", 40, ascii_only=True)
    moment = _inbound.kenya_time(text)
    if moment is not None:
        return moment
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CallbackParseError("A Pull Transactions trxDate is not a date.") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=KENYA_TZ)
    if not 2000 <= parsed.year <= 2200:
        raise CallbackParseError("A Pull Transactions trxDate is not a date.")
    return parsed.astimezone(UTC)


def _row(row: Any) -> PullTransaction:
    if not isinstance(row, dict):
        raise CallbackParseError("A Pull Transactions row is not an object.")
    transaction_id = _inbound.scalar_text(row.get("transactionId"), _WHAT, "transactionId", 100, ascii_only=True)
    if not _RECEIPT.fullmatch(transaction_id):
        raise CallbackParseError("A Pull Transactions row has no transactionId.")
    return PullTransaction(
        transaction_id=transaction_id,
        trx_date=_trx_date(row.get("trxDate")),
        msisdn=_inbound.scalar_text(row.get("msisdn"), _WHAT, "msisdn", 64, ascii_only=True),
        transaction_type=_inbound.scalar_text(row.get("transactiontype"), _WHAT, "transactiontype", 100),
        bill_reference=_inbound.scalar_text(row.get("billreference"), _WHAT, "billreference", 100),
        amount=_signed_amount(row.get("amount")),
    )


def _signed_amount(value: Any) -> Decimal:
    """An amount as hardened as a callback's, with its sign: money going out may be listed negative."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        return -_inbound.amount(-value, _WHAT, "amount")
    if isinstance(value, str) and value.strip().startswith("-"):
        digits = value.strip()[1:]
        if digits != digits.lstrip():  # "- 1" is no amount Daraja writes
            raise CallbackParseError("The Pull Transactions amount is not an amount of money.")
        return -_inbound.amount(digits, _WHAT, "amount")
    return _inbound.amount(value, _WHAT, "amount")


def parse_pull_rows(data: dict[str, Any] | bytes | str) -> tuple[str, list[PullTransaction]]:
    """(ResponseCode, rows) of a query answer; ``Response`` may be a list of rows or a list of lists of rows."""
    body = _inbound.load_object(data, "The Pull Transactions answer")
    code = _inbound.scalar_text(body.get("ResponseCode"), _WHAT, "ResponseCode", 20, ascii_only=True)
    if not code:
        raise CallbackParseError("The Pull Transactions answer has no ResponseCode.")
    response = body.get("Response")
    if response is None or code == PULL_NONE_FOUND:
        return code, []
    if not isinstance(response, list):
        raise CallbackParseError("The Pull Transactions Response is not a list.")
    flat: list[Any] = []
    for entry in response:
        flat.extend(entry if isinstance(entry, list) else [entry])
    if len(flat) > _MAX_ROWS:
        raise CallbackParseError("The Pull Transactions answer has too many rows.")
    return code, [_row(row) for row in flat]
