"""The organisation statement of the paybill: ``GET /__sim__/statement?from=...&to=...``, and sweeps to the bank.

What an accountant downloads from the M-Pesa org portal (Utility Account, "Completed transactions" export), as
CSV: preamble lines (``Organisation Name:``, ``Organisation Short Code:``, ``Time Period:``, ``Account Type:``,
``Opening Balance:``, ``Closing Balance:``), a blank line, the header row ``STATEMENT_HEADER``, then one row per
transaction, newest first as the portal lists them (``order=asc`` for oldest first).  Times are Kenya time
``YYYY-MM-DD HH:MM:SS``; amounts have two decimals and thousands separators (so the csv module quotes them);
Withdrawn is negative; Other Party Info is ``2547****0111 - JOHN DOE``.

Rows, every wording in ``DETAILS`` / ``REASON_TYPES`` below (the one place; the statement parser mirrors it):

- a payment into the paybill: STK ("Pay Bill Online"), C2B ("Pay Bill", the lost-confirmation payer
  254700000101 too: the money is there, only the confirmation was lost), B2B Express Checkout ("Business Pay
  Bill"), each followed by its charge row (``PAYBILL_TARIFF``: Safaricom's Business Bouquet paybill tariff, the
  business pays the whole charge), with the same Receipt No. as the payment (as M-Pesa does: the key of a row is
  the receipt *and* its Reason Type) and the payment's receipt as Linked Transaction ID;
- a reversal (a refund): Withdrawn the whole amount, Linked Transaction ID the reversed receipt; the charge of
  the reversed payment is not given back (the simulator's choice: Safaricom documents nothing);
- a failed STK payment (insufficient funds, wrong PIN: the customer answered, M-Pesa refused): Transaction
  Status "Failed", the amount in Paid In, the Balance unchanged;
- a sweep to the bank (``sim.sweep(amount)``, ``POST /__sim__/sweep {"amount": ...}``): Withdrawn.

The Balance column runs row by row over every Completed row since the simulator's first receipt: a Completed
row's Balance is the previous one plus Paid In plus Withdrawn (negative).  Till (Buy Goods) payments are on the
till's own statement, which the simulator does not make.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from .state import KENYA_TZ, PAYBILL, Payment, SimState, _monotonic

STATEMENT_PATH = "statement"  # under /__sim__/
SWEEP_PATH = "sweep"

# === The one place of the statement's wording (the parser's const mirrors it) === #
STATEMENT_HEADER = (
    "Receipt No.", "Completion Time", "Initiation Time", "Details", "Transaction Status", "Paid In", "Withdrawn",
    "Balance", "Balance Confirmed", "Reason Type", "Other Party Info", "Linked Transaction ID", "A/C No.",
)
ACCOUNT_TYPE = "Utility Account"
COMPLETED = "Completed"
FAILED = "Failed"
REASON_TYPES = {
    "stk": "Pay Bill Online",
    "c2b": "Pay Bill",
    "b2b": "Business Pay Bill",
    "charge": "Pay Bill Charge",
    "b2b_charge": "Business Pay Bill Charge",
    "reversal": "Reversal",
    "sweep": "Business Settlement",
}
DETAILS = {
    "stk": "Pay Bill Online from {party} Acc. {account}",
    "c2b": "Pay Bill from {party} Acc. {account}",
    "b2b": "Business Pay Bill from {party} Acc. {account}",
    "charge": "Pay Bill Charge",
    "b2b_charge": "Business Pay Bill Charge",
    "reversal": "Reversal of {original} to {party}",
    "sweep": "Funds transfer to bank - {bank}",
}
SETTLEMENT_BANK = "SIMULATED BANK ACC. 0100000000000"
# STK ResultCodes the customer answered and M-Pesa refused: a Failed row (a cancelled or unanswered prompt is not
# a transaction at all).
FAILED_STK_CODES = (1, 2001)

# Safaricom's Business Bouquet paybill tariff (the business pays the whole charge), KES: (up to, charge).
PAYBILL_TARIFF: tuple[tuple[int, int], ...] = (
    (100, 0), (500, 5), (1_000, 10), (1_500, 15), (2_500, 20), (3_500, 25), (5_000, 34), (7_500, 42),
    (10_000, 48), (15_000, 57), (20_000, 62), (25_000, 67), (30_000, 72), (35_000, 83), (40_000, 99),
    (45_000, 103), (250_000, 108),
)

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def paybill_charge(amount: int) -> int:
    """What the paybill pays Safaricom for receiving ``amount`` (PAYBILL_TARIFF)."""
    for ceiling, charge in PAYBILL_TARIFF:
        if amount <= ceiling:
            return charge
    return PAYBILL_TARIFF[-1][1]


def masked_msisdn(msisdn: str) -> str:
    """2547****0111, as the org portal masks a phone; a till or shortcode stays as it is."""
    return msisdn[:4] + "****" + msisdn[-4:] if re.fullmatch(r"254\d{9}", msisdn) else msisdn


def money(amount: int | Decimal) -> str:
    return f"{Decimal(amount):,.2f}"


def parse_bound(text: str | None, *, end: bool) -> datetime | None:
    """An ISO date or datetime in Kenya time (a naive one is Kenya time); a date ``to`` covers its whole day."""
    if text is None or not text.strip():
        return None
    text = text.strip()
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            day = date.fromisoformat(text)
            moment = datetime.combine(day + timedelta(days=1) if end else day, time(0), KENYA_TZ)
            return moment - timedelta(microseconds=1) if end else moment
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not an ISO date or datetime: {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=KENYA_TZ)


@dataclass
class StatementRow:
    receipt: str
    at: datetime
    kind: str  # a key of REASON_TYPES
    status: str
    paid_in: int
    withdrawn: int  # <= 0
    party: str
    account: str
    linked: str
    details: str
    balance: int = 0

    def as_csv(self) -> list[str]:
        stamp = self.at.astimezone(KENYA_TZ).strftime(TIME_FORMAT)
        return [
            self.receipt, stamp, stamp, self.details, self.status,
            money(self.paid_in) if self.paid_in else "",
            money(self.withdrawn) if self.withdrawn else "",
            money(self.balance), "true", REASON_TYPES[self.kind], self.party, self.linked, self.account,
        ]


def _party(payment: Payment) -> str:
    name = payment.payer_name.upper()
    return f"{masked_msisdn(payment.msisdn)} - {name}" if name else masked_msisdn(payment.msisdn)


def _rows_of(payment: Payment, state: SimState) -> list[StatementRow]:
    party = _party(payment)
    if payment.source == "reversal":
        details = DETAILS["reversal"].format(original=payment.reverses, party=party)
        return [StatementRow(payment.receipt, payment.at, "reversal", COMPLETED, 0, -payment.amount, party,
                             payment.bill_ref, payment.reverses or "", details)]
    kind = payment.source
    details = DETAILS[kind].format(party=party, account=payment.bill_ref)
    rows = [StatementRow(payment.receipt, payment.at, kind, COMPLETED, payment.amount, 0, party, payment.bill_ref,
                         "", details)]
    charge = paybill_charge(payment.amount)
    if charge:
        charge_kind = "b2b_charge" if kind == "b2b" else "charge"
        rows.append(StatementRow(payment.receipt, payment.at, charge_kind, COMPLETED, 0, -charge, "", "",
                                 payment.receipt, DETAILS[charge_kind]))
    return rows


def all_rows(state: SimState, shortcode: str) -> list[StatementRow]:
    """Every row of ``shortcode``'s statement so far, oldest first, with the running Balance (under the lock)."""
    now = _monotonic()
    rows: list[StatementRow] = []
    with state.lock:
        for payment in state.ledger.values():
            if payment.shortcode == shortcode and payment.visible_at <= now and (
                payment.source == "b2b" or payment.transaction_type == PAYBILL
            ):
                rows += _rows_of(payment, state)
        for failure in state.failures.values():
            if failure.shortcode == shortcode and failure.visible_at <= now:
                party = _party(failure)
                rows.append(StatementRow(
                    failure.receipt, failure.at, "stk", FAILED, failure.amount, 0, party, failure.bill_ref, "",
                    DETAILS["stk"].format(party=party, account=failure.bill_ref),
                ))
        for sweep in state.sweeps:
            if sweep["shortcode"] == shortcode:
                rows.append(StatementRow(
                    sweep["receipt"], datetime.fromisoformat(sweep["at"]), "sweep", COMPLETED, 0,
                    -int(sweep["amount"]), SETTLEMENT_BANK, "", "", DETAILS["sweep"].format(bank=SETTLEMENT_BANK),
                ))
    rows.sort(key=lambda row: row.at)  # stable: a charge stays after its payment
    balance = 0
    for row in rows:
        if row.status == COMPLETED:
            balance += row.paid_in + row.withdrawn
        row.balance = balance
    return rows


def balance_of(state: SimState, shortcode: str) -> int:
    rows = all_rows(state, shortcode)
    return rows[-1].balance if rows else 0


def statement_csv(
    state: SimState, shortcode: str, start: datetime | None, end: datetime | None, *, newest_first: bool = True
) -> str:
    """The statement of ``shortcode`` between ``start`` and ``end`` (inclusive; None: unbounded) as CSV text."""
    rows = all_rows(state, shortcode)
    before = [row for row in rows if start is not None and row.at < start]
    chosen = [row for row in rows if (start is None or row.at >= start) and (end is None or row.at <= end)]
    opening = before[-1].balance if before else 0
    closing = chosen[-1].balance if chosen else opening
    first = start or (chosen[0].at if chosen else None)
    last = end or (chosen[-1].at if chosen else None)
    period = " - ".join(moment.astimezone(KENYA_TZ).strftime(TIME_FORMAT) if moment else "" for moment in (first, last))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(["Organisation Name:", state.settings.organization_name])
    writer.writerow(["Organisation Short Code:", shortcode])
    writer.writerow(["Time Period:", period])
    writer.writerow(["Account Type:", ACCOUNT_TYPE])
    writer.writerow(["Opening Balance:", money(opening)])
    writer.writerow(["Closing Balance:", money(closing)])
    writer.writerow([])
    writer.writerow(STATEMENT_HEADER)
    for row in reversed(chosen) if newest_first else chosen:
        writer.writerow(row.as_csv())
    return out.getvalue()


def record_sweep(state: SimState, amount: Any, at: datetime) -> dict[str, Any]:
    """Sweep ``amount`` (whole shillings) of the paybill's balance to the bank; ValueError above the balance."""
    if isinstance(amount, bool) or not isinstance(amount, (int, str)) or not re.fullmatch(r"\d{1,12}", str(amount)):
        raise ValueError("amount must be whole shillings")
    value = int(amount)
    shortcode = state.settings.shortcode
    with state.lock:
        balance = balance_of(state, shortcode)
        if value < 1 or value > balance:
            raise ValueError(f"amount must be from 1 to the balance, {balance}")
        sweep = {"receipt": state.receipt(at), "shortcode": shortcode, "amount": value, "at": at.isoformat()}
        state.sweeps.append(sweep)
        return {**sweep, "balance": balance - value}
