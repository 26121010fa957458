"""The M-Pesa organisation statement parser: CSV and XLSX, the org and the older headers, and hostile files."""

from __future__ import annotations

import csv
import io
from datetime import datetime, timezone
from decimal import Decimal

import pytest

from muchiri_mpesa.daraja import DarajaValidationError, StatementError, StatementRow, parse_statement

PREAMBLE = [
    ["Organisation Name:", "Muchiri Distributors Ltd"],
    ["Organisation Short Code:", "174379"],
    ["Time Period:", "From 05-12-2026 00:00:00 To 05-12-2026 23:59:59"],
    [],
]
ORG_HEADER = ["Receipt No.", "Completion Time", "Initiation Time", "Details", "Transaction Status", "Paid In",
              "Withdrawn", "Balance", "Balance Confirmed", "Reason Type", "Other Party Info",
              "Linked Transaction ID", "A/C No."]
ORG_ROWS = [
    ["SL5AB12CD3", "2026-12-05 10:15:02", "2026-12-05 10:15:01", "Pay Bill from 2547****0111 - JANE DOE Acc. INV001",
     "Completed", "4,500.00", "", "104,500.00", "true", "Pay Bill Online", "2547****0111 - JANE DOE", "", "INV001"],
    ["SL5AB12CD3", "2026-12-05 10:15:02", "2026-12-05 10:15:01", "Business Pay Bill Charge",
     "Completed", "", "-25.00", "104,475.00", "true", "Business Pay Bill Charge", "", "", ""],
    ["SL5AB12CD4", "2026-12-05 11:00:00", "2026-12-05 11:00:00", "Pay Bill from 2547****0222 - JOHN",
     "Failed", "1,000.00", "", "104,475.00", "true", "Pay Bill Online", "2547****0222 - JOHN", "", "X"],
    ["SL5AB12CD5", "2026-12-05 18:00:00", "2026-12-05 18:00:00",
     "Organization Settlement Account to Organization Bank Account", "Completed", "", "100,000.00", "4,475.00",
     "true", "Settlement", "Equity Bank", "", ""],
]


def _csv(rows, encoding="utf-8-sig", header=ORG_HEADER, preamble=PREAMBLE):
    out = io.StringIO()
    writer = csv.writer(out)
    for line in [*preamble, header, *rows]:
        writer.writerow(line)
    return out.getvalue().encode(encoding)


def _xlsx(rows, header=ORG_HEADER, preamble=PREAMBLE, dates=False):
    openpyxl = pytest.importorskip("openpyxl")
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    for line in preamble:
        sheet.append(line or [None])
    sheet.append(header)
    for row in rows:
        row = list(row)
        if dates:
            row[1] = datetime.strptime(row[1], "%Y-%m-%d %H:%M:%S")
            row[5] = float(row[5].replace(",", "")) if row[5] else None
        sheet.append(row)
    out = io.BytesIO()
    workbook.save(out)
    return out.getvalue()


def test_org_statement_csv():
    rows = parse_statement(_csv(ORG_ROWS), "statement.csv")
    assert [row.receipt for row in rows] == ["SL5AB12CD3", "SL5AB12CD3", "SL5AB12CD4", "SL5AB12CD5"]
    paid = rows[0]
    assert isinstance(paid, StatementRow)
    assert paid.line == 6
    assert paid.paid_in == Decimal("4500.00") and paid.withdrawn == 0
    assert paid.balance == Decimal("104500.00")
    # Kenya time, +03:00, read as aware UTC.
    assert paid.completed_at == datetime(2026, 12, 5, 7, 15, 2, tzinfo=timezone.utc)
    assert paid.initiated_at == datetime(2026, 12, 5, 7, 15, 1, tzinfo=timezone.utc)
    assert paid.account_no == "INV001"
    assert paid.payer_msisdn == "2547****0111" and paid.payer_name == "JANE DOE"
    assert paid.reason_type == "Pay Bill Online" and paid.completed
    charge = rows[1]
    assert charge.withdrawn == Decimal("25.00"), "a negative Withdrawn is money out"
    assert charge.amount == Decimal("-25.00")
    assert not rows[2].completed
    assert rows[3].withdrawn == Decimal("100000.00")


def test_older_short_header_and_encodings():
    header = ["Receipt", "Date", "Details", "Status", "Withdrawn", "Paid In", "Balance"]
    rows = [["KX12AB34CD", "26/08/2009 12:39:42", "Paiement reçu", "Completed", "", "200", "520,499"]]
    for encoding in ("utf-8-sig", "utf-8", "cp1252"):
        parsed = parse_statement(_csv(rows, encoding, header=header, preamble=[]))
        assert parsed[0].details == "Paiement reçu"
        assert parsed[0].paid_in == Decimal("200.00") and parsed[0].balance == Decimal("520499.00")
        assert parsed[0].completed_at == datetime(2009, 8, 26, 9, 39, 42, tzinfo=timezone.utc)


def test_columns_by_name_not_place():
    order = list(reversed(range(len(ORG_HEADER))))
    header = [ORG_HEADER[i].upper() + "  " for i in order]
    rows = [[row[i] for i in order] for row in ORG_ROWS]
    assert parse_statement(_csv(rows, header=header)) == [
        row.__class__(**{**row.__dict__}) for row in parse_statement(_csv(ORG_ROWS))
    ]


def test_xlsx_as_csv():
    from_csv = parse_statement(_csv(ORG_ROWS))
    from_xlsx = parse_statement(_xlsx(ORG_ROWS), "statement.xlsx")
    assert [(r.receipt, r.paid_in, r.withdrawn, r.balance, r.completed_at) for r in from_xlsx] == \
        [(r.receipt, r.paid_in, r.withdrawn, r.balance, r.completed_at) for r in from_csv]
    typed = parse_statement(_xlsx(ORG_ROWS, dates=True))
    assert typed[0].completed_at == from_csv[0].completed_at and typed[0].paid_in == Decimal("4500.00")


def test_repeated_rows_are_read_once():
    rows = parse_statement(_csv([*ORG_ROWS, ORG_ROWS[0]]))
    assert len(rows) == 4


@pytest.mark.parametrize(("bad", "words"), [
    ({5: "4,5OO.00"}, "not an amount"),
    ({5: "1e5"}, "not an amount"),
    ({5: "12.345"}, "fractions"),
    ({1: "2026-13-45 10:00:00"}, "not a date"),
    ({1: ""}, "completion time is missing"),
    ({0: ""}, "no receipt"),
    ({0: "DROP TABLE"}, "not an M-Pesa receipt"),
    ({6: "10.00"}, "both paid in and withdrawn"),
    ({3: "x" * 10_000}, "CSV"),
])
def test_a_bad_row_names_its_line(bad, words):
    row = list(ORG_ROWS[0])
    for place, value in bad.items():
        row[place] = value
    with pytest.raises(StatementError) as caught:
        parse_statement(_csv([ORG_ROWS[3], row]))
    assert caught.value.line == 7
    assert "Line 7" in str(caught.value) and words in str(caught.value)
    assert isinstance(caught.value, DarajaValidationError)


def test_duplicate_receipt_with_other_amount():
    other = list(ORG_ROWS[0])
    other[5] = "45,000.00"
    with pytest.raises(StatementError, match="also on line 6"):
        parse_statement(_csv([ORG_ROWS[0], other]))


@pytest.mark.parametrize(("data", "words"), [
    (b"", "empty"),
    (b"  \n\n", "empty"),
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "PDF"),
    (b"name,amount\nfoo,1\n", "not an M-Pesa statement"),
    (b"PK\x03\x04garbage", "not a readable XLSX"),
    (b"\x00\xff" * 100, "not an M-Pesa statement"),
])
def test_not_a_statement(data, words):
    with pytest.raises(StatementError, match=words):
        parse_statement(data)


def test_a_huge_line():
    data = _csv(ORG_ROWS) + b'"' + b"9" * 5_000_000 + b'"\n'
    with pytest.raises(StatementError, match="Line"):
        parse_statement(data)


def test_header_after_long_preamble_is_not_searched_forever():
    data = b"junk\n" * 10_000 + ",".join(ORG_HEADER).encode() + b"\n"
    with pytest.raises(StatementError, match="not an M-Pesa statement"):
        parse_statement(data)
