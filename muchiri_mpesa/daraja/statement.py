"""The M-Pesa organisation statement, as the org portal gives it for download (CSV, or XLSX).

The accountant's own record from Safaricom: every movement of the shortcode's account, with its
receipt, its time (Kenya time), what it was (Details, Reason Type), the money in or out and the
balance after it.  The org statement's header row is::

    Receipt No., Completion Time, Initiation Time, Details, Transaction Status, Paid In, Withdrawn,
    Balance, Balance Confirmed, Reason Type, Other Party Info, Linked Transaction ID, A/C No.

and older exports use shorter sets (Receipt, Date, Details, Status, Withdrawn, Paid In, Balance, ...).
A few lines of preamble ("Organisation Name", "Time Period", ...) come before it.

Columns are found by their header name (case, spaces and punctuation ignored), never by their place.
Amounts may be quoted with thousands separators, and Withdrawn may be written negative: it is read
as money out, always >= 0.  A row that does not read refuses the whole file (StatementError, which
names the row): a statement is imported whole or not at all.

No Odoo here: the models import the rows (models/mpesa_statement.py).
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation

from .errors import DarajaValidationError
from .stk import KENYA_TZ
from .tokens import UTC

__all__ = [
    "STATEMENT_COLUMNS",
    "StatementError",
    "StatementRow",
    "parse_statement",
]

# Each field of a row, and the header names it goes by (compared as `_header_key` gives them).
STATEMENT_COLUMNS: dict[str, tuple[str, ...]] = {
    "receipt": ("receiptno", "receipt", "receiptnumber", "transactionid", "transid"),
    "completed_at": ("completiontime", "date", "completiondate", "transactiondate", "transactiontime"),
    "initiated_at": ("initiationtime", "initiationdate"),
    "details": ("details", "description", "transactiondetails"),
    "status": ("transactionstatus", "status"),
    "paid_in": ("paidin", "paidinamount", "moneyin"),
    "withdrawn": ("withdrawn", "withdrawal", "withdrawnamount", "moneyout"),
    "balance": ("balance", "balanceafter"),
    "reason_type": ("reasontype", "transactiontype", "type"),
    "other_party": ("otherpartyinfo", "otherparty", "otherpartydetails"),
    "linked_id": ("linkedtransactionid", "linkedtransaction"),
    "account_no": ("acno", "accountno", "accountnumber", "billreference", "billrefnumber"),
}
_REQUIRED = ("receipt", "completed_at")
_MAX_PREAMBLE = 50  # lines before the header row
_MAX_ROWS = 200_000
_MAX_CELL = 512  # characters: no field of a statement is longer
_MAX_BYTES = 64 * 1024 * 1024
_MAX_AMOUNT = Decimal("1000000000000")
_RECEIPT = re.compile(r"[A-Z0-9]{6,32}")
_DATE_FORMATS = (
    "%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M:%S",
    "%d-%m-%Y %H:%M:%S", "%d-%m-%Y %H:%M", "%d/%m/%Y %H:%M:%S", "%d/%m/%Y %H:%M",
    "%d.%m.%Y %H:%M:%S", "%d.%m.%Y %H:%M", "%Y/%m/%d %H:%M:%S",
)


class StatementError(DarajaValidationError):
    """The file is not an M-Pesa statement, or one of its rows does not read; ``line`` is the
    row's line number in the file (0 for the file as a whole)."""

    def __init__(self, message: str, line: int = 0) -> None:
        super().__init__(f"Line {line}: {message}" if line else message, "statement")
        self.line = line


@dataclass(frozen=True)
class StatementRow:
    """One row of the statement.  Times are aware UTC; amounts are Decimal shillings, both >= 0."""

    line: int
    receipt: str
    completed_at: datetime
    initiated_at: datetime | None
    details: str
    status: str
    paid_in: Decimal
    withdrawn: Decimal
    balance: Decimal | None
    reason_type: str
    other_party: str
    linked_id: str
    account_no: str

    @property
    def amount(self) -> Decimal:
        """The signed movement of the account: money in positive, money out negative."""
        return self.paid_in - self.withdrawn

    @property
    def completed(self) -> bool:
        """Whether the money moved: a failed, declined or cancelled row moved none."""
        return self.status.strip().lower() in ("completed", "")

    @property
    def payer_msisdn(self) -> str:
        """The payer's (masked) number of Other Party Info ``2547****0111 - NAME``."""
        return self.other_party.split(" - ", 1)[0].strip() if " - " in self.other_party else ""

    @property
    def payer_name(self) -> str:
        return self.other_party.split(" - ", 1)[1].strip() if " - " in self.other_party else ""


def _header_key(value: object) -> str:
    return re.sub(r"[^0-9a-z]+", "", str(value or "").lower())


def _columns(cells: list[object]) -> dict[str, int] | None:
    """The place of each known field in a header row, or None when the row is not the header."""
    keys = [_header_key(cell) for cell in cells]
    found: dict[str, int] = {}
    for field, names in STATEMENT_COLUMNS.items():
        for name in names:  # The first name is the org statement's: preferred when both are there.
            if name in keys:
                found[field] = keys.index(name)
                break
    if all(field in found for field in _REQUIRED) and ("paid_in" in found or "withdrawn" in found):
        return found
    return None


def _text(value: object, line: int, what: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    if len(text) > _MAX_CELL:
        raise StatementError(f"the {what} is {len(text)} characters long: no M-Pesa statement field is.", line)
    if any(ord(char) < 32 and char not in "\t" for char in text):
        raise StatementError(f"the {what} holds control characters.", line)
    return text


def _amount(value: object, line: int, what: str) -> Decimal:
    """'1,234.50', '"1,234.50"', '-1,234.50', 1234.5, '' (nothing) -> Decimal, sign kept."""
    if value is None or (isinstance(value, str) and value.strip() in ("", "-")):
        return Decimal(0)
    if isinstance(value, bool):
        raise StatementError(f"the {what} amount {value!r} is not an amount of money.", line)
    if isinstance(value, (int, float, Decimal)):
        text = str(value)
    else:
        text = _text(value, line, what).replace(",", "").replace(" ", "").replace("\u00a0", "")
        if text.upper().startswith(("KES", "KSH")):
            text = text[3:]
        if text.startswith("(") and text.endswith(")"):
            text = "-" + text[1:-1]
    if not re.fullmatch(r"-?[0-9]+(\.[0-9]+)?", text):
        raise StatementError(f"the {what} amount {str(value)[:40]!r} is not an amount of money.", line)
    try:
        amount = Decimal(text)
    except InvalidOperation:
        raise StatementError(f"the {what} amount {str(value)[:40]!r} is not an amount of money.", line) from None
    if abs(amount) >= _MAX_AMOUNT:
        raise StatementError(f"the {what} amount {text} is out of range.", line)
    if amount != amount.quantize(Decimal("0.01")):
        raise StatementError(f"the {what} amount {text} has fractions of a cent.", line)
    return amount.quantize(Decimal("0.01"))


def _time(value: object, line: int, what: str, required: bool) -> datetime | None:
    """A Kenya wall-clock time (the file's, +03:00, no daylight saving) as aware UTC."""
    if isinstance(value, datetime):  # XLSX: a naive cell holds the file's Kenya time
        moment = value
    else:
        text = _text(value, line, what)
        if not text:
            if required:
                raise StatementError(f"the {what} is missing.", line)
            return None
        moment = None
        for pattern in _DATE_FORMATS:
            try:
                moment = datetime.strptime(text, pattern)
                break
            except ValueError:
                continue
        if moment is None:
            try:
                moment = datetime.fromisoformat(text)
            except ValueError:
                raise StatementError(f"the {what} {text[:40]!r} is not a date and time.", line) from None
    if not 2000 <= moment.year <= 2200:
        raise StatementError(f"the {what} {moment} is not a statement's date.", line)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=KENYA_TZ)
    return moment.astimezone(UTC)


def _row(cells: list[object], columns: dict[str, int], line: int) -> StatementRow:
    def cell(field: str) -> object:
        place = columns.get(field)
        return cells[place] if place is not None and place < len(cells) else None

    receipt = _text(cell("receipt"), line, "receipt").upper()
    if not receipt:
        raise StatementError("the row has no receipt number.", line)
    if not _RECEIPT.fullmatch(receipt):
        raise StatementError(f"{receipt[:40]!r} is not an M-Pesa receipt number.", line)
    paid_in = _amount(cell("paid_in"), line, "Paid In")
    withdrawn = abs(_amount(cell("withdrawn"), line, "Withdrawn"))  # written negative by some exports
    if paid_in < 0:
        raise StatementError(f"the Paid In amount {paid_in} is negative.", line)
    if paid_in and withdrawn:
        raise StatementError("the row has money both paid in and withdrawn.", line)
    balance_cell = cell("balance")
    balance = None if balance_cell is None or str(balance_cell).strip() == "" \
        else _amount(balance_cell, line, "Balance")
    return StatementRow(
        line=line,
        receipt=receipt,
        completed_at=_time(cell("completed_at"), line, "completion time", required=True),
        initiated_at=_time(cell("initiated_at"), line, "initiation time", required=False),
        details=_text(cell("details"), line, "details"),
        status=_text(cell("status"), line, "status") or "Completed",
        paid_in=paid_in,
        withdrawn=withdrawn,
        balance=balance,
        reason_type=_text(cell("reason_type"), line, "reason type"),
        other_party=_text(cell("other_party"), line, "other party"),
        linked_id=_text(cell("linked_id"), line, "linked transaction").upper(),
        account_no=_text(cell("account_no"), line, "account number"),
    )


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")  # Excel's "CSV" on Windows


def _csv_lines(data: bytes):
    """(line number, cells) of a CSV file: comma-separated, or semicolons or tabs where Excel used them."""
    text = _decode(data).replace("\x00", "")
    head = text[:8192]
    delimiter = max((",", ";", "\t"), key=head.count)
    csv.field_size_limit(_MAX_CELL * 4)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            raise StatementError(f"the line does not read as CSV ({error}).", reader.line_num) from None
        yield reader.line_num, cells


def _xlsx_lines(data: bytes):
    """(row number, cells) of the first sheet of an XLSX workbook."""
    # openpyxl is one of Odoo's own requirements; imported here only, so that the Daraja layer
    # (and its tests of CSV) needs nothing beyond the standard library.
    try:
        import openpyxl  # noqa: PLC0415
    except ImportError:  # pragma: no cover - Odoo installs it
        raise StatementError("XLSX files need the openpyxl library: download the statement as CSV.") from None
    try:
        workbook = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    except Exception as error:  # noqa: BLE001 - zipfile, XML and openpyxl's own errors: not a workbook
        raise StatementError(f"the file is not a readable XLSX workbook ({type(error).__name__}).") from None
    try:
        sheet = workbook.worksheets[0]
        for number, cells in enumerate(sheet.iter_rows(values_only=True), start=1):
            yield number, list(cells)
    finally:
        workbook.close()


def parse_statement(data: bytes, filename: str | None = None) -> list[StatementRow]:
    """The rows of an M-Pesa statement file, in the file's order, each receipt's row once.

    A row repeated whole (two overlapping downloads pasted together) is read once; the same receipt
    and details with other amounts, status or time refuse the file.  A receipt may have two rows
    of different details: a payment and its charge.

    :raises StatementError: the file is not a statement, or a row does not read (it names the row)
    """
    if not isinstance(data, (bytes, bytearray)):
        raise StatementError("The statement must be the bytes of a file.")
    if not data.strip():
        raise StatementError("The file is empty: not an M-Pesa statement.")
    if len(data) > _MAX_BYTES:
        raise StatementError("The file is too large for an M-Pesa statement: import it a month at a time.")
    if data[:5] == b"%PDF-":
        raise StatementError(
            "The file is a PDF: download the statement from the M-Pesa org portal as CSV or Excel (XLSX).")
    is_xlsx = data[:4] == b"PK\x03\x04" or (filename or "").lower().endswith((".xlsx", ".xlsm"))
    lines = _xlsx_lines(bytes(data)) if is_xlsx else _csv_lines(bytes(data))
    columns = None
    rows: list[StatementRow] = []
    seen: dict[tuple[str, str], StatementRow] = {}
    for number, cells in lines:
        if columns is None:
            columns = _columns(cells)
            if columns is None and number >= _MAX_PREAMBLE:
                break
            continue
        if not any(str(cell).strip() for cell in cells if cell is not None):
            continue  # blank lines between the rows or at the end
        if len(rows) >= _MAX_ROWS:
            raise StatementError(f"more than {_MAX_ROWS} rows: import the statement a month at a time.", number)
        row = _row(cells, columns, number)
        key = (row.receipt, row.details.lower())
        first = seen.get(key)
        if first is not None:
            if (first.paid_in, first.withdrawn, first.status, first.completed_at) != (
                    row.paid_in, row.withdrawn, row.status, row.completed_at):
                raise StatementError(
                    f"receipt {row.receipt} is also on line {first.line} with other amounts or status.", number)
            continue
        seen[key] = row
        rows.append(row)
    if columns is None:
        raise StatementError(
            "No header row (Receipt No., Completion Time, Paid In, Withdrawn, ...) was found: not an M-Pesa"
            " statement.")
    return rows
