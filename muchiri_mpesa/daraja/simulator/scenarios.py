"""The simulator's outcomes: what the customer "does" is chosen by the phone number pushed to.

Like card test numbers, a few documented MSISDNs play Daraja's failure modes; every other valid number pays.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# Safaricom's own sandbox test MSISDN: pays, like every number not in MAGIC_NUMBERS.
SANDBOX_TEST_MSISDN = "254708374149"

# Daraja's per-transaction ceiling: a push above it is accepted, then declined with ResultCode 3.
DARAJA_MAX_AMOUNT = 250_000

SUCCESS_DESC = "The service request is processed successfully."
LOCKED_SUBSCRIBER_MESSAGE = (
    "Unable to lock subscriber, a transaction is already in process for the current subscriber"
)


class CallbackMode(str, enum.Enum):
    """When (and how often) the stkCallback is posted to the CallBackURL."""

    NORMAL = "normal"  # once, as soon as the result is known
    NEVER = "never"  # lost: only STK Push Query knows the result
    TWICE = "twice"  # the same body posted twice (duplicate delivery)
    LATE = "late"  # long after the query already answers the final result
    BEFORE_RESPONSE = "before_response"  # delivered and answered before the push's HTTP response is written


class ResultTiming(str, enum.Enum):
    """When the customer's answer (hence the final result) is known."""

    CALLBACK_DELAY = "callback_delay"
    PROMPT_TIMEOUT = "prompt_timeout"
    IMMEDIATE = "immediate"


@dataclass(frozen=True)
class Scenario:
    """What happens to a push sent to `phone`."""

    phone: str | None
    summary: str
    result_code: int | None  # None: the push itself is refused
    result_desc: str
    callback: CallbackMode = CallbackMode.NORMAL
    timing: ResultTiming = ResultTiming.CALLBACK_DELAY

    @property
    def refuses_push(self) -> bool:
        return self.result_code is None

    @property
    def is_success(self) -> bool:
        return self.result_code == 0


DEFAULT_SCENARIO = Scenario(
    phone=None,
    summary="success (ResultCode 0) after the callback delay",
    result_code=0,
    result_desc=SUCCESS_DESC,
)

# Safaricom's ResultCodes and wording, written out on purpose (see "Daraja's refusals" in state.py).
MAGIC_NUMBERS: dict[str, Scenario] = {
    s.phone: s  # type: ignore[misc]
    for s in (
        Scenario("254700000001", "1032 cancelled by the user", 1032, "Request cancelled by user"),
        Scenario(
            "254700000002",
            "1037 no answer from the phone, after the prompt timeout",
            1037,
            "DS timeout user cannot be reached",
            timing=ResultTiming.PROMPT_TIMEOUT,
        ),
        Scenario("254700000003", "1 insufficient funds", 1, "The balance is insufficient for the transaction."),
        Scenario("254700000004", "2001 wrong PIN", 2001, "The initiator information is invalid."),
        Scenario(
            "254700000005",
            "success, but the callback is never sent: only the query knows",
            0,
            SUCCESS_DESC,
            callback=CallbackMode.NEVER,
        ),
        Scenario("254700000006", "success, the callback is sent twice", 0, SUCCESS_DESC, callback=CallbackMode.TWICE),
        Scenario(
            "254700000007",
            "success, the callback comes long after the query already answers",
            0,
            SUCCESS_DESC,
            callback=CallbackMode.LATE,
        ),
        Scenario(
            "254700000008",
            "success, the callback is delivered before the push's HTTP response is returned",
            0,
            SUCCESS_DESC,
            callback=CallbackMode.BEFORE_RESPONSE,
            timing=ResultTiming.IMMEDIATE,
        ),
        Scenario(
            "254700000009",
            'the push is refused: HTTP 500, 500.001.1001 "Unable to lock subscriber, ..."',
            None,
            LOCKED_SUBSCRIBER_MESSAGE,
        ),
    )
}

# Amount above DARAJA_MAX_AMOUNT: accepted by the push (HTTP 200), declined in the callback / query.
ABOVE_MAXIMUM_SCENARIO = Scenario(
    phone=None,
    summary=f"any phone, Amount above {DARAJA_MAX_AMOUNT:,}: ResultCode 3 after the callback delay",
    result_code=3,
    result_desc="Declined due to limit rule: greater than the maximum transaction amount.",
)


def scenario_for(phone: str, amount: int = 1) -> Scenario:
    """The scenario of a push to `phone` (an MSISDN "2547XXXXXXXX") for `amount` shillings."""
    scenario = MAGIC_NUMBERS.get(phone, DEFAULT_SCENARIO)
    if amount > DARAJA_MAX_AMOUNT and not scenario.refuses_push:
        return ABOVE_MAXIMUM_SCENARIO
    return scenario


def magic_numbers_table() -> str:
    """The magic numbers as a Markdown table (README, CLI banner)."""
    rows = [
        "| PhoneNumber | outcome |",
        "|---|---|",
        f"| {SANDBOX_TEST_MSISDN} and any number not below | {DEFAULT_SCENARIO.summary} |",
    ]
    rows += [f"| {phone} | {s.summary} |" for phone, s in MAGIC_NUMBERS.items()]
    rows.append(f"| (any) | {ABOVE_MAXIMUM_SCENARIO.summary.removeprefix('any phone, ')} |")
    return "\n".join(rows)
