"""From a paybill payment's confirmation to its invoice paid, with M-Pesa's confirmation in between.

A C2B confirmation is a claim (Daraja signs nothing): the ledger books its money only once M-Pesa's
Transaction Status confirmed the receipt, its amount and the shortcode.  This measures what that
costs a distributor waiting for the goods, on a real prefork Odoo (2 HTTP workers, 2 cron workers)
talking to the in-process Daraja simulator over loopback:

    confirmation POSTed by the simulator -> ledger row awaiting -> the initiator job (woken) asks
    Transaction Status -> the simulator posts the result -> the job (woken) confirms the row ->
    matched -> done transaction -> post-processing -> invoice paid

It installs muchiri_mpesa in its own database (dropped and created again), posts N KES invoices,
registers the C2B URLs and the initiator, then pays each invoice from the simulator's phone at
--rate payments per second.  It prints p50 / p95 / max of the time from the start of each
confirmation's delivery to its invoice read as paid (the database polled every 50 ms), and the
result delay the simulator was set to (Daraja's own queue time, not ours).

A benchmark that prints figures, not a test: exit 0 when every invoice was paid, 1 otherwise.
Needs Odoo 18 importable by python3 and PostgreSQL, with the settings of scripts/odoo-tests:

    python3 benchmarks/bench_c2b_confirmation.py [--n 200] [--rate 5] [--result-delay 0.2]
                                                  [--db muchiri_mpesa_bench_c2b_confirm] [--timeout 600]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # The Daraja layer and its simulator, from the repository root.
sys.path.insert(0, str(REPO / "tests"))

import odoo_prefork  # noqa: E402 - after the path above
import odoo_scratch_db  # noqa: E402
from bench_callbacks import KEY, PASSKEY, POLL_INTERVAL, SECRET, SHORTCODE, ms  # noqa: E402

PHONE = "254708374149"


def setup(odoo, db: str, sim, odoo_url: str, n: int) -> dict[int, str]:
    """The provider on the simulator with its initiator, C2B URLs registered; N posted invoices.

    :return: invoice id -> the account number the phone types
    """
    registry = odoo.modules.registry.Registry(db)
    with registry.cursor() as cr:
        env = odoo.api.Environment(cr, odoo.SUPERUSER_ID, {})
        provider = odoo_scratch_db.simulator_provider(
            env, sim.base_url, KEY, SECRET, SHORTCODE, PASSKEY,
            mpesa_callback_base_url=odoo_url, mpesa_ip_check="log",
            mpesa_initiator_name=sim.initiator_name, mpesa_initiator_password=sim.initiator_password,
            mpesa_initiator_certificate=sim.certificate_pem,
        )
        provider.action_mpesa_c2b_register()
        partner = env["res.partner"].create({"name": "Bench Distributor", "mobile": "0708374149"})
        invoices = env["account.move"].create([{
            "move_type": "out_invoice", "partner_id": partner.id, "currency_id": env.ref("base.KES").id,
            "invoice_line_ids": [(0, 0, {"name": "Maize", "quantity": 1, "price_unit": 100 + i % 50,
                                         "tax_ids": [(5,)]})],
        } for i in range(n)])
        invoices.action_post()
        return {invoice.id: invoice.name for invoice in invoices}


def paid_ids(db: str, ids: list[int]) -> set[int]:
    import psycopg2  # noqa: PLC0415 - Odoo's own driver

    with contextlib.closing(psycopg2.connect(
        dbname=db, host=os.environ.get("PGHOST", "localhost"), port=os.environ.get("PGPORT", "5432"),
        user=os.environ.get("ODOO_DB_USER", "odoo"), password=os.environ.get("ODOO_DB_PASSWORD", "odoo"),
    )) as connection, connection.cursor() as cr:
        cr.execute("SELECT id FROM account_move WHERE payment_state IN ('paid', 'in_payment') AND id = ANY(%s)",
                   [ids])
        return {row[0] for row in cr.fetchall()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--rate", type=float, default=5.0, help="payments per second")
    parser.add_argument("--result-delay", type=float, default=0.2,
                        help="seconds the simulator takes to post a Transaction Status result")
    parser.add_argument("--db", default="muchiri_mpesa_bench_c2b_confirm")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()

    import odoo  # noqa: PLC0415 - Odoo is optional for the rest of the project

    from muchiri_mpesa.daraja.simulator import C2B_CONFIRMATION, DarajaSimulator  # noqa: PLC0415

    print(f"Installing muchiri_mpesa in {args.db} ...", flush=True)
    odoo_scratch_db.install(args.db)
    odoo_scratch_db.configure(args.db, "--max-cron-threads=0")
    sim = DarajaSimulator(host="127.0.0.1", port=0, consumer_key=KEY, consumer_secret=SECRET, shortcode=SHORTCODE,
                          passkey=PASSKEY, result_delay=args.result_delay)
    sim.start()
    server = odoo_prefork.PreforkOdoo(args.db, workers=2, max_cron_threads=2)
    try:
        names = setup(odoo, args.db, sim, server.base_url, args.n)
        server.start()
        print(f"Odoo on {server.base_url} (2 HTTP workers, 2 cron workers); paying {args.n} invoices at"
              f" {args.rate:g}/s, Transaction Status results after {args.result_delay:g} s", flush=True)
        receipts: dict[int, str] = {}
        started = time.monotonic()
        waiting = set(names)
        paid_at: dict[int, float] = {}
        for index, (invoice_id, name) in enumerate(names.items()):
            receipts[invoice_id] = sim.c2b_pay(100 + index % 50, PHONE, name)
            due = started + (index + 1) / args.rate
            while time.monotonic() < due:  # Poll while paying: the early ones are paid meanwhile.
                for done in paid_ids(args.db, list(waiting)):
                    paid_at[done] = time.monotonic()
                    waiting.discard(done)
                time.sleep(min(POLL_INTERVAL, max(0.0, due - time.monotonic())))
        deadline = time.monotonic() + args.timeout
        while waiting and time.monotonic() < deadline:
            for done in paid_ids(args.db, list(waiting)):
                paid_at[done] = time.monotonic()
                waiting.discard(done)
            time.sleep(POLL_INTERVAL)
        latencies = []
        for invoice_id, receipt in receipts.items():
            deliveries = sim.deliveries(C2B_CONFIRMATION, reference=receipt)
            if invoice_id in paid_at and deliveries and deliveries[0].attempts:
                latencies.append(paid_at[invoice_id] - deliveries[0].attempts[0].started_at)
        statuses = [r for r in sim.initiator_requests if r["api"] == "transaction_status"]
        print(f"paid: {len(paid_at)} of {args.n}; Transaction Status queries sent: {len(statuses)}")
        print(f"confirmation -> invoice paid: {ms(latencies)}")
        print(f"all {args.n} paid {max(paid_at.values(), default=started) - started:.1f} s after the first payment")
        return 0 if not waiting else 1
    finally:
        server.stop()
        sim.stop()


if __name__ == "__main__":
    sys.exit(main())
