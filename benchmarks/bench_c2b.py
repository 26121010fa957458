"""How the M-Pesa ledger copes with many paybill payments against many open invoices.

The provider books paybill money on its source check (no initiator, no Pull): what is measured is the
intake and the matching, not the wait for M-Pesa's confirmation (bench_c2b_confirmation.py).

Creates N posted KES invoices, then hands N C2B confirmations (each naming one invoice by its number,
typed as a distributor types it) to the entry the confirmation route uses, each on a cursor of its
own as each HTTP request has: the body is kept, recorded in the ledger, matched, and, the money being
confirmed at once, handed to Odoo's post-processing, which makes and reconciles the payment.  It
prints the time and the SQL queries per payment (goal: the SQL count does not grow with N), for each
size given.  The "post" columns post-process what the intake left (nothing, when every payment is
confirmed at once): every invoice must come out paid.

Needs Odoo 18 importable by python3 and PostgreSQL; it installs muchiri_mpesa in its own database
(dropped and created again) with the same settings as scripts/odoo-tests:

    python3 benchmarks/bench_c2b.py [--sizes 1000,10000] [--db muchiri_mpesa_bench_c2b] [--trace]
    python3 benchmarks/bench_c2b.py --trace-only [--trace-file FILE] --db DB   # one payment's SQL, in DB as it is

The intake's figures are printed every --progress payments as well: a count per payment that
grows with the payments already matched shows there long before N is reached.

It first races one confirmation on two workers (two database connections, as two Odoo workers):
one ledger row and one payment must come out.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # The Daraja layer, from the repository root.
sys.path.insert(0, str(REPO / "tests"))

import odoo_scratch_db  # noqa: E402 - after the path above

BATCH = 500


def confirmation(daraja, receipt: str, amount: int, bill_ref: str, phone: str) -> bytes:
    """A C2B confirmation body in Daraja's documented shape (docs/design.md, 3. Daraja facts)."""
    return json.dumps({
        "TransactionType": "Pay Bill", "TransID": receipt, "TransTime": "20260115093012",
        "TransAmount": f"{amount}.00", "BusinessShortCode": "174379", "BillRefNumber": bill_ref,
        "InvoiceNumber": "", "OrgAccountBalance": "", "ThirdPartyTransID": "",
        "MSISDN": daraja.hash_msisdn(phone), "FirstName": "Bench", "MiddleName": "", "LastName": "",
    }).encode()


def race(odoo, registry) -> bool:
    """One confirmation delivered twice at the same moment, on two workers (two connections): one
    ledger row, one payment transaction, one invoice paid once."""
    import threading  # noqa: PLC0415

    from muchiri_mpesa import daraja  # noqa: PLC0415

    with registry.cursor() as cr:
        env = odoo.api.Environment(cr, odoo.SUPERUSER_ID, {})
        partner = env["res.partner"].create({"name": "Race Distributor"})
        invoice = env["account.move"].create({
            "move_type": "out_invoice", "partner_id": partner.id, "currency_id": env.ref("base.KES").id,
            "invoice_line_ids": [(0, 0, {"name": "Maize", "quantity": 1, "price_unit": 700, "tax_ids": [(5,)]})],
        })
        invoice.action_post()
        body = confirmation(daraja, "RACE000001", 700, invoice.name, "0708374149")
    barrier = threading.Barrier(2)
    answers = []

    def worker():
        with registry.cursor() as cr:
            env = odoo.api.Environment(cr, odoo.SUPERUSER_ID, {})
            provider = env.ref("muchiri_mpesa.payment_provider_mpesa")
            barrier.wait()
            with env["muchiri.mpesa.event"]._mpesa_keep_inbound(provider, "c2b_confirmation", body, "127.0.0.1") as ev:
                answers.append(ev._mpesa_handle_inbound()[0])

    threads = [threading.Thread(target=worker) for _i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with registry.cursor() as cr:
        env = odoo.api.Environment(cr, odoo.SUPERUSER_ID, {})
        rows = env["muchiri.mpesa.ledger"].search([("name", "=", "RACE000001")])
        events = env["muchiri.mpesa.event"].search([("receipt_number", "=", "RACE000001")])
        states = sorted(events.mapped("state"))
        counts = len(rows), len(rows.transaction_ids)
    ok = answers == [200, 200] and counts == (1, 1) and states == ["ignored", "processed"]
    print(f"race of two workers on one receipt: answers {answers}, {counts[0]} ledger row,"
          f" {counts[1]} transaction, events {states}: {'ok' if ok else 'FAILED'}", flush=True)
    return ok


def run(odoo, registry, n: int, offset: int, post_sample: int, progress: int) -> dict[str, float]:
    from muchiri_mpesa import daraja  # noqa: PLC0415

    with registry.cursor() as cr:
        env = odoo.api.Environment(cr, odoo.SUPERUSER_ID, {})
        provider = env.ref("muchiri_mpesa.payment_provider_mpesa")
        kes = env.ref("base.KES")
        partner = env["res.partner"].create({"name": f"Bench Distributor {offset}", "mobile": "0708374149"})
        invoices = env["account.move"]
        started = time.perf_counter()
        for start in range(0, n, BATCH):
            batch = env["account.move"].create([{
                "move_type": "out_invoice", "partner_id": partner.id, "currency_id": kes.id,
                "invoice_line_ids": [(0, 0, {"name": "Maize", "quantity": 1, "price_unit": 100 + (i % 50),
                                             "tax_ids": [(5,)]})],
            } for i in range(start, min(start + BATCH, n))])
            batch.action_post()
            invoices |= batch
            cr.commit()
        print(f"  {n} open invoices posted in {time.perf_counter() - started:.0f} s", flush=True)
        # The distributor types the number as the phone's keypad makes it easy: lower case, spaces.
        receipts = [f"BN{offset + i:09d}" for i in range(n)]
        bodies = [
            confirmation(daraja, receipt, int(invoice.amount_total), invoice.name.lower().replace("/", " "),
                         "0708374149")
            for receipt, invoice in zip(receipts, invoices, strict=True)
        ]
        invoice_ids = invoices.ids

    sql_before, started = odoo.sql_db.sql_counter, time.perf_counter()
    slice_sql, slice_started = sql_before, started
    for index, body in enumerate(bodies, start=1):
        # A cursor and an environment of its own for each payment, as each HTTP request has: one
        # long-lived environment would measure the growth of its own cache, not the route's work.
        with registry.cursor() as cr:
            env = odoo.api.Environment(cr, odoo.SUPERUSER_ID, {})
            provider = env.ref("muchiri_mpesa.payment_provider_mpesa")
            with env["muchiri.mpesa.event"]._mpesa_keep_inbound(provider, "c2b_confirmation", body,
                                                                "127.0.0.1") as event:
                status, _answer = event._mpesa_handle_inbound()
                assert status == 200, status
        if not index % progress or index == n:
            # Per slice: a count that grows with the payments already matched shows here first.
            size = index % progress or progress
            now = time.perf_counter()
            print(f"  intake {index:>6}/{n}: {(odoo.sql_db.sql_counter - slice_sql) / size:.1f} SQL/pay,"
                  f" {1000 * (now - slice_started) / size:.0f} ms/pay in the last {size},"
                  f" {now - started:.0f} s so far", flush=True)
            slice_sql, slice_started = odoo.sql_db.sql_counter, now
    intake_s, intake_sql = time.perf_counter() - started, odoo.sql_db.sql_counter - sql_before

    # Odoo's post-processing (payment, reconciliation) on a sample: it is Odoo's own code, per payment.
    sql_before, started = odoo.sql_db.sql_counter, time.perf_counter()
    with registry.cursor() as cr:
        env = odoo.api.Environment(cr, odoo.SUPERUSER_ID, {})
        txs = env["payment.transaction"].search([
            ("mpesa_ledger_id.name", "in", receipts), ("is_post_processed", "=", False), ("state", "=", "done"),
        ], order="id", limit=post_sample)
        for tx in txs:
            tx._mpesa_post_process()
            cr.commit()
        post_n = len(txs)
    post_s, post_sql = time.perf_counter() - started, odoo.sql_db.sql_counter - sql_before

    with registry.cursor() as cr:
        env = odoo.api.Environment(cr, odoo.SUPERUSER_ID, {})
        matched = env["muchiri.mpesa.ledger"].search_count([("name", "in", receipts), ("state", "=", "matched")])
        paid = env["account.move"].search_count([
            ("id", "in", invoice_ids), ("payment_state", "in", ("paid", "in_payment"))])
    result = {"n": n, "intake_s": intake_s, "intake_sql": intake_sql, "post_n": post_n, "post_s": post_s,
              "post_sql": post_sql, "matched": matched, "paid": paid}
    print(_line(result), flush=True)
    return result


def trace(odoo, registry, receipt: str, path: str | None = None) -> int:
    """Deliver one more confirmation, for a new invoice of the last bench distributor, and print
    its SQL statements: how many, the most repeated shapes, and those naming many ids (a read over
    everything the distributor has, which grows with N).  :return: the statement count"""
    import re  # noqa: PLC0415
    from collections import Counter  # noqa: PLC0415

    from muchiri_mpesa import daraja  # noqa: PLC0415

    with registry.cursor() as cr:
        env = odoo.api.Environment(cr, odoo.SUPERUSER_ID, {})
        partner = env["res.partner"].search([("name", "=like", "Bench Distributor %")], order="id desc", limit=1)
        invoice = env["account.move"].create({
            "move_type": "out_invoice", "partner_id": partner.id, "currency_id": env.ref("base.KES").id,
            "invoice_line_ids": [(0, 0, {"name": "Maize", "quantity": 1, "price_unit": 123, "tax_ids": [(5,)]})],
        })
        invoice.action_post()
        body = confirmation(daraja, receipt, 123, invoice.name.lower().replace("/", " "), "0708374149")
        label = f"{partner.name}, {env['account.move'].search_count([('partner_id', '=', partner.id)])} invoices"

    queries = []

    class Capture(logging.Handler):
        def emit(self, record):
            queries.append(record.getMessage().split("query: ", 1)[-1])

    sql_logger = logging.getLogger("odoo.sql_db")
    handler, level = Capture(), sql_logger.level
    sql_logger.addHandler(handler)
    sql_logger.setLevel(logging.DEBUG)
    sql_logger.propagate = False
    try:
        with registry.cursor() as cr:
            env = odoo.api.Environment(cr, odoo.SUPERUSER_ID, {})
            provider = env.ref("muchiri_mpesa.payment_provider_mpesa")
            with env["muchiri.mpesa.event"]._mpesa_keep_inbound(provider, "c2b_confirmation", body, "127.0.0.1") as ev:
                ev._mpesa_handle_inbound()
    finally:
        sql_logger.removeHandler(handler)
        sql_logger.setLevel(level)
        sql_logger.propagate = True
    queries = [query for query in queries if not query.startswith(("SQL LOG", "SUM ", "table: "))]
    if path:
        Path(path).write_text("\n".join(queries))
    shape = re.compile(r"\b\d+\b|'[^']*'")
    print(f"  one more payment ({label}): {len(queries)} SQL statements", flush=True)
    for query, count in Counter(shape.sub("?", query)[:160] for query in queries).most_common(5):
        print(f"    {count:>4} x {query}", flush=True)
    for query in queries:
        ids = len(re.findall(r"\b\d+\b", query))
        if ids > 50:
            print(f"    {ids} numbers in: {shape.sub('?', query)[:200]}", flush=True)
    return len(queries)


def _line(r: dict[str, float]) -> str:
    n, post_n = r["n"], max(r["post_n"], 1)
    return (f"{n:>7} {r['matched']:>8} {r['paid']:>7} {1000 * r['intake_s'] / n:>14.1f} {r['intake_sql'] / n:>15.1f}"
            f" {r['post_n']:>7} {1000 * r['post_s'] / post_n:>12.1f} {r['post_sql'] / post_n:>13.1f}")


HEADER = (f"{'N':>7} {'matched':>8} {'paid':>7} {'intake ms/pay':>14} {'intake SQL/pay':>15}"
          f" {'post N':>7} {'post ms/pay':>12} {'post SQL/pay':>13}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--db", default="muchiri_mpesa_bench_c2b")
    parser.add_argument("--post-sample", type=int, default=1000,
                        help="payments post-processed per size (Odoo's own per-payment work)")
    parser.add_argument("--trace", action="store_true",
                        help="after each size, print the SQL statements of one more payment")
    parser.add_argument("--trace-only", action="store_true",
                        help="no install and no sizes: trace one more payment in the database as it is")
    parser.add_argument("--trace-file", help="with --trace-only: write the statements there")
    parser.add_argument("--progress", type=int, default=500, help="print the intake's figures every so many payments")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]

    import odoo  # noqa: PLC0415 - Odoo is optional for the rest of the project

    logging.getLogger("odoo.addons.muchiri_mpesa").setLevel(logging.WARNING)
    if args.trace_only:
        odoo_scratch_db.configure(args.db)
        trace(odoo, odoo.modules.registry.Registry(args.db), f"TR{int(time.time()):08d}", args.trace_file)
        return 0
    print(f"Installing muchiri_mpesa in {args.db} ...", flush=True)
    odoo_scratch_db.install(args.db)
    odoo_scratch_db.configure(args.db)
    registry = odoo.modules.registry.Registry(args.db)
    with registry.cursor() as cr:
        env = odoo.api.Environment(cr, odoo.SUPERUSER_ID, {})
        odoo_scratch_db.simulator_provider(env, "http://127.0.0.1:9", "k", "s", "174379",
                                           "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919",
                                           mpesa_distributors_only=False, mpesa_ip_check="enforce",
                                           # No initiator, no Pull: money is booked on the source check
                                           # (bench_c2b_confirmation.py measures Transaction Status).
                                           mpesa_allowed_ips="127.0.0.1")
        env["ir.config_parameter"].set_param("sale.automatic_invoice", False)

    run_started = time.perf_counter()
    raced = race(odoo, registry)
    results = []
    for index, n in enumerate(sizes):
        print(f"N = {n}:", flush=True)
        if not index:
            print(HEADER, flush=True)
        results.append(run(odoo, registry, n, offset=index * 10**7, post_sample=args.post_sample,
                           progress=args.progress))
        if args.trace:
            trace(odoo, registry, f"TR{index:08d}")

    print()
    print(HEADER)
    for r in results:
        print(_line(r))
    for r in results:
        print(f"N={r['n']}: intake {r['intake_s']:.0f} s wall, {r['intake_sql'] / r['n']:.1f} SQL per payment")
    print(f"wall time of the run (after the install): {time.perf_counter() - run_started:.0f} s")
    ok = raced and all(r["matched"] == r["n"] and r["paid"] == r["n"] for r in results)
    if len(results) > 1:
        growth = (results[-1]["intake_sql"] / results[-1]["n"]) / (results[0]["intake_sql"] / results[0]["n"])
        print(f"intake SQL per payment grows x{growth:.2f} from N={results[0]['n']} to N={results[-1]['n']}"
              " (goal: 1.00)")
        ok = ok and growth < 1.05
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
