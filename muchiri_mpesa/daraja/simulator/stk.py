"""M-Pesa Express: ``/mpesa/stkpush/v1/processrequest``, ``/mpesa/stkpushquery/v1/query`` and the stkCallback.

What Daraja checks is checked here (shortcode, Timestamp, the Password made of ShortCode + Passkey + Timestamp,
field presence, types and lengths); the customer's answer is chosen by the phone number (``scenarios``), and
a successful payment enters the ledger (Pull Transactions, Transaction Status, Reversal) once it is answered.
"""

from __future__ import annotations

import base64
import copy
import hmac
import re
import urllib.parse
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from .delivery import Deliverer
from .scenarios import LOCKED_SUBSCRIBER_MESSAGE, CallbackMode, ResultTiming, scenario_for
from .state import (
    _WRONG_CREDENTIALS,
    KENYA_TZ,
    PAYBILL,
    TILL,
    CallbackDelivery,
    Payment,
    SimState,
    StkTransaction,
    _invalid,
    _kenya_stamp,
    _monotonic,
    _now_utc,
    _Refusal,
    _Response,
    check_msisdn,
    check_text,
    check_whole_amount,
    text_of,
)
from .statement import FAILED_STK_CODES

STK_PUSH_PATH = "/mpesa/stkpush/v1/processrequest"
STK_QUERY_PATH = "/mpesa/stkpushquery/v1/query"

PUSH_ACCEPTED_DESC = "Success. Request accepted for processing"
# Safaricom's own typo ("successsfully") is part of the wire format.
QUERY_ACCEPTED_DESC = "The service request has been accepted successsfully"
BEING_PROCESSED_MESSAGE = "The transaction is being processed"


class StkApi:
    """STK Push, STK Push Query and the callbacks of the pushes."""

    def __init__(self, state: SimState, deliverer: Deliverer) -> None:
        self.state = state
        self.deliverer = deliverer

    # -- field checks -------------------------------------------------------------------------------------------
    def _check_shortcode(self, body: Mapping[str, Any]) -> str:
        text = text_of(body.get("BusinessShortCode"))
        if not text.isdigit() or text != self.state.settings.shortcode:
            raise _invalid("BusinessShortCode")
        return text

    @staticmethod
    def _check_timestamp(body: Mapping[str, Any]) -> str:
        value = body.get("Timestamp")
        text = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
        if not re.fullmatch(r"\d{14}", text):
            raise _invalid("Timestamp")
        try:
            datetime.strptime(text, "%Y%m%d%H%M%S")
        except ValueError:
            raise _invalid("Timestamp") from None
        return text

    def _check_password(self, body: Mapping[str, Any], shortcode: str, timestamp: str) -> None:
        password = body.get("Password")
        if not isinstance(password, str) or not password.strip():
            raise _invalid("Password")
        passkey = self.state.settings.passkey
        expected = base64.b64encode(f"{shortcode}{passkey}{timestamp}".encode()).decode("ascii")
        if not hmac.compare_digest(password.strip().encode(), expected.encode()):
            raise _Refusal(*_WRONG_CREDENTIALS)

    def _check_callback_url(self, body: Mapping[str, Any]) -> str:
        value = body.get("CallBackURL")
        if not isinstance(value, str) or value != value.strip() or any(c.isspace() for c in value):
            raise _invalid("CallBackURL")
        parts = urllib.parse.urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _invalid("CallBackURL")
        if self.state.settings.reject_mpesa_in_callback_url and re.search(
            r"m-?pesa|safaricom", value, re.IGNORECASE
        ):
            raise _invalid("CallBackURL")
        return value

    # -- STK Push -----------------------------------------------------------------------------------------------
    def push(self, body: dict[str, Any]) -> _Response:
        state = self.state
        settings = state.settings
        shortcode = self._check_shortcode(body)
        timestamp = self._check_timestamp(body)
        password = body.get("Password")
        if not isinstance(password, str) or not password.strip():
            raise _invalid("Password")
        transaction_type = body.get("TransactionType")
        if transaction_type not in (PAYBILL, TILL):
            raise _invalid("TransactionType")
        amount = check_whole_amount(body)
        check_msisdn(body, "PartyA")
        party_b = text_of(body.get("PartyB"))
        expected_party_b = shortcode if transaction_type == PAYBILL else settings.till_number
        if not party_b.isdigit() or party_b != expected_party_b:
            raise _invalid("PartyB")
        phone = check_msisdn(body, "PhoneNumber")
        callback_url = self._check_callback_url(body)
        account_reference = check_text(body, "AccountReference", 12)
        transaction_desc = check_text(body, "TransactionDesc", 13)
        self._check_password(body, shortcode, timestamp)

        scenario = scenario_for(phone, amount)
        if scenario.refuses_push:
            raise _Refusal(500, "500.001.1001", LOCKED_SUBSCRIBER_MESSAGE)

        now = _monotonic()
        wall = _now_utc()
        with state.lock:
            if state.stopping:
                raise _Refusal(503, "503.001.01", "Service Unavailable")
            latest = state.transactions.get(state.latest_by_phone.get(phone, ""))
            if latest is not None and not latest.is_final(now):
                raise _Refusal(500, "500.001.1001", LOCKED_SUBSCRIBER_MESSAGE)
            if scenario.timing is ResultTiming.IMMEDIATE:
                wait = 0.0
            elif scenario.timing is ResultTiming.PROMPT_TIMEOUT:
                wait = settings.prompt_timeout
            else:
                wait = settings.callback_delay
            result_moment = wall + timedelta(seconds=wait)
            checkout_id = self._checkout_request_id(wall, phone)
            merchant_id = (
                f"{state.random.randint(1000, 99999)}-{state.random.randint(10_000_000, 99_999_999)}-"
                f"{next(state.merchant_seq)}"
            )
            receipt = state.receipt(result_moment) if scenario.is_success else None
            # A refusal the customer met after answering (no money, the wrong PIN): M-Pesa gives it a receipt too,
            # listed as Failed on the organisation's statement (statement.py).
            failed_receipt = (
                state.receipt(result_moment)
                if scenario.result_code in FAILED_STK_CODES and party_b == settings.shortcode
                else None
            )
            tx = StkTransaction(
                checkout_request_id=checkout_id,
                merchant_request_id=merchant_id,
                phone=phone,
                amount=amount,
                business_shortcode=shortcode,
                transaction_type=str(transaction_type),
                party_b=party_b,
                account_reference=account_reference,
                transaction_desc=transaction_desc,
                callback_url=callback_url,
                payload=copy.deepcopy(body),
                scenario=scenario,
                result_code=int(scenario.result_code or 0),
                result_desc=scenario.result_desc,
                accepted_at=now,
                result_at=now + wait,
                transaction_date=int(_kenya_stamp(result_moment)),
                receipt=receipt,
                callback_body=None,
            )
            tx.callback_body = self._callback_body(tx)
            state.transactions[checkout_id] = tx
            state.order.append(checkout_id)
            state.latest_by_phone[phone] = checkout_id
            if receipt is not None:
                # The money is in the shortcode once the customer answered, callback or not (Pull, Status).
                state.record_payment(
                    Payment(
                        receipt=receipt,
                        source="stk",
                        shortcode=party_b,
                        business_shortcode=shortcode,
                        transaction_type=str(transaction_type),
                        amount=amount,
                        msisdn=phone,
                        bill_ref=account_reference,
                        first_name="John",
                        middle_name="",
                        last_name="Doe",
                        at=result_moment,
                        visible_at=now + wait,
                    )
                )
            if failed_receipt is not None:
                state.record_failure(
                    Payment(
                        receipt=failed_receipt,
                        source="stk",
                        shortcode=party_b,
                        business_shortcode=shortcode,
                        transaction_type=str(transaction_type),
                        amount=amount,
                        msisdn=phone,
                        bill_ref=account_reference,
                        first_name="John",
                        middle_name="",
                        last_name="Doe",
                        at=result_moment,
                        visible_at=now + wait,
                    )
                )
            deliveries = self._plan_callbacks(tx, now + wait)
            state.cond.notify_all()

        for delivery in deliveries:
            if scenario.callback is CallbackMode.BEFORE_RESPONSE:
                # Delivered (and answered) by this very request thread before the push's answer is written.
                with state.lock:
                    state.deliveries.append(delivery)
                    delivery.state = "sending"
                self.deliverer.attempt(delivery, 1)
            else:
                self.deliverer.plan(delivery)
        return _Response(
            200,
            {
                "MerchantRequestID": merchant_id,
                "CheckoutRequestID": checkout_id,
                "ResponseCode": "0",
                "ResponseDescription": PUSH_ACCEPTED_DESC,
                "CustomerMessage": PUSH_ACCEPTED_DESC,
            },
        )

    def _checkout_request_id(self, wall: datetime, phone: str) -> str:
        # Like Daraja's "ws_CO_23052022122137653708374149": ddmmyyyyHHMMSS in Kenya time, 3 digits of
        # milliseconds, then the phone's last 9 digits.  A collision (same phone, same millisecond) bumps
        # the milliseconds.
        local = wall.astimezone(KENYA_TZ)
        millis = local.microsecond // 1000
        while True:
            candidate = f"ws_CO_{local.strftime('%d%m%Y%H%M%S')}{millis % 1000:03d}{phone[-9:]}"
            if candidate not in self.state.transactions:
                return candidate
            millis += 1

    @staticmethod
    def _callback_body(tx: StkTransaction) -> dict[str, Any]:
        callback: dict[str, Any] = {
            "MerchantRequestID": tx.merchant_request_id,
            "CheckoutRequestID": tx.checkout_request_id,
            "ResultCode": tx.result_code,
            "ResultDesc": tx.result_desc,
        }
        if tx.result_code == 0:
            callback["CallbackMetadata"] = {
                "Item": [
                    {"Name": "Amount", "Value": float(tx.amount)},
                    {"Name": "MpesaReceiptNumber", "Value": tx.receipt},
                    {"Name": "Balance"},
                    {"Name": "TransactionDate", "Value": tx.transaction_date},
                    {"Name": "PhoneNumber", "Value": int(tx.phone)},
                ]
            }
        return {"Body": {"stkCallback": callback}}

    def _plan_callbacks(self, tx: StkTransaction, result_at: float) -> list[CallbackDelivery]:
        settings = self.state.settings
        mode = tx.scenario.callback
        if mode is CallbackMode.NEVER:
            return []
        due = [result_at]
        if mode is CallbackMode.LATE:
            due = [max(result_at, tx.accepted_at + settings.late_callback_delay)]
        elif mode is CallbackMode.TWICE:
            due = [result_at, result_at + settings.duplicate_callback_gap]
        return [
            CallbackDelivery(
                checkout_request_id=tx.checkout_request_id,
                merchant_request_id=tx.merchant_request_id,
                url=tx.callback_url,
                body=copy.deepcopy(tx.callback_body or {}),
                copy_number=number,
                due_at=at,
                reference=tx.receipt or "",
            )
            for number, at in enumerate(due, start=1)
        ]

    # -- STK Push Query -----------------------------------------------------------------------------------------
    def query(self, body: dict[str, Any]) -> _Response:
        shortcode = self._check_shortcode(body)
        timestamp = self._check_timestamp(body)
        checkout_id = body.get("CheckoutRequestID")
        if not isinstance(checkout_id, str) or not checkout_id.strip():
            raise _invalid("CheckoutRequestID")
        self._check_password(body, shortcode, timestamp)
        with self.state.lock:
            tx = self.state.transactions.get(checkout_id.strip())
            if tx is None or tx.business_shortcode != shortcode:
                raise _invalid("CheckoutRequestID")
            tx.queries += 1
            if not tx.is_final():
                raise _Refusal(500, "500.001.1001", BEING_PROCESSED_MESSAGE)
            return _Response(
                200,
                {
                    "ResponseCode": "0",
                    "ResponseDescription": QUERY_ACCEPTED_DESC,
                    "MerchantRequestID": tx.merchant_request_id,
                    "CheckoutRequestID": tx.checkout_request_id,
                    "ResultCode": tx.result_code_text,
                    "ResultDesc": tx.result_desc,
                },
            )
