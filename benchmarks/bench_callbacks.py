"""How the callback route copes with a burst of Daraja callbacks on a real prefork Odoo, next to other requests.

Installs muchiri_mpesa in its own database (dropped and created again), creates N pending M-Pesa transactions
whose prompts the in-process Daraja simulator really took (to 254700000005: the customer paid, the simulator
posts no callback itself), starts a prefork Odoo (2 HTTP workers, 1 cron worker, tests/odoo_prefork.py), then
posts the N success callbacks from 8 threads while other threads hit /web/health?db_server_status=1 for the same
time.  It prints:

- callbacks/s and health requests/s during the burst, and their ratio (goal >= 0.8: acknowledging a callback
  costs a worker about what a health check costs, so a burst of callbacks does not starve the other requests).
  The ratio is taken from the worker time each request cost (Odoo's access log); the wall-clock ratio is printed
  too, but both kinds of clients take turns on Odoo's one accept queue, so it mostly follows the thread counts;
- p50 / p95 latency of the callbacks (and of the health requests);
- SQL queries per callback, from Odoo's access log (its three perf figures per request); with --log-sql, each
  statement of the last callback, split into Odoo's own request (before and after the route's method) and the
  addon's (between the controller's two debug lines), and that split for every callback (Odoo's SQL log slows
  the workers: take the throughput figures from a run without it, and a small --n is enough);
- the time from each callback to its transaction's `done`, read from the database (polled every 50 ms) until
  all N are done or --settle-timeout: the cron worker settles them when the route wakes it
  (muchiri_mpesa.cron_mpesa_settle_callbacks);
- the burst's time from the first callback posted to the last transaction done, the settlement job's rate
  (callbacks settled per second while it worked; goal >= 30/s) and the STK Queries per callback (goal 1).
  benchmarks/profile_settle.py measures the job's SQL statements and time per callback, in process (the cron
  worker's log mixes in Odoo's post-processing job, which the settlement wakes).

The transactions are not due for the reconciliation cron (next check in a day): only the callbacks settle them.
A benchmark that prints figures, not a test: exit 0 when it measured, 1 when it could not run (3 on the hard
--timeout, which stops Odoo first).  Needs Odoo 18 importable by python3 and PostgreSQL, with the settings of
scripts/odoo-tests (PGHOST, PGPORT, ODOO_DB_USER, ODOO_DB_PASSWORD):

    python3 benchmarks/bench_callbacks.py [--n 300] [--db muchiri_mpesa_bench_callbacks] [--threads 8]
                                          [--health-threads 8] [--query-delay 0] [--settle-timeout 300]
                                          [--timeout 1200] [--no-install] [--log-sql]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import logging
import os
import queue
import re
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # The Daraja layer and its simulator, from the repository root.
sys.path.insert(0, str(REPO / "tests"))

import odoo_prefork  # noqa: E402 - after the path above
import odoo_scratch_db  # noqa: E402

KEY, SECRET, SHORTCODE = "bench-key", "bench-secret", "174379"
PASSKEY = "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919"
PHONE_CALLBACK_LOST = "254700000005"  # Pays; the simulator never posts a callback: the benchmark does.
AMOUNT = 100
RATIO_GOAL = 0.8
SQL_GOAL = 8  # statements per kept callback: insert the body, find the transaction, mark it, wake the job
SETTLE_GOAL = 30.0  # callbacks settled per second by the settlement job, each confirmed by one STK Query
POLL_INTERVAL = 0.05  # seconds between two reads of the transactions' states
CALLBACK_ATTEMPTS = 4  # Daraja retries a callback answered 5xx or not answered; so does the benchmark
HEALTH_PATH = "/web/health?db_server_status=1"

_server: odoo_prefork.PreforkOdoo | None = None  # Stopped by the hard timeout too.


# === HTTP CLIENT === #

def http_call(port: int, method: str, path: str, body: bytes | None = None, timeout: float = 60.0) -> int | None:
    """One request on a connection of its own (Odoo's prefork workers close it after each answer anyway).

    :return: the HTTP status, None when no answer came (refused, reset, timeout)
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


@dataclass
class Delivery:
    """One callback: its transaction, its body, and what its attempts got."""

    tx_id: int
    body: bytes
    first_sent: float = 0.0  # time.monotonic() of the first attempt
    answered: float = 0.0  # time.monotonic() of the last answer
    latency: float = 0.0  # seconds of the last attempt
    statuses: list[int | None] = field(default_factory=list)


def post_callbacks(port: int, path: str, deliveries: list[Delivery], threads: int) -> None:
    """Post every delivery from `threads` threads; a 5xx or no answer is retried, as Daraja does."""
    work: queue.Queue[Delivery] = queue.Queue()
    for delivery in deliveries:
        work.put(delivery)

    def run() -> None:
        while True:
            try:
                delivery = work.get_nowait()
            except queue.Empty:
                return
            for attempt in range(CALLBACK_ATTEMPTS):
                started = time.monotonic()
                if not attempt:
                    delivery.first_sent = started
                status = http_call(port, "POST", path, delivery.body)
                delivery.answered = time.monotonic()
                delivery.latency = delivery.answered - started
                delivery.statuses.append(status)
                if status is not None and status < 500:
                    break
                time.sleep(0.2 * 2 ** attempt)

    workers = [threading.Thread(target=run, name=f"callbacks-{i}", daemon=True) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def hit_health(port: int, stop: threading.Event, results: list[tuple[float, float, int | None]]) -> None:
    """GET the health route until `stop`; (started, latency, status) of each request into `results`."""
    while not stop.is_set():
        started = time.monotonic()
        status = http_call(port, "GET", HEALTH_PATH, timeout=30.0)
        results.append((started, time.monotonic() - started, status))


class DonePoller(threading.Thread):
    """Reads which transactions are done every POLL_INTERVAL; notes when each was first seen done."""

    def __init__(self, db: str, tx_ids: list[int]) -> None:
        super().__init__(name="done-poller", daemon=True)
        self.db = db
        self.waiting = set(tx_ids)
        self.done_at: dict[int, float] = {}
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        import psycopg2  # noqa: PLC0415 - Odoo's own driver

        try:
            connection = psycopg2.connect(
                dbname=self.db, host=os.environ.get("PGHOST", "localhost"), port=os.environ.get("PGPORT", "5432"),
                user=os.environ.get("ODOO_DB_USER", "odoo"), password=os.environ.get("ODOO_DB_PASSWORD", "odoo"),
            )
            connection.autocommit = True
            with contextlib.closing(connection), connection.cursor() as cr:
                while self.waiting and not self.stop.is_set():
                    cr.execute("SELECT id FROM payment_transaction WHERE state = 'done' AND id = ANY(%s)",
                               [list(self.waiting)])
                    seen = time.monotonic()
                    for (tx_id,) in cr.fetchall():
                        self.done_at[tx_id] = seen
                        self.waiting.discard(tx_id)
                    if self.waiting:
                        self.stop.wait(POLL_INTERVAL)
        except Exception as error:  # noqa: BLE001 - reported by main()
            self.error = error


# === FIGURES === #

_LOG_RECORD = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<pid>\d+) \w+ \S+ (?P<logger>\S+): (?P<message>.*)$")
_QUERY_PREFIX = re.compile(r"^\[[^\]]*\] query:\s*")
_INTAKE_LOGGER = "odoo.addons.muchiri_mpesa.controllers.main"  # its debug lines bracket the addon's statements


@dataclass
class CallbackStatements:
    """The SQL statements one callback request ran, from Odoo's SQL log: Odoo's own and the addon's."""

    odoo: list[str] = field(default_factory=list)
    addon: list[str] = field(default_factory=list)


def callback_statements(text: str) -> list[CallbackStatements]:
    """The statements of each callback request in a piece of a log written with --log-sql, in order.

    A worker serves one request at a time: its statements since its previous access line are the request's.
    The controller's debug lines ("... received", "... answered") mark where the addon's part begins and ends.
    """
    pending: dict[int, tuple[CallbackStatements, list[str]]] = {}  # pid -> (statements, the list being filled)
    last: list[str] | None = None  # the statement a continuation line belongs to
    found = []
    for line in text.splitlines():
        match = _LOG_RECORD.match(line)
        if not match:
            if last is not None:
                last[-1] += "\n" + line
            continue
        last = None
        pid, logger, message = int(match["pid"]), match["logger"], match["message"].rstrip()
        if pid not in pending:
            fresh = CallbackStatements()
            pending[pid] = (fresh, fresh.odoo)
        statements, filling = pending[pid]
        if logger == "odoo.sql_db" and "query:" in message:
            filling.append(_QUERY_PREFIX.sub("", message, count=1))
            last = filling
        elif logger == _INTAKE_LOGGER and message.endswith(" received."):
            pending[pid] = (statements, statements.addon)
        elif logger == _INTAKE_LOGGER and " answered " in message:
            pending[pid] = (statements, statements.odoo)
        elif logger == "werkzeug":
            access = odoo_prefork.parse_access_line(line)
            if access is not None and access.path.startswith("/payment/lnm/"):
                found.append(statements)
            del pending[pid]
    return found


def print_statements(calls: list[CallbackStatements]) -> None:
    if not calls:
        print("SQL statements:            - (no callback in Odoo's SQL log)")
        return
    odoo_counts, addon_counts = [len(c.odoo) for c in calls], [len(c.addon) for c in calls]
    print(f"SQL statements per callback, from Odoo's SQL log ({len(calls)} callbacks): Odoo's request mean "
          f"{statistics.fmean(odoo_counts):.1f} (min {min(odoo_counts)}), the addon's mean "
          f"{statistics.fmean(addon_counts):.1f} (min {min(addon_counts)}); total goal <= {SQL_GOAL}")
    print("the last callback's statements:")
    for part, statements in (("odoo ", calls[-1].odoo), ("addon", calls[-1].addon)):
        for number, statement in enumerate(statements, 1):
            text = " ".join(statement.split())
            print(f"  {part} {number:2d}. {text[:300]}{' ...' if len(text) > 300 else ''}")


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile (share 0.5 = median); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def ms(values: list[float]) -> str:
    if not values:
        return "-"
    return (f"p50 {percentile(values, 0.5) * 1000:.0f} ms, p95 {percentile(values, 0.95) * 1000:.0f} ms, "
            f"max {max(values) * 1000:.0f} ms")


def worker_seconds(lines: list[odoo_prefork.AccessLogLine]) -> list[float]:
    """Seconds each request held its worker: Odoo's SQL time plus its remaining time."""
    return [line.query_time + line.remaining_time for line in lines
            if line.query_time is not None and line.remaining_time is not None]


def cost(seconds: list[float]) -> str:
    if not seconds:
        return "-"
    return f"mean {statistics.fmean(seconds) * 1000:.0f} ms, median {statistics.median(seconds) * 1000:.0f} ms"


def capacity(seconds: list[float], workers: int) -> str:
    """Requests per second the workers would serve if they served only these."""
    return f"{workers / statistics.fmean(seconds):.1f}" if seconds else "-"


def hard_timeout(seconds: float) -> None:
    """Past `seconds`, stop Odoo and leave: the benchmark never hangs."""

    def expire() -> None:
        print(f"HARD TIMEOUT after {seconds:.0f} s: stopping Odoo and exiting", flush=True)
        if _server is not None:
            with contextlib.suppress(Exception):
                _server.stop(timeout=5)
        os._exit(3)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()


# === SETUP === #

def create_transactions(odoo: Any, db: str, sim: Any, n: int, callback_base_url: str) -> tuple[list[Delivery], str]:
    """N pending transactions whose prompts the simulator took (paid, no callback); their callbacks to post.

    :return: the deliveries and the callback path (with the provider's secret)
    """
    from muchiri_mpesa.daraja import DarajaClient, DarajaCredentials, ShortcodeConfig, stk_callback_body  # noqa: PLC0415

    registry = odoo.modules.registry.Registry(db)
    with registry.cursor() as cr:
        env = odoo.api.Environment(cr, odoo.SUPERUSER_ID, {})
        provider = odoo_scratch_db.simulator_provider(
            env, sim.base_url, KEY, SECRET, SHORTCODE, PASSKEY, mpesa_callback_base_url=callback_base_url,
            mpesa_ip_check="log",  # The benchmark posts from 127.0.0.1: logged, not refused.
        )
        callback_path = provider._mpesa_daraja_url("stk").removeprefix(provider._mpesa_callback_base_url())

        # One phone for every prompt: the simulated customer answers at once (callback delay 0), so the phone
        # is free again for the next push.
        client = DarajaClient(DarajaCredentials(KEY, SECRET, base_url=sim.base_url),
                              ShortcodeConfig(business_shortcode=SHORTCODE, passkey=PASSKEY))
        checkout_ids = [
            client.stk_push(phone=PHONE_CALLBACK_LOST, amount=AMOUNT, reference=f"CB{i}", description="Bench",
                            callback_url=callback_base_url + callback_path).checkout_request_id
            for i in range(n)
        ]
        partner = env["res.partner"].create({"name": "Callback Bench Distributor", "is_distributor": True})
        now = odoo.fields.Datetime.now()
        run = uuid.uuid4().hex[:6]  # References stay unique when --no-install reuses the database.
        txs = env["payment.transaction"].create([{
            "provider_id": provider.id,
            "payment_method_id": env.ref("payment.payment_method_mpesa").id,
            "reference": f"CBENCH-{run}-{i}",
            "amount": AMOUNT, "currency_id": env.ref("base.KES").id, "partner_id": partner.id,
            "state": "pending", "provider_reference": checkout_id,
            "mpesa_phone": PHONE_CALLBACK_LOST, "mpesa_requested_amount": AMOUNT,
            "mpesa_push_sent_at": now - timedelta(seconds=5),
            "mpesa_next_check_at": now + timedelta(days=1),  # Only the callbacks settle them.
        } for i, checkout_id in enumerate(checkout_ids)])
        cr.commit()

    deliveries = []
    for tx_id, checkout_id in zip(txs.ids, checkout_ids, strict=True):
        paid = sim.transaction(checkout_id)
        body = stk_callback_body(
            paid.merchant_request_id, checkout_id, 0, paid.result_desc, amount=AMOUNT, receipt=paid.receipt,
            transaction_date=datetime.now(timezone.utc), phone=PHONE_CALLBACK_LOST,
        )
        deliveries.append(Delivery(tx_id, json.dumps(body).encode()))
    return deliveries, callback_path


def settled_by(db: str, odoo: Any, tx_ids: list[int]) -> tuple[Counter, Counter]:
    """How the transactions were settled (mpesa_settled_by) and what became of the callback events."""
    registry = odoo.modules.registry.Registry(db)
    with registry.cursor() as cr:
        cr.execute("SELECT COALESCE(mpesa_settled_by, state) FROM payment_transaction WHERE id = ANY(%s)", [tx_ids])
        sources = Counter(row[0] for row in cr.fetchall())
        cr.execute("SELECT COALESCE(state, '-') FROM muchiri_mpesa_event"
                   " WHERE kind = 'stk_callback' AND transaction_id = ANY(%s)", [tx_ids])
        events = Counter(row[0] for row in cr.fetchall())
    return sources, events


# === MAIN === #

def main() -> int:
    global _server  # For the hard timeout.
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="callbacks (one per pending transaction)")
    parser.add_argument("--db", default="muchiri_mpesa_bench_callbacks")
    parser.add_argument("--threads", type=int, default=8, help="threads posting the callbacks")
    parser.add_argument("--health-threads", type=int, default=8, help="threads hitting /web/health meanwhile")
    parser.add_argument("--query-delay", type=float, default=0.0,
                        help="seconds Daraja takes to answer each STK Push Query (the simulator answers at once;"
                             " Daraja often takes a second)")
    parser.add_argument("--settle-timeout", type=float, default=300.0,
                        help="seconds to wait, after the burst, for every transaction to be done")
    parser.add_argument("--timeout", type=float, default=1200.0, help="hard limit of the whole run, in seconds")
    parser.add_argument("--no-install", action="store_true", help="reuse the database as it is")
    parser.add_argument("--log-sql", action="store_true",
                        help="log Odoo's SQL and print each statement of a callback (slower: use a small --n)")
    args = parser.parse_args()
    hard_timeout(args.timeout)

    try:
        import odoo  # noqa: PLC0415 - Odoo is optional for the rest of the project
    except ImportError:
        print("Odoo 18 is not importable by python3: nothing to measure.", file=sys.stderr)
        return 1
    from muchiri_mpesa.daraja.simulator import DarajaSimulator  # noqa: PLC0415

    logging.getLogger("muchiri_mpesa").setLevel(logging.WARNING)
    if not args.no_install:
        print(f"Installing muchiri_mpesa in {args.db} ...", flush=True)
        odoo_scratch_db.install(args.db)
    odoo_scratch_db.configure(args.db, "--max-cron-threads=0")

    with DarajaSimulator(consumer_key=KEY, consumer_secret=SECRET, shortcode=SHORTCODE, passkey=PASSKEY,
                         callback_delay=0, callback_retry_delays=(), max_records=10 * args.n + 1000) as sim:
        extra_args = ["--log-sql", f"--log-handler={_INTAKE_LOGGER}:DEBUG"] if args.log_sql else []
        server = _server = odoo_prefork.PreforkOdoo(args.db, workers=2, max_cron_threads=1, extra_args=extra_args)
        deliveries, callback_path = create_transactions(odoo, args.db, sim, args.n, server.base_url)
        tx_ids = [d.tx_id for d in deliveries]
        print(f"{args.n} pending transactions; starting Odoo (log: {server.log_path}) ...", flush=True)
        with server:
            http_pids, cron_pids = server.http_workers(), server.cron_workers()
            for _ in range(4 * len(http_pids)):  # Each worker builds its routing map on its first request.
                http_call(server.port, "GET", HEALTH_PATH)
            queries_before = len(sim.requests_for("stk_query"))
            if args.query_delay:
                sim.delay_next(args.query_delay, count=4 * args.n, operations=["stk_query"])
            mark = server.log_mark()
            poller = DonePoller(args.db, tx_ids)
            poller.start()

            stop_health = threading.Event()
            health: list[tuple[float, float, int | None]] = []
            health_threads = [threading.Thread(target=hit_health, args=(server.port, stop_health, health),
                                               name=f"health-{i}", daemon=True) for i in range(args.health_threads)]
            burst_started = time.monotonic()
            for thread in health_threads:
                thread.start()
            post_callbacks(server.port, callback_path, deliveries, args.threads)
            burst_ended = time.monotonic()
            stop_health.set()
            for thread in health_threads:
                thread.join(60)

            poller.join(args.settle_timeout)  # It ends when all are done (or on an error).
            poller.stop.set()
            poller.join(10)
            settle_ended = time.monotonic()
            stk_queries = len(sim.requests_for("stk_query")) - queries_before
            log_lines = server.access_log(mark)
            statements = callback_statements(server.log_since(mark)) if args.log_sql else None
            errors = server.error_lines(mark)
        _server = None
        sources, events = settled_by(args.db, odoo, tx_ids)

    if poller.error is not None:
        print(f"Could not read the transactions' states: {poller.error!r}", file=sys.stderr)
        return 1
    duration = burst_ended - burst_started
    answered = [d for d in deliveries if d.statuses and d.statuses[-1] is not None]
    statuses = Counter(d.statuses[-1] for d in deliveries)
    retried = sum(1 for d in deliveries if len(d.statuses) > 1)
    in_burst = [h for h in health if h[0] + h[1] <= burst_ended]
    callback_rate = len(answered) / duration
    health_rate = len(in_burst) / duration
    callback_lines = [line for line in log_lines if line.path.startswith("/payment/lnm/")]
    health_lines = [line for line in log_lines if line.path.startswith("/web/health")]
    sql = [line.queries for line in callback_lines if line.queries is not None]
    to_done = [poller.done_at[d.tx_id] - d.first_sent for d in deliveries if d.tx_id in poller.done_at]
    # What each request cost its worker, from Odoo's own figures (SQL time + the rest): with both kinds of
    # clients looping on one accept queue, each client gets its turn in order, so the wall-clock rates follow
    # the thread counts more than the cost; the worker time says how many of each the workers could serve.
    callback_cost = worker_seconds(callback_lines)
    health_cost = worker_seconds(health_lines)
    workers = len(http_pids)

    print(f"Odoo: prefork, HTTP workers {http_pids}, cron worker {cron_pids}; "
          f"{args.threads} callback threads, {args.health_threads} health threads; STK Query answered in "
          f"{args.query_delay:.2f} s + the simulator's time")
    print(f"callbacks posted:          {args.n} in {duration:.2f} s; answers {dict(statuses)}; retried {retried}")
    print(f"callbacks/s:               {callback_rate:.1f} wall clock; {capacity(callback_cost, workers)} by worker "
          f"time ({cost(callback_cost)} of worker time each)")
    print(f"health requests/s:         {health_rate:.1f} wall clock ({len(in_burst)} during the burst); "
          f"{capacity(health_cost, workers)} by worker time ({cost(health_cost)} each)")
    ratio = statistics.fmean(health_cost) / statistics.fmean(callback_cost) if callback_cost and health_cost else 0
    print(f"ratio callbacks/health:    {ratio:.2f} by worker time (goal >= {RATIO_GOAL}); "
          f"{callback_rate / max(health_rate, 1e-9):.2f} wall clock (bound to the thread counts)")
    print(f"callback latency:          {ms([d.latency for d in answered])}")
    print(f"health latency:            {ms([h[1] for h in in_burst])}")
    if sql:
        print(f"SQL queries per callback:  mean {statistics.fmean(sql):.1f}, median {statistics.median(sql):.0f}, "
              f"max {max(sql)} ({len(callback_lines)} callback lines in the access log; goal <= {SQL_GOAL}"
              f"{'' if args.log_sql else '; --log-sql splits them: Odoo and the addon'})")
    else:
        print("SQL queries per callback:  - (no callback line with perf figures in the access log)")
    health_sql = [line.queries for line in health_lines if line.queries is not None]
    if health_sql:
        print(f"SQL queries per health:    mean {statistics.fmean(health_sql):.1f}")
    if statements is not None:
        print_statements(statements)
    print(f"callback to done:          {ms(to_done)} (polled every {POLL_INTERVAL * 1000:.0f} ms); "
          f"{len(to_done)} of {args.n} done {settle_ended - burst_started:.1f} s after the burst began")
    print(f"settled by:                {dict(sources)}; callback events {dict(events)}; STK queries {stk_queries}"
          f" ({stk_queries / max(len(to_done), 1):.2f} per callback done, goal 1)")
    if to_done:
        first_sent = min(d.first_sent for d in deliveries)
        done_times = sorted(poller.done_at.values())
        print(f"burst, first callback to last done: {done_times[-1] - first_sent:.1f} s for {len(to_done)} callbacks")
        working = done_times[-1] - done_times[0]
        rate = (len(done_times) - 1) / working if working > 0 else float("inf")
        print(f"settlement job:            {rate:.1f} callbacks/s settled while it worked (first to last done; "
              f"goal >= {SETTLE_GOAL:.0f}/s); {len(to_done) / (done_times[-1] - first_sent):.1f}/s from the first "
              f"callback posted")
    if errors:
        print(f"ERROR lines in Odoo's log: {len(errors)}, first: {errors[0][:300]}")
    if len(to_done) < args.n:
        print(f"NOTE: {args.n - len(to_done)} transactions were not done after --settle-timeout "
              f"{args.settle_timeout:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
