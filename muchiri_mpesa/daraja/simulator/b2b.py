"""B2B Express Checkout: ``/v1/ussdpush/get-msisdn`` and the result posted to callbackUrl.

A vendor asks Daraja to prompt a merchant's till (``primaryShortCode``) to pay its paybill (``receiverShortCode``,
the simulator's shortcode).  The fields are checked as the other APIs check theirs (400.002.02 "Bad Request -
Invalid <field>"), the answer is ``{"code": "0", "status": "USSD Initiated Successfully"}``, and after
``callback_delay`` seconds the till's operator has answered: the flat JSON result goes to callbackUrl, with the
retries of every callback.  A paid checkout enters the ledger as source "b2b" (Transaction Status and Reversal
know it; its OriginatorConversationID is the RequestRefID, so Transaction Status finds it by
OriginalConversationID when its result was lost).  Pull Transactions does not list it: Daraja documents no
row for it.

The paying till chooses the outcome (B2B_MAGIC_TILLS); any other till pays.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from .delivery import Deliverer
from .state import (
    B2B_RESULT,
    PAYBILL,
    CallbackDelivery,
    Payment,
    SimState,
    _invalid,
    _monotonic,
    _now_utc,
    _Response,
    check_text,
    check_url,
    check_whole_amount,
    text_of,
)

B2B_CHECKOUT_PATH = "/v1/ussdpush/get-msisdn"

INITIATED_STATUS = "USSD Initiated Successfully"
SUCCESS_DESC = "The service request is processed successfully."
# Safaricom's codes and wording, written out on purpose (see "Daraja's refusals" in state.py).
CANCELLED = ("4001", "User cancelled transaction")
KYC_FAILED = ("4102", "Merchant KYC Fail")
NO_NOMINATED_NUMBER = ("4104", "Missing Nominated Number")

_TILL = re.compile(r"[0-9]{5,7}")
_PAYMENT_REF_MAX = 12  # the simulator's choice: M-Pesa Express's AccountReference limit (Daraja documents none)
_PARTNER_NAME_MAX = 100
_MAX_AMOUNT = 250_000


@dataclass(frozen=True)
class B2BScenario:
    """What the operator of ``till`` does with the prompt."""

    till: str | None
    summary: str
    result_code: str | None  # None: no result ever (the prompt is never answered)
    result_desc: str = SUCCESS_DESC
    pays: bool = False  # the money moves (into the ledger)
    posts_result: bool = True  # False: the result is lost (never posted)
    refused_at_once: bool = False  # the acknowledgement itself carries result_code


B2B_DEFAULT_SCENARIO = B2BScenario(None, "pays (resultCode 0) after the callback delay", "0", pays=True)
B2B_MAGIC_TILLS: dict[str, B2BScenario] = {
    s.till: s  # type: ignore[misc]
    for s in (
        B2BScenario("600100", "pays (resultCode 0) after the callback delay", "0", pays=True),
        B2BScenario("600101", "4001 cancelled by the till's operator", *CANCELLED),
        B2BScenario("600102", "never answers: no result ever comes, nothing is paid", None, ""),
        B2BScenario(
            "600103",
            "pays, but the result is lost (never posted): Transaction Status knows it",
            "0",
            pays=True,
            posts_result=False,
        ),
        B2BScenario(
            "600104",
            'refused at once: {"code": "4104", "status": "Missing Nominated Number"}, no prompt',
            *NO_NOMINATED_NUMBER,
            refused_at_once=True,
        ),
        B2BScenario("600105", "4102 Merchant KYC Fail, in the result", *KYC_FAILED),
    )
}
# Until a till pays, its name in Transaction Status (DebitPartyName "600100 - <name>").
TILL_NAME = "Distributor Till"


def b2b_scenario_for(till: str) -> B2BScenario:
    return B2B_MAGIC_TILLS.get(till, B2B_DEFAULT_SCENARIO)


def b2b_magic_tills_table() -> str:
    """The magic tills as a Markdown table (README, CLI banner)."""
    rows = ["| primaryShortCode | outcome |", "|---|---|"]
    rows += [f"| {till} | {s.summary} |" for till, s in B2B_MAGIC_TILLS.items()]
    rows.append(f"| any other till | {B2B_DEFAULT_SCENARIO.summary} |")
    return "\n".join(rows)


def _amount_text(amount: int) -> str:
    return f"{amount}.0"  # Daraja writes "71.0"


class B2BApi:
    """USSD push to a till, and its result."""

    def __init__(self, state: SimState, deliverer: Deliverer) -> None:
        self.state = state
        self.deliverer = deliverer

    def checkout(self, body: dict[str, Any]) -> _Response:
        state = self.state
        settings = state.settings
        till = text_of(body.get("primaryShortCode"))
        if not _TILL.fullmatch(till) or till == settings.shortcode:
            raise _invalid("primaryShortCode")
        receiver = text_of(body.get("receiverShortCode"))
        if receiver != settings.shortcode:
            raise _invalid("receiverShortCode")
        amount = check_whole_amount(body, "amount")
        if amount > _MAX_AMOUNT:
            raise _invalid("amount")
        reference = check_text(body, "paymentRef", _PAYMENT_REF_MAX)
        reject = ("mpesa", "m-pesa", "safaricom") if settings.reject_mpesa_in_callback_url else ()
        callback_url = check_url(body, "callbackUrl", reject)
        partner = check_text(body, "partnerName", _PARTNER_NAME_MAX)
        request_id = check_text(body, "RequestRefID", 100)
        scenario = b2b_scenario_for(till)
        if scenario.refused_at_once:
            return _Response(200, {"code": scenario.result_code, "status": scenario.result_desc})

        now = _monotonic()
        wall = _now_utc()
        wait = settings.callback_delay
        result_moment = wall + timedelta(seconds=wait)
        with state.lock:
            if request_id in state.b2b_checkouts:  # the simulator's choice: one prompt per RequestRefID
                raise _invalid("RequestRefID")
            receipt = state.receipt(result_moment) if scenario.pays else None
            conversation = state.conversation_id(result_moment)
            record: dict[str, Any] = {
                "RequestRefID": request_id,
                "primaryShortCode": till,
                "receiverShortCode": receiver,
                "amount": amount,
                "paymentRef": reference,
                "partnerName": partner,
                "callbackUrl": callback_url,
                "scenario": scenario.summary,
                "resultCode": scenario.result_code,
                "transactionId": receipt,
                "conversationID": conversation,
                "result_at": now + wait if scenario.result_code is not None else None,
                "result_posted": scenario.result_code is not None and scenario.posts_result,
            }
            state.b2b_checkouts[request_id] = record
            if receipt is not None:
                state.record_payment(
                    Payment(
                        receipt=receipt,
                        source="b2b",
                        shortcode=receiver,
                        business_shortcode=receiver,
                        transaction_type=PAYBILL,
                        amount=amount,
                        msisdn=till,  # the payer: a till, not a phone
                        bill_ref=reference,
                        first_name=TILL_NAME,
                        middle_name="",
                        last_name="",
                        at=result_moment,
                        visible_at=now + wait,
                        originator_conversation_id=request_id,
                    )
                )
            state.cond.notify_all()
        if record["result_posted"]:
            self.deliverer.plan(
                CallbackDelivery(
                    checkout_request_id="",
                    merchant_request_id="",
                    url=callback_url,
                    body=self._result_body(scenario, record),
                    copy_number=1,
                    due_at=now + wait,
                    kind=B2B_RESULT,
                    reference=request_id,
                )
            )
        return _Response(200, {"code": "0", "status": INITIATED_STATUS})

    @staticmethod
    def _result_body(scenario: B2BScenario, record: dict[str, Any]) -> dict[str, Any]:
        if scenario.pays:
            return {
                "resultCode": "0",
                "resultDesc": SUCCESS_DESC,
                "amount": _amount_text(record["amount"]),
                "requestId": record["RequestRefID"],
                "resultType": "0",
                "conversationID": record["conversationID"],
                "transactionId": record["transactionId"],
                "status": "SUCCESS",
            }
        return {
            "resultCode": scenario.result_code,
            "resultDesc": scenario.result_desc,
            "requestId": record["RequestRefID"],
            "amount": _amount_text(record["amount"]),
            "paymentReference": record["paymentRef"],
        }

    def records(self) -> list[dict[str, Any]]:
        with self.state.lock:
            return copy.deepcopy(list(self.state.b2b_checkouts.values()))
