# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
import contextlib
import json
import threading
import time
from urllib.parse import urlsplit

from odoo.fields import Command
from odoo.tests import common as odoo_test_common

from odoo.addons.account_payment.tests.common import AccountPaymentCommon
from odoo.addons.muchiri_mpesa import const
from odoo.addons.muchiri_mpesa.daraja.simulator import DarajaSimulator
from odoo.addons.payment.tests.http_common import PaymentHttpCommon
from odoo.addons.sale.tests.common import SaleCommon

SIM_KEY = 'test-consumer-key'
SIM_SECRET = 'test-consumer-secret'
SIM_SHORTCODE = '174379'
SIM_PASSKEY = 'bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919'

# The simulator's outcomes, chosen by phone number (see the README).
# Seconds before the simulated customer answers: the test reads the pending state well before.
CALLBACK_DELAY = 1.0

PHONE_SUCCESS = '254708374149'
PHONE_CANCELLED = '254700000001'
PHONE_NO_ANSWER = '254700000002'
PHONE_NO_FUNDS = '254700000003'
PHONE_WRONG_PIN = '254700000004'
PHONE_CALLBACK_LOST = '254700000005'
PHONE_CALLBACK_TWICE = '254700000006'
PHONE_CALLBACK_LATE = '254700000007'
PHONE_CALLBACK_EARLY = '254700000008'
PHONE_LOCKED = '254700000009'


class MpesaCommon(AccountPaymentCommon, SaleCommon, PaymentHttpCommon):
    """A KES quotation of a distributor, an M-Pesa provider that talks to a real Daraja simulator
    on loopback, and the simulator's callbacks reaching this Odoo's real HTTP server."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.simulator = DarajaSimulator(
            host='127.0.0.1', port=0, consumer_key=SIM_KEY, consumer_secret=SIM_SECRET,
            shortcode=SIM_SHORTCODE, passkey=SIM_PASSKEY, callback_delay=CALLBACK_DELAY, prompt_timeout=0.5,
            late_callback_delay=4.0, callback_timeout=3.0,
            # As Daraja does: every URL we hand it must avoid the words it refuses.
            reject_mpesa_in_callback_url=True,
        )
        cls.simulator.start()
        cls.addClassCleanup(cls.simulator.stop)

        cls.currency_kes = cls.setup_other_currency('KES', rates=[('1900-01-01', 100.0)])
        cls.provider = cls._prepare_provider('mpesa', update_values={
            'mpesa_consumer_key': SIM_KEY,
            'mpesa_consumer_secret': SIM_SECRET,
            'mpesa_shortcode': SIM_SHORTCODE,
            'mpesa_passkey': SIM_PASSKEY,
            'mpesa_api_url': cls.simulator.base_url,
            'mpesa_callback_base_url': cls.base_url(),
            'mpesa_ip_check': 'log',
            'mpesa_push_cooldown': 120,
            'maximum_amount': 150000,
            'is_published': True,
            'available_country_ids': [Command.clear()],
        })
        cls.payment_method = cls.env.ref('payment.payment_method_mpesa')
        cls.payment_method.active = True
        cls.payment_method_id = cls.payment_method.id

        cls.distributor_user = cls._create_new_portal_user(login='distributor', name='Wanjiku Distributors')
        cls.distributor = cls.distributor_user.partner_id
        cls.distributor.write({
            'is_distributor': True, 'email': 'wanjiku@example.com', 'mobile': '0708 374 149',
        })
        pricelist = cls.env['product.pricelist'].create({
            'name': "KES", 'currency_id': cls.currency_kes.id,
        })
        cls.quotation = cls.env['sale.order'].create({
            'partner_id': cls.distributor.id,
            'pricelist_id': pricelist.id,
            'require_payment': True,
            'require_signature': False,
            'prepayment_percent': 1.0,
            'order_line': [Command.create({
                'product_id': cls.product.id, 'product_uom_qty': 3, 'price_unit': 1500.0,
                'tax_id': [Command.clear()],
            })],
        })
        cls.currency = cls.currency_kes
        cls.partner = cls.distributor
        cls.amount = cls.quotation.amount_total

    @classmethod
    def _request_handler(cls, s, r, /, **kw):
        """Odoo's guard against external requests compares the timeout with a number; the Daraja
        client sends a (connect, read) pair.  Loopback requests go out unchanged."""
        timeout = kw.get('timeout')
        if isinstance(timeout, tuple) and urlsplit(r.url).hostname in ('127.0.0.1', 'localhost'):
            return odoo_test_common._super_send(s, r, **kw)
        return super()._request_handler(s, r, **kw)

    def setUp(self):
        super().setUp()
        self.simulator.reset()  # Pending prompts of a previous test would lock its phones.

    # === HELPERS === #

    def _result_known(self, tx):
        """Whether the simulated customer has answered (the query then gives the final result)."""
        return self.simulator.transaction(tx.provider_reference).is_final()

    def _start_portal_payment(self, order=None, login='distributor'):
        """Odoo's own transaction route, as the portal's payment form calls it.

        :return: the processing values given to the browser
        """
        order = order or self.quotation
        with self.registry.test_lock:  # See _get_tx.
            self.authenticate(login, login)
            params = {
                'provider_id': self.provider.id,
                'payment_method_id': self.payment_method_id,
                'token_id': None,
                'amount': order.amount_total,
                'flow': 'direct',
                'tokenization_requested': False,
                'landing_route': order.get_portal_url(),
                'access_token': order._portal_ensure_token(),
            }
        return self.make_jsonrpc_request(self._build_url(f'/my/orders/{order.id}/transaction'), params)

    def _stk_push(self, processing_values, phone):
        """Our route, as the M-Pesa inline form calls it after the transaction route."""
        return self.make_jsonrpc_request(self._build_url('/payment/mpesa/stk_push'), {
            'reference': processing_values['reference'],
            'phone': phone,
            'access_token': processing_values['mpesa_access_token'],
        })

    def _stk_push_refusal(self, processing_values, phone):
        """The message the payment form shows when our route refuses the push."""
        response = self.url_open(self._build_url('/payment/mpesa/stk_push'), data=json.dumps({
            'jsonrpc': '2.0', 'method': 'call', 'id': 0, 'params': {
                'reference': processing_values['reference'],
                'phone': phone,
                'access_token': processing_values['mpesa_access_token'],
            },
        }), headers={'Content-Type': 'application/json'})
        answer = response.json()
        self.assertNotIn('error', answer, "a refusal is an answer of the route, not a server error")
        message = answer['result'].get('error')
        self.assertTrue(message, "the push was refused")
        return message

    def _get_tx(self, reference):
        # Under the server's lock: a callback may be running on the shared connection right now.
        with self.registry.test_lock:
            return super()._get_tx(reference).sudo()

    def _pay_from_portal(self, phone, order=None):
        values = self._start_portal_payment(order)
        result = self._stk_push(values, phone)
        return self._get_tx(values['reference']), result

    def _settle_callbacks(self):
        """Run the settlement job, as the cron Odoo wakes after each callback would (no cron runs
        in Odoo's tests).  Under the lock the test server holds while it serves a request."""
        with self.registry.test_lock:
            self.env['muchiri.mpesa.event'].sudo()._cron_mpesa_settle_callbacks()
            # Then Odoo's post-processing job, which the settlement wakes (less its commits).
            self.env.invalidate_all()
            Transaction = self.env['payment.transaction'].sudo()
            for tx in Transaction.search([('provider_code', '=', 'mpesa'), ('is_post_processed', '=', False),
                                          ('state', 'in', ('done', 'cancel', 'error'))]):
                tx._mpesa_post_process()
            self.env.invalidate_all()

    @contextlib.contextmanager
    def _settling_in_background(self, interval=0.3):
        """While a browser runs a tour, settle received callbacks as Odoo's cron worker would."""
        stop = threading.Event()

        def run():
            while not stop.wait(interval):
                self._settle_callbacks()

        thread = threading.Thread(target=run, name='mpesa-settlement', daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=30)

    def _wait(self, predicate, timeout=10.0, message="condition", settle=True):
        """Wait for something Odoo's HTTP server does in its own thread, running the settlement
        job meanwhile (unless `settle` is False).

        The server's requests share this test's database connection: read it only under the lock
        the server holds while it handles a request.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if settle:
                self._settle_callbacks()
            with self.registry.test_lock:
                self.env.invalidate_all()
                if predicate():
                    return
            time.sleep(0.05)
        self.fail(f"Timed out waiting for {message}")

    def _wait_callbacks(self, tx, count=1, timeout=10.0):
        """Wait until the simulator's callbacks for `tx` were answered by Odoo, and settled."""
        self.simulator.wait_for_callback(tx.provider_reference, count=count, timeout=timeout)
        self._wait(lambda: True)

    def _wait_final(self, tx, callbacks=1):
        self._wait_callbacks(tx, callbacks)
        self.assertNotIn(tx.state, ('draft', 'pending'), f"{tx.reference} is settled")

    def _post_callback(self, body, secret=None, raw=None, settle=True, route=const.LNM_ROUTES['stk']):
        """POST a callback to Odoo as Daraja does (plain JSON, no JSON-RPC envelope), then run the
        settlement job that the callback wakes (unless `settle` is False)."""
        secret = secret or self.provider.mpesa_callback_secret
        url = self._build_url(route.replace('<string:secret>', secret))
        data = raw if raw is not None else json.dumps(body)
        response = self.opener.post(url, data=data, headers={'Content-Type': 'application/json'},
                                    timeout=20)
        if settle:
            self._settle_callbacks()
        return response

    def _events(self, **domain):
        with self.registry.test_lock:  # See _get_tx.
            return self.env['muchiri.mpesa.event'].search(
                [(key, '=', value) for key, value in domain.items()]
            )
