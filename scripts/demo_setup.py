"""The demo's own setup, shared by `scripts/demo` and `docker-compose.yml`: a Kenyan company, and the
simulator's registrations made again at each start.

  python3 scripts/demo_setup.py kenya-before --db mpesa_demo [--db-host ...]   # after `-i base`
  python3 scripts/demo_setup.py kenya-after --db mpesa_demo [--db-host ...]    # after the addon
  python3 scripts/demo_setup.py register --url http://127.0.0.1:8069 --db mpesa_demo [--wait 120]

The demo database is made in three Odoo runs: `-i base`, then `kenya-before` makes the main company
Kenyan (country, KES) before Accounting is installed, so that `-i l10n_ke` gives it Kenya's chart of
accounts (VAT 16%) instead of the generic one, then `-i sale_management,muchiri_mpesa`; `kenya-after`
puts every user on Nairobi's time and the distributor in Swahili, restates the currency rates
against KES and archives the second company that l10n_ke's demo data makes (the demo is one Kenyan
company).  The addon itself depends on no localization: these steps are the demo's, never the addon's.

`register` runs at each start, once Odoo answers: it registers the demo provider's C2B URLs with the
simulator (whose state file may hold another run's port, or be gone), so that a paybill payment
reaches Odoo, and gives the distributor an open invoice when she has none, to pay by paybill.

Only the standard library, and psycopg2 (Odoo's own dependency) for the database steps.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.request
import xmlrpc.client

ADMIN = ("admin", "admin")
TIMEZONE = "Africa/Nairobi"
DISTRIBUTOR_LOGIN, DISTRIBUTOR_LANG = "wanjiku", "sw"
COMPANY_NAME = "Muchiri Wholesale Ltd"
# The distributor's open invoice, made at each start when she has none, so that paying an invoice by
# paybill needs no setup: two bags of sugar.
INVOICE_PRODUCT, INVOICE_QUANTITY = ("muchiri_mpesa", "demo_product_sugar"), 2
PROVIDER_XMLID = ("muchiri_mpesa", "payment_provider_mpesa")


def connect(args):
    import psycopg2  # noqa: PLC0415 - only the database steps need it

    return psycopg2.connect(dbname=args.db, host=args.db_host, port=args.db_port, user=args.db_user,
                            password=args.db_password)


def kenya_before(args) -> int:
    """The main company in Kenya, in KES: Accounting, installed next, gives it Kenya's chart."""
    with connect(args) as cnx, cnx.cursor() as cr:
        cr.execute("SELECT 1 FROM ir_module_module WHERE name = 'account' AND state = 'installed'")
        if cr.fetchone():
            print("demo setup: Accounting is installed already; the company stays as it is.")
            return 0
        cr.execute("UPDATE res_currency SET active = true WHERE name = 'KES'")
        cr.execute("""
            UPDATE res_partner SET country_id = (SELECT id FROM res_country WHERE code = 'KE'),
                                   city = 'Nairobi', tz = %s, name = %s
             WHERE id = (SELECT partner_id FROM res_company WHERE id = 1)""", [TIMEZONE, COMPANY_NAME])
        cr.execute("UPDATE res_company SET currency_id = (SELECT id FROM res_currency WHERE name = 'KES'),"
                   " name = %s WHERE id = 1", [COMPANY_NAME])
    print(f"demo setup: the company is {COMPANY_NAME}, in Kenya, in KES.")
    return 0


def kenya_after(args) -> int:
    with connect(args) as cnx, cnx.cursor() as cr:
        # l10n_ke's demo data makes a company of its own, "KE Company": the demo is one company.
        cr.execute("""
            SELECT res_id FROM ir_model_data WHERE module = 'base' AND name = 'demo_company_ke'
               AND res_id <> 1""")
        for (company_id,) in cr.fetchall():
            cr.execute("DELETE FROM res_company_users_rel WHERE cid = %s", [company_id])
            cr.execute("UPDATE res_company SET active = false WHERE id = %s", [company_id])
        # Every user on Nairobi's time, as the M-Pesa messages and statements are.
        cr.execute("UPDATE res_partner SET tz = %s WHERE id IN (SELECT partner_id FROM res_users)", [TIMEZONE])
        # The distributor reads Swahili (loaded with the addon): the portal's M-Pesa form, its
        # status messages, the paybill details and the mails are in Swahili.
        cr.execute("""
            UPDATE res_partner SET lang = %s
             WHERE id = (SELECT partner_id FROM res_users WHERE login = %s)
               AND EXISTS (SELECT 1 FROM res_lang WHERE code = %s AND active)""",
                   [DISTRIBUTOR_LANG, DISTRIBUTOR_LOGIN, DISTRIBUTOR_LANG])
        # Odoo's demo rates are against USD: restate them against KES, the company's currency, so
        # that KES itself is 1 (a rate of 129 on the company's own currency would mean nothing).
        cr.execute("""
            SELECT r.rate FROM res_currency_rate r JOIN res_currency c ON c.id = r.currency_id
             WHERE c.name = 'KES' AND r.company_id = 1 ORDER BY r.name DESC LIMIT 1""")
        kes_rate = float((cr.fetchone() or [1.0])[0] or 1.0)
        if abs(kes_rate - 1.0) > 1e-9:
            cr.execute("UPDATE res_currency_rate SET rate = rate / %s WHERE company_id = 1", [kes_rate])
            cr.execute("""
                DELETE FROM res_currency_rate WHERE company_id = 1
                   AND currency_id = (SELECT id FROM res_currency WHERE name = 'KES')""")
    print(f"demo setup: users on {TIMEZONE}, rates against KES, one company.")
    return 0


def register(args) -> int:
    """Register the demo provider's C2B URLs with the simulator, through Odoo (as *Register C2B URLs*)."""
    base = args.url.rstrip("/")
    deadline = time.monotonic() + args.wait
    while True:
        try:
            urllib.request.urlopen(f"{base}/web/health", timeout=2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                print(f"demo setup: Odoo did not answer on {base}; C2B URLs not registered.", file=sys.stderr)
                return 1
            time.sleep(0.5)
    try:
        uid = xmlrpc.client.ServerProxy(f"{base}/xmlrpc/2/common").authenticate(args.db, *ADMIN, {})
        if not uid:
            print("demo setup: admin / admin does not log in (password changed?); register the C2B URLs"
                  " from the provider's form.", file=sys.stderr)
            return 1
        models = xmlrpc.client.ServerProxy(f"{base}/xmlrpc/2/object", allow_none=True)
        rows = models.execute_kw(args.db, uid, ADMIN[1], "ir.model.data", "search_read",
                                 [[("module", "=", PROVIDER_XMLID[0]), ("name", "=", PROVIDER_XMLID[1])]],
                                 {"fields": ["res_id"]})
        [provider] = models.execute_kw(args.db, uid, ADMIN[1], "payment.provider", "read",
                                       [[rows[0]["res_id"]]], {"fields": ["state"]})
        if provider["state"] != "test":
            print("demo setup: the M-Pesa provider is not in test mode; its C2B URLs are left as they are.")
            return 0
        answer = models.execute_kw(args.db, uid, ADMIN[1], "payment.provider", "action_mpesa_c2b_register",
                                   [[provider["id"]]])
    except (OSError, xmlrpc.client.Error, IndexError, ValueError) as error:
        print(f"demo setup: the C2B URLs were not registered: {error}", file=sys.stderr)
        return 1
    message = (answer or {}).get("params", {}).get("message", "")
    print(f"demo setup: C2B URLs registered with the simulator. {message}".rstrip())
    try:
        open_invoice(models, args.db, uid)
    except (OSError, xmlrpc.client.Error, IndexError, ValueError) as error:
        print(f"demo setup: no open invoice for the distributor: {error}", file=sys.stderr)
    return 0


def open_invoice(models, db: str, uid: int) -> None:
    """An open invoice of the demo distributor, posted, to pay by paybill: made when she has none."""
    def call(model, method, *args, **kwargs):
        return models.execute_kw(db, uid, ADMIN[1], model, method, list(args), kwargs)

    def xmlid(module, name):
        [row] = call("ir.model.data", "search_read", [("module", "=", module), ("name", "=", name)],
                     fields=["res_id"])
        return row["res_id"]

    found = call("account.move", "search_read", [
        ("commercial_partner_id", "=", xmlid("muchiri_mpesa", "demo_distributor")),
        ("move_type", "=", "out_invoice"), ("state", "=", "posted"),
        ("payment_state", "in", ["not_paid", "partial"]),
    ], fields=["name", "amount_residual"], order="id", limit=1)
    if not found:
        invoice_id = call("account.move", "create", {
            "move_type": "out_invoice", "partner_id": xmlid("muchiri_mpesa", "demo_distributor_contact"),
            "invoice_line_ids": [(0, 0, {"product_id": xmlid(*INVOICE_PRODUCT), "quantity": INVOICE_QUANTITY})],
        })
        try:
            call("account.move", "action_post", [invoice_id])
        except xmlrpc.client.Error:
            call("account.move", "unlink", [invoice_id])  # No draft left behind at each start.
            raise
        found = call("account.move", "read", [invoice_id], fields=["name", "amount_residual"])
    print(f"demo setup: the distributor's open invoice {found[0]['name']} ({found[0]['amount_residual']:,.2f} due).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["kenya-before", "kenya-after", "register"])
    parser.add_argument("--db", default="mpesa_demo")
    parser.add_argument("--db-host", default="localhost")
    parser.add_argument("--db-port", default="5432")
    parser.add_argument("--db-user", default="odoo")
    parser.add_argument("--db-password", default="odoo")
    parser.add_argument("--url", default="http://127.0.0.1:8069", help="Odoo, for register")
    parser.add_argument("--wait", type=float, default=120.0, help="seconds register waits for Odoo")
    args = parser.parse_args(argv)
    return {"kenya-before": kenya_before, "kenya-after": kenya_after, "register": register}[args.step](args)


if __name__ == "__main__":
    sys.exit(main())
