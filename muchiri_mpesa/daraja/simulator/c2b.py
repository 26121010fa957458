"""C2B: ``/mpesa/c2b/v1|v2/registerurl``, ``/mpesa/c2b/v1/simulate`` and the POSTs to the registered URLs.

Registration: the app's API product decides the version (``c2b_versions``; the other one answers HTTP 401
401.003.01 "no apiproduct match"); ``c2b_register_once`` plays production, where a second registration answers
"500.003.1001 Urls are already registered"; a URL with a banned word (M-Pesa in any case, Safaricom, exe, exec,
cmd, sql, query) or of a tunnel / URL tester is refused with 400.002.02 "Bad Request - Invalid <Field>".

A payment (``/simulate``, or ``sim.c2b_pay`` which is the same as a phone paying the paybill) POSTs the
validation body to the ValidationURL when ``c2b_external_validation`` is on, waits ``c2b_validation_timeout``
(about 8 s at Daraja) for ``{"ResultCode": "0"}`` or a C2B000xx rejection, and lets the registered
ResponseType decide when no usable answer comes; an accepted payment enters the ledger (Pull Transactions,
Transaction Status, Reversal) and its confirmation goes to the ConfirmationURL, the MSISDN as SHA-256 hex.

Magic payer numbers (C2B_MAGIC_NUMBERS): 254700000101 the confirmation is lost (the money is in Pull only),
254700000102 the confirmation is sent twice, 254700000103 the validation answer is too slow (ResponseType
decides, whatever the ValidationURL answered).
"""

from __future__ import annotations

import copy
import hashlib
import json
from datetime import datetime
from typing import Any

from .delivery import Deliverer
from .state import (
    C2B_CONFIRMATION,
    C2B_VALIDATION,
    PAYBILL,
    TILL,
    CallbackDelivery,
    Payment,
    SimState,
    _invalid,
    _kenya_stamp,
    _monotonic,
    _now_utc,
    _Refusal,
    _Response,
    check_digits,
    check_msisdn,
    check_url,
    check_whole_amount,
    optional_text,
)

C2B_MAX_AMOUNT = 250_000  # What one phone payment may move.
C2B_REGISTER_V1_PATH = "/mpesa/c2b/v1/registerurl"
C2B_REGISTER_V2_PATH = "/mpesa/c2b/v2/registerurl"
C2B_SIMULATE_PATH = "/mpesa/c2b/v1/simulate"

REGISTERED_DESC = "Success"
SIMULATE_DESC = "Accept the service request successfully."
# Safaricom's errorCodes and wording, written out on purpose (see "Daraja's refusals" in state.py).
NO_PRODUCT = (
    401, "401.003.01", "Error Occurred - Invalid Access Token - Invalid API call as no apiproduct match found"
)
ALREADY_REGISTERED = (500, "500.003.1001", "Urls are already registered")
BANNED_URL_WORDS = ("m-pesa", "mpesa", "safaricom", "exec", "exe", "cmd", "sql", "query")
BANNED_URL_HOSTS = ("ngrok", "loca.lt", "localtunnel", "serveo", "localhost.run", "trycloudflare", "webhook.site",
                    "requestbin", "pipedream", "mockbin", "beeceptor", "requestcatcher", "hookbin")

LOST_CONFIRMATION = "254700000101"
DUPLICATE_CONFIRMATION = "254700000102"
SLOW_VALIDATION = "254700000103"
C2B_MAGIC_NUMBERS: dict[str, str] = {
    LOST_CONFIRMATION: "the payment goes through (it is in Pull Transactions) but the confirmation is never sent",
    DUPLICATE_CONFIRMATION: "the confirmation is sent twice (duplicate_callback_gap apart)",
    SLOW_VALIDATION: "the ValidationURL's answer comes too late: the registered ResponseType decides",
}
MSISDN_FORMATS = ("hash", "masked", "plain")


def _msisdn_as_sent(msisdn: str, form: str) -> str:
    if form == "plain":
        return msisdn
    if form == "masked":
        return msisdn[:6] + "***" + msisdn[-3:]  # like "254708***149"
    return hashlib.sha256(msisdn.encode("ascii")).hexdigest()


class C2BApi:
    """URL registration, simulated payments, validation and confirmation."""

    def __init__(self, state: SimState, deliverer: Deliverer) -> None:
        self.state = state
        self.deliverer = deliverer

    # -- register URL -------------------------------------------------------------------------------------------
    def register_v1(self, body: dict[str, Any]) -> _Response:
        return self._register("v1", body)

    def register_v2(self, body: dict[str, Any]) -> _Response:
        return self._register("v2", body)

    def _register(self, version: str, body: dict[str, Any]) -> _Response:
        state = self.state
        if version not in state.settings.c2b_versions:
            raise _Refusal(*NO_PRODUCT)
        shortcode = check_digits(body, "ShortCode")
        if not state.owns_shortcode(shortcode):
            raise _invalid("ShortCode")
        response_type = body.get("ResponseType")
        if response_type not in ("Completed", "Cancelled"):
            raise _invalid("ResponseType")
        urls = {name: self._check_registered_url(body, name) for name in ("ConfirmationURL", "ValidationURL")}
        with state.lock:
            if state.settings.c2b_register_once and shortcode in state.c2b_urls:
                raise _Refusal(*ALREADY_REGISTERED)
            state.c2b_urls[shortcode] = {"ResponseType": str(response_type), "version": version, **urls}
        return _Response(
            200,
            {
                "OriginatorCoversationID": state.originator_conversation_id(),  # Safaricom's spelling
                "ResponseCode": "0",
                "ResponseDescription": REGISTERED_DESC,
            },
        )

    @staticmethod
    def _check_registered_url(body: dict[str, Any], name: str) -> str:
        url = check_url(body, name, BANNED_URL_WORDS)
        host = (url.split("//", 1)[-1].split("/", 1)[0]).casefold()
        if any(banned in host for banned in BANNED_URL_HOSTS):
            raise _invalid(name)
        return url

    # -- simulate -----------------------------------------------------------------------------------------------
    def simulate(self, body: dict[str, Any]) -> _Response:
        shortcode = check_digits(body, "ShortCode")
        command = body.get("CommandID")
        if command not in (PAYBILL, TILL):
            raise _invalid("CommandID")
        settings = self.state.settings
        expected = settings.shortcode if command == PAYBILL else settings.till_number
        if shortcode != expected:
            raise _invalid("ShortCode")
        amount = check_whole_amount(body)
        if amount > C2B_MAX_AMOUNT:
            raise _invalid("Amount")
        msisdn = check_msisdn(body, "Msisdn")
        bill_ref = optional_text(body, "BillRefNumber", 20)
        if command == PAYBILL and not bill_ref.strip():
            raise _invalid("BillRefNumber")
        self.pay(amount, msisdn, bill_ref, command_id=str(command))
        return _Response(
            200,
            {
                "OriginatorCoversationID": self.state.originator_conversation_id(),
                "ResponseCode": "0",
                "ResponseDescription": SIMULATE_DESC,
            },
        )

    def pay(
        self,
        amount: int,
        msisdn: str,
        bill_ref: str = "",
        *,
        command_id: str = PAYBILL,
        first_name: str = "John",
        middle_name: str = "",
        last_name: str = "Doe",
    ) -> str:
        """A customer pays from the phone: validation (if on), then the ledger and the confirmation.  TransID."""
        state = self.state
        settings = state.settings
        till = command_id == TILL
        if till and not settings.till_number:
            raise ValueError("this simulator has no till number")
        shortcode = str(settings.till_number) if till else settings.shortcode
        wall = _now_utc()
        trans_id = state.receipt(wall)
        attempt = {
            "TransID": trans_id,
            "shortcode": shortcode,
            "amount": int(amount),
            "msisdn": msisdn,
            "bill_ref": "" if till else bill_ref,
            "state": "pending",  # -> "completed" | "cancelled"
            "validation": None,  # the ResultCode the ValidationURL answered, when it did
            "decided_by": None,  # "validation" | "response_type" | "no_validation"
        }
        with state.cond:
            state.c2b_attempts[trans_id] = attempt
            urls = copy.deepcopy(state.c2b_urls.get(shortcode))
            state.cond.notify_all()
        body = {
            "TransactionType": "Buy Goods" if till else "Pay Bill",
            "TransID": trans_id,
            "TransTime": _kenya_stamp(wall),
            "TransAmount": f"{int(amount)}.00",
            "BusinessShortCode": shortcode,
            "BillRefNumber": attempt["bill_ref"],
            "InvoiceNumber": "",
            "OrgAccountBalance": "",
            "ThirdPartyTransID": "",
            "MSISDN": _msisdn_as_sent(msisdn, settings.c2b_msisdn_format),
            "FirstName": first_name,
            "MiddleName": middle_name,
            "LastName": last_name,
        }
        names = (first_name, middle_name, last_name)
        due = _monotonic() + settings.c2b_delay
        if urls is not None and settings.c2b_external_validation:
            validation = CallbackDelivery(
                checkout_request_id="",
                merchant_request_id="",
                url=urls["ValidationURL"],
                body=body,
                copy_number=1,
                due_at=due,
                kind=C2B_VALIDATION,
                reference=trans_id,
                timeout=settings.c2b_validation_timeout,
                retries=False,  # Daraja asks once, then ResponseType decides
            )
            self.deliverer.plan(validation, lambda d: self._validated(d, attempt, body, urls, wall, names))
        else:
            decided = "no_validation"
            self.deliverer.schedule(due, lambda: self._complete(attempt, body, urls, wall, names, decided))
        return trans_id

    # -- validation, then confirmation --------------------------------------------------------------------------
    def _validated(
        self, delivery: CallbackDelivery, attempt: dict[str, Any], body: dict[str, Any],
        urls: dict[str, str], wall: datetime, names: tuple[str, str, str],
    ) -> None:
        code = self._answered_code(delivery)
        with self.state.lock:
            attempt["validation"] = code
        if code is None or attempt["msisdn"] == SLOW_VALIDATION:
            if urls["ResponseType"] == "Completed":
                self._complete(attempt, body, urls, wall, names, "response_type")
            else:
                self._cancel(attempt, "response_type")
        elif code == "0":
            self._complete(attempt, body, urls, wall, names, "validation")
        else:
            self._cancel(attempt, "validation")

    @staticmethod
    def _answered_code(delivery: CallbackDelivery) -> str | None:
        """"0" or a C2B000xx code the ValidationURL answered in time with HTTP 2xx; None otherwise."""
        if not delivery.delivered:
            return None
        try:
            answer = json.loads(delivery.response_text)
        except ValueError:
            return None
        code = answer.get("ResultCode") if isinstance(answer, dict) else None
        text = str(code).strip() if isinstance(code, (str, int)) and not isinstance(code, bool) else ""
        if text == "0" or (text.startswith("C2B000") and len(text) == 8):
            return text
        return None

    def _cancel(self, attempt: dict[str, Any], decided_by: str) -> None:
        with self.state.cond:
            attempt["state"] = "cancelled"
            attempt["decided_by"] = decided_by
            self.state.cond.notify_all()

    def _complete(
        self, attempt: dict[str, Any], body: dict[str, Any], urls: dict[str, str] | None,
        wall: datetime, names: tuple[str, str, str], decided_by: str,
    ) -> None:
        state = self.state
        settings = state.settings
        till = body["TransactionType"] == "Buy Goods"
        with state.cond:
            if state.stopping:
                return
            state.record_payment(
                Payment(
                    receipt=attempt["TransID"],
                    source="c2b",
                    shortcode=attempt["shortcode"],
                    business_shortcode=settings.shortcode,
                    transaction_type=TILL if till else PAYBILL,
                    amount=attempt["amount"],
                    msisdn=attempt["msisdn"],
                    bill_ref=attempt["bill_ref"],
                    first_name=names[0],
                    middle_name=names[1],
                    last_name=names[2],
                    at=wall,
                    visible_at=_monotonic(),
                )
            )
            attempt["state"] = "completed"
            attempt["decided_by"] = decided_by
            balance = state.balances.get(attempt["shortcode"], 0)
            state.cond.notify_all()
        if urls is None or attempt["msisdn"] == LOST_CONFIRMATION:
            return
        confirmation = {**body, "OrgAccountBalance": f"{balance}.00"}
        copies = 2 if attempt["msisdn"] == DUPLICATE_CONFIRMATION else 1
        now = _monotonic()
        for number in range(1, copies + 1):
            self.deliverer.plan(
                CallbackDelivery(
                    checkout_request_id="",
                    merchant_request_id="",
                    url=urls["ConfirmationURL"],
                    body=copy.deepcopy(confirmation),
                    copy_number=number,
                    due_at=now + (number - 1) * settings.duplicate_callback_gap,
                    kind=C2B_CONFIRMATION,
                    reference=attempt["TransID"],
                )
            )

    def wait(self, trans_id: str, timeout: float) -> dict[str, Any]:
        """The attempt once it is completed or cancelled; TimeoutError otherwise."""
        deadline = _monotonic() + timeout
        with self.state.cond:
            while True:
                attempt = self.state.c2b_attempts[trans_id]
                if attempt["state"] != "pending":
                    return copy.deepcopy(attempt)
                remaining = deadline - _monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"the C2B payment {trans_id} is still pending after {timeout} s")
                self.state.cond.wait(remaining)

