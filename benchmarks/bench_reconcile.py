"""How one run of the reconciliation cron copes with many pending M-Pesa transactions.

Creates N pending transactions whose prompts the local Daraja simulator has settled (their callbacks
lost), runs the cron once, and prints how long it took, how many STK queries it sent (goal: exactly
one per due transaction) and how many SQL queries it ran per transaction (goal: a small constant).

Needs Odoo 18 importable by python3 and PostgreSQL; it installs muchiri_mpesa in its own database
(dropped and created again) with the same settings as scripts/odoo-tests:

    python3 benchmarks/bench_reconcile.py [--n 1000] [--db muchiri_mpesa_bench]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # The Daraja layer and its simulator, from the repository root.
sys.path.insert(0, str(REPO / "tests"))

import odoo_scratch_db  # noqa: E402 - after the path above


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--db", default="muchiri_mpesa_bench")
    args = parser.parse_args()

    import odoo  # noqa: PLC0415 - Odoo is optional for the rest of the project

    from muchiri_mpesa.daraja import DarajaClient, DarajaCredentials, ShortcodeConfig  # noqa: PLC0415
    from muchiri_mpesa.daraja.simulator import CallbackListener, DarajaSimulator  # noqa: PLC0415

    logging.getLogger("muchiri_mpesa").setLevel(logging.WARNING)
    print(f"Installing muchiri_mpesa in {args.db} ...", flush=True)
    odoo_scratch_db.install(args.db)
    odoo_scratch_db.configure(args.db)

    key, secret, shortcode = "bench-key", "bench-secret", "174379"
    passkey = "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919"
    with DarajaSimulator(consumer_key=key, consumer_secret=secret, shortcode=shortcode, passkey=passkey,
                         callback_delay=0.05, callback_retry_delays=(), max_records=10 * args.n) as sim, \
            CallbackListener() as listener:
        # N prompts that the customers paid, whose callbacks the "Odoo" side never processes.
        client = DarajaClient(DarajaCredentials(key, secret, base_url=sim.base_url),
                              ShortcodeConfig(business_shortcode=shortcode, passkey=passkey))
        checkout_ids = [
            client.stk_push(phone=f"2547{10000000 + i:08d}", amount=100, reference=f"B{i}",
                            description="Bench", callback_url=listener.url).checkout_request_id
            for i in range(args.n)
        ]
        time.sleep(0.5)  # Every simulated customer has answered.

        registry = odoo.modules.registry.Registry(args.db)
        with registry.cursor() as cr:
            env = odoo.api.Environment(cr, odoo.SUPERUSER_ID, {})
            provider = odoo_scratch_db.simulator_provider(env, sim.base_url, key, secret, shortcode, passkey)
            partner = env["res.partner"].create({"name": "Bench Distributor", "is_distributor": True})
            now = odoo.fields.Datetime.now()
            env["payment.transaction"].create([{
                "provider_id": provider.id,
                "payment_method_id": env.ref("payment.payment_method_mpesa").id,
                "reference": f"BENCH-{i}",
                "amount": 100, "currency_id": env.ref("base.KES").id, "partner_id": partner.id,
                "state": "pending", "provider_reference": checkout_id,
                "mpesa_requested_amount": 100,
                "mpesa_push_sent_at": now - timedelta(seconds=40),
                "mpesa_next_check_at": now - timedelta(seconds=1),
            } for i, checkout_id in enumerate(checkout_ids)])
            cr.commit()

            queries_before = len(sim.requests_for("stk_query"))
            sql_before = cr.sql_log_count
            started = time.perf_counter()
            checked = env["payment.transaction"]._cron_mpesa_reconcile(batch_size=args.n)
            elapsed = time.perf_counter() - started
            sql = cr.sql_log_count - sql_before
            stk_queries = len(sim.requests_for("stk_query")) - queries_before
            settled = env["payment.transaction"].search_count([
                ("reference", "=like", "BENCH-%"), ("state", "=", "done"),
            ])

    print(f"due transactions:          {args.n}")
    print(f"checked by one cron run:   {checked}")
    print(f"settled (done):            {settled}")
    print(f"cron run time:             {elapsed:.2f} s ({1000 * elapsed / max(checked, 1):.1f} ms per transaction)")
    print(f"STK queries sent:          {stk_queries} ({stk_queries / max(checked, 1):.2f} per transaction; goal 1)")
    print(f"SQL queries:               {sql} ({sql / max(checked, 1):.1f} per transaction; goal: a small constant)")
    print(f"OAuth requests:            {sim.token_requests} (client and cron together)")
    return 0 if checked == settled == args.n and stk_queries == args.n else 1


if __name__ == "__main__":
    sys.exit(main())
