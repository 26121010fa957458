"""How the M-Pesa statement import copes with a month of a busy paybill: 10,000 rows, at two ledger sizes.

Installs muchiri_mpesa in its own database (dropped and created again, the settings of scripts/odoo-tests),
fills the M-Pesa ledger with L rows (straight in SQL: the ledger's size is what is varied), then imports a
statement of R rows in one transaction, as the import wizard does: half the paid-in rows are receipts the
ledger knows, half are new (recorded from the source 'statement', matched, their account naming no document:
they wait in the queue), each paid-in row has its Pay Bill Charge, and a sweep to the bank closes every
hundred rows.  It prints the time and the SQL statements per row for each ledger size (goal: the same at
both sizes), and whether the journal's balance came out as the statement's last Balance.

    python3 benchmarks/bench_statement.py [--rows 10000] [--ledger-sizes 10000,200000] [--db muchiri_mpesa_bench_st]
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import odoo_scratch_db  # noqa: E402 - after the path above

HEADER = ["Receipt No.", "Completion Time", "Initiation Time", "Details", "Transaction Status", "Paid In",
          "Withdrawn", "Balance", "Balance Confirmed", "Reason Type", "Other Party Info", "Linked Transaction ID",
          "A/C No."]


def fill_ledger(cr, provider, prefix: str, size: int) -> None:
    """`size` matched ledger rows, confirmed by Transaction Status, in one INSERT."""
    cr.execute(
        """INSERT INTO muchiri_mpesa_ledger (name, company_id, provider_id, currency_id, state, amount, trans_time,
                                             confirmation, source_c2b, bill_ref, bill_ref_key,
                                             create_uid, write_uid, create_date, write_date)
           SELECT %s || lpad(g::text, 9, '0'), %s, %s, %s, 'matched', 100 + g %% 50,
                  now() AT TIME ZONE 'UTC' - make_interval(mins => g), 'status', true, 'INV' || g, 'inv' || g,
                  1, 1, now() AT TIME ZONE 'UTC', now() AT TIME ZONE 'UTC'
             FROM generate_series(1, %s) g""",
        [prefix, provider.company_id.id, provider.id, provider.env.ref("base.KES").id, size],
    )


def statement(prefix: str, known_prefix: str, rows: int, start: datetime, balance: float) -> tuple[bytes, float]:
    """A statement CSV of `rows` rows (newest first, as the portal lists them) from `balance`; the last Balance."""
    out, lines, index = io.StringIO(), [], 0
    while len(lines) < rows:
        when = (start + timedelta(seconds=30 * index)).strftime("%Y-%m-%d %H:%M:%S")
        if index % 100 == 99:
            amount = balance - 1000
            balance -= amount
            lines.append([f"{prefix}S{index:07d}", when, when, "Organization Settlement Account to Organization Bank"
                          " Account", "Completed", "", f"-{amount:,.2f}", f"{balance:,.2f}", "true", "Settlement",
                          "Bank", "", ""])
        else:
            # Half the payments are receipts the ledger knows (matched already), half are new.
            receipt = f"{known_prefix}{index + 1:09d}" if index % 2 else f"{prefix}P{index:07d}"
            amount = 100 + (index + 1) % 50 if index % 2 else 150.0
            balance += amount
            lines.append([receipt, when, when, f"Pay Bill from 2547****0111 - BENCH Acc. NODOC{index}", "Completed",
                          f"{amount:,.2f}", "", f"{balance:,.2f}", "true", "Pay Bill Online",
                          "2547****0111 - BENCH PAYER", "", f"NODOC{index}"])
            if len(lines) < rows:
                balance -= 0.5
                lines.append([receipt, when, when, "Business Pay Bill Charge", "Completed", "", "-0.50",
                              f"{balance:,.2f}", "true", "Business Pay Bill Charge", "", "", ""])
        index += 1
    writer = csv.writer(out)
    writer.writerows([["Organisation Name:", "Bench"], HEADER, *reversed(lines)])
    return out.getvalue().encode("utf-8-sig"), balance


def run(odoo, registry, rows: int, ledger_size: int, index: int, balance: float) -> dict[str, float]:
    prefix = f"B{index}"
    with registry.cursor() as cr:
        env = odoo.api.Environment(cr, odoo.SUPERUSER_ID, {})
        provider = env.ref("muchiri_mpesa.payment_provider_mpesa")
        started = time.perf_counter()
        fill_ledger(cr, provider, f"L{index}", ledger_size)
        cr.execute("SELECT count(*) FROM muchiri_mpesa_ledger")
        total = cr.fetchone()[0]
        print(f"  ledger: {total} rows ({ledger_size} added in {time.perf_counter() - started:.0f} s)", flush=True)
        start = datetime(2026, 11, 1) + timedelta(days=10 * index)
        data, last_balance = statement(prefix, f"L{index}", rows, start, balance)
    sql_before, started = odoo.sql_db.sql_counter, time.perf_counter()
    with registry.cursor() as cr:
        env = odoo.api.Environment(cr, odoo.SUPERUSER_ID, {})
        provider = env.ref("muchiri_mpesa.payment_provider_mpesa")
        stmt, message = env["muchiri.mpesa.statement"]._mpesa_import(provider, data, "bench.csv")
        lines = len(stmt.line_ids)
        difference = provider.mpesa_statement_difference
    seconds, sql = time.perf_counter() - started, odoo.sql_db.sql_counter - sql_before
    result = {"rows": rows, "ledger": total, "lines": lines, "s": seconds, "sql": sql, "difference": difference,
              "balance": last_balance}
    print(_line(result), flush=True)
    if index == 0:
        print("  " + message.replace("\n", "\n  "), flush=True)
    return result


def _line(r: dict[str, float]) -> str:
    return (f"{r['rows']:>7} {r['ledger']:>9} {r['lines']:>7} {r['s']:>8.0f} {1000 * r['s'] / r['rows']:>10.1f}"
            f" {r['sql'] / r['rows']:>11.1f} {r['difference']:>11.2f}")


HEADER_LINE = (f"{'rows':>7} {'ledger':>9} {'lines':>7} {'s':>8} {'ms/row':>10} {'SQL/row':>11}"
               f" {'difference':>11}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--ledger-sizes", default="10000,200000",
                        help="ledger rows added before each import (at least --rows: half the payments are known)")
    parser.add_argument("--db", default="muchiri_mpesa_bench_st")
    args = parser.parse_args()

    import odoo  # noqa: PLC0415 - Odoo is optional for the rest of the project

    logging.getLogger("odoo.addons.muchiri_mpesa").setLevel(logging.WARNING)
    print(f"Installing muchiri_mpesa in {args.db} ...", flush=True)
    odoo_scratch_db.install(args.db)
    odoo_scratch_db.configure(args.db)
    registry = odoo.modules.registry.Registry(args.db)
    with registry.cursor() as cr:
        env = odoo.api.Environment(cr, odoo.SUPERUSER_ID, {})
        odoo_scratch_db.simulator_provider(env, "http://127.0.0.1:9", "k", "s", "174379",
                                           "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919",
                                           mpesa_distributors_only=False, mpesa_ip_check="enforce",
                                           mpesa_allowed_ips="127.0.0.1")
        env["payment.provider"]._mpesa_setup_accounting()
    results = []
    print(HEADER_LINE, flush=True)
    for index, size in enumerate(int(size) for size in args.ledger_sizes.split(",")):
        results.append(run(odoo, registry, args.rows, size, index, results[-1]["balance"] if results else 0.0))
    print()
    print(HEADER_LINE)
    for r in results:
        print(_line(r))
    ok = all(abs(r["difference"]) < 0.005 for r in results)
    if len(results) > 1:
        growth = (results[-1]["sql"] / results[-1]["rows"]) / (results[0]["sql"] / results[0]["rows"])
        print(f"SQL per row grows x{growth:.2f} from a ledger of {results[0]['ledger']} rows to"
              f" {results[-1]['ledger']} (goal: 1.00)")
        ok = ok and growth < 1.05
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
