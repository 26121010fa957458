"""The scripted demo: an STK Push that completes through a callback, offline.

    python3 -m muchiri_mpesa.daraja.simulator.demo [--phone 254708374149] [--amount 1]

starts the Daraja simulator in a thread (or uses a running one with --base-url), starts a local CallBackURL
listener on loopback, sends an STK Push with the DarajaClient, queries it while the "customer" decides, waits for
the callback, parses it with parse_stk_callback, confirms with a last query and prints what happened.

Exit status: 0 paid (callback received and confirmed), 1 not paid (refused, cancelled, failed), 2 no callback in
time, 3 error (network, unexpected answer).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from .. import (
    DarajaApiError,
    DarajaClient,
    DarajaCredentials,
    DarajaError,
    Outcome,
    ShortcodeConfig,
    parse_stk_callback,
    to_whole_shillings,
)
from .listener import CallbackListener
from .scenarios import MAGIC_NUMBERS, SANDBOX_TEST_MSISDN, scenario_for
from .server import (
    DEFAULT_CONSUMER_KEY,
    DEFAULT_CONSUMER_SECRET,
    DEFAULT_SHORTCODE,
    SANDBOX_PASSKEY,
    DarajaSimulator,
)

# 2 is argparse's exit code for a bad command line.
PAID, NOT_PAID, NO_CALLBACK, ERROR = 0, 1, 4, 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m muchiri_mpesa.daraja.simulator.demo",
        description="Send one STK Push to a local Daraja simulator and follow it to its callback.",
    )
    parser.add_argument("--phone", default=SANDBOX_TEST_MSISDN,
                        help="the phone to prompt; magic numbers choose the outcome (default: %(default)s)")
    parser.add_argument("--amount", default="1", help="KES, rounded up to whole shillings (default: %(default)s)")
    parser.add_argument("--reference", default="S00042-DEMO", help="the order reference (default: %(default)s)")
    parser.add_argument("--callback-delay", type=float, default=1.0,
                        help="seconds before the simulated customer answers (default: %(default)s)")
    parser.add_argument("--prompt-timeout", type=float, default=4.0,
                        help="seconds before an unanswered prompt expires (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds to wait for the callback (default: enough for every magic number;"
                             " 30 with --base-url)")
    parser.add_argument("--base-url", default=None,
                        help="use a simulator already running there instead of starting one")
    parser.add_argument("--consumer-key", default=DEFAULT_CONSUMER_KEY)
    parser.add_argument("--consumer-secret", default=DEFAULT_CONSUMER_SECRET)
    parser.add_argument("--shortcode", default=DEFAULT_SHORTCODE)
    parser.add_argument("--passkey", default=SANDBOX_PASSKEY)
    parser.add_argument("--listen-host", default="127.0.0.1",
                        help="where the demo's CallBackURL listener listens (default: %(default)s)")
    parser.add_argument("--callback-host", default=None,
                        help="the host the simulator must post to, if not --listen-host (e.g. from a container)")
    return parser


def _say(text: str = "") -> None:
    print(text, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    simulator: DarajaSimulator | None = None
    listener = CallbackListener(args.listen_host)
    try:
        if args.base_url is None:
            simulator = DarajaSimulator(
                "127.0.0.1",
                0,
                consumer_key=args.consumer_key,
                consumer_secret=args.consumer_secret,
                shortcode=args.shortcode,
                passkey=args.passkey,
                callback_delay=args.callback_delay,
                prompt_timeout=args.prompt_timeout,
                callback_retry_delays=(0.5, 1.0, 2.0),
            ).start()
            base_url = simulator.base_url
            _say(f"Daraja simulator started on {base_url}")
        else:
            base_url = args.base_url.rstrip("/")
            _say(f"Using the Daraja simulator at {base_url}")
        listener.start()
        callback_url = listener.url
        if args.callback_host:
            callback_url = callback_url.replace(f"//{args.listen_host}:", f"//{args.callback_host}:", 1)
        _say(f"Callback listener on {callback_url}")
        scenario = MAGIC_NUMBERS.get(args.phone)
        if scenario is not None:
            _say(f"Magic number {args.phone}: {scenario.summary}")
        return _run(args, base_url, callback_url, listener)
    finally:
        listener.stop()
        if simulator is not None:
            simulator.stop()


def _run(args: argparse.Namespace, base_url: str, callback_url: str, listener: CallbackListener) -> int:
    client = DarajaClient(
        DarajaCredentials(args.consumer_key, args.consumer_secret, base_url=base_url),
        ShortcodeConfig(args.shortcode, args.passkey),
        timeout=(5.0, 30.0),
    )
    timeout = args.timeout
    if timeout is None and args.base_url:
        timeout = 30.0  # A running simulator has its own delays (the CLI's prompt timeout is 10 s).
    elif timeout is None:
        timeout = max(args.prompt_timeout, 3 * args.callback_delay) + 5.0

    _say(f"\n1. STK Push: KES {args.amount} from {args.phone}, reference {args.reference}")
    started = time.monotonic()
    try:
        asked = to_whole_shillings(args.amount)
        pushed = client.stk_push(phone=args.phone, amount=args.amount, reference=args.reference,
                                 description="Demo payment", callback_url=callback_url)
    except DarajaApiError as exc:
        _say(f"   refused by Daraja: {exc}")
        _say("\nNOT PAID: the push was refused.")
        return NOT_PAID
    except DarajaError as exc:
        _say(f"   failed: {exc}")
        return ERROR
    _say(f"   accepted: ResponseCode {pushed.response_code} ({pushed.response_description})")
    _say(f"   MerchantRequestID {pushed.merchant_request_id}, CheckoutRequestID {pushed.checkout_request_id}")
    _say("   (accepted is not paid: the callback or a query says whether the customer paid)")

    try:
        _say("\n2. STK Push Query while the customer decides")
        first = client.stk_query(pushed.checkout_request_id)
        _say(f"   {first.outcome.value.upper()}: {first.result_code or '-'} {first.result_desc}")

        _say(f"\n3. Waiting up to {timeout:g} s for the callback")
        try:
            received = listener.wait_for(1, timeout=timeout)[0]
        except TimeoutError:
            final = client.stk_query(pushed.checkout_request_id)
            _say(f"   no callback after {timeout:g} s; the query says {final.outcome.value.upper()} "
                 f"({final.result_code or '-'} {final.result_desc}).")
            _say("   In the product, the reconciliation cron settles such payments from the query.")
            _say("\nNO CALLBACK")
            return NO_CALLBACK
        _say(f"   received after {received.received_at - started:.2f} s:")
        for line in json.dumps(received.json(), indent=2).splitlines():
            _say(f"   {line}")
        callback = parse_stk_callback(received.body)
        _say(f"   parsed: ResultCode {callback.result_code} ({callback.result_desc}) -> "
             f"{callback.outcome.value.upper()}: {callback.result.message}")
        if callback.is_success:
            _say(f"   amount KES {callback.amount}, receipt {callback.receipt_number}, "
                 f"paid at {callback.transaction_date}, phone {callback.phone_number}")

        _say("\n4. STK Push Query to confirm (Daraja does not sign callbacks)")
        final = client.stk_query(pushed.checkout_request_id)
        _say(f"   {final.outcome.value.upper()}: {final.result_code} {final.result_desc}")
    except DarajaError as exc:
        _say(f"   failed: {exc}")
        return ERROR

    confirmed = (
        callback.is_success
        and final.outcome is Outcome.SUCCESS
        and callback.checkout_request_id == pushed.checkout_request_id
        and callback.amount == asked
    )
    if confirmed:
        _say(f"\nSUCCESS: KES {callback.amount} paid, M-Pesa receipt {callback.receipt_number}.")
        return PAID
    expected = scenario_for(args.phone)
    _say(f"\nNOT PAID: {callback.result.message} (ResultCode {callback.result_code}; simulator scenario: "
         f"{expected.summary})")
    return NOT_PAID


if __name__ == "__main__":
    sys.exit(main())
