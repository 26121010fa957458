"""What one run of the settlement job costs per STK callback, in process: SQL statements and time.

Installs muchiri_mpesa in its own database (dropped and created again; --no-install reuses it), creates N
pending M-Pesa transactions whose prompts the in-process Daraja simulator took (paid, no callback), keeps
their N success callbacks as the callback route does (muchiri.mpesa.event._mpesa_receive), makes them due,
then runs the settlement job (_cron_mpesa_settle_callbacks) once and prints:

- the callbacks settled, the job's seconds and ms per settled callback, callbacks settled per second, and
  this process's CPU time per settled callback (steadier than the wall clock on a shared machine);
- the SQL statements per settled callback (Odoo's statement counter: the job's cursor and the cursors the
  job opens, such as the STK Query's audit log);
- the STK Queries per settled callback (goal 1);
- with --profile, cProfile's top functions by cumulative time (--profile-out to keep the stats).

A benchmark that prints figures, not a test; the settings are those of scripts/odoo-tests (PGHOST, PGPORT,
ODOO_DB_USER, ODOO_DB_PASSWORD):

    python3 benchmarks/profile_settle.py [--n 200] [--db muchiri_mpesa_profile_settle] [--no-install]
                                         [--profile] [--profile-out FILE] [--top 40]
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import pstats
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_callbacks  # noqa: E402 - after the path above
import odoo_scratch_db  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="callbacks (one per pending transaction)")
    parser.add_argument("--db", default="muchiri_mpesa_profile_settle")
    parser.add_argument("--no-install", action="store_true", help="reuse the database as it is")
    parser.add_argument("--profile", action="store_true", help="run the job under cProfile and print its top")
    parser.add_argument("--profile-out", help="write cProfile's stats to this file")
    parser.add_argument("--top", type=int, default=40, help="functions of the profile to print")
    parser.add_argument("--log-sql", action="store_true", help="log each statement of the job (use a small --n)")
    args = parser.parse_args()

    try:
        import odoo  # noqa: PLC0415 - Odoo is optional for the rest of the project
    except ImportError:
        print("Odoo 18 is not importable by python3: nothing to measure.", file=sys.stderr)
        return 1
    from odoo import sql_db  # noqa: PLC0415

    from muchiri_mpesa.daraja.simulator import DarajaSimulator  # noqa: PLC0415

    logging.getLogger("muchiri_mpesa").setLevel(logging.WARNING)
    # The simulator posts from 127.0.0.1, which the provider logs (mpesa_ip_check 'log') on every callback.
    logging.getLogger("odoo.addons.muchiri_mpesa").setLevel(logging.ERROR)
    if not args.no_install:
        print(f"Installing muchiri_mpesa in {args.db} ...", flush=True)
        odoo_scratch_db.install(args.db)
    odoo_scratch_db.configure(args.db, "--max-cron-threads=0")
    sim_args = {"consumer_key": bench_callbacks.KEY, "consumer_secret": bench_callbacks.SECRET,
                "shortcode": bench_callbacks.SHORTCODE, "passkey": bench_callbacks.PASSKEY}
    with DarajaSimulator(**sim_args, callback_delay=0, callback_retry_delays=(),
                         max_records=10 * args.n + 1000) as sim:
        base_url = "http://127.0.0.1:8069"
        deliveries, _path = bench_callbacks.create_transactions(odoo, args.db, sim, args.n, base_url)
        tx_ids = [d.tx_id for d in deliveries]
        registry = odoo.modules.registry.Registry(args.db)
        with registry.cursor() as cr:
            env = odoo.api.Environment(cr, odoo.SUPERUSER_ID, {})
            provider = env["payment.transaction"].browse(tx_ids[0]).provider_id
            Event = env["muchiri.mpesa.event"]
            for delivery in deliveries:  # Kept and admitted as the callback route does, each committed.
                Event._mpesa_receive(provider, "stk_callback", delivery.body, "127.0.0.1")
            cr.execute("UPDATE muchiri_mpesa_event SET next_attempt_at = NULL"
                       " WHERE kind = 'stk_callback' AND transaction_id = ANY(%s)", [tx_ids])
            # What an earlier run (--no-install) left waiting is not this run's to settle.
            cr.execute("UPDATE muchiri_mpesa_event SET next_attempt_at = now() + interval '30 days'"
                       " WHERE state IN ('received', 'queued', 'unmatched', 'error')"
                       " AND (transaction_id IS NULL OR NOT transaction_id = ANY(%s))", [tx_ids])
            cr.commit()

        queries_before = len(sim.requests_for("stk_query"))
        with registry.cursor() as cr:
            env = odoo.api.Environment(cr, odoo.SUPERUSER_ID, {})
            profiler = cProfile.Profile() if args.profile or args.profile_out else None
            if args.log_sql:
                if not logging.getLogger().handlers:
                    logging.basicConfig(format="%(name)s: %(message)s")
                logging.getLogger("odoo.sql_db").setLevel(logging.DEBUG)
            statements_before = sql_db.sql_counter
            started, cpu_started = time.perf_counter(), time.process_time()
            if profiler:
                profiler.enable()
            settled = env["muchiri.mpesa.event"]._cron_mpesa_settle_callbacks()
            if profiler:
                profiler.disable()
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
            statements = sql_db.sql_counter - statements_before
            logging.getLogger("odoo.sql_db").setLevel(logging.WARNING)
            cr.commit()
            cr.execute("SELECT count(*) FROM payment_transaction WHERE state = 'done' AND id = ANY(%s)", [tx_ids])
            done = cr.fetchone()[0]
        stk_queries = len(sim.requests_for("stk_query")) - queries_before

    per = max(settled, 1)
    print(f"settled:                   {settled} callbacks ({done} of {args.n} transactions done)")
    print(f"settlement job:            {seconds:.2f} s, {seconds * 1000 / per:.1f} ms per settled callback, "
          f"{settled / seconds:.1f} callbacks/s{' (under cProfile)' if profiler else ''}")
    print(f"Odoo's CPU time:           {cpu * 1000 / per:.1f} ms per settled callback (this process only; the"
          f" database's share follows the statements, and a busy machine stretches the wall-clock figures)")
    print(f"SQL statements:            {statements}, {statements / per:.1f} per settled callback")
    print(f"STK queries:               {stk_queries}, {stk_queries / per:.2f} per settled callback (goal 1)")
    if profiler:
        if args.profile_out:
            profiler.dump_stats(args.profile_out)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
