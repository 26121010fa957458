"""Check the demo's setup, pay demo quotations by push and by paybill, and refund, over HTTP.

Run twice by `bash scripts/demo --smoke` against the running demo (Odoo with demo data, the
simulator).  First: the demo is a Kenyan company with the Sales app (the app installed, KES the
company's currency, the users on Africa/Nairobi); then, as the distributor's browser does, log in
to the portal, open a quotation, read its payment form, call Odoo's transaction route and the M-Pesa
push route as the inline form does, follow the status page's poll while the simulator's customer
pays and its callback reaches Odoo, and check as the administrator over XML-RPC that the order is
confirmed, invoiced and its transaction done with an M-Pesa receipt; then a phone pays another
quotation by paybill (the simulator's /__sim__/c2b-pay) and the money must reach Odoo's ledger.
With --after-restart (scripts/demo has restarted the simulator meanwhile): a paybill payment must
still reach Odoo, and the push payment is refunded (M-Pesa's Reversal, the initiator's certificate)
to the end.  Exit 0 when everything held.

Only the standard library and requests (the addon's own dependency).
"""

from __future__ import annotations

import argparse
import html
import math
import re
import sys
import time
import xmlrpc.client

import requests

DISTRIBUTOR = ("wanjiku", "wanjiku")
ADMIN = ("admin", "admin")
ACCOUNTANT_LOGIN = "accountant"
PHONE = "0708 374 149"  # The simulator's success number, as the distributor types it.
MSISDN = "254708374149"  # The same, as M-Pesa writes it.
TIMEZONE = "Africa/Nairobi"


class SmokeError(Exception):
    pass


def attribute(page: str, name: str, tag_pattern: str) -> str:
    """The value of `name` on the first tag matching `tag_pattern`."""
    tag = re.search(tag_pattern, page)
    if not tag:
        raise SmokeError(f"no tag like {tag_pattern!r} on the page")
    value = re.search(rf'\s{re.escape(name)}="([^"]*)"', tag.group(0))
    if not value:
        raise SmokeError(f"no {name} on {tag.group(0)[:200]}")
    return html.unescape(value.group(1))


def json_rpc(session: requests.Session, url: str, params: dict) -> dict:
    answer = session.post(url, json={"jsonrpc": "2.0", "method": "call", "id": 1, "params": params}, timeout=60)
    answer.raise_for_status()
    body = answer.json()
    if "error" in body:
        raise SmokeError(f"{url}: {body['error'].get('data', {}).get('message') or body['error']}")
    return body["result"]


def login(session: requests.Session, base: str, db: str, credentials: tuple[str, str]) -> None:
    page = session.get(f"{base}/web/login", params={"db": db}, timeout=30).text
    csrf = attribute(page, "value", r'<input[^>]*name="csrf_token"[^>]*>')
    answer = session.post(f"{base}/web/login", data={
        "login": credentials[0], "password": credentials[1], "csrf_token": csrf, "db": db,
    }, timeout=60)
    if "/web/login" in answer.url:
        raise SmokeError(f"could not log in as {credentials[0]}")


def pay(base: str, db: str, timeout: float, order_id: int) -> int:
    session = requests.Session()
    login(session, base, db, DISTRIBUTOR)
    quotes = session.get(f"{base}/my/quotes", timeout=60).text
    if str(order_id) not in re.findall(r'/my/orders/(\d+)\?', quotes):
        raise SmokeError(f"the quotation {order_id} is not among the distributor's quotations (paid already?"
                         " use --reset)")
    page = session.get(f"{base}/my/orders/{order_id}", timeout=60).text
    # The demo's distributor reads Swahili: the paybill details and the M-Pesa form say so.
    if "Lipa kwa M-Pesa" not in page:
        raise SmokeError(f"the quotation {order_id}'s page is not in Swahili for {DISTRIBUTOR[0]}")
    form = r'<form[^>]*id="o_payment_form"[^>]*>'
    radio = r'<input[^>]*data-provider-code="mpesa"[^>]*>'
    print(f"smoke: paying quotation {order_id} ({attribute(page, 'data-amount', form)} KES) as {DISTRIBUTOR[0]}")
    values = json_rpc(session, base + attribute(page, "data-transaction-route", form), {
        "provider_id": int(attribute(page, "data-provider-id", radio)),
        "payment_method_id": int(attribute(page, "data-payment-option-id", radio)),
        "token_id": None,
        "amount": float(attribute(page, "data-amount", form)),
        "flow": "direct",
        "tokenization_requested": False,
        "landing_route": attribute(page, "data-landing-route", form),
        "access_token": attribute(page, "data-access-token", form),
    })
    push = json_rpc(session, f"{base}/payment/mpesa/stk_push", {
        "reference": values["reference"], "phone": PHONE, "access_token": values["mpesa_access_token"],
    })
    if push.get("error"):
        raise SmokeError(f"the push was refused: {push['error']}")
    print(f"smoke: prompt sent for {values['reference']}; following the status page")
    pushed = time.monotonic()
    session.get(f"{base}/payment/status", timeout=60)
    deadline = time.monotonic() + timeout
    while True:
        status = json_rpc(session, f"{base}/payment/status/poll", {})
        state = status.get("state")
        if state not in (None, "draft", "pending") or time.monotonic() > deadline:
            break
        time.sleep(1)
    print(f"smoke: transaction {values['reference']} is {state} {time.monotonic() - pushed:.1f} s after the push")

    models = xmlrpc.client.ServerProxy(f"{base}/xmlrpc/2/object", allow_none=True)
    uid = xmlrpc.client.ServerProxy(f"{base}/xmlrpc/2/common").authenticate(db, *ADMIN, {})
    if not uid:
        raise SmokeError("could not log in as admin over XML-RPC")
    # The post-processing (order confirmation) follows the status page's poll: give it a moment.
    while True:
        [order] = models.execute_kw(db, uid, ADMIN[1], "sale.order", "read", [[order_id]],
                                    {"fields": ["name", "state", "amount_total", "mpesa_receipt_number"]})
        txs = models.execute_kw(db, uid, ADMIN[1], "payment.transaction", "search_read",
                                [[("reference", "=", values["reference"])]],
                                {"fields": ["state", "is_post_processed", "mpesa_receipt_number"]})
        if (order["state"] == "sale" and txs and txs[0]["is_post_processed"]) or time.monotonic() > deadline:
            break
        time.sleep(1)
    tx = txs[0] if txs else {}
    print(f"smoke: order {order['name']} is {order['state']}; transaction {tx.get('state')}, receipt "
          f"{tx.get('mpesa_receipt_number')}, post-processed {tx.get('is_post_processed')}")
    paid = order["state"] == "sale" and tx.get("state") == "done" and bool(tx.get("mpesa_receipt_number"))
    # The demo invoices on payment: the order's invoice is posted and paid by the M-Pesa payment.
    invoices = models.execute_kw(db, uid, ADMIN[1], "account.move", "search_read",
                                 [[("invoice_origin", "=", order["name"]), ("move_type", "=", "out_invoice")]],
                                 {"fields": ["name", "state", "payment_state"]})
    print(f"smoke: invoices {[(i['name'], i['state'], i['payment_state']) for i in invoices]}")
    invoiced = len(invoices) == 1 and invoices[0]["state"] == "posted" \
        and invoices[0]["payment_state"] in ("paid", "in_payment")
    print("smoke: PAID, confirmed and invoiced" if paid and invoiced else "smoke: NOT paid and invoiced",
          flush=True)
    return 0 if paid and invoiced else 1


class Admin:
    """The administrator over JSON-RPC (which, unlike XML-RPC, carries the None of Odoo's actions)."""

    def __init__(self, base: str, db: str):
        self.url = f"{base}/jsonrpc"
        self.db = db
        self.uid = self._call("common", "authenticate", db, *ADMIN, {})
        if not self.uid:
            raise SmokeError("could not log in as admin over JSON-RPC")

    def _call(self, service: str, method: str, *args):
        answer = requests.post(self.url, json={"jsonrpc": "2.0", "method": "call", "id": 1, "params": {
            "service": service, "method": method, "args": list(args),
        }}, timeout=60)
        answer.raise_for_status()
        body = answer.json()
        if "error" in body:
            raise SmokeError(f"{method}: {body['error'].get('data', {}).get('message') or body['error']}")
        return body.get("result")  # Odoo leaves out a None result.

    def __call__(self, model: str, method: str, *args, **kwargs):
        return self._call("object", "execute_kw", self.db, self.uid, ADMIN[1], model, method, list(args), kwargs)

    def ref(self, module: str, name: str) -> int:
        rows = self("ir.model.data", "search_read", [("module", "=", module), ("name", "=", name)],
                    fields=["res_id"])
        if not rows:
            raise SmokeError(f"no record {module}.{name}")
        return rows[0]["res_id"]


def check_setup(admin: Admin) -> None:
    """The demo is a Kenyan company with the Sales app."""
    apps = admin("ir.module.module", "search_read", [("name", "in", ["sale_management", "l10n_ke"])],
                 fields=["name", "state"])
    states = {app["name"]: app["state"] for app in apps}
    if states.get("sale_management") != "installed":
        raise SmokeError(f"the Sales app (sale_management) is {states.get('sale_management')}")
    [user] = admin("res.users", "read", [admin.uid], fields=["company_id"])
    [company] = admin("res.company", "read", [user["company_id"][0]], fields=["currency_id", "chart_template"])
    if company["currency_id"][1] != "KES":
        raise SmokeError(f"the company's currency is {company['currency_id'][1]}, not KES")
    users = admin("res.users", "search_read", [("login", "in", ["admin", ACCOUNTANT_LOGIN, DISTRIBUTOR[0]])],
                  fields=["login", "tz", "lang"], context={"active_test": False})
    elsewhere = {user["login"]: user["tz"] for user in users if user["tz"] != TIMEZONE}
    if len(users) != 3 or elsewhere:
        raise SmokeError(f"users not on {TIMEZONE}: {elsewhere or 'some demo user is missing'}")
    [distributor] = [user for user in users if user["login"] == DISTRIBUTOR[0]]
    if distributor["lang"] != "sw":
        raise SmokeError(f"{DISTRIBUTOR[0]} reads {distributor['lang']}, not Swahili")
    print(f"smoke: the Sales app is installed, the company keeps its books in KES ({company['chart_template']}"
          f" chart), admin, {ACCOUNTANT_LOGIN} and {DISTRIBUTOR[0]} are on {TIMEZONE}, {DISTRIBUTOR[0]} reads"
          " Swahili")


def pay_by_paybill(admin: Admin, sim_url: str, quotation: str | None, timeout: float, amount: int | None = None,
                   until: str | None = None, bill_ref: str = "NO-SUCH-REF") -> None:
    """A phone pays a demo quotation into the paybill, its number as the account number (or, without
    a quotation, `bill_ref`: by default an account number that matches nothing): the money must reach
    Odoo's ledger (which the C2B URLs, registered with the simulator, make possible), and its row the
    state `until`."""
    order = {"name": bill_ref, "amount_total": 0}
    if quotation:
        [order] = admin("sale.order", "read", [admin.ref("muchiri_mpesa", quotation)], fields=["name", "amount_total"])
    amount = amount or math.ceil(order["amount_total"])  # M-Pesa moves whole shillings.
    answer = requests.post(f"{sim_url}/__sim__/c2b-pay", json={
        "amount": amount, "msisdn": MSISDN, "bill_ref": order["name"],
    }, timeout=30)
    answer.raise_for_status()
    receipt = answer.json()["TransID"]
    print(f"smoke: a phone paid {amount} KES by paybill for {order['name']} (receipt {receipt})")
    deadline = time.monotonic() + timeout
    while True:
        rows = admin("muchiri.mpesa.ledger", "search_read", [("name", "=", receipt)], fields=["state", "amount"])
        if (rows and rows[0]["state"] == (until or rows[0]["state"])) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if not rows:
        raise SmokeError(f"the paybill payment {receipt} never reached Odoo (C2B URLs not registered?)")
    if until and rows[0]["state"] != until:
        raise SmokeError(f"the paybill payment {receipt} is {rows[0]['state']}, not {until}")
    print(f"smoke: paybill payment {receipt} reached Odoo's ledger ({rows[0]['state']})")


def pay_open_invoice(admin: Admin, sim_url: str, timeout: float) -> None:
    """The banner's invoice command: the distributor's open invoice (demo_setup.py register makes one
    at each start), paid by paybill with its number and its amount due up to a whole shilling, is paid."""
    invoices = admin("account.move", "search_read", [
        ("commercial_partner_id", "=", admin.ref("muchiri_mpesa", "demo_distributor")),
        ("move_type", "=", "out_invoice"), ("state", "=", "posted"), ("payment_state", "in", ["not_paid", "partial"]),
    ], fields=["name", "amount_residual"], order="id", limit=1)
    if not invoices:
        raise SmokeError("the distributor has no open invoice to pay by paybill (demo_setup.py register)")
    [invoice] = invoices
    pay_by_paybill(admin, sim_url, None, timeout, amount=math.ceil(invoice["amount_residual"]),
                   until="matched", bill_ref=invoice["name"])
    deadline = time.monotonic() + timeout
    while True:  # Booked at once, or by the post-processing job a moment later.
        [invoice] = admin("account.move", "read", [invoice["id"]], fields=["name", "payment_state"])
        if invoice["payment_state"] in ("paid", "in_payment") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if invoice["payment_state"] not in ("paid", "in_payment"):
        raise SmokeError(f"the invoice {invoice['name']} paid by paybill is {invoice['payment_state']}")
    print(f"smoke: the invoice {invoice['name']} is paid")


def refund(admin: Admin, timeout: float) -> None:
    """Refund the last push payment with Odoo's Refund button, to the end: the Reversal is accepted
    (the initiator's password encrypted with the simulator's certificate of now) and its result booked."""
    provider_id = admin.ref("muchiri_mpesa", "payment_provider_mpesa")
    txs = admin("payment.transaction", "search_read", [
        ("provider_id", "=", provider_id), ("state", "=", "done"), ("operation", "=", "online_direct"),
        ("payment_id", "!=", False),
    ], fields=["reference", "payment_id", "amount", "child_transaction_ids"], order="id desc", limit=5)
    txs = [tx for tx in txs if not tx["child_transaction_ids"]]
    if not txs:
        raise SmokeError("no push payment left to refund")
    tx = txs[0]
    payment_id = tx["payment_id"][0]
    action = admin("account.payment", "action_refund_wizard", [payment_id])
    context = {**(action.get("context") or {}), "active_id": payment_id, "active_model": "account.payment"}
    wizard = admin(action["res_model"], "create", {}, context=context)
    admin(action["res_model"], "action_refund", [wizard], context=context)
    print(f"smoke: refunding {tx['reference']} ({tx['amount']} KES)")
    deadline = time.monotonic() + timeout
    while True:
        refunds = admin("payment.transaction", "search_read", [
            ("source_transaction_id", "=", tx["id"]), ("operation", "=", "refund"),
        ], fields=["reference", "state", "state_message", "mpesa_receipt_number"])
        if (refunds and refunds[0]["state"] not in ("draft", "pending")) or time.monotonic() > deadline:
            break
        time.sleep(1)
    if not refunds or refunds[0]["state"] != "done":
        said = refunds and f"{refunds[0]['state']}: {refunds[0]['state_message']}"
        raise SmokeError(f"the refund of {tx['reference']} did not go through ({said or 'no refund'})")
    print(f"smoke: refund {refunds[0]['reference']} done, reversal {refunds[0]['mpesa_receipt_number']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the demo Odoo, e.g. http://127.0.0.1:8069")
    parser.add_argument("--db", default="mpesa_demo")
    parser.add_argument("--sim-url", help="the simulator, e.g. http://127.0.0.1:8089 (paybill payments)")
    parser.add_argument("--after-restart", action="store_true",
                        help="the simulator was restarted: pay by paybill and refund the push payment")
    parser.add_argument("--fresh-payment", action="store_true",
                        help="with --after-restart: the simulator forgot the payments made before its restart"
                             " (no state file): pay one more by push, and refund that one")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for the payment")
    args = parser.parse_args(argv)
    started = time.monotonic()
    base = args.url.rstrip("/")
    try:
        admin = Admin(base, args.db)
        # Maize by push, sugar by paybill; after the restart, an instalment of the bulk one by
        # paybill, and oil by push when the simulator forgot the first push payment.
        if args.after_restart:
            rc = 0
            if args.sim_url:
                pay_by_paybill(admin, args.sim_url.rstrip("/"), "demo_quotation_bulk", args.timeout, amount=1000)
                # The banner's second command: money matched to nothing waits in the queue.
                pay_by_paybill(admin, args.sim_url.rstrip("/"), None, 30, amount=1000, until="unmatched")
            if args.fresh_payment:
                rc = pay(base, args.db, args.timeout, admin.ref("muchiri_mpesa", "demo_quotation_oil"))
            if rc == 0:
                refund(admin, args.timeout)
        else:
            check_setup(admin)
            rc = pay(base, args.db, args.timeout, admin.ref("muchiri_mpesa", "demo_quotation_maize"))
            if rc == 0 and args.sim_url:
                pay_by_paybill(admin, args.sim_url.rstrip("/"), "demo_quotation_sugar", args.timeout)
                pay_open_invoice(admin, args.sim_url.rstrip("/"), args.timeout)
    except (SmokeError, requests.RequestException, xmlrpc.client.Error) as error:
        print(f"smoke: FAILED: {error}", file=sys.stderr)
        rc = 1
    print(f"smoke: {time.monotonic() - started:.1f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
