# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""An enabled provider talks to Safaricom's production API only.

Payments are taken in test mode at the simulator; the host they remember is then a plain HTTP
listener on loopback, standing for the old host (a simulator or a developer's machine) that must
never see the production consumer key and secret, a production SecurityCredential or a ResultURL
with the callback secret.  The provider goes live; the refund button, the initiator job, saving
the initiator and the reconciliation cron run; the listener must receive nothing at all.
"""
import base64
import json
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import requests

from odoo import fields
from odoo.exceptions import UserError, ValidationError
from odoo.tests import tagged
from odoo.tools import mute_logger

from odoo.addons.muchiri_mpesa import daraja

from .common import PHONE_CALLBACK_LOST
from .test_refund import InitiatorCommon

PROD_KEY = 'production-consumer-key'
PROD_SECRET = 'production-consumer-secret'
LOOPBACK = ('127.0.0.1', 'localhost')


class OldHost:
    """A real HTTP server on loopback that records every request and answers as Daraja would
    (a token, then an acknowledgement), so that whatever reaches it would go on."""

    def __init__(self):
        self.requests = []
        received = self.requests

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get('Content-Length') or 0)
                received.append({
                    'method': self.command, 'path': self.path,
                    'authorization': self.headers.get('Authorization', ''),
                    'body': self.rfile.read(length).decode('utf-8', 'replace') if length else '',
                })
                if self.path.startswith('/oauth/'):
                    answer = {'access_token': 'old-host-token', 'expires_in': '3599'}
                else:
                    answer = {'ConversationID': 'AG_OLD_HOST', 'OriginatorConversationID': 'OLD-1',
                              'ResponseCode': '0', 'ResponseDescription': 'Accept the service request successfully.'}
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header('Content-Type', 'application/json')
                self.send_header('Content-Length', str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.server.server_address[1]}'
        self.thread = threading.Thread(target=self.server.serve_forever, name='old-daraja-host', daemon=True)

    def start(self):
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def summary(self):
        lines = []
        for request in self.requests:
            said = request['authorization']
            if said.startswith('Basic '):
                said = 'Basic ' + base64.b64decode(said[6:]).decode('utf-8', 'replace')
            lines.append(f"{request['method']} {request['path']} [{said}] {request['body'][:300]}")
        return '\n'.join(lines)


@tagged('post_install', '-at_install')
class TestLiveHosts(InitiatorCommon):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.old_host = OldHost()
        cls.old_host.start()
        cls.addClassCleanup(cls.old_host.stop)
        cls.outbound = []

    @classmethod
    def _request_handler(cls, s, r, /, **kw):
        """The test machine has no internet, and nothing may reach Safaricom from a test: a request
        to any other host than loopback is recorded and refused here, as a network that cannot
        reach the host would (the only transport patched: loopback requests go out for real)."""
        if urlsplit(r.url).hostname not in LOOPBACK:
            cls.outbound.append(r.url)
            raise requests.exceptions.ConnectTimeout(f"No network in tests (was {r.method} {r.url})")
        return super()._request_handler(s, r, **kw)

    def setUp(self):
        super().setUp()
        self.old_host.requests.clear()
        self.outbound.clear()

    # === HELPERS === #

    def _taken_in_test_mode(self, kind, scheduled=True):
        """A payment taken in test mode at the simulator, that remembers the listener as the Daraja
        it went through: 'paid', 'unverified' (its receipt waits for Transaction Status; its check
        due when `scheduled`) or 'pending' (a prompt whose callback was lost)."""
        if kind == 'pending':
            tx, _result = self._pay_from_portal(PHONE_CALLBACK_LOST)
            self.assertEqual(tx.state, 'pending')
        else:
            tx = self._paid()
        if kind == 'unverified':
            tx.write({'mpesa_receipt_status': 'unverified', 'mpesa_receipt_proof': False})
            if scheduled:
                tx._mpesa_request_receipt_proof()  # As a receipt learnt after the fact is, in test mode.
                self.assertTrue(tx.mpesa_status_next_at, "its check was due when the provider went live")
        tx.mpesa_api_url = self.old_host.url
        return tx

    def _go_live(self):
        self.provider.write({
            'state': 'enabled', 'mpesa_api_url': False, 'mpesa_callback_base_url': 'https://shop.example.com',
            'mpesa_consumer_key': PROD_KEY, 'mpesa_consumer_secret': PROD_SECRET,
        })

    def _assert_old_host_untouched(self, what):
        self.assertFalse(self.old_host.requests, f"{what}: the old host received\n{self.old_host.summary()}")
        self.assertFalse([url for url in self.outbound if not url.startswith(daraja.PRODUCTION_URL + '/')],
                         f"{what}: only Safaricom's production API is ever asked")

    def _chatter_says(self, document, text):
        return document.message_ids.filtered(lambda message: text in (message.body or ''))

    # === TESTS === #

    def test_refund_of_a_test_mode_payment_is_refused(self):
        paid = self._taken_in_test_mode('paid')
        self._go_live()
        refused = None
        try:
            self._refund_with_odoos_button(paid)
        except (ValidationError, UserError) as error:
            refused = error
        self._assert_old_host_untouched("the refund button")
        self.assertIsInstance(refused, ValidationError, "the refund is refused")
        self.assertIn("taken while M-Pesa was in test mode", str(refused))
        self.assertIn("pay it back by hand", str(refused))
        self.assertFalse(self._refund_of(paid), "no refund transaction is left behind")

    def test_receipt_check_job_skips_test_mode_receipts_and_says_so_once(self):
        unverified = self._taken_in_test_mode('unverified')
        order = unverified.sale_order_ids
        self._go_live()
        self._run_initiator_job()
        self._assert_old_host_untouched("the receipt check job")
        self.assertFalse(unverified.mpesa_status_next_at, "no longer scheduled")
        self.assertEqual(unverified.mpesa_receipt_status, 'unverified')
        self.assertIn("taken while M-Pesa was in test mode", unverified.mpesa_receipt_proof_note)
        self.assertEqual(len(self._chatter_says(order, "was taken while M-Pesa was in test mode")), 1)
        self._run_initiator_job()
        self.provider.write({'mpesa_initiator_password': 'production-initiator-password'})
        self._run_initiator_job()
        self._assert_old_host_untouched("the next runs")
        self.assertEqual(len(self._chatter_says(order, "was taken while M-Pesa was in test mode")), 1,
                         "said once, not at every run or save")

    def test_saving_the_initiator_does_not_check_test_mode_receipts(self):
        unverified = self._taken_in_test_mode('unverified', scheduled=False)
        self._go_live()
        # Saving the production initiator asks about every unverified receipt: not this one.
        self.provider.write({'mpesa_initiator_password': 'production-initiator-password'})
        self._run_initiator_job()
        self._assert_old_host_untouched("saving the initiator")
        self.assertFalse(unverified.mpesa_status_next_at)
        self.assertIn("taken while M-Pesa was in test mode", unverified.mpesa_receipt_proof_note)

    @mute_logger('odoo.addons.muchiri_mpesa.models.payment_transaction')
    def test_pending_test_mode_prompt_is_ended_not_queried(self):
        pending = self._taken_in_test_mode('pending')
        order = pending.sale_order_ids
        self._go_live()
        pending.mpesa_next_check_at = fields.Datetime.now() - timedelta(seconds=1)
        with self.registry.test_lock:
            self.env['payment.transaction'].sudo()._cron_mpesa_reconcile()
            self.env.invalidate_all()
        self._assert_old_host_untouched("the reconciliation cron")
        self.assertEqual(pending.state, 'error', "ended, not queried")
        self.assertIn("taken while M-Pesa was in test mode", pending.state_message)
        self.assertFalse(pending.mpesa_next_check_at)
        with self.assertRaises(UserError) as caught:
            order.action_mpesa_check_status()
        self.assertIn("No M-Pesa payment", str(caught.exception), "nothing is pending any more")
        self._assert_old_host_untouched("the order's status check")

    def test_status_check_from_the_order_ends_a_test_mode_prompt(self):
        pending = self._taken_in_test_mode('pending')
        self._go_live()
        action = pending.sale_order_ids.action_mpesa_check_status()
        self._assert_old_host_untouched("the order's status check")
        self.assertEqual(pending.state, 'error')
        self.assertIn("taken while M-Pesa was in test mode", str(action))

    def test_a_late_callback_of_a_test_mode_prompt_is_not_confirmed_in_production(self):
        pending, _result = self._pay_from_portal(PHONE_CALLBACK_LOST)
        pending.mpesa_api_url = self.old_host.url
        self._go_live()
        response = self._post_callback(daraja.stk_callback_body(
            pending.mpesa_merchant_request_id, pending.provider_reference, 0,
            "The service request is processed successfully.", amount=int(pending.amount),
            receipt='SIMOLD0001', transaction_date=fields.Datetime.now(), phone=pending.mpesa_phone,
        ))
        self.assertEqual(response.status_code, 200)
        self._assert_old_host_untouched("the callback's confirmation")
        self.assertEqual(pending.state, 'error', "production cannot confirm it: never paid by a callback")
        self.assertFalse(pending.mpesa_receipt_number)
        self.assertIn("taken while M-Pesa was in test mode", pending.state_message)

    def test_an_enabled_provider_asks_production_whatever_its_api_url_holds(self):
        self._go_live()
        # A value the form refuses for an enabled provider, but a database may hold (older
        # versions, a restored copy): requests still go to production.
        self.env.flush_all()
        self.env.cr.execute("UPDATE payment_provider SET mpesa_api_url = %s WHERE id = %s",
                            [self.old_host.url, self.provider.id])
        self.provider.invalidate_recordset()
        self.assertEqual(self.provider.mpesa_api_url, self.old_host.url)
        self.assertEqual(self.provider._mpesa_api_base_url(), daraja.PRODUCTION_URL)
        with self.assertRaises(UserError) as caught:
            self.provider.action_mpesa_test_connection()
        self.assertIn(daraja.PRODUCTION_URL, str(caught.exception))
        self._assert_old_host_untouched("the connection test")
        self.assertTrue(self.outbound, "the token was asked of production (refused: no network in tests)")

        self.outbound.clear()
        with self.assertRaises(UserError):
            self.provider.action_mpesa_c2b_register()
        self._assert_old_host_untouched("the C2B registration")
        self.assertTrue(self.outbound)

        self.outbound.clear()
        with self.assertRaises(daraja.DarajaError):
            self.provider._mpesa_pull()
        self._assert_old_host_untouched("Pull Transactions")
        self.assertTrue(self.outbound)

    def test_a_production_payment_is_still_refunded_in_production(self):
        tx = self._paid()
        tx.mpesa_api_url = daraja.PRODUCTION_URL  # Taken once live.
        self._go_live()
        refund = self._refund_with_odoos_button(tx)
        self._assert_old_host_untouched("the refund of a production payment")
        self.assertTrue(refund, "the refund is made and its reversal sent")
        self.assertTrue(self.outbound, "to production (refused: no network in tests)")
        self.assertTrue(all(url.startswith(daraja.PRODUCTION_URL) for url in self.outbound))
        self.assertEqual(self._refund_of(tx).state, 'error', "not sent: production could not be reached")
        self.assertNotIn("test mode", refund.state_message or '')
