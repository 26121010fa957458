"""Benchmark of the Daraja client against the in-process simulator (a script, not a test).

    python3 benchmarks/bench_daraja.py [--n 200] [--warmup 10] [--strict]

For N STK pushes it prints how many OAuth requests the client made (goal: 1) and the client's mean time per
``stk_push`` next to a bare ``requests.post`` of the same payload on the same Session (so the same keep-alive
connection), with the ratio (goal: within 1.2x).  Client and bare calls alternate, so drift in the machine's load
hits both alike.  --strict exits 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from muchiri_mpesa.daraja import (
    DarajaClient,
    DarajaCredentials,
    ShortcodeConfig,
    build_stk_push_payload,
)
from muchiri_mpesa.daraja.simulator import (
    DEFAULT_CONSUMER_KEY,
    DEFAULT_CONSUMER_SECRET,
    DEFAULT_SHORTCODE,
    SANDBOX_PASSKEY,
    STK_PUSH_PATH,
    DarajaSimulator,
)

TOKEN_GOAL = 1
RATIO_GOAL = 1.2
CALLBACK_URL = "http://127.0.0.1:9/callback"  # never called: the simulated customers answer after an hour


def _ms(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return (f"mean {statistics.fmean(values) * 1000:7.3f} ms   median {statistics.median(values) * 1000:7.3f} ms"
            f"   p95 {p95 * 1000:7.3f} ms")


@dataclass
class Figures:
    pushes: int
    token_requests: int
    connections: int
    client_times: list[float]
    bare_times: list[float]


def run(n: int, warmup: int) -> Figures:
    with DarajaSimulator(port=0, callback_delay=3600, prompt_timeout=3600) as sim:
        session = requests.Session()
        shortcode = ShortcodeConfig(DEFAULT_SHORTCODE, SANDBOX_PASSKEY)
        client = DarajaClient(
            DarajaCredentials(DEFAULT_CONSUMER_KEY, DEFAULT_CONSUMER_SECRET, base_url=sim.base_url),
            shortcode,
            session=session,
        )
        url = f"{sim.base_url}{STK_PUSH_PATH}"
        total = n + warmup
        client_times: list[float] = []
        bare_times: list[float] = []
        token: str | None = None
        bare_payloads: list[dict[str, object]] = []
        for index in range(total):
            # Distinct phones: Daraja (and the simulator) refuse a second prompt to a phone with one pending.
            client_phone = f"2547150{index:05d}"
            started = time.perf_counter()
            client.stk_push(phone=client_phone, amount=1, reference=f"S{index:05d}", description="Benchmark",
                            callback_url=CALLBACK_URL)
            client_elapsed = time.perf_counter() - started
            if token is None:
                token = client.access_token().value
                headers = {"Authorization": f"Bearer {token}"}
                # The same payload as the client's, built before the timed loop (Timestamp and Password of now).
                bare_payloads = [
                    build_stk_push_payload(shortcode, phone=f"2547160{i:05d}", amount=1, reference=f"S{i:05d}",
                                           description="Benchmark", callback_url=CALLBACK_URL)
                    for i in range(total)
                ]
            started = time.perf_counter()
            response = session.post(url, json=bare_payloads[index], headers=headers, timeout=(5.0, 30.0))
            bare_elapsed = time.perf_counter() - started
            if response.status_code != 200:
                raise SystemExit(f"the bare request failed: HTTP {response.status_code} {response.text}")
            if index >= warmup:
                client_times.append(client_elapsed)
                bare_times.append(bare_elapsed)
        session.close()
        return Figures(len(sim.pushes), sim.token_requests, sim.connections_opened, client_times, bare_times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="timed pushes of each kind (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed pushes first (default: %(default)s)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    args = parser.parse_args(argv)
    if args.n < 1 or args.warmup < 0:
        parser.error("--n must be >= 1 and --warmup >= 0")

    result = run(args.n, args.warmup)
    client_times, bare_times = result.client_times, result.bare_times
    ratio = statistics.fmean(client_times) / statistics.fmean(bare_times)
    median_ratio = statistics.median(client_times) / statistics.median(bare_times)
    tokens_ok = result.token_requests == TOKEN_GOAL
    ratio_ok = ratio <= RATIO_GOAL
    print(f"Daraja client vs bare requests.post, against the in-process simulator (Python {sys.version.split()[0]})")
    print(f"  pushes accepted            : {result.pushes} = 2 x ({args.n} timed + {args.warmup} warm-up), "
          "client and bare alternating")
    print(f"  OAuth requests (client)    : {result.token_requests}   goal {TOKEN_GOAL}   "
          f"{'OK' if tokens_ok else 'MISSED'}")
    print(f"  TCP connections opened     : {result.connections} (one keep-alive Session for both)")
    print(f"  client.stk_push            : {_ms(client_times)}")
    print(f"  bare requests.post         : {_ms(bare_times)}")
    print(f"  ratio client / bare (mean) : {ratio:.3f}x   goal <= {RATIO_GOAL}x   {'OK' if ratio_ok else 'MISSED'}")
    print(f"  ratio (median)             : {median_ratio:.3f}x")
    return 0 if (tokens_ok and ratio_ok) or not args.strict else 1


if __name__ == "__main__":
    sys.exit(main())
