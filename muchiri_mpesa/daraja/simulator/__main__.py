"""``python3 -m muchiri_mpesa.daraja.simulator``: run the local Daraja until Ctrl-C / SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from .b2b import b2b_magic_tills_table
from .c2b import C2B_MAGIC_NUMBERS
from .initiator import MAGIC_REMARKS
from .persist import ENV_VAR, StateFileError
from .scenarios import magic_numbers_table
from .server import (
    DEFAULT_CALLBACK_DELAY,
    DEFAULT_CALLBACK_RETRY_DELAYS,
    DEFAULT_CALLBACK_TIMEOUT,
    DEFAULT_CONSUMER_KEY,
    DEFAULT_CONSUMER_SECRET,
    DEFAULT_HOST,
    DEFAULT_INITIATOR_NAME,
    DEFAULT_INITIATOR_PASSWORD,
    DEFAULT_PORT,
    DEFAULT_PROMPT_TIMEOUT,
    DEFAULT_PULL_PAGE_SIZE,
    DEFAULT_SHORTCODE,
    DEFAULT_TILL,
    DEFAULT_VALIDATION_TIMEOUT,
    SANDBOX_PASSKEY,
    TOKEN_LIFETIME,
    DarajaSimulator,
)


def c2b_magic_table() -> str:
    return "\n".join(f"| {number} | {summary} |" for number, summary in C2B_MAGIC_NUMBERS.items())


def _delays(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated seconds, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("delays must be >= 0")
    return values


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("seconds must be >= 0")
    return value


def _versions(text: str) -> tuple[str, ...]:
    values = tuple(part.strip() for part in text.split(",") if part.strip())
    if not values or not set(values) <= {"v1", "v2"}:
        raise argparse.ArgumentTypeError(f"expected v1, v2 or v1,v2, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m muchiri_mpesa.daraja.simulator",
        description="A local Safaricom Daraja (OAuth, STK Push, STK Push Query, callbacks) for offline tests. "
        "Outcomes are chosen by the PhoneNumber (magic numbers, printed at start).",
    )
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help="address to listen on; 0.0.0.0 in a container (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="port to listen on, 0 picks a free one (default: %(default)s)"
    )
    parser.add_argument(
        "--consumer-key", default=DEFAULT_CONSUMER_KEY, help="the app's consumer key (default: %(default)s)"
    )
    parser.add_argument(
        "--consumer-secret", default=DEFAULT_CONSUMER_SECRET, help="the app's consumer secret (default: %(default)s)"
    )
    parser.add_argument(
        "--shortcode",
        default=DEFAULT_SHORTCODE,
        help="the BusinessShortCode, paybill or store number (default: %(default)s)",
    )
    parser.add_argument(
        "--passkey",
        default=SANDBOX_PASSKEY,
        help="the Lipa Na M-Pesa Online passkey (default: Safaricom's published sandbox passkey of 174379, "
        f"{SANDBOX_PASSKEY[:8]}...)",
    )
    parser.add_argument(
        "--till",
        default=DEFAULT_TILL,
        help="the till number, PartyB of CustomerBuyGoodsOnline pushes; empty: none (default: %(default)s)",
    )
    parser.add_argument(
        "--callback-delay",
        type=_seconds,
        default=DEFAULT_CALLBACK_DELAY,
        help="seconds from an accepted push to the customer's answer and its callback (default: %(default)s)",
    )
    parser.add_argument(
        "--prompt-timeout",
        type=_seconds,
        default=DEFAULT_PROMPT_TIMEOUT,
        help="seconds before an unanswered prompt ends with 1037, 254700000002 (default: %(default)s)",
    )
    parser.add_argument(
        "--late-callback-delay",
        type=_seconds,
        default=None,
        help="seconds from the push to the late callback of 254700000007 (default: 3 x --callback-delay)",
    )
    parser.add_argument(
        "--duplicate-gap",
        type=_seconds,
        default=0.0,
        help="seconds between the two deliveries of 254700000006; 0: they race (default: %(default)s)",
    )
    parser.add_argument(
        "--callback-retry-delays",
        type=_delays,
        default=DEFAULT_CALLBACK_RETRY_DELAYS,
        help="comma-separated back-off before each retry of a callback answered 5xx or not answered "
        "(default: 1,2,4)",
    )
    parser.add_argument(
        "--callback-timeout",
        type=_seconds,
        default=DEFAULT_CALLBACK_TIMEOUT,
        help="seconds to wait for the CallBackURL's answer (default: %(default)s)",
    )
    parser.add_argument(
        "--token-lifetime",
        type=int,
        default=TOKEN_LIFETIME,
        help="seconds a token lives, sent as expires_in (default: %(default)s)",
    )
    parser.add_argument(
        "--keep-previous-tokens",
        action="store_true",
        help="do not revoke a consumer key's previous token when a new one is issued",
    )
    parser.add_argument(
        "--reject-mpesa-urls",
        action="store_true",
        help='refuse CallBackURLs containing "mpesa", "m-pesa" or "safaricom", as integrators report Daraja does',
    )
    parser.add_argument(
        "--initiator-name",
        default=DEFAULT_INITIATOR_NAME,
        help="the Initiator of Reversal and Transaction Status requests (default: %(default)s, Safaricom's "
        "sandbox initiator)",
    )
    parser.add_argument(
        "--initiator-password",
        default=DEFAULT_INITIATOR_PASSWORD,
        help="the initiator password the SecurityCredential must carry, encrypted with the certificate printed at "
        "start and served at GET /__sim__/certificate (default: %(default)s, Safaricom's sandbox one)",
    )
    parser.add_argument(
        "--result-delay",
        type=_seconds,
        default=None,
        help="seconds from an accepted Reversal / Transaction Status to its Result (default: --callback-delay)",
    )
    parser.add_argument(
        "--c2b-versions",
        type=_versions,
        default=("v1", "v2"),
        help="the C2B API product(s) of the app, comma-separated; registerurl of another version answers "
        "401.003.01 (default: v1,v2)",
    )
    parser.add_argument(
        "--c2b-register-once",
        action="store_true",
        help='production-like: a second C2B registration answers "500.003.1001 Urls are already registered"',
    )
    parser.add_argument(
        "--c2b-external-validation",
        action="store_true",
        help="ask the registered ValidationURL before each C2B payment (Safaricom switches it on per shortcode)",
    )
    parser.add_argument(
        "--validation-timeout",
        type=_seconds,
        default=DEFAULT_VALIDATION_TIMEOUT,
        help="seconds to wait for the ValidationURL before the registered ResponseType decides "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--c2b-msisdn-format",
        choices=("hash", "masked", "plain"),
        default="hash",
        help="the MSISDN of C2B validation and confirmation bodies (default: %(default)s, SHA-256 hex)",
    )
    parser.add_argument(
        "--pull-page-size",
        type=int,
        default=DEFAULT_PULL_PAGE_SIZE,
        help="rows per Pull Transactions page (default: %(default)s)",
    )
    parser.add_argument(
        "--state-file",
        default=os.environ.get(ENV_VAR) or None,
        help="keep C2B / Pull registrations, the certificate and its key, receipts and balances across restarts "
        f"in this JSON file (default: ${ENV_VAR}, else nothing is kept)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every HTTP line")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s")

    simulator = DarajaSimulator(
        args.host,
        args.port,
        consumer_key=args.consumer_key,
        consumer_secret=args.consumer_secret,
        shortcode=args.shortcode,
        passkey=args.passkey,
        till_number=args.till or None,
        callback_delay=args.callback_delay,
        prompt_timeout=args.prompt_timeout,
        late_callback_delay=args.late_callback_delay,
        duplicate_callback_gap=args.duplicate_gap,
        callback_retry_delays=args.callback_retry_delays,
        callback_timeout=args.callback_timeout,
        token_lifetime=args.token_lifetime,
        invalidate_previous_tokens=not args.keep_previous_tokens,
        reject_mpesa_in_callback_url=args.reject_mpesa_urls,
        initiator_name=args.initiator_name,
        initiator_password=args.initiator_password,
        result_delay=args.result_delay,
        c2b_versions=args.c2b_versions,
        c2b_register_once=args.c2b_register_once,
        c2b_external_validation=args.c2b_external_validation,
        c2b_validation_timeout=args.validation_timeout,
        c2b_msisdn_format=args.c2b_msisdn_format,
        pull_page_size=args.pull_page_size,
        state_file=args.state_file,
    )
    try:
        simulator.start()
    except StateFileError as exc:
        print(f"Cannot start: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"Cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2

    try:
        certificate = simulator.certificate_pem  # the key pair is made now, so the banner can show it
    except ImportError:
        certificate = "(unavailable: install cryptography for the Reversal and Transaction Status APIs)\n"

    # The default is Safaricom's published sandbox password; one given on the command line is not echoed.
    shown_password = args.initiator_password if args.initiator_password == DEFAULT_INITIATOR_PASSWORD else "(as given)"
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    print(
        f"Daraja simulator listening on {simulator.base_url} (bound to {args.host}:{simulator.port})\n"
        f"  consumer key / secret : {args.consumer_key} / {args.consumer_secret}\n"
        f"  shortcode / till      : {args.shortcode} / {args.till or '-'}\n"
        f"  callback delay        : {args.callback_delay} s, prompt timeout {args.prompt_timeout} s\n"
        f"  initiator / password  : {args.initiator_name} / {shown_password}\n"
        f"  state file            : {args.state_file or '(none: a restart forgets everything)'}\n"
        f"Certificate for SecurityCredentials (also GET {simulator.base_url}/__sim__/certificate):\n"
        f"{certificate}"
        f"Magic phone numbers:\n{magic_numbers_table()}\n"
        f"C2B magic payer numbers:\n{c2b_magic_table()}\n"
        f"B2B Express Checkout magic tills:\n{b2b_magic_tills_table()}\n"
        f"Initiator magic Remarks / Occasion: {', '.join(MAGIC_REMARKS)}\n"
        "Ctrl-C to stop.",
        flush=True,
    )
    try:
        while not stop.wait(0.5):
            pass
    finally:
        simulator.stop()
    print("Daraja simulator stopped.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
