"""Pay one demo quotation over HTTP as the distributor's browser does, then check the order.

Run by `bash scripts/demo --smoke` against the running demo (Odoo with demo data, the simulator):
log in to the portal, open a quotation, read its payment form, call Odoo's transaction route and
the M-Pesa push route as the inline form does, follow the status page's poll while the simulator's
customer pays and its callback reaches Odoo, then check, as the administrator over XML-RPC, that the
order is confirmed and its transaction done with an M-Pesa receipt.  Exit 0 when paid.

Only the standard library and requests (the addon's own dependency).
"""

from __future__ import annotations

import argparse
import html
import re
import sys
import time
import xmlrpc.client

import requests

DISTRIBUTOR = ("wanjiku", "wanjiku")
ADMIN = ("admin", "admin")
PHONE = "0708 374 149"  # The simulator's success number, as the distributor types it.


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


def pay(base: str, db: str, timeout: float) -> int:
    session = requests.Session()
    login(session, base, db, DISTRIBUTOR)
    quotes = session.get(f"{base}/my/quotes", timeout=60).text
    ids = re.findall(r'/my/orders/(\d+)\?', quotes)
    if not ids:
        raise SmokeError("the distributor has no quotation in the portal")
    order_id = min(int(order) for order in ids)  # The first demo quotation (maize): one prompt pays it all.
    page = session.get(f"{base}/my/orders/{order_id}", timeout=60).text
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
    session.get(f"{base}/payment/status", timeout=60)
    deadline = time.monotonic() + timeout
    while True:
        status = json_rpc(session, f"{base}/payment/status/poll", {})
        state = status.get("state")
        if state not in (None, "draft", "pending") or time.monotonic() > deadline:
            break
        time.sleep(1)
    print(f"smoke: transaction {values['reference']} is {state}")

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the demo Odoo, e.g. http://127.0.0.1:8069")
    parser.add_argument("--db", default="mpesa_demo")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for the payment")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        rc = pay(args.url.rstrip("/"), args.db, args.timeout)
    except (SmokeError, requests.RequestException, xmlrpc.client.Error) as error:
        print(f"smoke: FAILED: {error}", file=sys.stderr)
        rc = 1
    print(f"smoke: {time.monotonic() - started:.1f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
