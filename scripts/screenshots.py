"""Screenshots of the demo for the README: headless Chromium driven over the DevTools protocol.

Run by `bash scripts/screenshots` against a running demo (scripts/demo); writes 1280x800 PNGs into
docs/: the portal payment form with the phone, the "check your phone" page, the paid order, the
order's M-Pesa tab, the M-Pesa analysis and the exchanges list.  Pays one demo quotation (the
simulator's success number) on the way.  The three ways a distributor pays (a large quotation's
form asking in instalments, the choice of the till, the paybill details and QR code on the
quotation) go into the addon's static/description/, where the provider's form shows them.  The
demo's distributor reads Swahili: the pictures are taken in English, then a quotation's paybill
details and M-Pesa form again in Swahili (portal-paybill-swahili.png, portal-swahili.png), and the
distributor is left in Swahili.  Needs `chromium` and websocket-client.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import xmlrpc.client
from pathlib import Path

import websocket

WIDTH, HEIGHT = 1280, 800
DOCS = Path(__file__).resolve().parent.parent / "docs"
# The three ways to pay: shown by the provider's form too, so inside the addon (and linked by the README).
DESCRIPTION = DOCS.parent / "muchiri_mpesa" / "static" / "description"


class Browser:
    """One headless Chromium page, just enough of the DevTools protocol for screenshots."""

    def __init__(self, chromium: str):
        self.profile = tempfile.mkdtemp(prefix="muchiri-screenshots-")
        self.process = subprocess.Popen([
            chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--hide-scrollbars", "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
            f"--window-size={WIDTH},{HEIGHT}", "about:blank",
        ], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile, "DevToolsActivePort")
        for _ in range(200):
            if port_file.exists() and port_file.read_text().strip():
                break
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as answer:
            page = next(target for target in json.load(answer) if target["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.ids = itertools.count(1)
        self.send("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)

    def send(self, method: str, **params):
        message_id = next(self.ids)
        self.ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails'].get('text')}")
        return result.get("result", {}).get("value")

    def wait(self, expression: str, timeout: float = 30.0, what: str = ""):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = self.js(expression)
            except RuntimeError:
                value = None
            if value:
                return value
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what or expression}")

    def open(self, url: str, ready: str = "document.readyState === 'complete'"):
        self.send("Page.navigate", url=url)
        time.sleep(0.3)
        self.wait(ready, what=url)

    def click(self, selector: str):
        self.wait(f"!!document.querySelector({json.dumps(selector)})", what=selector)
        self.js(f"document.querySelector({json.dumps(selector)}).click()")

    def shoot(self, name: str, settle: float = 0.8, folder: Path = DOCS):
        time.sleep(settle)  # Animations (modals, fading alerts) end.
        # Odoo's "page is out of date" notice: the assets of a new database are built while it loads.
        self.js("document.querySelectorAll('.o_notification').forEach(n => n.remove())")
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path = folder / name
        path.write_bytes(base64.b64decode(data))
        print(f"screenshots: {path.relative_to(DOCS.parent)} ({path.stat().st_size // 1024} KiB)")

    def close(self):
        self.ws.close()
        self.process.terminate()
        self.process.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)


def login(browser: Browser, base: str, db: str, login_name: str, password: str):
    # A fresh browser: no session, and no frontend_lang cookie, which Odoo sets at logout to the public
    # user's language and then prefers to the user's own (the Swahili pictures would come out English).
    browser.send("Network.clearBrowserCookies")
    browser.open(f"{base}/web/login?db={db}", "!!document.querySelector('.oe_login_form')")
    browser.js(f"""(() => {{
        const form = document.querySelector('.oe_login_form');
        form.querySelector("input[name='login']").value = {json.dumps(login_name)};
        form.querySelector("input[name='password']").value = {json.dumps(password)};
        form.submit();
    }})()""")
    time.sleep(1)
    browser.wait("document.readyState === 'complete' && !location.pathname.startsWith('/web/login')",
                 what=f"{login_name} logged in")


def backend(browser: Browser, base: str, path: str, ready: str):
    browser.open(f"{base}{path}", ready)
    browser.wait("!document.querySelector('.o_loading_indicator, .o-main-components-container .o_blockUI')")


def open_mpesa_form(browser: Browser):
    """On a quotation's portal page: Accept & Pay, M-Pesa chosen, the phone filled in."""
    browser.click("#o_sale_portal_paynow")
    browser.wait("!!document.querySelector('#modalaccept.show #o_mpesa_phone')"
                 " || !!document.querySelector(\"#modalaccept.show input[data-provider-code='mpesa']\")")
    browser.js("""(() => {
        const radio = document.querySelector(
            "#modalaccept input[name='o_payment_radio'][data-provider-code='mpesa']");
        if (radio && !radio.checked) radio.click();
    })()""")
    browser.wait("(document.querySelector('#modalaccept #o_mpesa_phone') || {}).value", what="the phone")


def three_ways(browser: Browser, base: str):
    """The largest demo quotation (above one prompt's 250,000): its form says the instalments
    before Pay, offers the distributor's till; its page shows the paybill details and QR code."""
    browser.open(f"{base}/my/quotes", "!!document.querySelector('.o_portal_my_doc_table')")
    bulk_url = browser.js("""(() => {
        const rows = [...document.querySelectorAll('.o_portal_my_doc_table tbody tr')];
        const amount = (row) => parseFloat(row.innerText.replace(/,/g, '').match(/([0-9]+[.][0-9]{2})(?!.*[0-9])/s)[1]);
        rows.sort((a, b) => amount(b) - amount(a));
        return rows[0].querySelector("a[href^='/my/orders/']").getAttribute('href');
    })()""")
    browser.open(base + bulk_url, "!!document.querySelector('#o_sale_portal_paynow')")
    browser.js("document.querySelector('.o_mpesa_paybill').scrollIntoView({block: 'center'})")
    browser.shoot("portal-paybill-qr.png", folder=DESCRIPTION)
    open_mpesa_form(browser)
    browser.wait("!!document.querySelector('#modalaccept .o_mpesa_instalments_note')", what="the instalments note")
    browser.shoot("portal-instalments.png", folder=DESCRIPTION)
    browser.click("#modalaccept #o_mpesa_pay_from_till")
    browser.wait("!!document.querySelector(\"#modalaccept div[name='o_mpesa_phone_block'].d-none\")",
                 what="the till chosen")
    browser.shoot("portal-pay-from-till.png", folder=DESCRIPTION)


def distributor_reads(base: str, db: str, lang: str):
    """The demo distributor's language, set as the administrator."""
    uid = xmlrpc.client.ServerProxy(f"{base}/xmlrpc/2/common").authenticate(db, "admin", "admin", {})
    models = xmlrpc.client.ServerProxy(f"{base}/xmlrpc/2/object")
    [user_id] = models.execute_kw(db, uid, "admin", "res.users", "search", [[("login", "=", "wanjiku")]])
    models.execute_kw(db, uid, "admin", "res.users", "write", [[user_id], {"lang": lang}])


def swahili(browser: Browser, base: str, order_url: str):
    """A quotation as the Swahili-reading distributor sees it: the paybill details and the form."""
    browser.open(base + order_url, "!!document.querySelector('#o_sale_portal_paynow')")
    browser.js("document.querySelector('.o_mpesa_paybill').scrollIntoView({block: 'center'})")
    browser.shoot("portal-paybill-swahili.png")
    open_mpesa_form(browser)
    browser.shoot("portal-swahili.png")


def run(base: str, db: str, chromium: str):
    DOCS.mkdir(exist_ok=True)
    browser = Browser(chromium)
    try:
        distributor_reads(base, db, "en_US")
        login(browser, base, db, "wanjiku", "wanjiku")
        three_ways(browser, base)
        browser.open(f"{base}/my/quotes", "!!document.querySelector('.o_portal_my_doc_table')")
        # The first demo quotation (the lowest id): one prompt pays it all.
        order_url = browser.js("[...document.querySelectorAll(\".o_portal_my_doc_table a[href^='/my/orders/']\")]"
                               ".map(a => a.getAttribute('href'))"
                               ".sort((a, b) => parseInt(a.split('/my/orders/')[1])"
                               " - parseInt(b.split('/my/orders/')[1]))[0]")
        order_id = int(order_url.split("/my/orders/")[1].split("?")[0])
        second_url = browser.js("[...document.querySelectorAll(\".o_portal_my_doc_table a[href^='/my/orders/']\")]"
                                ".map(a => a.getAttribute('href'))"
                                ".sort((a, b) => parseInt(a.split('/my/orders/')[1])"
                                " - parseInt(b.split('/my/orders/')[1]))[1]")
        browser.open(base + order_url, "!!document.querySelector('#o_sale_portal_paynow')")
        open_mpesa_form(browser)
        browser.shoot("portal-payment-form.png")

        browser.click("#modalaccept button[name='o_payment_submit_button']")
        browser.wait("location.pathname === '/payment/status'"
                     " && !!document.querySelector(\"div[name='o_payment_status_alert']\")",
                     what="the status page")
        browser.shoot("portal-check-your-phone.png", settle=0.3)

        browser.wait("location.pathname.startsWith('/my/orders/')"
                     " && !!document.querySelector(\"#quote_content div[name='o_payment_status_alert']\")",
                     timeout=60, what="the paid order")
        browser.shoot("portal-paid.png")

        distributor_reads(base, db, "sw")
        login(browser, base, db, "wanjiku", "wanjiku")
        swahili(browser, base, second_url)

        login(browser, base, db, "admin", "admin")
        backend(browser, base, f"/odoo/sales/{order_id}",
                "!!document.querySelector('.o_form_view')")
        browser.click(".o_notebook a[name='mpesa']")
        browser.shoot("order-mpesa-tab.png")
        backend(browser, base, "/odoo/action-muchiri_mpesa.action_mpesa_report",
                "!!document.querySelector('.o_graph_view, .o_pivot_view')")
        browser.shoot("mpesa-analysis.png", settle=1.5)
        backend(browser, base, "/odoo/action-muchiri_mpesa.action_mpesa_event",
                "!!document.querySelector('.o_list_view .o_data_row')")
        browser.shoot("mpesa-exchanges.png")
    finally:
        distributor_reads(base, db, "sw")
        browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the running demo, e.g. http://127.0.0.1:8069")
    parser.add_argument("--db", default="mpesa_demo")
    parser.add_argument("--chromium", default=os.environ.get("CHROMIUM") or shutil.which("chromium")
                        or shutil.which("chromium-browser") or "chromium")
    args = parser.parse_args(argv)
    run(args.url.rstrip("/"), args.db, args.chromium)
    return 0


if __name__ == "__main__":
    sys.exit(main())
