"""Concurrency checks of muchiri_mpesa with real PostgreSQL connections, as Odoo's workers have.

Odoo's own tests (muchiri_mpesa/tests, HttpCase) run every request on ONE shared database connection, so
they never see a lock wait, a serialization failure or a deadlock between workers.  This script installs
muchiri_mpesa in its own database (dropped and created again), runs a Daraja simulator in-process on
loopback, and races real workers: threads that each open their own ``registry.cursor()``, with committed
data, run as Odoo runs them:

- an HTTP request: ``odoo.service.model.retrying(func, env)`` on its own cursor, which replays the whole
  request on a serialization failure (as ``odoo.http.Request._transactioning`` does), with the public
  user's environment and ``sudo()`` as in controllers/main.py;
- a cron job: ``ir.cron._callback()`` of the addon's reconciliation cron on its own cursor, then a commit,
  as ``ir.cron._run_job`` does (Odoo 18's cron does NOT replay a job on a serialization failure).

Every concurrent step has a hard timeout: a deadlock FAILS, with the threads' stacks and the database's
lock waits, instead of hanging (the waits are then cancelled so that the next scenarios run).  One line per
scenario, then ``concurrency: N passed, M failed``; the exit status is non-zero on any failure.

Scenarios: 1 token refresh by 8 workers; 2 a push while the token refreshes; 2b (extra) 4 pushes while the
token refreshes; 3 a double click; 4 two transactions of one order pushed at once; 5 a success callback and
its settlement run against the reconciliation cron; 6 duplicate callbacks and two settlement runs at once;
7 (extra) the order saved while its push is at Daraja; 8 two refunds at once; 9 the status page's poll and
Odoo's post-processing job on one paid prompt.
The kill -9 scenarios run a real prefork Odoo (tests/odoo_prefork.py: 2 HTTP workers, 1 cron worker) on the
same database and talk to it over HTTP: K1 a burst of duplicated callbacks during which an HTTP worker is
killed in the middle of a request (the master respawns it; the callers retry as Daraja does), then the cron
worker in the middle of its work; K2 a portal push whose worker is killed while Daraja holds the push's answer.
Odoo is then stopped, and the settlement job (muchiri_mpesa.cron_mpesa_settle_callbacks), the reconciliation
job and Odoo's post-processing run in-process until nothing is due; the checks read the database.
K3 runs TWO prefork Odoo servers (each 2 HTTP workers and a cron worker, ``--proxy-mode``) on the same database,
as behind a load balancer: a burst of STK callbacks, C2B confirmations and their duplicates goes to both in turn
(with X-Forwarded-For, the source check enforced), one whole server (its process group: master, HTTP and cron
workers) is killed -9 halfway, preferably while its cron worker is in the middle of the settlement job, and
restarted; what got no answer is retried on the other server, as a balancer does.  Nothing runs in-process: the
two servers settle and post-process everything, and the checks read the database (one account.payment per
payment, one ledger row per receipt, each body taken once) and both servers' logs (which PID answered, ran the
settlement job, queried Daraja).
Odoo logs every failed query at ERROR, a serialization failure or a NOWAIT refusal too: those expected ones
are counted in the scenario lines, not shown; any other ERROR log fails its scenario.

    python3 tests/odoo_concurrency.py [--db muchiri_mpesa_concurrency] [--timeout 30] [--rounds 10]
                                      [--repeat 5] [--kill-txs 60] [--two-server-payments 30]
                                      [--settle-timeout 240] [--only 1 5 K1 K2 K3] [--no-install]

Needs Odoo 18 importable by python3 and PostgreSQL, with the settings of scripts/odoo-tests and
benchmarks/bench_reconcile.py (PGHOST, PGPORT, ODOO_DB_USER, ODOO_DB_PASSWORD).  Its name does not match
pytest's test_*.py pattern: ``python3 -m pytest tests`` does not collect it.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import functools
import http.client
import json
import logging
import os
import queue
import random
import re
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # The Daraja layer and its simulator, from the repository root.

import odoo_prefork  # noqa: E402 - this script's own folder, tests/
import odoo_scratch_db  # noqa: E402

KEY, SECRET, SHORTCODE = "concurrency-key", "concurrency-secret", "174379"
PASSKEY = "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919"
SAFARICOM_ADDRESS = "196.201.214.200"  # A published Safaricom callback address: passes the source check.
PHONE_SANDBOX = "254708374149"  # Pays; the simulator posts its callback (to the listener here).
PHONE_CALLBACK_LOST = "254700000005"  # Pays; the simulator never posts a callback: only the query knows.
ORDER_LINE_PRICE, ORDER_LINE_QTY = 1500.0, 3
TOKEN_DELAY = 0.3  # Seconds Daraja takes to issue a token in the token scenarios.
SETTLE_CRON = "muchiri_mpesa.cron_mpesa_settle_callbacks"  # The settlement job of the callbacks' new flow.
RECONCILE_CRON = "muchiri_mpesa.cron_mpesa_reconcile"
# Daraja's back-off when a callback gets a 5xx or no answer (the simulator's default is 1, 2, 4 s; shorter here).
CALLBACK_RETRY_DELAYS = (0.2, 0.4, 0.8, 1.6, 3.2)
KILL_PUSH_ANSWER_DELAY = 4.0  # K2: seconds Daraja holds the push's answer (the worker is killed meanwhile)
KILL_CALLBACK_DELAY = 2.0  # K2: seconds from the push to the customer's answer and its callback
# Logged at ERROR by a prefork Odoo for reasons outside these checks: mails to an SMTP server that is not there.
PREFORK_NOISE = ("odoo.addons.mail.models.mail_mail", "odoo.addons.base.models.ir_mail_server")

_logger = logging.getLogger("muchiri_mpesa.concurrency")
# The Daraja client's line for each STK Query (the settlement job confirms each callback by one), with its PID.
STK_QUERY_LINE = re.compile(r"^\S+ \S+ (?P<pid>\d+) INFO \S+ \S+: STK query of (?P<checkout>\S+): ", re.MULTILINE)


REPLAY_TRACEBACKS: dict[str, str] = {}  # The first traceback of each place a request was replayed from.


def replay_site(error: BaseException) -> str:
    """Where a concurrency error came from: the innermost frame of the addon, and the PostgreSQL error."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "muchiri_mpesa" in f.filename]
    where = f"{Path(frames[-1].filename).name}:{frames[-1].name}" if frames else "?"
    site = f"{type(error).__name__} in {where}"
    REPLAY_TRACEBACKS.setdefault(site, "".join(traceback.format_exception(error)))
    return site


def expected_sql_error(record: logging.LogRecord) -> bool:
    """Odoo logs every failed query at ERROR: a serialization failure or a NOWAIT refusal is expected."""
    message = record.getMessage()
    return record.name == "odoo.sql_db" and (
        "could not serialize access" in message or "could not obtain lock" in message
    )


# === HARNESS === #

class HideExpectedSqlErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not expected_sql_error(record)


class Hang(Exception):
    """Some worker did not finish within the timeout: a deadlock or a lock wait that never ends."""


@dataclass
class Job:
    name: str
    func: Callable[[Any], Any]  # func(env) -> value
    mode: str = "http"  # "http": retrying() as Odoo's HTTP requests; "cron": as ir.cron._run_job
    public: bool = True  # the public user's environment (a controller, auth='public'), else superuser
    delay: float = 0.0  # seconds to wait after the common start


@dataclass
class Slot:
    name: str
    value: Any = None
    error: BaseException | None = None
    tb: str = ""
    elapsed: float = 0.0
    finished: float = 0.0  # time.perf_counter() at the end
    replays: list[str] = field(default_factory=list)  # where each serialization failure replayed the request


class LogCapture(logging.Handler):
    """Keeps the log records of the run: an unexpected ERROR fails its scenario."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []
        self._lock_records = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock_records:
            self.records.append(record)

    def since(self, mark: int) -> list[logging.LogRecord]:
        with self._lock_records:
            return list(self.records[mark:])


@dataclass
class PaidPrompt:
    """A committed pending transaction of its own order whose prompt the customer paid, and the stkCallback body
    Daraja sends for it (the simulator's own), as it reaches Odoo."""

    order_id: int
    tx_id: int
    checkout_request_id: str
    sim_tx: Any
    body: bytes


class Checks:
    """What a scenario measured, and which of its expectations failed."""

    def __init__(self) -> None:
        self.facts: list[str] = []
        self.failures: list[str] = []

    def fact(self, text: str) -> None:
        self.facts.append(text)

    def expect(self, ok: bool, text: str) -> bool:
        if not ok:
            self.failures.append(text)
        return ok

    @property
    def ok(self) -> bool:
        return not self.failures


class Harness:
    def __init__(self, args: argparse.Namespace, odoo: Any, registry: Any, sim: Any, listener: Any,
                 capture: LogCapture) -> None:
        from odoo.addons.muchiri_mpesa import daraja  # noqa: PLC0415 - importable once the addons path is set

        self.odoo = odoo
        self.daraja = daraja
        self.db = args.db
        self.timeout = args.timeout
        self.rounds = args.rounds
        self.repeat = args.repeat
        self.registry = registry
        self.sim = sim
        self.listener = listener
        self.capture = capture
        self.kill_txs = args.kill_txs
        self.two_server_payments = args.two_server_payments
        self.settle_timeout = args.settle_timeout
        self.passed = self.failed = 0
        self._phone_seq = 0

    # -- cursors and environments ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def env(self, public: bool = False):
        """A superuser (or public user) environment on a cursor of its own; committed when the block ends."""
        odoo = self.odoo
        with contextlib.closing(self.registry.cursor()) as cr:
            uid = self.public_uid if public else odoo.SUPERUSER_ID
            yield odoo.api.Environment(cr, uid, {})
            cr.commit()

    def setup(self) -> None:
        """KES, the M-Pesa provider on the simulator (callbacks to a listener), a distributor, a product."""
        Command = self.odoo.fields.Command
        with self.env() as env:
            env.ref("base.KES").active = True
            provider = env.ref("muchiri_mpesa.payment_provider_mpesa")
            provider.write({
                "state": "test", "mpesa_consumer_key": KEY, "mpesa_consumer_secret": SECRET,
                "mpesa_shortcode": SHORTCODE, "mpesa_passkey": PASSKEY, "mpesa_api_url": self.sim.base_url,
                # Nothing of Odoo listens here: the simulator's own callbacks land in the listener.
                "mpesa_callback_base_url": self.listener.url.rsplit("/", 1)[0],
                "mpesa_confirm_by_query": True, "mpesa_push_cooldown": 120, "mpesa_distributors_only": True,
                "mpesa_ip_check": "log",
            })
            env.ref("payment.payment_method_mpesa").active = True  # Once its provider is in test mode.
            self.provider_id = provider.id
            self.public_uid = env.ref("base.public_user").id
            self.kes_id = env.ref("base.KES").id
            self.method_id = env.ref("payment.payment_method_mpesa").id
            self.partner_id = env["res.partner"].create({
                "name": "Concurrency Distributors", "is_distributor": True, "email": "orders@example.com",
            }).id
            self.pricelist_id = env["product.pricelist"].create({"name": "KES", "currency_id": self.kes_id}).id
            self.product_id = env["product.product"].create({
                "name": "Maize flour 50 kg", "type": "consu", "list_price": ORDER_LINE_PRICE,
                "taxes_id": [Command.clear()],
            }).id
            self.journal = provider.journal_id.display_name or "-"
            # The order confirmation mail would render a PDF with wkhtmltopdf (seconds, and it needs an
            # HTTP server): not what these checks are about.
            env["mail.template"].search([("model", "=", "sale.order")]).report_template_ids = [Command.clear()]

    def new_phone(self) -> str:
        """A paying phone of its own: the simulator refuses a push while the phone's last prompt is open."""
        self._phone_seq += 1
        return f"2547{20000000 + self._phone_seq:08d}"

    def new_order(self, env, tag: str):
        Command = self.odoo.fields.Command
        return env["sale.order"].create({
            "partner_id": self.partner_id, "pricelist_id": self.pricelist_id, "client_order_ref": tag,
            "order_line": [Command.create({
                "product_id": self.product_id, "product_uom_qty": ORDER_LINE_QTY,
                "price_unit": ORDER_LINE_PRICE, "tax_id": [Command.clear()],
            })],
        })

    def new_draft_tx(self, env, tag: str, order=None):
        Command = self.odoo.fields.Command
        return env["payment.transaction"].create({
            "provider_id": self.provider_id, "payment_method_id": self.method_id,
            "reference": f"{tag}-{uuid.uuid4().hex[:6]}",
            "amount": order.amount_total if order else ORDER_LINE_PRICE * ORDER_LINE_QTY,
            "currency_id": self.kes_id, "partner_id": self.partner_id, "operation": "online_direct",
            "sale_order_ids": [Command.set(order.ids)] if order else [],
        })

    def clear_tokens(self) -> None:
        with self.env() as env:
            env.cr.execute("DELETE FROM muchiri_mpesa_token")

    def push_now(self, tx_id: int, phone: str) -> str:
        """Send a prompt in a cursor of its own (as the STK push route, sequentially); its CheckoutRequestID."""
        with self.env(public=True) as env:
            tx = env["payment.transaction"].sudo().browse(tx_id)
            error = self.odoo.service.model.retrying(functools.partial(tx._mpesa_send_stk_push, phone), env)
            if error:
                raise RuntimeError(f"the setup push of {tx.reference} was refused: {error}")
            return tx.provider_reference

    def wait_final(self, checkout_request_id: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.sim.transaction(checkout_request_id).is_final():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the simulated customer never answered {checkout_request_id}")
            time.sleep(0.02)

    def paid_prompt_of(self, order_id: int, tx_id: int, checkout_request_id: str) -> PaidPrompt:
        """The paid prompt `checkout_request_id` of transaction `tx_id`, with Daraja's callback for it."""
        sim_tx = self.sim.transaction(checkout_request_id)
        return PaidPrompt(order_id, tx_id, checkout_request_id, sim_tx, json.dumps(sim_tx.callback_body).encode())

    def paid_prompt(self, tag: str, due: bool) -> PaidPrompt:
        """A committed pending transaction of its own order whose prompt, sent by Odoo's push, the customer paid
        (no callback sent); due for its next status check, or not due for a long while."""
        with self.env() as env:
            order = self.new_order(env, tag)
            tx = self.new_draft_tx(env, tag, order)
        checkout_request_id = self.push_now(tx.id, PHONE_CALLBACK_LOST)
        self.wait_final(checkout_request_id)
        with self.env() as env:
            # Only this transaction is due: the pending ones of other scenarios wait, out of the way.
            later = self.odoo.fields.Datetime.now() + timedelta(days=1)
            env.cr.execute(
                "UPDATE payment_transaction SET mpesa_next_check_at = %s"
                " WHERE state = 'pending' AND mpesa_next_check_at IS NOT NULL AND id != %s", [later, tx.id],
            )
            next_check = self.odoo.fields.Datetime.now() - timedelta(seconds=1) if due else later
            env.cr.execute("UPDATE payment_transaction SET mpesa_next_check_at = %s WHERE id = %s", [next_check, tx.id])
        return self.paid_prompt_of(order.id, tx.id, checkout_request_id)

    # -- what the workers run ------------------------------------------------------------------------------
    def controller_push(self, env, reference: str, phone: str):
        """MpesaController.mpesa_stk_push, minus the access token check: None when the prompt went,
        the refusal's message (the draft is then cancelled), or a ValidationError."""
        tx_sudo = env["payment.transaction"].sudo().search([
            ("reference", "=", reference), ("provider_code", "=", "mpesa"),
        ], limit=1)
        return tx_sudo._mpesa_send_stk_push_or_refuse(phone)

    def controller_callback(self, env, raw_body: bytes):
        """MpesaController.mpesa_callback (from a Safaricom address): the body kept and queued on the
        model's own cursor, no Daraja call.  Returns the HTTP status it answers."""
        provider_sudo = env["payment.provider"].sudo().browse(self.provider_id)
        status, _answer = env["muchiri.mpesa.event"].sudo()._mpesa_receive(
            provider_sudo, "stk_callback", raw_body, SAFARICOM_ADDRESS,
        )
        return status

    def cron_settle(self, env):
        """One run of the settlement cron (woken by each callback) as ir.cron._run_job runs it."""
        cron = env.ref("muchiri_mpesa.cron_mpesa_settle_callbacks")
        try:
            cron._callback(cron.cron_name, cron.ir_actions_server_id.id)
        finally:
            env.cr.commit()

    def cron_reconcile(self, env):
        """One run of the reconciliation cron as ir.cron._run_job runs it."""
        cron = env.ref("muchiri_mpesa.cron_mpesa_reconcile")
        try:
            cron._callback(cron.cron_name, cron.ir_actions_server_id.id)
        finally:
            env.cr.commit()

    # -- running workers together ----------------------------------------------------------------------------
    def race(self, label: str, jobs: list[Job]) -> dict[str, Slot]:
        """Start `jobs` together, each on its own cursor; raise Hang when one outlives the timeout."""
        barrier = threading.Barrier(len(jobs))
        slots = [Slot(job.name) for job in jobs]
        threads = [
            threading.Thread(target=self._work, args=(job, slot, barrier), name=f"{label}/{job.name}", daemon=True)
            for job, slot in zip(jobs, slots, strict=True)
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + self.timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        hung = [thread for thread in threads if thread.is_alive()]
        if hung:
            report = self._diagnose(hung)
            self._unblock(threads)
            raise Hang(f"{', '.join(t.name for t in hung)} still running after {self.timeout:.0f} s\n{report}")
        return {slot.name: slot for slot in slots}

    def _work(self, job: Job, slot: Slot, barrier: threading.Barrier) -> None:
        odoo = self.odoo
        threading.current_thread().dbname = self.db  # As Odoo's request and cron threads.
        started = time.perf_counter()
        try:
            barrier.wait(self.timeout)
            if job.delay:
                time.sleep(job.delay)
            started = time.perf_counter()
            # A cursor of its own, closed (rolled back if not committed) at the end, as an HTTP request's.
            with contextlib.closing(self.registry.cursor()) as cr:
                uid = self.public_uid if job.public else odoo.SUPERUSER_ID
                env = odoo.api.Environment(cr, uid, {})
                if job.mode == "http":
                    slot.value = odoo.service.model.retrying(functools.partial(self._traced, job.func, env, slot), env)
                elif job.mode == "cron":
                    slot.value = job.func(env)
                else:
                    raise ValueError(job.mode)
        except BaseException as error:  # noqa: BLE001 - reported by the scenario
            slot.error = error
            slot.tb = traceback.format_exc()
        finally:
            slot.finished = time.perf_counter()
            slot.elapsed = slot.finished - started

    @staticmethod
    def _traced(func, env, slot: Slot):
        """func(env), noting where a concurrency error makes retrying() replay the request."""
        from psycopg2 import OperationalError  # noqa: PLC0415

        from odoo.service.model import PG_CONCURRENCY_EXCEPTIONS_TO_RETRY  # noqa: PLC0415

        try:
            return func(env)
        except OperationalError as error:
            if isinstance(error, PG_CONCURRENCY_EXCEPTIONS_TO_RETRY):
                slot.replays.append(replay_site(error))
            raise

    def _pg(self):
        import psycopg2  # noqa: PLC0415

        connection = psycopg2.connect(
            dbname=self.db, host=os.environ.get("PGHOST", "localhost"), port=os.environ.get("PGPORT", "5432"),
            user=os.environ.get("ODOO_DB_USER", "odoo"), password=os.environ.get("ODOO_DB_PASSWORD", "odoo"),
        )
        connection.autocommit = True
        return connection

    def _diagnose(self, hung: list[threading.Thread]) -> str:
        lines = []
        frames = sys._current_frames()
        for thread in hung:
            frame = frames.get(thread.ident)
            stack = "".join(traceback.format_stack(frame)[-12:]) if frame else "    (no frame)\n"
            lines.append(f"  stack of {thread.name}:\n{stack}")
        with contextlib.closing(self._pg()) as connection, connection.cursor() as cr:
            cr.execute("""
                SELECT pid, state, wait_event_type, wait_event, pg_blocking_pids(pid),
                       round(extract(epoch FROM now() - xact_start)::numeric, 1), left(query, 140)
                  FROM pg_stat_activity
                 WHERE datname = current_database() AND pid != pg_backend_pid() AND state != 'idle'
                 ORDER BY xact_start""")
            lines.append("  database sessions (pid, state, wait, blocked by, transaction age s, query):")
            lines += [f"    {row}" for row in cr.fetchall()]
        return "\n".join(lines)

    def _unblock(self, threads: list[threading.Thread]) -> None:
        """Free the hung workers so that the next scenarios run: cancel the lock waits, then terminate."""
        with contextlib.closing(self._pg()) as connection, connection.cursor() as cr:
            for statement in (
                "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid != pg_backend_pid() AND wait_event_type IN ('Lock', 'LWLock')",
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid != pg_backend_pid() AND state != 'idle'",
            ):
                cr.execute(statement)
                deadline = time.monotonic() + 5
                for thread in threads:
                    thread.join(max(0.0, deadline - time.monotonic()))
                if not any(thread.is_alive() for thread in threads):
                    return

    # -- reading the outcome ------------------------------------------------------------------------------
    @staticmethod
    def replays(slots: dict[str, Slot], counter: Counter | None = None) -> Counter:
        """Where retrying() replayed the requests of this step (added to `counter`)."""
        counter = Counter() if counter is None else counter
        for slot in slots.values():
            counter.update(slot.replays)
        return counter

    def token_works(self, value: str) -> bool:
        """Whether Daraja still takes this bearer token (it revokes a token when it issues another)."""
        request = urllib.request.Request(
            self.sim.base_url + "/mpesa/stkpushquery/v1/query", data=b"{}", method="POST",
            headers={"Authorization": f"Bearer {value}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5):
                return True
        except urllib.error.HTTPError as error:
            return error.code != 401  # 400: the token passed, the empty query did not

    def pushes_sent(self, since: int) -> list[Any]:
        """The STK pushes Daraja accepted (prompts on a phone) since the `since`-th push request."""
        return [r for r in self.sim.requests_for("stk_push")[since:] if r.status == 200]

    def pushes_refused(self, since: int) -> int:
        """Push requests Daraja refused (a revoked token is refused with 401, then resent by the client)."""
        return sum(1 for r in self.sim.requests_for("stk_push")[since:] if r.status != 200)

    @staticmethod
    def worker_errors(slots: dict[str, Slot], expected: tuple[type[BaseException], ...] = ()) -> list[str]:
        return [
            f"{slot.name}: {slot.error!r}\n{slot.tb}" for slot in slots.values()
            if slot.error is not None and not isinstance(slot.error, expected)
        ]

    def confirmations(self, env, tx) -> int:
        """How many times the transaction went to done: Odoo logs each transition on its orders."""
        return env["mail.message"].search_count([
            ("model", "=", "sale.order"), ("res_id", "in", tx.sale_order_ids.ids),
            ("body", "ilike", f"reference {tx.reference} for"), ("body", "ilike", "has been confirmed"),
        ])

    # -- scenarios ------------------------------------------------------------------------------------------
    def run(self, number: str, title: str, scenario: Callable[[Checks], None]) -> None:
        checks = Checks()
        mark = len(self.capture.records)
        sites_before = set(REPLAY_TRACEBACKS)
        started = time.perf_counter()
        try:
            scenario(checks)
        except Hang as hang:
            checks.expect(False, f"HANG (deadlock?): {hang}")
        except Exception:  # noqa: BLE001 - the scenario line says what broke
            checks.expect(False, f"the scenario itself broke:\n{traceback.format_exc()}")
        records = [r for r in self.capture.since(mark) if r.levelno >= logging.ERROR]
        errors = [r for r in records if not expected_sql_error(r)]
        if len(records) > len(errors):
            checks.fact(f"expected concurrency errors logged by odoo.sql_db {len(records) - len(errors)}")
        checks.expect(not errors, f"{len(errors)} ERROR log(s): " + " | ".join(
            f"{r.name}: {r.getMessage()}" + (f"\n{''.join(traceback.format_exception(*r.exc_info))}"
                                             if r.exc_info else "")
            for r in errors[:3]
        ))
        elapsed = time.perf_counter() - started
        status = "PASS" if checks.ok else "FAIL"
        print(f"{status} {number}. {title}: {'; '.join(checks.facts)} [{elapsed:.2f} s]", flush=True)
        for failure in checks.failures:
            print("    - " + failure.replace("\n", "\n      "), flush=True)
        for site in sorted(set(REPLAY_TRACEBACKS) - sites_before) if checks.failures else ():
            print(f"    replayed from {site}; first traceback:\n      "
                  + REPLAY_TRACEBACKS[site].rstrip().replace("\n", "\n      "), flush=True)
        if checks.ok:
            self.passed += 1
        else:
            self.failed += 1

    @staticmethod
    def sites(replays: Counter) -> str:
        return ", ".join(f"{count} x {site}" for site, count in replays.most_common()) or "none"

    def s1_token(self, c: Checks) -> None:
        """8 workers need a token while the token table is empty: Daraja issues exactly one."""
        self.clear_tokens()
        requests_before, issued_before = self.sim.token_requests, self.sim.tokens_issued
        with self.env() as env:
            events_before = env["muchiri.mpesa.event"].search_count([("kind", "=", "token")])

        def token(env):
            return env["payment.provider"].sudo().browse(self.provider_id)._mpesa_client().access_token().value

        # Daraja's OAuth often takes a while: the other workers are surely waiting for the first one.
        self.sim.delay_next(TOKEN_DELAY, operations=["token"])
        slots = self.race("s1", [Job(f"worker{i}", token) for i in range(8)])
        errors = self.worker_errors(slots)
        values = {slot.value for slot in slots.values() if slot.error is None}
        requests = self.sim.token_requests - requests_before
        issued = self.sim.tokens_issued - issued_before
        with self.env() as env:
            env.cr.execute("SELECT value FROM muchiri_mpesa_token")
            stored = [row[0] for row in env.cr.fetchall()]
            events = env["muchiri.mpesa.event"].search_count([("kind", "=", "token")]) - events_before
        works = bool(stored) and self.token_works(stored[0])
        c.fact(f"OAuth requests {requests}, tokens issued {issued}, distinct values returned {len(values)}, "
               f"stored rows {len(stored)}, stored token accepted by Daraja {works}, token audit events {events}, "
               f"replays: {self.sites(self.replays(slots))}, slowest worker "
               f"{max(s.elapsed for s in slots.values()):.2f} s")
        c.expect(not errors, "worker errors:\n" + "\n".join(errors))
        c.expect(requests == 1 and issued == 1, f"{requests} OAuth requests / {issued} tokens (expected 1)")
        c.expect(len(values) == 1 and stored == list(values), f"values {len(values)}, stored {len(stored)}")
        c.expect(works, "Daraja refuses the stored token: another one was issued after it")
        c.expect(events == 1, f"{events} token audit events (expected 1)")

    def s2_push_while_token_refreshes(self, c: Checks) -> None:
        """The reviewer's deadlock: the push's token refresh (own cursor) vs the audit insert (push cursor)."""
        with self.env() as env:
            reference = self.new_draft_tx(env, "S2").reference
        self.clear_tokens()
        issued_before, pushes_before = self.sim.tokens_issued, len(self.sim.requests_for("stk_push"))
        slots = self.race("s2", [Job("push", lambda env: self.controller_push(env, reference, PHONE_SANDBOX))])
        slot = slots["push"]
        c.expect(not self.worker_errors(slots), "worker error:\n" + "\n".join(self.worker_errors(slots)))
        with self.env() as env:
            tx = env["payment.transaction"].search([("reference", "=", reference)])
            kinds = Counter(tx.mpesa_event_ids.mapped("kind"))
            c.fact(f"returned {slot.value!r} in {slot.elapsed:.2f} s, state {tx.state}, CheckoutRequestID "
                   f"{tx.provider_reference or '-'}, audit events {dict(kinds)}, tokens issued "
                   f"{self.sim.tokens_issued - issued_before}, pushes {len(self.pushes_sent(pushes_before))}")
            c.expect(slot.error is None and slot.value is None, f"the push returned {slot.value!r}")
            c.expect(tx.state == "pending" and bool(tx.provider_reference), "not committed pending")
            c.expect(kinds.get("token") == 1 and kinds.get("stk_push") == 1, "token/stk_push audit events")

    def s2b_pushes_while_token_refreshes(self, c: Checks) -> None:
        """Extra: 4 different transactions pushed at once with the token table empty."""
        with self.env() as env:
            references = [self.new_draft_tx(env, f"S2B{i}").reference for i in range(4)]
        self.clear_tokens()
        issued_before, pushes_before = self.sim.tokens_issued, len(self.sim.requests_for("stk_push"))
        jobs = [Job(f"push{i}", functools.partial(self.controller_push, reference=ref, phone=self.new_phone()))
                for i, ref in enumerate(references)]
        self.sim.delay_next(TOKEN_DELAY, operations=["token"])
        slots = self.race("s2b", jobs)
        errors = self.worker_errors(slots)
        with self.env() as env:
            txs = env["payment.transaction"].search([("reference", "in", references)])
            states = Counter(txs.mapped("state"))
            stuck = txs.filtered(lambda tx: tx.state == "draft" and tx.mpesa_push_sent_at)
            token_events = len(txs.mpesa_event_ids.filtered(lambda e: e.kind == "token"))
        issued = self.sim.tokens_issued - issued_before
        pushes = len(self.pushes_sent(pushes_before))
        c.fact(f"results {[s.value if s.error is None else type(s.error).__name__ for s in slots.values()]}, "
               f"states {dict(states)}, stuck in draft after an attempt {len(stuck)}, tokens issued {issued}, "
               f"push requests refused by Daraja {self.pushes_refused(pushes_before)}, "
               f"token audit events {token_events}, pushes {pushes}, replays: {self.sites(self.replays(slots))}, "
               f"slowest {max(s.elapsed for s in slots.values()):.2f} s")
        c.expect(not errors, "worker errors:\n" + "\n".join(errors))
        c.expect(states == Counter(pending=4) and pushes == 4, "not 4 pending transactions and 4 pushes")
        c.expect(issued == 1 and token_events == 1, f"{issued} tokens issued (expected 1)")

    def _push_race(self, c: Checks, label: str, two_txs: bool) -> None:
        ValidationError = self.odoo.exceptions.ValidationError
        outcomes, replays, slowest, resent = Counter(), Counter(), 0.0, 0
        for i in range(self.repeat):
            with self.env() as env:
                order = self.new_order(env, f"{label}R{i}")
                txs = [self.new_draft_tx(env, f"{label}R{i}", order) for _ in range(2 if two_txs else 1)]
                order_id, tx_ids = order.id, [tx.id for tx in txs]
                references = [tx.reference for tx in txs] * (1 if two_txs else 2)
            phones = [self.new_phone(), self.new_phone()] if two_txs else [self.new_phone()] * 2
            pushes_before = len(self.sim.requests_for("stk_push"))
            delay = [0.0, 0.0, 0.002, 0.005, 0.01][i % 5]
            jobs = [Job(f"click{k}", functools.partial(self.controller_push, reference=references[k], phone=phones[k]),
                        delay=delay if k == i % 2 else 0.0) for k in range(2)]
            slots = self.race(f"{label}r{i}", jobs)
            self.replays(slots, replays)
            slowest = max([slowest] + [s.elapsed for s in slots.values()])
            errors = self.worker_errors(slots, expected=(ValidationError,))
            sent = self.pushes_sent(pushes_before)
            resent += self.pushes_refused(pushes_before)
            refused = [s for s in slots.values() if isinstance(s.error, ValidationError) or isinstance(s.value, str)]
            winners = [s for s in slots.values() if s.error is None and s.value is None]
            outcomes.update(["refused: " + (str(s.error.args[0]) if s.error else s.value)[:45] for s in refused])
            if not two_txs and len(winners) == 2 and len(sent) == 1:
                # A click replayed (serialization failure) once the other's prompt is recorded returns
                # quietly without sending (see _mpesa_send_stk_push): one prompt, both "sent".
                outcomes["returned None after a replay, without a second push" if any(
                    s.replays for s in winners) else "returned None without a replay or a second push"] += 1
                refused, winners = winners[1:], winners[:1]
            with self.env() as env:
                txs = env["payment.transaction"].browse(tx_ids)
                order = env["sale.order"].browse(order_id)
                pending = txs.filtered(lambda tx: tx.state == "pending")
                # Accepted pushes: one refused with 401 (revoked token) is resent by the client, by design.
                pushed_events = txs.mpesa_event_ids.filtered(lambda e: e.kind == "stk_push" and e.http_status == 200)
                prefix = f"round {i}: "
                c.expect(not errors, prefix + "worker errors:\n" + "\n".join(errors))
                c.expect(len(sent) == 1, prefix + f"{len(sent)} STK pushes reached Daraja (expected 1)")
                c.expect(len(winners) == 1 and len(refused) == 1,
                         prefix + f"{len(winners)} sent / {len(refused)} refused or quiet (expected 1 / 1): "
                         + str([(s.value, s.error) for s in slots.values()]))
                c.expect(len(pending) == 1 and len(pushed_events) == 1,
                         prefix + f"{len(pending)} pending transactions, {len(pushed_events)} accepted stk_push events")
                if two_txs and len(pending) == 1:
                    loser = txs - pending
                    # Refused before anything left: cancelled with the reason (or left draft by a replay).
                    c.expect(loser.state in ("draft", "cancel") and not loser.mpesa_push_sent_at,
                             prefix + f"the refused transaction is {loser.state}, sent at {loser.mpesa_push_sent_at}")
                    c.expect(order.mpesa_phone == pending.mpesa_phone, prefix + "the order's phone is not the winner's")
                if sent and len(pending) == 1:
                    c.expect(sent[0].response_body.get("CheckoutRequestID") == pending.provider_reference,
                             prefix + "the pending transaction does not hold the CheckoutRequestID of the push")
        c.fact(f"{self.repeat} rounds; losers: {dict(outcomes)}; push requests refused by Daraja {resent}; "
               f"replays: {self.sites(replays)}; slowest worker {slowest:.2f} s")

    def s3_double_click(self, c: Checks) -> None:
        self._push_race(c, "S3", two_txs=False)

    def s4_same_order(self, c: Checks) -> None:
        self._push_race(c, "S4", two_txs=True)

    def s5_callback_vs_cron(self, c: Checks) -> None:
        settled_by, states, replays, slowest, queries = Counter(), Counter(), Counter(), 0.0, Counter()
        for i in range(self.rounds):
            prompt = self.paid_prompt(f"S5R{i}", due=True)
            order_id, tx_id, checkout_request_id = prompt.order_id, prompt.tx_id, prompt.checkout_request_id
            sim_tx = prompt.sim_tx
            queries_before = sim_tx.queries
            # Both at once, then one or the other a little late: the lock changes hands at every point.
            lag = [0.0, 0.0, 0.003, 0.003, 0.01, 0.01, 0.02, 0.02, 0.05, 0.05][i % 10]
            jobs = [
                Job("cron", self.cron_reconcile, mode="cron", public=False, delay=lag if i % 2 else 0.0),
                Job("callback", functools.partial(self.controller_callback, raw_body=prompt.body),
                    delay=0.0 if i % 2 else lag),
                Job("settle", self.cron_settle, mode="cron", public=False, delay=lag),
            ]
            slots = self.race(f"s5r{i}", jobs)
            with self.env() as env:  # The run the callback woke, if the racing one came too early.
                self.cron_settle(env)
            self.replays(slots, replays)
            slowest = max([slowest] + [s.elapsed for s in slots.values()])
            prefix = f"round {i} ({'cron' if i % 2 else 'callback'} {lag * 1000:.0f} ms late): "
            errors = self.worker_errors(slots)
            c.expect(not errors, prefix + "worker errors:\n" + "\n".join(errors))
            with self.env() as env:
                env["payment.transaction"].browse(tx_id)._post_process()
            with self.env() as env:
                tx = env["payment.transaction"].browse(tx_id)
                events = env["muchiri.mpesa.event"].search([
                    ("kind", "=", "stk_callback"), ("checkout_request_id", "=", checkout_request_id),
                ])
                payments = env["account.payment"].search_count([("payment_transaction_id", "=", tx.id)])
                confirmations = self.confirmations(env, tx)
                settled_by[tx.mpesa_settled_by or "-"] += 1
                states.update(events.mapped("state"))
                queries[self.sim.transaction(checkout_request_id).queries - queries_before] += 1
                c.expect(tx.state == "done", prefix + f"the transaction is {tx.state}: {tx.state_message}")
                c.expect(tx.mpesa_receipt_number == sim_tx.receipt,
                         prefix + f"receipt {tx.mpesa_receipt_number!r}, Daraja's is {sim_tx.receipt!r}")
                c.expect(confirmations == 1, prefix + f"set done {confirmations} times")
                c.expect(payments == 1, prefix + f"{payments} account.payment for the transaction (expected 1)")
                c.expect(len(events) == 1 and events.state == "processed",
                         prefix + f"callback events {events.mapped('state')} {events.mapped('message')}")
                c.expect(env["sale.order"].browse(order_id).state == "sale", prefix + "the order is not confirmed")
        c.fact(f"{self.rounds} rounds, all done once with Daraja's receipt and one payment; settled by "
               f"{dict(settled_by)}; callback events {dict(states)}; STK queries per round {dict(queries)}; "
               f"replays: {self.sites(replays)}; slowest worker {slowest:.2f} s")

    def s9_poll_vs_post_processing_job(self, c: Checks) -> None:
        """A paid prompt, its callback settled: the status page's poll and Odoo's post-processing job (which
        the callback woke) post-process it at once.  One confirms and invoices the order; the other leaves it
        (no second confirmation into a serialization failure, which Odoo logs at ERROR)."""
        replays, done_by, slowest = Counter(), Counter(), 0.0
        mark = len(self.capture.records)

        def poll(env, tx_id):  # PaymentPostProcessing.poll_status, as the public user, on the sudo transaction.
            tx = env["payment.transaction"].sudo().browse(tx_id)
            if not tx.is_post_processed:
                tx._post_process()
            return "poll" if tx.is_post_processed else "-"

        def job(env, tx_id):  # ir.cron._run_job of payment.cron_post_process_payment_tx, on this transaction.
            tx = env["payment.transaction"].browse(tx_id)
            tx._cron_post_process()
            env.cr.commit()
            return "job" if tx.is_post_processed else "-"

        for i in range(self.rounds):
            prompt = self.paid_prompt(f"S9R{i}", due=False)
            with self.env() as env:
                self.controller_callback(env, prompt.body)
            with self.env() as env:
                self.cron_settle(env)
            with self.env() as env:
                tx = env["payment.transaction"].browse(prompt.tx_id)
                c.expect(tx.state == "done" and not tx.is_post_processed,
                         f"round {i}: not a paid, unprocessed prompt ({tx.state}, {tx.is_post_processed})")
            lag = [0.0, 0.0, 0.005, 0.005, 0.02, 0.02, 0.05, 0.05, 0.1, 0.1][i % 10]
            slots = self.race(f"s9r{i}", [
                Job("poll", functools.partial(poll, tx_id=prompt.tx_id), delay=0.0 if i % 2 else lag),
                Job("job", functools.partial(job, tx_id=prompt.tx_id), mode="cron", public=False,
                    delay=lag if i % 2 else 0.0),
            ])
            self.replays(slots, replays)
            slowest = max([slowest] + [slot.elapsed for slot in slots.values()])
            errors = self.worker_errors(slots)
            c.expect(not errors, f"round {i}: worker errors:\n" + "\n".join(errors))
            done_by.update(slot.value for slot in slots.values() if slot.value and slot.value != "-")
            with self.env() as env:
                tx = env["payment.transaction"].browse(prompt.tx_id)
                order = env["sale.order"].browse(prompt.order_id)
                payments = env["account.payment"].search_count([("payment_transaction_id", "=", tx.id)])
                c.expect(tx.is_post_processed, f"round {i}: not post-processed")
                c.expect(order.state == "sale", f"round {i}: the order is {order.state}")
                c.expect(self.confirmations(env, tx) == 1, f"round {i}: confirmed {self.confirmations(env, tx)} times")
                c.expect(payments == 1, f"round {i}: {payments} account.payment (expected 1)")
                c.expect(len(order.invoice_ids) <= 1, f"round {i}: {len(order.invoice_ids)} invoices")
        serialization = [record for record in self.capture.since(mark)
                         if record.levelno >= logging.ERROR and expected_sql_error(record)]
        c.expect(not serialization, f"{len(serialization)} serialization failures logged at ERROR: the two"
                                    " post-processed the same payment")
        c.fact(f"{self.rounds} rounds, each order confirmed once with one payment; post-processed by {dict(done_by)};"
               f" replays: {self.sites(replays)}; slowest worker {slowest:.2f} s")

    def s6_duplicate_callbacks(self, c: Checks) -> None:
        state_sets, replays, slowest = Counter(), Counter(), 0.0
        for i in range(self.repeat):
            prompt = self.paid_prompt(f"S6R{i}", due=False)
            tx_id, checkout_request_id, sim_tx = prompt.tx_id, prompt.checkout_request_id, prompt.sim_tx
            delay = [0.0, 0.0, 0.002, 0.005, 0.01][i % 5]
            jobs = [Job(f"delivery{k}", functools.partial(self.controller_callback, raw_body=prompt.body),
                        delay=delay if k else 0.0) for k in range(2)]
            # Two settlement runs at once (the cron, and a run a second worker started).
            jobs += [Job(f"settle{k}", self.cron_settle, mode="cron", public=False, delay=delay * k)
                     for k in range(2)]
            slots = self.race(f"s6r{i}", jobs)
            with self.env() as env:  # The run the callbacks woke, if the racing ones came too early.
                self.cron_settle(env)
            self.replays(slots, replays)
            slowest = max([slowest] + [s.elapsed for s in slots.values()])
            prefix = f"round {i}: "
            errors = self.worker_errors(slots)
            c.expect(not errors, prefix + "worker errors:\n" + "\n".join(errors))
            with self.env() as env:
                tx = env["payment.transaction"].browse(tx_id)
                events = env["muchiri.mpesa.event"].search([
                    ("kind", "=", "stk_callback"), ("checkout_request_id", "=", checkout_request_id),
                ])
                event_states = sorted(events.mapped("state"))
                state_sets[", ".join(event_states)] += 1
                receipts = env["payment.transaction"].search_count([("mpesa_receipt_number", "=", sim_tx.receipt)])
                confirmations = self.confirmations(env, tx)
                c.expect(tx.state == "done" and tx.mpesa_settled_by == "callback",
                         prefix + f"the transaction is {tx.state} (settled by {tx.mpesa_settled_by})")
                c.expect(tx.mpesa_receipt_number == sim_tx.receipt and receipts == 1,
                         prefix + f"receipt {tx.mpesa_receipt_number!r} on {receipts} transactions")
                c.expect(confirmations == 1, prefix + f"set done {confirmations} times")
                c.expect(event_states == ["ignored", "processed"],
                         prefix + f"callback events {event_states} {events.mapped('message')}")
        c.fact(f"{self.repeat} rounds, done once each; callback events {dict(state_sets)}; replays: "
               f"{self.sites(replays)}; slowest worker {slowest:.2f} s")

    def s7_order_edited_during_push(self, c: Checks) -> None:
        """Extra: a salesperson saves the order while its prompt's HTTP request is at Daraja."""
        with self.env() as env:
            order = self.new_order(env, "S7")
            reference, order_id = self.new_draft_tx(env, "S7", order).reference, order.id
        phone = self.new_phone()
        pushes_before = len(self.sim.requests_for("stk_push"))
        self.sim.delay_next(1.0, operations=["stk_push"])  # Daraja takes a second to answer, as it often does.

        def edit(env):
            env["sale.order"].browse(order_id).note = "Deliver to gate B"

        slots = self.race("s7", [
            Job("push", functools.partial(self.controller_push, reference=reference, phone=phone)),
            Job("salesperson", edit, public=False, delay=0.3),
        ])
        sent = self.pushes_sent(pushes_before)
        checkout_request_id = sent[0].response_body.get("CheckoutRequestID") if sent else None
        with self.env() as env:
            tx = env["payment.transaction"].search([("reference", "=", reference)])
            events = Counter(tx.mpesa_event_ids.mapped("kind"))
            push = slots["push"]
            c.fact(f"push returned {push.value if push.error is None else repr(push.error)}; prompts on the phone "
                   f"{len(sent)}; transaction {tx.state} with CheckoutRequestID {tx.provider_reference or '-'} "
                   f"(Daraja's: {checkout_request_id}); audit events {dict(events)}; replays: "
                   f"{self.sites(self.replays(slots))}; the salesperson saved "
                   f"{slots['push'].finished - slots['salesperson'].finished:.2f} s before the push ended")
            errors = self.worker_errors(slots)
            c.expect(not errors, "worker errors:\n" + "\n".join(errors))
            c.expect(len(sent) == 1, f"{len(sent)} pushes reached Daraja")
            c.expect(tx.state == "pending" and tx.provider_reference == checkout_request_id,
                     f"the prompt is on the phone but the transaction is {tx.state} without its CheckoutRequestID")


    def s8_double_refund(self, c: Checks) -> None:
        """Two accountants (or a double click on two workers) refund one M-Pesa payment at once."""
        with self.env() as env:
            env["payment.provider"].browse(self.provider_id).write({
                "mpesa_initiator_name": self.sim.initiator_name,
                "mpesa_initiator_password": self.sim.initiator_password,
                "mpesa_initiator_certificate": self.sim.certificate_pem,
            })
        outcomes, replays, slowest = Counter(), Counter(), 0.0
        for i in range(self.repeat):
            prompt = self.paid_prompt(f"S8R{i}", due=False)
            tx_id = prompt.tx_id
            with self.env() as env:  # Paid by its callback, then post-processed: a posted payment.
                self.controller_callback(env, prompt.body)
            with self.env() as env:
                self.cron_settle(env)
            with self.env() as env:
                tx = env["payment.transaction"].browse(tx_id)
                tx._post_process()
                amount = tx.amount
            reversals_before = len(self.sim.initiator_requests)

            def refund(env, tx_id=tx_id, amount=amount):
                env["payment.transaction"].browse(tx_id).action_refund(amount_to_refund=amount)

            delay = [0.0, 0.0, 0.002, 0.005, 0.01][i % 5]
            slots = self.race(f"s8r{i}", [
                Job(f"accountant{k}", refund, public=False, delay=delay if k else 0.0) for k in range(2)
            ])
            self.replays(slots, replays)
            slowest = max([slowest] + [s.elapsed for s in slots.values()])
            prefix = f"round {i}: "
            sent = [r for r in self.sim.initiator_requests[reversals_before:] if r["api"] == "reversal"]
            for slot in slots.values():
                outcomes["refund sent" if slot.error is None else f"refused: {str(slot.error)[:45]}"] += 1
            errors = self.worker_errors(slots, expected=(self.odoo.exceptions.ValidationError,))
            c.expect(not errors, prefix + "worker errors:\n" + "\n".join(errors))
            c.expect(len(sent) == 1, prefix + f"{len(sent)} reversals reached Daraja (expected 1)")
            with self.env() as env:
                tx = env["payment.transaction"].browse(tx_id)
                refunds = tx.child_transaction_ids.filtered(lambda t: t.operation == "refund")
                c.expect(len(refunds) == 1 and refunds.state in ("pending", "done"),
                         prefix + f"refund transactions {refunds.mapped('state')} (expected one, pending or done)")
                c.expect(sum(1 for slot in slots.values() if slot.error is None) == 1,
                         prefix + "exactly one worker sent the refund")
        c.fact(f"{self.repeat} rounds, one reversal each; workers {dict(outcomes)}; replays: "
               f"{self.sites(replays)}; slowest worker {slowest:.2f} s")

    # -- the kill -9 scenarios: a real prefork Odoo --------------------------------------------------------------
    @contextlib.contextmanager
    def prefork(self, callback_base_url: bool = False):
        """A prefork Odoo on this database (2 HTTP workers, 1 cron worker), stopped when the block ends.

        :param callback_base_url: the prompts sent meanwhile give Daraja this Odoo's callback URL (else the
            listener's, as in the other scenarios)
        """
        server = odoo_prefork.PreforkOdoo(self.db, workers=2, max_cron_threads=1, extra_args=["--limit-time-real=60"])
        if callback_base_url:
            with self.env() as env:
                env["payment.provider"].browse(self.provider_id).mpesa_callback_base_url = server.base_url
        try:
            with server:
                yield server
        finally:
            if callback_base_url:
                with self.env() as env:
                    env["payment.provider"].browse(self.provider_id).mpesa_callback_base_url = \
                        self.listener.url.rsplit("/", 1)[0]

    def callback_path(self) -> str:
        with self.env() as env:
            provider = env["payment.provider"].browse(self.provider_id)
            return provider._mpesa_daraja_url("stk").removeprefix(provider._mpesa_callback_base_url())

    @staticmethod
    def http_post(port: int, path: str, body: bytes, timeout: float = 60.0,
                  headers: dict[str, str] | None = None) -> tuple[int | None, bytes]:
        """POST on a connection of its own: (status, body), status None when no answer came (refused, reset)."""
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            connection.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
            response = connection.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException):
            return None, b""
        finally:
            connection.close()

    def worker_in_transaction(self, server: odoo_prefork.PreforkOdoo, workers: Callable[[], list[int]],
                              timeout: float) -> tuple[int, bool]:
        """One of `workers()` that has a database transaction open on this database right now (in the middle of
        a request or a job), or, after `timeout`, any of them: (pid, whether it was caught in a transaction)."""
        pg_port = int(os.environ.get("PGPORT", "5432"))
        deadline = time.monotonic() + timeout
        with contextlib.closing(self._pg()) as connection, connection.cursor() as cr:
            while time.monotonic() < deadline:
                cr.execute("SELECT client_port FROM pg_stat_activity WHERE datname = current_database()"
                           " AND pid != pg_backend_pid() AND xact_start IS NOT NULL")
                busy = {row[0] for row in cr.fetchall()}
                for pid in workers():
                    if busy & set(server.connections(pid, pg_port)):
                        return pid, True
                time.sleep(0.005)
        return workers()[0], False

    def run_job(self, xmlid: str) -> str | None:
        """One run of a cron job as ir.cron._run_job runs it; an explanation when the job does not exist."""
        with self.env() as env:
            cron = env.ref(xmlid, raise_if_not_found=False)
            if not cron:
                return f"the job {xmlid} does not exist"
            try:
                cron._callback(cron.cron_name, cron.ir_actions_server_id.id)
            finally:
                env.cr.commit()
        return None

    def run_jobs_until_idle(self, c: Checks, tx_ids: list[int], rounds: int = 12) -> int:
        """With Odoo stopped: the settlement job, the reconciliation job and Odoo's post-processing, until none of
        the transactions is pending and none of their callbacks waits.  What would wait for its next attempt
        (back-off, next status check) is made due at once, as time passing would.  Returns the rounds run."""
        from odoo.addons.muchiri_mpesa import const  # noqa: PLC0415

        waiting_states = getattr(const, "CALLBACK_WAITING_STATES", ("received", "unmatched", "error"))
        missing: set[str] = set()
        ran = 0
        while ran < rounds:
            ran += 1
            with self.env() as env:
                now = self.odoo.fields.Datetime.now() - timedelta(seconds=1)
                txs = env["payment.transaction"].browse(tx_ids)
                txs.filtered(lambda tx: tx.state == "pending").write({"mpesa_next_check_at": now})
                events = env["muchiri.mpesa.event"].search([
                    ("kind", "=", "stk_callback"), ("state", "in", list(waiting_states)),
                    "|", ("transaction_id", "in", tx_ids),
                    ("checkout_request_id", "in", [r for r in txs.mapped("provider_reference") if r]),
                ])
                if "next_attempt_at" in events._fields:
                    events.write({"next_attempt_at": now})
            for xmlid in (SETTLE_CRON, RECONCILE_CRON):
                problem = self.run_job(xmlid)
                if problem:
                    missing.add(problem)
            with self.env() as env:
                unprocessed = env["payment.transaction"].browse(tx_ids).filtered(
                    lambda tx: tx.state == "done" and not tx.is_post_processed)
                if unprocessed:  # (An empty recordset would post-process every transaction of the database.)
                    unprocessed._cron_post_process()
            with self.env() as env:
                txs = env["payment.transaction"].browse(tx_ids)
                pending = txs.filtered(lambda tx: tx.state in ("draft", "pending") and tx.provider_reference)
                references = [r for r in txs.mapped("provider_reference") if r]
                waiting = env["muchiri.mpesa.event"].search_count([
                    ("kind", "=", "stk_callback"), ("state", "in", list(waiting_states)),
                    "|", ("transaction_id", "in", tx_ids), ("checkout_request_id", "in", references),
                ])
                unprocessed = len(txs.filtered(lambda tx: tx.state == "done" and not tx.is_post_processed))
            if not pending and not waiting and not unprocessed:
                break
        for problem in sorted(missing):
            c.expect(False, f"{problem}: the new callback flow has not landed (settlement job run as a no-op)")
        return ran

    def prefork_errors(self, server: odoo_prefork.PreforkOdoo) -> tuple[list[str], int]:
        """The ERROR lines of the prefork Odoo's log that fail a scenario, and how many were only noise."""
        # A serialization failure's "bad query" record names the failure on its second line.
        records = [record for record in server.error_records() if not any(
            marker in record for marker in ("could not serialize access", "could not obtain lock"))]
        lines = [record.split("\n", 1)[0] for record in records]
        noise = [line for line in lines if any(f" {name}: " in line for name in PREFORK_NOISE)]
        return [line for line in lines if line not in noise], len(noise)

    def paid_prompts(self, tag: str, n: int) -> list[PaidPrompt]:
        """`n` pending transactions of their own orders whose prompts the customers paid: real prompts on distinct
        phones, their answers known in 0.2 s, the simulator's own callbacks sent to the listener (what reaches
        Odoo is the caller's burst), their status checks a day away (only the callbacks settle them).

        :return: the paid prompts, in the order of their transactions
        """
        with self.env() as env:
            orders = [self.new_order(env, f"{tag}R{i}") for i in range(n)]
            provider = env["payment.provider"].browse(self.provider_id)
            client = provider._mpesa_client()
            pushed = [client.stk_push(phone=self.new_phone(), amount=int(order.amount_total), reference=f"{tag}R{i}",
                                      description="Kill test", callback_url=self.listener.url)
                      for i, order in enumerate(orders)]
        for result in pushed:
            self.wait_final(result.checkout_request_id)
        with self.env() as env:
            later = self.odoo.fields.Datetime.now() + timedelta(days=1)
            prompts = []
            for order, result in zip(orders, pushed, strict=True):
                tx = self.new_draft_tx(env, tag, env["sale.order"].browse(order.id))
                tx.write({
                    "provider_reference": result.checkout_request_id,
                    "mpesa_merchant_request_id": result.merchant_request_id,
                    "mpesa_phone": self.sim.transaction(result.checkout_request_id).phone,
                    "mpesa_requested_amount": int(tx.amount),
                    "mpesa_push_sent_at": self.odoo.fields.Datetime.now(), "mpesa_next_check_at": later,
                })
                tx._set_pending()
                prompts.append((order.id, tx.id, result.checkout_request_id))
        return [self.paid_prompt_of(*prompt) for prompt in prompts]

    def k1_kill_during_callbacks(self, c: Checks) -> None:
        """A burst of duplicated callbacks on a prefork Odoo; an HTTP worker killed -9 in the middle of one, later the
        cron worker in the middle of its work; the callers retry what got no answer, as Daraja does."""
        n = self.kill_txs
        copies = [2 + i % 3 for i in range(n)]  # 2 to 4 deliveries of each callback
        prompts = self.paid_prompts("K1", n)
        tx_ids, sim_txs, bodies = [p.tx_id for p in prompts], [p.sim_tx for p in prompts], [p.body for p in prompts]
        deliveries = [(i, bodies[i]) for i in range(n) for _ in range(copies[i])]
        random.Random(7).shuffle(deliveries)  # Duplicates race at every distance.
        statuses: list[list[int | None]] = [[] for _ in deliveries]
        path = self.callback_path()
        kill: dict[str, Any] = {}

        with self.prefork() as server:
            work: queue.Queue[int] = queue.Queue()
            for index in range(len(deliveries)):
                work.put(index)
            answered = threading.Semaphore(0)

            def caller() -> None:
                while True:
                    try:
                        index = work.get_nowait()
                    except queue.Empty:
                        return
                    for delay in (*CALLBACK_RETRY_DELAYS, None):
                        status, _answer = self.http_post(server.port, path, deliveries[index][1])
                        statuses[index].append(status)
                        if (status is not None and status < 500) or delay is None:
                            break
                        time.sleep(delay)  # Daraja's retry of a 5xx or of no answer.
                    answered.release()

            def killer() -> None:
                # A third of the burst answered, then the first HTTP worker caught with a transaction open; one
                # more third, then the cron worker (extra: it settles the callbacks in the new flow).
                for kind, workers in (("http", server.http_workers), ("cron", server.cron_workers)):
                    for _ in range(len(deliveries) // 3):
                        if not answered.acquire(timeout=self.timeout):
                            break
                    pid, in_transaction = self.worker_in_transaction(server, workers, timeout=3.0)
                    started = time.monotonic()
                    server.kill_worker(pid)
                    kill[kind] = pid, in_transaction
                    server.wait_workers(http=2, cron=1, exclude=[pid], timeout=self.timeout)
                    kill[f"{kind}_respawned_in"] = time.monotonic() - started

            started = time.monotonic()
            threads = [threading.Thread(target=caller, name=f"k1/caller{i}", daemon=True) for i in range(8)]
            threads.append(threading.Thread(target=killer, name="k1/killer", daemon=True))
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + max(self.timeout, 4.0 * len(deliveries))
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            hung = [thread.name for thread in threads if thread.is_alive()]
            burst = time.monotonic() - started
            errors, noise = self.prefork_errors(server)
        if hung:
            raise Hang(f"{', '.join(hung)} still running after {burst:.0f} s")
        with self.env() as env:
            done_by_odoo = len(env["payment.transaction"].browse(tx_ids).filtered(lambda tx: tx.state == "done"))
        rounds = self.run_jobs_until_idle(c, tx_ids)

        attempts = Counter(status for history in statuses for status in history)
        finals = Counter(history[-1] if history else None for history in statuses)
        ok = Counter(deliveries[index][0] for index, history in enumerate(statuses) if 200 in history)
        with self.env() as env:
            txs = env["payment.transaction"].browse(tx_ids)
            env.cr.execute("SELECT request_body, count(*) FROM muchiri_mpesa_event"
                           " WHERE kind = 'stk_callback' AND request_body = ANY(%s) GROUP BY request_body",
                           [[body.decode() for body in bodies]])
            kept = dict(env.cr.fetchall())
            payments = Counter(env["account.payment"].search([("payment_transaction_id", "in", tx_ids)])
                               .mapped("payment_transaction_id.id"))
            events = env["muchiri.mpesa.event"].search([("kind", "=", "stk_callback"), ("request_body", "in",
                                                        [body.decode() for body in bodies])])
            not_done = txs.filtered(lambda tx: tx.state != "done")
            twice = [tx.reference for tx in txs if self.confirmations(env, tx) != 1]
            receipts = {sim_tx.receipt: env["payment.transaction"].search(
                [("mpesa_receipt_number", "=", sim_tx.receipt)]).ids for sim_tx in sim_txs}
            wrong_receipts = [r for i, r in enumerate(receipts) if receipts[r] != [tx_ids[i]]]
            lost = [f"{txs[i].reference}: {ok[i]} answered 200, {kept.get(body.decode(), 0)} kept"
                    for i, body in enumerate(bodies) if kept.get(body.decode(), 0) < ok[i]]
            doubled = [tx_id for tx_id, count in payments.items() if count > 1]
            killed = "; ".join(
                f"{kind} worker {kill[kind][0]} killed {'inside' if kill[kind][1] else 'outside'} a database "
                f"transaction, respawned in {kill[f'{kind}_respawned_in']:.1f} s" for kind in ("http", "cron")
                if f"{kind}_respawned_in" in kill)
            c.fact(f"{n} transactions, {len(deliveries)} deliveries ({len(deliveries) - n} duplicates) from 8 "
                   f"callers in {burst:.1f} s; {killed}; answers {dict(attempts)}, final {dict(finals)}; "
                   f"{done_by_odoo} done when Odoo stopped, jobs then ran {rounds} round(s); "
                   f"states {dict(Counter(txs.mapped('state')))}, settled by "
                   f"{dict(Counter(txs.mapped('mpesa_settled_by')))}; callback events "
                   f"{dict(Counter(events.mapped('state')))}; payments {sum(payments.values())}; "
                   f"Odoo log ERROR lines {len(errors)} (+{noise} mail delivery) in {server.log_path}")
            c.expect("http" in kill, "no HTTP worker was killed")
            c.expect(not not_done, f"{len(not_done)} transactions not done: "
                     + ", ".join(f"{tx.reference} {tx.state} {tx.state_message or ''}" for tx in not_done[:5]))
            c.expect(not twice, f"{len(twice)} transactions not set done exactly once: {twice[:5]}")
            c.expect(not wrong_receipts, f"{len(wrong_receipts)} receipts not on exactly their one transaction: "
                     + ", ".join(f"{r} on {receipts[r]}" for r in wrong_receipts[:5]))
            c.expect(not doubled, f"{len(doubled)} transactions with two account.payment or more: {doubled[:5]}")
            c.expect(not lost, f"{len(lost)} callbacks answered 200 but not kept: {lost[:5]}")
            c.expect(finals == Counter({200: len(deliveries)}),
                     f"not every delivery ended with 200 after Daraja's retries: {dict(finals)}")
            c.expect(not any(status is not None and status >= 500 for status in attempts),
                     f"Odoo answered a 5xx: {dict(attempts)}")
            c.expect(not errors, f"{len(errors)} ERROR line(s) in {server.log_path}: " + " | ".join(errors[:3]))

    @staticmethod
    def rpc_outcome(status: int | None, body: bytes) -> str:
        """What a JSON-RPC call answered, in a few words."""
        if status is None:
            return "no answer"
        try:
            answer = json.loads(body)
        except ValueError:
            return f"HTTP {status}"
        if "error" in answer:
            return f"error {answer['error'].get('data', {}).get('message', answer['error'].get('message'))!r}"
        return f"result {answer.get('result')!r}"

    def k2_recover_by_hand(self, tx_id: int, checkout_request_id: str | None) -> str:
        """When the worker died before Daraja answered, nothing in Odoo knew the prompt's CheckoutRequestID:
        the prompt ends "outcome unknown" after five minutes (the cron), the unmatched-payment alert names its
        kept callback, and an accountant matches the two (the wizard, confirmed by Daraja's query)."""
        with self.env() as env:
            tx = env["payment.transaction"].browse(tx_id)
            if tx.state == "done" or not checkout_request_id:
                return "no recovery needed"
            env.cr.execute("UPDATE payment_transaction SET mpesa_push_sent_at = mpesa_push_sent_at"
                           " - interval '10 minutes' WHERE id = %s", [tx_id])
            env.invalidate_all()
            env["payment.transaction"]._mpesa_expire_unanswered_pushes()
            env.cr.commit()
            tx.invalidate_recordset()
            unknown = f"then {tx.state}, outcome unknown {tx.mpesa_outcome_unknown}"
            event = env["muchiri.mpesa.event"].search([
                ("kind", "=", "stk_callback"), ("checkout_request_id", "=", checkout_request_id),
                ("state", "=", "unmatched")], limit=1)
            if not event:
                return unknown + ", no unmatched callback to match"
            env = env(su=True)
            env["muchiri.mpesa.callback.match"].with_context(active_id=event.id).create(
                {"transaction_id": tx_id}).action_match()
            env.cr.commit()
            return unknown + ", matched by hand"

    def k2_kill_during_push(self, c: Checks) -> None:
        """The worker of a portal STK push is killed -9 while Daraja holds the push's answer."""
        from odoo.tools import hmac as hmac_tool  # noqa: PLC0415

        with self.env() as env:
            order = self.new_order(env, "K2")
            tx = self.new_draft_tx(env, "K2", order)
            tx_id, order_id, reference = tx.id, order.id, tx.reference
            # The token Odoo's transaction route gives the browser (payment.utils.generate_access_token, which
            # needs an HTTP request for its environment).
            token = hmac_tool(env(su=True), "generate_access_token", "|".join(
                str(value) for value in (tx.reference, tx.amount, tx.currency_id.id, tx.partner_id.id)))
        phone = self.new_phone()
        saved = (self.sim.callback_delay, self.sim.callback_retry_delays)
        pushes_before = len(self.sim.requests_for("stk_push"))
        calls: list[tuple[int | None, bytes]] = []
        kill: dict[str, Any] = {}

        def push_call(port: int) -> tuple[int | None, bytes]:
            payload = {"jsonrpc": "2.0", "method": "call", "id": 1,
                       "params": {"reference": reference, "phone": phone, "access_token": token}}
            return self.http_post(port, "/payment/mpesa/stk_push", json.dumps(payload).encode())

        try:
            # The customer answers after the kill and the respawn; Daraja retries its callback as it does.
            self.sim.callback_delay, self.sim.callback_retry_delays = KILL_CALLBACK_DELAY, CALLBACK_RETRY_DELAYS
            with self.prefork(callback_base_url=True) as server:
                self.sim.delay_next(KILL_PUSH_ANSWER_DELAY, operations=["stk_push"])
                caller = threading.Thread(target=lambda: calls.append(push_call(server.port)), name="k2/push",
                                          daemon=True)
                caller.start()
                deadline = time.monotonic() + self.timeout
                while time.monotonic() < deadline and "pid" not in kill:
                    if len(self.sim.requests_for("stk_push")) > pushes_before:  # Daraja has the push.
                        at_daraja = [pid for pid in server.http_workers() if server.connections(pid, self.sim.port)]
                        if at_daraja:
                            server.kill_worker(at_daraja[0])
                            kill.update(pid=at_daraja[0], after=time.monotonic())
                            break
                    time.sleep(0.01)
                if "pid" not in kill:
                    raise RuntimeError("no HTTP worker was seen waiting on Daraja's answer to the push")
                server.wait_workers(http=2, exclude=[kill["pid"]], timeout=self.timeout)
                kill["respawned_in"] = time.monotonic() - kill["after"]
                caller.join(self.timeout)
                # The distributor presses Pay again (or the browser resends): never a second prompt.
                calls.append(push_call(server.port))
                sent = self.pushes_sent(pushes_before)
                checkout_request_id = sent[0].response_body.get("CheckoutRequestID") if sent else None
                if checkout_request_id:
                    self.sim.wait_for_callback(checkout_request_id, timeout=self.timeout)
                    time.sleep(1.0)  # The cron worker's chance to settle what the callback woke it for.
                errors, noise = self.prefork_errors(server)
        finally:
            self.sim.callback_delay, self.sim.callback_retry_delays = saved
        with self.env() as env:
            before = env["payment.transaction"].browse(tx_id)
            state_before, reference_before = before.state, before.provider_reference
        rounds = self.run_jobs_until_idle(c, [tx_id])
        recovery = self.k2_recover_by_hand(tx_id, checkout_request_id)

        deliveries = self.sim.callbacks_for(checkout_request_id) if checkout_request_id else []
        with self.env() as env:
            tx = env["payment.transaction"].browse(tx_id)
            order = env["sale.order"].browse(order_id)
            done = order.transaction_ids.filtered(lambda t: t.state == "done")
            events = env["muchiri.mpesa.event"].search([
                ("kind", "=", "stk_callback"), ("checkout_request_id", "=", checkout_request_id or "-")])
            answers = [self.rpc_outcome(status, body) for status, body in calls]
            c.fact(f"worker {kill['pid']} killed while Daraja held the answer, respawned in "
                   f"{kill['respawned_in']:.1f} s; route answers {answers}; prompts on the phone {len(sent)}; "
                   f"callback deliveries {[d.status for d in deliveries]}, kept as "
                   f"{events.mapped('state')}; before the jobs {state_before} with CheckoutRequestID "
                   f"{reference_before or '-'}; after {rounds} job round(s) {tx.state} with "
                   f"{tx.provider_reference or '-'} (Daraja's {checkout_request_id}); {recovery}; "
                   f"Odoo log ERROR lines {len(errors)} (+{noise} mail delivery) in {server.log_path}")
            c.expect(len(sent) == 1, f"{len(sent)} prompts reached Daraja (expected exactly 1)")
            c.expect(len(done) <= 1, f"{len(done)} done transactions for the order (doubled)")
            c.expect(bool(events), "the callback of the prompt was not kept")
            c.expect(tx.state == "done" and tx.provider_reference == checkout_request_id,
                     f"the payment is lost: the prompt was paid but the transaction is {tx.state} with "
                     f"CheckoutRequestID {tx.provider_reference or 'none'} (Daraja's {checkout_request_id}); "
                     f"its callback waits as {events.mapped('state')}")
            c.expect(not errors, f"{len(errors)} ERROR line(s) in {server.log_path}: " + " | ".join(errors[:3]))

    # -- several Odoo servers on one database --------------------------------------------------------------------
    def two_server_prefork(self, label: str) -> odoo_prefork.PreforkOdoo:
        """One of the K3 servers: 2 HTTP workers and a cron worker, behind a proxy (--proxy-mode)."""
        log_path = Path(tempfile.gettempdir()) / f"odoo-prefork-{self.db}-{label}-{uuid.uuid4().hex[:6]}.log"
        # Odoo's default limit (120 s): an idle cron worker sleeps 60 to 69 s between its polls, and a limit under
        # that makes the master kill it for a timeout before it ever polls (unless a NOTIFY wakes it).
        return odoo_prefork.PreforkOdoo(self.db, workers=2, max_cron_threads=1, log_path=log_path,
                                        extra_args=["--limit-time-real=120", "--proxy-mode"])

    @staticmethod
    def inbound_events(env, bodies: list[bytes]) -> list[tuple[str, str, str]]:
        """(state, source address, body) of every exchange that kept one of these bodies (a callback or a C2B
        confirmation).  The scenario's only SQL on muchiri_mpesa_event."""
        env.cr.execute("SELECT state, remote_addr, request_body FROM muchiri_mpesa_event"
                       " WHERE request_body = ANY(%s) ORDER BY id", [[body.decode() for body in bodies]])
        return env.cr.fetchall()

    def paid_c2b(self, tag: str, n: int) -> tuple[list[int], list[str], list[bytes]]:
        """`n` orders, each paid in full by a customer at the paybill with the order's number as account: the
        simulator's confirmations go to the listener (what reaches Odoo is the caller's burst).

        :return: the orders' ids, the receipts (TransID) and the confirmation bodies, in the same order
        """
        from odoo.addons.muchiri_mpesa.daraja.simulator import C2B_CONFIRMATION  # noqa: PLC0415

        with self.env() as env:
            orders = [self.new_order(env, f"{tag}C{i}") for i in range(n)]
            order_ids, names = [order.id for order in orders], [order.name for order in orders]
            amount = int(orders[0].amount_total)
            env["payment.provider"].browse(self.provider_id)._mpesa_client().register_c2b_urls(
                SHORTCODE, "Completed", self.listener.url, self.listener.url)
        receipts = [self.sim.c2b_pay(amount, self.new_phone(), bill_ref=name) for name in names]
        bodies = []
        for receipt in receipts:
            delivery = self.sim.wait_for_deliveries(C2B_CONFIRMATION, reference=receipt, timeout=self.timeout)[0]
            bodies.append(json.dumps(delivery.body).encode())
        return order_ids, receipts, bodies

    def cron_backlog(self) -> int:
        """Active jobs due now (a fresh database has every job due: the servers first catch up with them)."""
        with self.env() as env:
            return env["ir.cron"].search_count([
                ("active", "=", True), ("nextcall", "<=", self.odoo.fields.Datetime.now())])

    def k3_two_servers(self, c: Checks) -> None:
        """Two prefork Odoo servers on one database behind a (simulated) load balancer; a burst of STK callbacks, C2B
        confirmations and their duplicates spread over both; one whole server killed -9 halfway, then restarted."""
        n = self.two_server_payments
        with self.env() as env:
            provider = env["payment.provider"].browse(self.provider_id)
            saved = {name: provider[name] for name in ("mpesa_ip_check", "mpesa_initiator_name")}
            # The source check refuses unknown addresses: the proxy's X-Forwarded-For must reach it.  Without an
            # initiator (nor Pull) that check confirms the C2B money: it is booked at once, as in production
            # set-ups that cannot ask M-Pesa.
            provider.write({"mpesa_ip_check": "enforce", "mpesa_initiator_name": False})
            payments_before = env["account.payment"].search_count([])
            settle_id = env.ref(SETTLE_CRON).id
            post_id = env.ref("payment.cron_post_process_payment_tx").id
        try:
            self._k3_two_servers(c, n, payments_before, settle_id, post_id)
        finally:
            with self.env() as env:
                env["payment.provider"].browse(self.provider_id).write(saved)

    def _k3_two_servers(self, c: Checks, n: int, payments_before: int, settle_id: int, post_id: int) -> None:
        prompts = self.paid_prompts("K3", n)
        tx_ids, sim_txs, stk_bodies = [p.tx_id for p in prompts], [p.sim_tx for p in prompts], [p.body for p in prompts]
        order_ids, receipts, c2b_bodies = self.paid_c2b("K3", n)
        with self.env() as env:
            provider = env["payment.provider"].browse(self.provider_id)
            base = provider._mpesa_callback_base_url()
            stk_path = provider._mpesa_daraja_url("stk").removeprefix(base)
            c2b_path = provider._mpesa_daraja_url("c2b_confirmation").removeprefix(base)
        # 2 or 3 deliveries of each body (Daraja's duplicates), shuffled: duplicates race at every distance.
        deliveries = [(stk_path, body) for i, body in enumerate(stk_bodies) for _ in range(2 + i % 2)]
        deliveries += [(c2b_path, body) for i, body in enumerate(c2b_bodies) for _ in range(2 + (i + 1) % 2)]
        random.Random(11).shuffle(deliveries)
        history: list[list[tuple[str, int | None]]] = [[] for _ in deliveries]  # (server, status) per attempt
        servers = [self.two_server_prefork("A"), self.two_server_prefork("B")]
        labels = {id(server): label for server, label in zip(servers, "AB", strict=True)}
        kill: dict[str, Any] = {}
        try:
            started = time.monotonic()
            for server in servers:
                server.start()
            with self.env() as env:  # Wake both cron workers now (a NOTIFY) rather than at their next poll.
                env.ref(SETTLE_CRON)._trigger()
            # A database whose jobs have not run for a while has all of them due: the cron workers catch up first.
            while self.cron_backlog() and time.monotonic() - started < 120:
                time.sleep(0.5)
            warm = time.monotonic() - started
            backlog = self.cron_backlog()
            marks = [server.log_mark() for server in servers]

            work: queue.Queue[int] = queue.Queue()
            for index in range(len(deliveries)):
                work.put(index)
            answered = threading.Semaphore(0)

            def caller() -> None:
                # The load balancer: a delivery goes to the servers in turn; what got no answer (or a 5xx) is sent
                # again after Daraja's back-off, and the balancer gives it to the next server.
                while True:
                    try:
                        index = work.get_nowait()
                    except queue.Empty:
                        return
                    path, body = deliveries[index]
                    for attempt, delay in enumerate((*CALLBACK_RETRY_DELAYS, None)):
                        server = servers[(index + attempt) % 2]
                        status, _answer = self.http_post(server.port, path, body, headers={
                            "X-Forwarded-For": SAFARICOM_ADDRESS, "X-Forwarded-Proto": "https",
                            "X-Forwarded-Host": "erp.example.com"})
                        history[index].append((labels[id(server)], status))
                        if (status is not None and status < 500) or delay is None:
                            break
                        time.sleep(delay)
                    answered.release()

            def killer() -> None:
                for _ in range(len(deliveries) // 2):
                    if not answered.acquire(timeout=self.timeout):
                        break
                # The server whose cron worker is in the middle of the settlement job (its log says the run started
                # and has not ended): the other one must take the job over.  Else the one that ran it most, else B.
                victim, in_job = None, False
                deadline = time.monotonic() + 15.0
                while victim is None and time.monotonic() < deadline:
                    for server, mark in zip(servers, marks, strict=True):
                        runs = [line for line in server.cron_log(mark) if line.cron_id == settle_id]
                        if runs and runs[-1].event == "starting":
                            victim, in_job = server, True
                            break
                    time.sleep(0.05)
                if victim is None:
                    victim = max(reversed(servers), key=lambda server: sum(
                        1 for line in server.cron_log(marks[servers.index(server)])
                        if line.cron_id == settle_id and line.event == "starting"))
                kill.update(victim=labels[id(victim)], in_job=in_job, answered=sum(1 for h in history if h),
                            at=time.monotonic() - burst_started)
                kill["pids"] = victim.kill_server()
                kill["server"], kill["down"] = victim, time.monotonic()
                killed.set()

            killed = threading.Event()
            burst_started = time.monotonic()
            threads = [threading.Thread(target=caller, name=f"k3/caller{i}", daemon=True) for i in range(8)]
            threads.append(threading.Thread(target=killer, name="k3/killer", daemon=True))
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + max(self.timeout, 4.0 * len(deliveries))
            # Restarted by this thread, which outlives it (Odoo stops when the thread that started it ends).
            if killed.wait(max(0.0, deadline - time.monotonic())):
                victim = kill["server"]
                victim.start(keep_log=True)
                kill["restarted_in"] = time.monotonic() - kill["down"]
                kill["new_pids"] = [victim.process.pid, *victim.http_workers(), *victim.cron_workers()]
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            hung = [thread.name for thread in threads if thread.is_alive()]
            burst = time.monotonic() - burst_started
            if hung:
                raise Hang(f"{', '.join(hung)} still running after {burst:.0f} s")
            if "new_pids" not in kill:
                raise RuntimeError(f"no server was killed and restarted: {kill}")

            # Both servers settle, post-process and invoice on their own: nothing runs in this process.
            settled_in = None
            while time.monotonic() - burst_started < burst + self.settle_timeout:
                if self.k3_settled(tx_ids, order_ids, receipts):
                    settled_in = time.monotonic() - burst_started
                    break
                time.sleep(1.0)
            logs = [server.log_since(mark) for server, mark in zip(servers, marks, strict=True)]
            down = [labels[id(server)] for server in servers if not server.running or not server.health()]
            errors = [self.prefork_errors(server) for server in servers]
        finally:
            for server in servers:
                server.stop()

        c.expect(not down, f"server(s) {down} no longer serve at the end (a restart must outlive the burst)")
        self.k3_check(c, n, tx_ids, sim_txs, stk_bodies, order_ids, receipts, c2b_bodies, deliveries, history,
                      payments_before)
        # Who did what: each server's log (its access log, ir.cron's lines, the Daraja client's STK queries), by the
        # PID that wrote it.
        evidence = []
        prompts = {sim_tx.checkout_request_id for sim_tx in sim_txs}
        queried_on: dict[str, set[str]] = {}
        for label, server, text, (errs, noise) in zip("AB", servers, logs, errors, strict=True):
            access = [line for line in odoo_prefork.parse_access_log(text) if "/payment/lnm/" in line.path]
            crons = odoo_prefork.parse_cron_log(text)
            settle_runs = [line for line in crons if line.cron_id == settle_id and line.event == "starting"]
            settled = sum(line.done or 0 for line in crons if line.cron_id == settle_id and line.event == "processed")
            post_runs = [line for line in crons if line.cron_id == post_id and line.event == "starting"]
            queries = [match for match in STK_QUERY_LINE.finditer(text) if match["checkout"] in prompts]
            for match in queries:
                queried_on.setdefault(match["checkout"], set()).add(label)
            evidence.append(
                f"server {label}: {len(access)} deliveries answered by HTTP workers "
                f"{dict(Counter(line.pid for line in access))}, settlement job run {len(settle_runs)} times by "
                f"cron workers {dict(Counter(line.pid for line in settle_runs))} (logged {settled} callbacks settled;"
                f" STK queries of the prompts {dict(Counter(int(match['pid']) for match in queries))}), "
                f"post-processing {len(post_runs)} times by {dict(Counter(line.pid for line in post_runs))}; "
                f"ERROR lines {len(errs)} (+{noise} mail delivery) in {server.log_path}")
            c.expect(bool(settle_runs), f"the settlement job never ran on server {label}")
            c.expect(not errs, f"{len(errs)} ERROR line(s) in {server.log_path}: " + " | ".join(errs[:3]))
        attempts = Counter(status for h in history for _server, status in h)
        c.fact(f"{n} paid prompts and {n} paybill payments, {len(deliveries)} deliveries "
               f"({len(deliveries) - 2 * n} duplicates) from 8 callers over 2 servers in {burst:.1f} s (the servers"
               f" caught up with the due jobs in {warm:.0f} s, {backlog} still due); server "
               f"{kill['victim']} killed -9 whole (master and workers {kill['pids']}) after {kill['answered']} "
               f"deliveries, {'in the middle of a settlement run' if kill['in_job'] else 'running no settlement job'}, "
               f"restarted in {kill['restarted_in']:.1f} s as {kill['new_pids']}; answers {dict(attempts)}; "
               + (f"all settled and post-processed {settled_in:.1f} s after the burst began" if settled_in is not None
                  else f"NOT all settled {self.settle_timeout:.0f} s after the burst"))
        for line in evidence:
            c.fact(line)
        where = Counter("+".join(sorted(labels)) for labels in queried_on.values())
        c.fact(f"prompts confirmed by STK Query from server {dict(where)}" + (
            " (on both: the run killed -9 had not committed them; the other server's run confirmed them again and"
            " settled each once)" if "A+B" in where else ""))

    @staticmethod
    def k3_order_payments(env, tx_ids: list[int], order_ids: list[int]):
        """The account.payment records of every transaction of the scenario's orders (a payment made twice would
        be on a second transaction of its order)."""
        orders = env["payment.transaction"].browse(tx_ids).sale_order_ids | env["sale.order"].browse(order_ids)
        return env["account.payment"].search([("payment_transaction_id", "in", orders.transaction_ids.ids)])

    def k3_settled(self, tx_ids: list[int], order_ids: list[int], receipts: list[str]) -> bool:
        """Whether every prompt and every paybill payment is done, post-processed, with its account.payment."""
        with self.env() as env:
            txs = env["payment.transaction"].browse(tx_ids)
            rows = env["muchiri.mpesa.ledger"].search([("name", "in", receipts)])
            txs |= rows.transaction_ids
            return (len(rows) == len(receipts) and all(row.state == "matched" for row in rows)
                    and all(tx.state == "done" and tx.is_post_processed for tx in txs)
                    and len(self.k3_order_payments(env, tx_ids, order_ids)) >= len(tx_ids) + len(order_ids))

    def k3_check(self, c: Checks, n: int, tx_ids: list[int], sim_txs: list[Any], stk_bodies: list[bytes],
                 order_ids: list[int], receipts: list[str], c2b_bodies: list[bytes],
                 deliveries: list[tuple[str, bytes]], history: list[list[tuple[str, int | None]]],
                 payments_before: int) -> None:
        """Every payment settled exactly once: nothing lost, nothing doubled."""
        with self.env() as env:
            Payment = env["account.payment"]
            txs = env["payment.transaction"].browse(tx_ids)
            events = self.inbound_events(env, stk_bodies + c2b_bodies)
            by_body: dict[str, Counter] = {}
            for state, _address, body in events:
                by_body.setdefault(body, Counter())[state] += 1
            addresses = Counter(address for _state, address, _body in events)
            # STK: each prompt done once, with Daraja's receipt and one account.payment.
            not_done = txs.filtered(lambda tx: tx.state != "done")
            twice = [tx.reference for tx in txs if self.confirmations(env, tx) != 1]
            stk_payments = Counter(Payment.search([("payment_transaction_id", "in", tx_ids)])
                                   .mapped("payment_transaction_id.id"))
            wrong_receipts = [sim_tx.receipt for i, sim_tx in enumerate(sim_txs) if env["payment.transaction"].search(
                [("mpesa_receipt_number", "=", sim_tx.receipt)]).ids != [tx_ids[i]]]
            # C2B: one ledger row per receipt, matched to its order by one done transaction with one payment.
            c2b_problems = []
            c2b_payments = 0
            for order_id, receipt in zip(order_ids, receipts, strict=True):
                rows = env["muchiri.mpesa.ledger"].search([("name", "=", receipt)])
                done = rows.transaction_ids.filtered(lambda tx: tx.state == "done")
                paid = Payment.search_count([("payment_transaction_id", "in", rows.transaction_ids.ids)])
                c2b_payments += paid
                order = env["sale.order"].browse(order_id)
                if len(rows) != 1 or rows.state != "matched" or len(done) != 1 or paid != 1 \
                        or done.sale_order_ids != order or self.confirmations(env, done) != 1:
                    c2b_problems.append(f"{receipt}: {len(rows)} ledger rows {rows.mapped('state')} "
                                        f"{rows.mapped('note')}, {len(done)} done transactions, {paid} payments, "
                                        f"order {order.name} {order.state}")
            payments = len(self.k3_order_payments(env, tx_ids, order_ids))
            created = Payment.search_count([]) - payments_before
            # Every body answered 200 at least once is kept, and exactly one of its copies was taken (processed).
            answered = Counter(deliveries[i][1] for i, h in enumerate(history) if any(s == 200 for _x, s in h))
            lost = [body[:60] for body in answered if sum(by_body.get(body.decode(), Counter()).values()) < 1]
            not_once = [f"{dict(by_body.get(body.decode(), {}))}" for body in stk_bodies + c2b_bodies
                        if by_body.get(body.decode(), Counter())["processed"] != 1]
            finals = Counter(h[-1][1] if h else None for h in history)
            states = Counter(state for state, _address, _body in events)
            c.fact(f"prompts {dict(Counter(txs.mapped('state')))} settled by "
                   f"{dict(Counter(txs.mapped('mpesa_settled_by')))}, paybill payments "
                   f"{n - len(c2b_problems)} of {n} matched once; account.payment of the {2 * n} orders {payments} "
                   f"({sum(stk_payments.values())} for prompts, {c2b_payments} for paybill payments; {created} created "
                   f"in the database meanwhile, what earlier runs left included); kept exchanges "
                   f"{len(events)} {dict(states)} (a 'received' one was kept by a request killed -9: Daraja's "
                   f"retry on the other server carried its payment), seen from {dict(addresses)}")
            c.expect(not not_done, f"{len(not_done)} prompts not done: "
                     + ", ".join(f"{tx.reference} {tx.state} {tx.state_message or ''}" for tx in not_done[:5]))
            c.expect(not twice, f"{len(twice)} prompts not set done exactly once: {twice[:5]}")
            c.expect(all(count == 1 for count in stk_payments.values()) and len(stk_payments) == n,
                     f"prompts' account.payment per transaction {dict(Counter(stk_payments.values()))} "
                     "(expected 1 each)")
            c.expect(not wrong_receipts,
                     f"{len(wrong_receipts)} receipts not on exactly their prompt: {wrong_receipts[:5]}")
            c.expect(not c2b_problems, f"{len(c2b_problems)} paybill payments not settled exactly once: "
                     + "; ".join(c2b_problems[:5]))
            c.expect(payments == 2 * n, f"{payments} account.payment for the {2 * n} orders (expected one each)")
            c.expect(not lost, f"{len(lost)} bodies answered 200 but not kept: {lost[:3]}")
            c.expect(not not_once, f"{len(not_once)} bodies not taken exactly once: {not_once[:5]}")
            c.expect(finals == Counter({200: len(deliveries)}),
                     f"not every delivery ended with 200 after the retries: {dict(finals)}")
            c.expect(set(addresses) == {SAFARICOM_ADDRESS},
                     f"the servers saw the callers as {dict(addresses)}, not as X-Forwarded-For (proxy_mode)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default="muchiri_mpesa_concurrency")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds each concurrent step may take")
    parser.add_argument("--rounds", type=int, default=10, help="callback-vs-cron races (scenario 5)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds of the scenarios 3, 4 and 6")
    parser.add_argument("--kill-txs", type=int, default=60, help="transactions of the K1 burst (2-4 callbacks each)")
    parser.add_argument("--two-server-payments", type=int, default=30,
                        help="paid prompts, and as many paybill payments, of the K3 burst (2-3 deliveries each)")
    parser.add_argument("--settle-timeout", type=float, default=240.0,
                        help="K3: seconds the two servers may take to settle everything after the burst")
    parser.add_argument("--no-install", action="store_true", help="reuse the database as it is (faster reruns)")
    parser.add_argument("--only", nargs="*", help="run only these scenarios (e.g. 1 5 K1)")
    args = parser.parse_args()

    import odoo  # noqa: PLC0415 - Odoo is optional for the rest of the project
    import odoo.service.model  # noqa: PLC0415

    started = time.perf_counter()
    if not args.no_install:
        print(f"Installing muchiri_mpesa in {args.db} ...", flush=True)
        odoo_scratch_db.install(args.db)
    print(f"installed in {time.perf_counter() - started:.1f} s", flush=True)
    odoo_scratch_db.configure(args.db, "--max-cron-threads=0")

    for handler in logging.getLogger().handlers:  # Odoo's console: counted in the scenario lines instead.
        handler.addFilter(HideExpectedSqlErrors())
    capture = LogCapture()
    logging.getLogger().addHandler(capture)
    logging.getLogger("odoo.service.model").propagate = False  # retrying()'s INFO lines: counted by the workers
    # The whole run never hangs: past this, every thread's stack is printed and the process exits.
    faulthandler.dump_traceback_later(
        240 + args.timeout * (12 + args.rounds + 3 * args.repeat) + 240 + args.settle_timeout, exit=True,
    )

    registry = odoo.modules.registry.Registry(args.db)
    from odoo.addons.muchiri_mpesa.daraja.simulator import CallbackListener, DarajaSimulator  # noqa: PLC0415

    with DarajaSimulator(consumer_key=KEY, consumer_secret=SECRET, shortcode=SHORTCODE, passkey=PASSKEY,
                         callback_delay=0.2, prompt_timeout=0.5, callback_retry_delays=()) as sim, \
            CallbackListener() as listener:
        harness = Harness(args, odoo, registry, sim, listener, capture)
        harness.setup()
        print(f"simulator {sim.base_url}, callbacks to {listener.url}, journal {harness.journal}", flush=True)
        scenarios: list[tuple[str, str, Callable[[Checks], None]]] = [
            ("1", "token: 8 workers, empty token table", harness.s1_token),
            ("2", "push while the token refreshes (empty token table)", harness.s2_push_while_token_refreshes),
            ("2b", "4 pushes of different transactions while the token refreshes",
             harness.s2b_pushes_while_token_refreshes),
            ("3", "double click: one draft transaction pushed twice at once", harness.s3_double_click),
            ("4", "two transactions of one order pushed at once", harness.s4_same_order),
            ("5", "success callback vs reconciliation cron", harness.s5_callback_vs_cron),
            ("6", "duplicate success callbacks racing", harness.s6_duplicate_callbacks),
            ("7", "extra: the order is saved while its push is at Daraja", harness.s7_order_edited_during_push),
            ("8", "two refunds of one M-Pesa payment at once (Reversal API)", harness.s8_double_refund),
            ("9", "the status page's poll vs Odoo's post-processing job on one paid prompt",
             harness.s9_poll_vs_post_processing_job),
            ("K1", "kill -9 of an HTTP worker, then of the cron worker, during a burst of duplicated callbacks",
             harness.k1_kill_during_callbacks),
            ("K2", "kill -9 of the worker of a portal push while Daraja holds its answer (prefork Odoo)",
             harness.k2_kill_during_push),
            ("K3", "two prefork Odoo servers on one database, one killed -9 whole (master and workers) and restarted"
             " during a burst of duplicated STK callbacks and C2B confirmations", harness.k3_two_servers),
        ]
        for number, title, scenario in scenarios:
            if not args.only or number in args.only:
                harness.run(number, title, scenario)
    faulthandler.cancel_dump_traceback_later()
    print(f"concurrency: {harness.passed} passed, {harness.failed} failed", flush=True)
    return 1 if harness.failed else 0


if __name__ == "__main__":
    sys.exit(main())
