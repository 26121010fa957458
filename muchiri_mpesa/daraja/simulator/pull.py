"""Pull Transactions: ``/pulltransactions/v1/register`` and ``/pulltransactions/v1/query``.

The query returns every STK and C2B payment into the registered shortcode (its paybill, or its till) from the
ledger, oldest first, between StartDate and EndDate ("YYYY-MM-DD HH:MM:SS", Kenya time) and within the last 48
hours only (``sim.age_transaction`` moves a receipt back in time), ``pull_page_size`` rows from OffSetValue:
ResponseCode "1000" with rows, "1001" when there are none (HTTP 200 both).  A lost confirmation is here too.

Magic (``sim.pull_next(outcome, count)``, one outcome per query): ``repeat_page`` answers the page from offset 0
whatever OffSetValue says (a Daraja that ignores it: a client paging on would loop); ``with_reversals`` lists the
reversals of the shortcode's payments too, with their own receipt, type ``reversal`` and a negative amount (Daraja
documents no reversal row: the simulator's choice, so that a client proves it never books one as money in).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from .state import (
    KENYA_TZ,
    PAYBILL,
    PULL_WINDOW,
    Payment,
    SimState,
    _invalid,
    _monotonic,
    _now_utc,
    _Response,
    check_digits,
    check_msisdn,
    check_url,
    text_of,
)

PULL_REGISTER_PATH = "/pulltransactions/v1/register"
PULL_QUERY_PATH = "/pulltransactions/v1/query"
_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
# Safaricom's ResponseCodes, written out on purpose (see "Daraja's refusals" in state.py).
RECORDS_FOUND = "1000"
NO_RECORDS = "1001"

# The names of sim.pull_next: quirks of a real Daraja, for the next queries.
REPEAT_PAGE = "repeat_page"
WITH_REVERSALS = "with_reversals"
PULL_OUTCOMES = (REPEAT_PAGE, WITH_REVERSALS)
REVERSAL_TYPE = "reversal"  # Daraja documents no type for a reversal row: the simulator's choice


def _date(body: dict[str, Any], name: str) -> datetime:
    text = body.get(name)
    if not isinstance(text, str):
        raise _invalid(name)
    try:
        return datetime.strptime(text.strip(), _DATE_FORMAT).replace(tzinfo=KENYA_TZ)
    except ValueError:
        raise _invalid(name) from None


class PullApi:
    """Pull Transactions over the shared ledger."""

    def __init__(self, state: SimState) -> None:
        self.state = state

    def register(self, body: dict[str, Any]) -> _Response:
        state = self.state
        shortcode = check_digits(body, "ShortCode")
        if not state.owns_shortcode(shortcode):
            raise _invalid("ShortCode")
        if body.get("RequestType") != "Pull":
            raise _invalid("RequestType")
        nominated = check_msisdn(body, "NominatedNumber")
        callback_url = check_url(body, "CallBackURL")
        with state.lock:
            state.pull_registrations[shortcode] = {"NominatedNumber": nominated, "CallBackURL": callback_url}
        return _Response(
            200,
            {
                "ResponseRefID": state.request_id(),
                "ResponseStatus": RECORDS_FOUND,
                "ShortCode": shortcode,
                "ResponseDescription": "Shortcode Registered Successfully",
            },
        )

    def query(self, body: dict[str, Any]) -> _Response:
        state = self.state
        shortcode = check_digits(body, "ShortCode")
        start = _date(body, "StartDate")
        end = _date(body, "EndDate")
        if end < start:
            raise _invalid("EndDate")
        offset_text = text_of(body.get("OffSetValue", "0")) or "0"
        if not re.fullmatch(r"[0-9]{1,12}", offset_text):  # not isdigit(): "٣", or 5,000 digits int() refuses
            raise _invalid("OffSetValue")
        offset = int(offset_text)
        oldest = _now_utc() - PULL_WINDOW
        now = _monotonic()
        with state.lock:
            if shortcode not in state.pull_registrations:
                raise _invalid("ShortCode")  # not registered for Pull Transactions
            outcome = state.pull_outcomes.pop(0) if state.pull_outcomes else None
            if outcome == REPEAT_PAGE:
                offset = 0
            sources = ("stk", "c2b", "reversal") if outcome == WITH_REVERSALS else ("stk", "c2b")
            payments = sorted(
                (
                    p
                    for p in state.ledger.values()
                    if p.source in sources
                    and shortcode in (p.shortcode, p.business_shortcode)
                    and p.visible_at <= now
                    and p.at >= oldest
                    and start <= p.at <= end
                ),
                key=lambda p: (p.at, p.receipt),
            )
            page = payments[offset : offset + max(1, state.settings.pull_page_size)]
            organization = state.settings.organization_name
        if not page:
            return _Response(
                200,
                {"ResponseRefID": state.request_id(), "ResponseCode": NO_RECORDS, "ResponseMessage": "No records found",
                 "Response": [[]]},
            )
        rows = [
            {
                "transactionId": p.receipt,
                "trxDate": p.at.astimezone(KENYA_TZ).isoformat(timespec="milliseconds"),
                "msisdn": int(p.msisdn),
                "sender": "MPESA",
                "transactiontype": _transaction_type(p),
                "billreference": p.bill_ref,
                "amount": f"{-p.amount if p.source == 'reversal' else p.amount}.0",
                "organizationname": organization,
            }
            for p in page
        ]
        return _Response(
            200,
            {"ResponseRefID": state.request_id(), "ResponseCode": RECORDS_FOUND, "ResponseMessage": "Success",
             "Response": [rows]},
        )


def _transaction_type(payment: Payment) -> str:
    if payment.source == "reversal":
        return REVERSAL_TYPE
    return "c2b-pay-bill-debit" if payment.transaction_type == PAYBILL else "c2b-buy-goods-debit"
