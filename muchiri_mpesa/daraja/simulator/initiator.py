"""Initiator APIs: ``/mpesa/reversal/v1/request`` and ``/mpesa/transactionstatus/v1/query``.

Both check the Bearer token and the fields, answer at once ``{OriginatorConversationID, ConversationID,
ResponseCode: "0", ResponseDescription}`` (accepted, not done), process the request against the ledger of every
receipt the simulator produced (STK and C2B payments, and the reversals), and POST the Result to ResultURL after
``result_delay`` seconds, with the retries of every callback.  The SecurityCredential is decrypted with the
simulator's own key (``keys``): an initiator name or password other than the configured ones gives ResultCode
2001 in the Result, as Daraja does.

Outcomes:
- Reversal of a known receipt, for its whole amount, to its shortcode: 0, the receipt is reversed once;
  again: R000001; unknown receipt, other shortcode or another amount: R000002; wrong credential: 2001.
- Transaction Status: ReceiptNo, Amount, TransactionStatus ("Completed", or "Reversed" once reversed),
  DebitPartyName, CreditPartyName ("<shortcode> - <organisation>"), InitiatedTime, FinalisedTime, ...;
  unknown receipt or another PartyA: R000002; wrong credential: 2001.  The payment is named by TransactionID
  (its receipt) or, without one, by OriginalConversationID: the request that made it (a B2B checkout's
  RequestRefID, whose result may have been lost).
- Magic: ``SIM-NO-RESULT`` in Remarks or Occasion (or ``sim.initiator_next("no_result")``): processed, but the
  Result never comes; ``SIM-QUEUE-TIMEOUT`` (or ``sim.initiator_next("queue_timeout")``): not processed, the
  timeout body goes to QueueTimeOutURL instead.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from typing import Any

from .delivery import Deliverer
from .keys import Identity, decrypt_credential, new_identity
from .state import (
    INITIATOR_RESULT,
    INITIATOR_TIMEOUT,
    PAYBILL,
    CallbackDelivery,
    Payment,
    SimState,
    _invalid,
    _kenya_stamp,
    _monotonic,
    _now_utc,
    _Response,
    check_digits,
    check_text,
    check_url,
    check_whole_amount,
    optional_text,
    text_of,
)

REVERSAL_PATH = "/mpesa/reversal/v1/request"
TRANSACTION_STATUS_PATH = "/mpesa/transactionstatus/v1/query"

ACCEPTED_DESC = "Accept the service request successfully."
PROCESSED_DESC = "The service request is processed successfully."
# Safaricom's ResultCodes and wording, written out on purpose (see "Daraja's refusals" in state.py).
INVALID_INITIATOR = (2001, "The initiator information is invalid.")
ALREADY_REVERSED = ("R000001", "The transaction has already been reversed.")
INVALID_ORIGINAL = ("R000002", "The OriginalTransactionID is invalid.")
TIMEOUT_DESC = "The request was not processed in time: it timed out in the M-Pesa queue."
# Where Daraja says its own results queue lives (ReferenceData of real results).
_QUEUE_URL = "https://internalsandbox.safaricom.co.ke/mpesa/{}/v1/submit"

# Magic values (in Remarks or Occasion, any case) and the names of sim.initiator_next.
NO_RESULT = "no_result"
QUEUE_TIMEOUT = "queue_timeout"
MAGIC_REMARKS: dict[str, str] = {"SIM-NO-RESULT": NO_RESULT, "SIM-QUEUE-TIMEOUT": QUEUE_TIMEOUT}
OUTCOMES = (NO_RESULT, QUEUE_TIMEOUT)

_TRANSACTION_ID = re.compile(r"[A-Za-z0-9]{4,32}")
_CONVERSATION_ID = re.compile(r"[A-Za-z0-9_.:-]{4,100}")


_DEBIT_ACCOUNT = {"reversal": "Utility Account", "b2b": "Merchant Account"}


def _pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
    return {"ResultParameter": [{"Key": key, "Value": value} for key, value in items]}


class InitiatorApi:
    """Reversal and Transaction Status against the shared ledger."""

    def __init__(self, state: SimState, deliverer: Deliverer) -> None:
        self.state = state
        self.deliverer = deliverer
        self._identity: Identity | None = None
        self._identity_lock = threading.Lock()

    @property
    def identity(self) -> Identity:
        """The key pair and certificate, made when first needed (about 0.1 s)."""
        with self._identity_lock:
            if self._identity is None:
                self._identity = new_identity(f"Daraja Simulator {self.state.settings.shortcode}")
            return self._identity

    # -- checks -------------------------------------------------------------------------------------------------
    def _common(self, body: Mapping[str, Any], command: str, *, by_originator: bool = False) -> dict[str, Any]:
        """The fields both APIs share; ``by_originator``: TransactionID may be left out when the payment is named
        by OriginalConversationID instead (Transaction Status)."""
        reject = ("mpesa", "m-pesa", "safaricom") if self.state.settings.reject_mpesa_in_callback_url else ()
        initiator = check_text(body, "Initiator", 100)
        credential = check_text(body, "SecurityCredential", 4096)
        if body.get("CommandID") != command:
            raise _invalid("CommandID")
        originator = text_of(body.get("OriginalConversationID")) if by_originator else ""
        if originator and not _CONVERSATION_ID.fullmatch(originator):
            raise _invalid("OriginalConversationID")
        transaction_id = text_of(body.get("TransactionID"))
        if not _TRANSACTION_ID.fullmatch(transaction_id) and not (originator and not transaction_id):
            raise _invalid("TransactionID")
        checked = {
            "initiator": initiator,
            "credential": credential,
            "transaction_id": transaction_id,
            "original_conversation_id": originator,
            "result_url": check_url(body, "ResultURL", reject),
            "timeout_url": check_url(body, "QueueTimeOutURL", reject),
            "remarks": check_text(body, "Remarks", 100, min_length=2),
            "occasion": optional_text(body, "Occasion", 100),
        }
        return checked

    def _credential_ok(self, initiator: str, credential: str) -> bool:
        settings = self.state.settings
        password = decrypt_credential(self.identity, credential)
        return initiator == settings.initiator_name and password == settings.initiator_password

    def _outcome(self, checked: Mapping[str, Any]) -> str | None:
        text = f"{checked['remarks']} {checked['occasion']}".upper()
        for token, outcome in MAGIC_REMARKS.items():
            if token in text:
                return outcome
        with self.state.lock:
            return self.state.initiator_outcomes.pop(0) if self.state.initiator_outcomes else None

    # -- Reversal -----------------------------------------------------------------------------------------------
    def reversal(self, body: dict[str, Any]) -> _Response:
        checked = self._common(body, "TransactionReversal")
        amount = check_whole_amount(body)
        receiver = check_digits(body, "ReceiverParty")
        if text_of(body.get("RecieverIdentifierType")) not in ("11", "4"):
            raise _invalid("RecieverIdentifierType")
        return self._accept("reversal", checked, lambda: self._reverse(checked, amount, receiver))

    def _reverse(self, checked: Mapping[str, Any], amount: int, receiver: str) -> tuple[Any, str, str, list]:
        """Apply the reversal now: (ResultCode, ResultDesc, TransactionID, ResultParameters items)."""
        state = self.state
        settings = state.settings
        if not self._credential_ok(checked["initiator"], checked["credential"]):
            return (*INVALID_INITIATOR, "", [])
        wall = _now_utc()
        with state.lock:
            original = state.visible_payment(checked["transaction_id"])
            if original is None or original.source == "reversal" or receiver not in (
                original.shortcode,
                original.business_shortcode,
            ):
                return (*INVALID_ORIGINAL, "", [])
            if original.reversed_by is not None:
                return (*ALREADY_REVERSED, "", [])
            if amount != original.amount:
                return (*INVALID_ORIGINAL, "", [])
            receipt = state.receipt(wall)
            original.reversed_by = receipt
            state.record_payment(
                Payment(
                    receipt=receipt,
                    source="reversal",
                    shortcode=original.shortcode,
                    business_shortcode=original.business_shortcode,
                    transaction_type=original.transaction_type,
                    amount=original.amount,
                    msisdn=original.msisdn,
                    bill_ref=original.bill_ref,
                    first_name=original.first_name,
                    middle_name=original.middle_name,
                    last_name=original.last_name,
                    at=wall,
                    visible_at=_monotonic(),
                    reverses=original.receipt,
                )
            )
            state.balances[original.shortcode] = state.balances.get(original.shortcode, 0) - original.amount
            balance = state.balances[original.shortcode]
        items = [
            ("DebitAccountBalance", f"Utility Account|KES|{balance:.2f}|{balance:.2f}|0.00|0.00"),
            ("Amount", float(original.amount)),
            ("TransCompletedTime", int(_kenya_stamp(wall))),
            ("OriginalTransactionID", original.receipt),
            ("Charge", 0.0),
            ("CreditPartyPublicName", f"{original.msisdn} - {original.payer_name}"),
            ("DebitPartyPublicName", f"{original.shortcode} - {settings.organization_name}"),
        ]
        return 0, PROCESSED_DESC, receipt, items

    # -- Transaction Status -------------------------------------------------------------------------------------
    def status(self, body: dict[str, Any]) -> _Response:
        checked = self._common(body, "TransactionStatusQuery", by_originator=True)
        party_a = check_digits(body, "PartyA")
        kind = text_of(body.get("IdentifierType"))
        if kind not in ("1", "2", "4"):
            raise _invalid("IdentifierType")
        return self._accept("transaction_status", checked, lambda: self._status(checked, party_a, kind))

    def _status(self, checked: Mapping[str, Any], party_a: str, kind: str) -> tuple[Any, str, str, list]:
        state = self.state
        settings = state.settings
        if not self._credential_ok(checked["initiator"], checked["credential"]):
            return (*INVALID_INITIATOR, "", [])
        with state.lock:
            # By receipt; or, without one, by the request that made the payment (OriginalConversationID).
            if checked["transaction_id"]:
                payment = state.visible_payment(checked["transaction_id"])
            else:
                payment = state.payment_of_request(checked["original_conversation_id"])
            if payment is None or (
                checked["original_conversation_id"]
                and payment.originator_conversation_id != checked["original_conversation_id"]
            ):
                return (*INVALID_ORIGINAL, "", [])
            if kind == "1":
                parties: tuple[str, ...] = () if payment.source == "b2b" else (payment.msisdn,)
            else:  # the shortcode paid; for a B2B payment the paying till too
                parties = (payment.shortcode, payment.business_shortcode)
                if payment.source == "b2b":
                    parties += (payment.msisdn,)
            if party_a not in parties:
                return (*INVALID_ORIGINAL, "", [])
            reversed_ = payment.reversed_by is not None
        customer = f"{payment.msisdn} - {payment.payer_name}"
        business = f"{payment.shortcode} - {settings.organization_name}"
        if payment.source == "reversal":
            debit, credit, reason = business, customer, "Reversal"
        elif payment.source == "b2b":
            debit, credit, reason = customer, business, "Business Pay Bill"
        else:
            debit, credit = customer, business
            reason = "Pay Bill Online" if payment.transaction_type == PAYBILL else "Pay Merchant"
        stamp = int(_kenya_stamp(payment.at))
        items = [
            ("DebitPartyName", debit),
            ("CreditPartyName", credit),
            ("OriginatorConversationID", payment.originator_conversation_id or state.originator_conversation_id()),
            ("InitiatedTime", stamp),
            ("CreditPartyCharges", ""),
            ("DebitAccountType", _DEBIT_ACCOUNT.get(payment.source, "MMF Account")),
            ("TransactionReason", ""),
            ("ReasonType", reason),
            ("TransactionStatus", "Reversed" if reversed_ else "Completed"),
            ("FinalisedTime", stamp),
            ("Amount", float(payment.amount)),
            ("ConversationID", state.conversation_id(payment.at)),
            ("ReceiptNo", payment.receipt),
        ]
        return 0, PROCESSED_DESC, payment.receipt[:3] + "0000000", items

    # -- the answer, now and later ------------------------------------------------------------------------------
    def _accept(self, api: str, checked: Mapping[str, Any], process: Any) -> _Response:
        state = self.state
        wall = _now_utc()
        originator = state.originator_conversation_id()
        conversation = state.conversation_id(wall)
        outcome = self._outcome(checked)
        record: dict[str, Any] = {
            "api": api,
            "OriginatorConversationID": originator,
            "ConversationID": conversation,
            "TransactionID": checked["transaction_id"],
            "OriginalConversationID": checked.get("original_conversation_id", ""),
            "outcome": outcome or "result",
        }
        due = _monotonic() + state.settings.result_delay
        queue = _QUEUE_URL.format("reversalresults" if api == "reversal" else "transactionstatusresults")
        reference = {"ReferenceItem": {"Key": "QueueTimeoutURL", "Value": queue}}
        if outcome == QUEUE_TIMEOUT:
            # Never processed: only the timeout body, to QueueTimeOutURL.
            body = {
                "Result": {
                    "ResultType": 1,
                    "ResultCode": 1,
                    "ResultDesc": TIMEOUT_DESC,
                    "OriginatorConversationID": originator,
                    "ConversationID": conversation,
                    "TransactionID": "",
                    "ReferenceData": reference,
                }
            }
            record["ResultCode"] = None
            self._plan(INITIATOR_TIMEOUT, checked["timeout_url"], body, conversation, due)
        else:
            code, desc, transaction_id, items = process()
            result: dict[str, Any] = {
                "ResultType": 0,
                "ResultCode": code,
                "ResultDesc": desc,
                "OriginatorConversationID": originator,
                "ConversationID": conversation,
                "TransactionID": transaction_id,
            }
            if items:
                result["ResultParameters"] = _pairs(items)
            result["ReferenceData"] = reference
            record["ResultCode"] = str(code)
            if outcome != NO_RESULT:
                self._plan(INITIATOR_RESULT, checked["result_url"], {"Result": result}, conversation, due)
        with state.cond:
            state.initiator_requests.append(record)
            state.cond.notify_all()
        return _Response(
            200,
            {
                "OriginatorConversationID": originator,
                "ConversationID": conversation,
                "ResponseCode": "0",
                "ResponseDescription": ACCEPTED_DESC,
            },
        )

    def _plan(self, kind: str, url: str, body: dict[str, Any], conversation: str, due: float) -> None:
        self.deliverer.plan(
            CallbackDelivery(
                checkout_request_id="",
                merchant_request_id="",
                url=url,
                body=body,
                copy_number=1,
                due_at=due,
                kind=kind,
                reference=conversation,
            )
        )

