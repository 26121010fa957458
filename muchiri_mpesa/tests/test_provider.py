# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""The provider: its set-up warnings and form, to whom it is offered, its initiator, what it settles
when several share a database, and the live hosts it talks to.
"""
import base64
import json
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import psycopg2
import requests
from lxml import etree
from markupsafe import Markup

from odoo import fields
from odoo.exceptions import AccessError, UserError, ValidationError
from odoo.fields import Command
from odoo.tests import tagged
from odoo.tools import mute_logger

from odoo.addons.muchiri_mpesa import daraja

from .common import (
    PHONE_CALLBACK_LOST,
    SIM_KEY,
    SIM_PASSKEY,
    SIM_SECRET,
    SIM_SHORTCODE,
    MpesaCommon,
    MpesaInitiatorCommon,
)

# What a first set-up needs, on the Credentials tab, in this order.
FIRST_SET_UP = (
    'mpesa_consumer_key', 'mpesa_consumer_secret', 'mpesa_shortcode_type', 'mpesa_shortcode',
    'mpesa_till_number', 'mpesa_passkey', 'action_mpesa_test_connection',
)
# What has working defaults, on the M-Pesa: advanced tab.
ADVANCED = (
    'mpesa_api_url', 'mpesa_callback_base_url', 'mpesa_callback_secret',
    'action_mpesa_regenerate_callback_secret', 'mpesa_ip_check', 'mpesa_allowed_ips',
    'mpesa_confirm_by_query', 'mpesa_push_cooldown', 'mpesa_reconcile_cutoff_hours',
    'mpesa_distributors_only', 'mpesa_alert_group_id', 'mpesa_alert_quiet_period',
    'mpesa_alert_min_rate', 'mpesa_alert_window', 'mpesa_alert_min_sample',
    'mpesa_alert_pending_delay', 'mpesa_alert_order_failures', 'mpesa_alert_order_window',
)

KES_INACTIVE = "(KES) is not active"
NO_KES_PRICELIST = "No pricelist is in KES"
NO_RATE = "KES has no exchange rate"
NO_DISTRIBUTOR = "no contact is a distributor"
NOT_IN_KENYA = "is not in Kenya"
KENYA_LEFT_OUT = "Kenya is not among the provider's countries"

PROD_KEY = 'production-consumer-key'
PROD_SECRET = 'production-consumer-secret'
LOOPBACK = ('127.0.0.1', 'localhost')


@tagged('post_install', '-at_install')
class TestProviderSetup(MpesaCommon):

    def setUp(self):
        super().setUp()
        self.kenya = self.env.ref('base.ke')
        self.company = self.provider.company_id
        self.company.country_id = self.kenya

    def _warnings(self):
        self.env.invalidate_all()  # Not stored: each read looks at currencies, pricelists, contacts.
        return Markup(self.provider.mpesa_setup_warnings or '').striptags()

    def _assert_warns(self, text):
        self.assertIn(text, self._warnings())

    def _assert_quiet(self, text):
        self.assertNotIn(text, self._warnings())

    def _kes_pricelists(self):
        return self.env['product.pricelist'].search([('currency_id', '=', self.currency_kes.id)])

    # === SET-UP WARNINGS === #

    def test_a_provider_ready_to_be_offered_warns_of_nothing(self):
        self.assertFalse(self._warnings())
        self.assertFalse(self.provider.mpesa_setup_needs_kes_pricelist)

    def test_no_kes_pricelist_is_said_and_created_in_one_click(self):
        self._kes_pricelists().action_archive()
        self._assert_warns(NO_KES_PRICELIST)
        self._assert_quiet(KES_INACTIVE)
        self.assertTrue(self.provider.mpesa_setup_needs_kes_pricelist)
        action = self.provider.action_mpesa_create_kes_pricelist()
        self.assertEqual(action['params']['type'], 'success')
        self.assertEqual(len(self._kes_pricelists()), 1)
        self._assert_quiet(NO_KES_PRICELIST)
        self.assertFalse(self.provider.mpesa_setup_needs_kes_pricelist)

    def test_inactive_kes_is_said_and_activated_in_one_click(self):
        self.currency_kes.active = False  # Odoo archives the KES pricelists with it.
        self._assert_warns(KES_INACTIVE)
        self._assert_warns(NO_KES_PRICELIST)
        self.assertTrue(self.provider.mpesa_setup_needs_kes_pricelist)
        self.provider.action_mpesa_create_kes_pricelist()
        self.assertTrue(self.currency_kes.active)
        self.assertTrue(self._kes_pricelists())
        self.assertFalse(self._warnings())

    def test_a_kes_company_without_any_pricelist_needs_none(self):
        self.env['product.pricelist'].search([]).action_archive()
        self._assert_warns(NO_KES_PRICELIST)  # Quotations are in the company's currency.
        nairobi = self.env['res.company'].create({
            'name': "Nairobi Wholesale", 'currency_id': self.currency_kes.id, 'country_id': self.kenya.id,
        })
        self.env['product.pricelist'].search([]).action_archive()
        provider = self.env['payment.provider'].create({
            'name': "M-Pesa Nairobi", 'code': 'mpesa', 'company_id': nairobi.id,
        })
        self.env.invalidate_all()
        self.assertNotIn(NO_KES_PRICELIST, Markup(provider.mpesa_setup_warnings or '').striptags())

    def test_a_missing_exchange_rate_is_said(self):
        self.assertNotEqual(self.company.currency_id, self.currency_kes)
        rates = self.currency_kes.rate_ids
        self.assertTrue(rates)
        rates.unlink()
        self._assert_warns(NO_RATE)
        # Another company's rate (demo data has several companies) converts nothing of this one's.
        other = self.env['res.company'].sudo().create({'name': "Kampala Wholesale"})
        self.env['res.currency.rate'].sudo().create({
            'currency_id': self.currency_kes.id, 'name': '2020-01-01', 'rate': 140.0, 'company_id': other.id,
        })
        self._assert_warns(NO_RATE)
        self.env['res.currency.rate'].create({
            'currency_id': self.currency_kes.id, 'name': '2020-01-01', 'rate': 130.0,
        })
        self._assert_quiet(NO_RATE)

    def test_no_distributor_is_said(self):
        distributors = self.env['res.partner'].search([('is_distributor', '=', True)])
        distributors.is_distributor = False
        self._assert_warns(NO_DISTRIBUTOR)
        self.provider.mpesa_distributors_only = False
        self._assert_quiet(NO_DISTRIBUTOR)
        self.provider.mpesa_distributors_only = True
        self.distributor.is_distributor = True
        self._assert_quiet(NO_DISTRIBUTOR)

    def test_a_company_outside_kenya_is_said(self):
        self.company.country_id = self.env.ref('base.us')
        self._assert_warns(NOT_IN_KENYA)
        self.company.country_id = self.kenya
        self._assert_quiet(NOT_IN_KENYA)

    def test_countries_that_leave_out_kenya_are_said(self):
        self.provider.available_country_ids = [Command.set(self.env.ref('base.us').ids)]
        self._assert_warns(KENYA_LEFT_OUT)
        self.provider.available_country_ids = [Command.link(self.kenya.id)]
        self._assert_quiet(KENYA_LEFT_OUT)
        self.provider.available_country_ids = [Command.clear()]
        self._assert_quiet(KENYA_LEFT_OUT)

    def test_another_provider_gets_no_mpesa_warning(self):
        self.company.country_id = self.env.ref('base.us')
        other = self.env['payment.provider'].create({'name': "Other", 'code': 'none'})
        self.env.invalidate_all()
        self.assertFalse(other.mpesa_setup_warnings)

    def test_the_pricelist_button_is_for_administrators_only(self):
        self.currency_kes.active = False
        with self.assertRaises(AccessError):
            self.provider.with_user(self.internal_user).action_mpesa_create_kes_pricelist()
        self.assertFalse(self.currency_kes.active)

    # === TEST CONNECTION === #

    def _test_connection_error(self):
        """The message of the refused test, without rolling back what was kept meanwhile (the log
        is kept on its own committed cursor in production, a savepoint in tests)."""
        try:
            self.provider.action_mpesa_test_connection()
        except UserError as error:
            return str(error)
        self.fail("the test connection was refused")

    def test_refused_credentials_are_said_once_and_logged(self):
        self.provider.mpesa_consumer_secret = 'wrong'
        events_before = self._events(kind='token')
        message = self._test_connection_error()
        self.assertEqual(message.count("refused"), 1, message)
        self.assertEqual(message.count("consumer key and secret"), 1, message)
        self.assertEqual(message.count("Invalid Authentication passed"), 1, message)
        self.assertEqual(message.count("Check"), 0, message)
        self.assertIn("My Apps", message)
        self.assertNotIn('wrong', message)
        refused = self._events(kind='token') - events_before
        self.assertEqual(len(refused), 1, "the refused token request is in the exchanges log")
        self.assertEqual(refused.http_status, 400)
        self.assertEqual(refused.result_code, '400.008.01')
        self.assertIn("refused the consumer key and secret", refused.error)
        self.assertNotIn('wrong', refused.request_body or '')

    def test_an_unreachable_daraja_is_said_once_and_logged(self):
        self.provider.mpesa_api_url = 'http://127.0.0.1:9'
        events_before = self._events(kind='token')
        message = self._test_connection_error()
        self.assertIn("could not be reached", message)
        self.assertEqual(message.count("Daraja"), 1, message)
        self.assertIn('http://127.0.0.1:9', message)
        unreachable = self._events(kind='token') - events_before
        self.assertEqual(len(unreachable), 1)
        self.assertFalse(unreachable.http_status)
        self.assertTrue(unreachable.error)

    # === THE FORM === #

    def _form_arch(self):
        arch = self.env['payment.provider'].get_views([(False, 'form')])['views']['form']['arch']
        return etree.fromstring(arch)

    def test_the_form_leads_with_the_first_set_up(self):
        arch = self._form_arch()
        order = [node.get('name') for node in arch.iter('field', 'button')]
        for name in FIRST_SET_UP + ADVANCED:
            self.assertIn(name, order)
        last_first = max(order.index(name) for name in FIRST_SET_UP)
        first_advanced = min(order.index(name) for name in ADVANCED)
        self.assertLess(last_first, first_advanced, "the first set-up comes before the advanced settings")
        credentials = arch.xpath("//page[@name='credentials']")[0]
        advanced = arch.xpath("//page[@name='mpesa_advanced']")[0]
        self.assertEqual(advanced.get('string'), "M-Pesa: advanced")
        for name in FIRST_SET_UP:
            self.assertTrue(credentials.xpath(f".//*[@name='{name}']"), f"{name} is on Credentials")
        for name in ADVANCED:
            self.assertTrue(advanced.xpath(f".//*[@name='{name}']"), f"{name} is on M-Pesa: advanced")
        self.assertFalse(arch.xpath("//page[@name='mpesa_monitoring']"), "monitoring is advanced")

    def test_the_form_shows_the_warnings_and_the_pricelist_button_first(self):
        arch = self._form_arch()
        [alert] = arch.xpath("//div[@name='mpesa_setup_warnings']")
        self.assertIn('alert', alert.get('class'))
        self.assertTrue(alert.xpath(".//field[@name='mpesa_setup_warnings']"))
        self.assertTrue(alert.xpath(".//button[@name='action_mpesa_create_kes_pricelist']"))
        self.assertFalse(alert.xpath("ancestor::notebook"), "above the tabs")

    def test_the_credentials_say_where_the_daraja_portal_has_them(self):
        fields = self.env['payment.provider']._fields
        for name in ('mpesa_consumer_key', 'mpesa_consumer_secret'):
            self.assertIn("My Apps", fields[name].help)
            self.assertIn("Lipa Na M-Pesa Online", fields[name].help)
        self.assertIn("174379", fields['mpesa_shortcode'].help)
        self.assertIn("M-Pesa Express simulator", fields['mpesa_passkey'].help)
        self.assertIn("Go Live", fields['mpesa_passkey'].help)


@tagged('post_install', '-at_install')
class TestProviderAvailability(MpesaCommon):

    def _compatible(self, partner):
        return self.env['payment.provider'].sudo()._get_compatible_providers(
            self.quotation.company_id.id, partner.id, self.quotation.amount_total,
            currency_id=self.currency_kes.id,
        )

    def test_offered_to_distributors_only(self):
        self.assertIn(self.provider, self._compatible(self.distributor))
        self.assertNotIn(self.provider, self._compatible(self.partner_a))
        contact = self.env['res.partner'].create({'name': "Clerk", 'parent_id': self.distributor.id})
        self.assertIn(self.provider, self._compatible(contact), "a contact pays as its company")
        self.provider.mpesa_distributors_only = False
        self.assertIn(self.provider, self._compatible(self.partner_a))

    def test_kes_only(self):
        self.assertEqual(self.provider.available_currency_ids.mapped('name'), ['KES'])

    def test_one_token_shared_by_every_request(self):
        before = self.simulator.tokens_issued
        for _i in range(3):
            self.provider._mpesa_client().access_token()
        self.assertLessEqual(self.simulator.tokens_issued - before, 1)
        tokens = self.env['muchiri.mpesa.token'].sudo().search([])
        self.assertEqual(len(tokens), 1)
        with self.assertRaises(AccessError):
            tokens.with_user(self.internal_user).read(['value'])

    def test_test_connection_explains_bad_credentials(self):
        self.provider.mpesa_consumer_secret = 'wrong'
        with self.assertRaises(UserError) as caught:
            self.provider.action_mpesa_test_connection()
        self.assertIn('refused', str(caught.exception))
        self.provider.mpesa_consumer_secret = 'test-consumer-secret'
        self.assertEqual(self.provider.action_mpesa_test_connection()['params']['type'], 'success')
        self.provider.mpesa_api_url = 'http://127.0.0.1:9'
        with self.assertRaises(UserError) as caught:
            self.provider.action_mpesa_test_connection()
        self.assertIn('could not be reached', str(caught.exception))

    def test_production_needs_public_https_callbacks(self):
        with self.assertRaises(ValidationError):
            self.provider.write({'state': 'enabled', 'mpesa_callback_base_url': 'http://shop.example.com'})
        with self.assertRaises(ValidationError):
            self.provider.write({'state': 'enabled', 'mpesa_callback_base_url': 'https://abc.ngrok-free.app'})
        with self.assertRaises(ValidationError, msg="production never talks to a simulator"):
            self.provider.write({'state': 'enabled', 'mpesa_callback_base_url': 'https://shop.example.com'})
        self.provider.write({
            'state': 'enabled', 'mpesa_callback_base_url': 'https://shop.example.com', 'mpesa_api_url': False,
        })
        self.assertEqual(self.provider._mpesa_api_base_url(), 'https://api.safaricom.co.ke')

    def test_till_needs_a_till_number(self):
        with self.assertRaises(ValidationError):
            self.provider.write({'mpesa_shortcode_type': 'till', 'mpesa_till_number': False})


@tagged('post_install', '-at_install')
class TestProviderScoping(MpesaCommon):

    def test_callback_on_another_providers_path_settles_nothing(self):
        tx = self._pending_tx()
        self._answered(tx)
        other = self._second_provider(mpesa_confirm_by_query=False)
        self.assertNotEqual(other.mpesa_callback_secret, self.provider.mpesa_callback_secret)

        response = self._post_callback(self._body(tx), secret=other.mpesa_callback_secret)
        self.assertEqual(response.status_code, 200, "acknowledged: a CheckoutRequestID can come before its answer")
        event = self._events(kind='stk_callback', checkout_request_id=tx.provider_reference)
        self.assertEqual(event.provider_id, other, "filed under the provider whose path it came on")
        self.assertEqual(event.state, 'unmatched')
        self.assertFalse(event.transaction_id)
        self.assertEqual(tx.state, 'pending', "another provider's transaction is never touched")
        self.assertFalse(tx.mpesa_receipt_number)
        self.assertFalse(tx.mpesa_callback_at)

    def test_disabled_provider_still_settles_its_own_prompts(self):
        tx = self._pending_tx()
        self._answered(tx)
        self.assertEqual(tx.mpesa_api_url, self.simulator.base_url)
        # Switched off, and no longer pointed anywhere: its prompt's query still goes where the push went.
        self.provider.write({'state': 'disabled', 'mpesa_api_url': False})
        response = self._post_callback(self._body(tx))
        self.assertEqual(response.status_code, 200)
        self.assertEqual(tx.state, 'done')
        self.assertEqual(tx.mpesa_receipt_number, 'SIM1234567')
        self.assertEqual(self._queries(), 1, "confirmed by Daraja: a disabled provider is no test provider")

    @mute_logger('odoo.sql_db')
    def test_checkout_request_id_is_unique_per_provider(self):
        tx = self._pending_tx()
        twin_values = {'reference': 'TWIN-1', 'mpesa_push_sent_at': fields.Datetime.now(),
                       'provider_reference': tx.provider_reference}
        with self.assertRaises(psycopg2.IntegrityError), self.cr.savepoint():
            tx.copy(twin_values)
            self.env.flush_all()
        other = self._second_provider()
        twin = tx.copy({**twin_values, 'provider_id': other.id})
        self.env.flush_all()  # Another provider may know the same CheckoutRequestID.
        self.assertEqual(twin.provider_reference, tx.provider_reference)

    def test_two_companies_never_share_a_shortcode(self):
        """A receipt is one payment, whatever the company: a second company's provider on the same
        shortcode would be listed the same money by Pull, could never book it, and its Pull window
        would never move.  The set-up is refused; another shortcode, or another M-Pesa, is fine."""
        mombasa = self.env['res.company'].create({'name': "Mombasa Wholesale", 'currency_id': self.currency_kes.id})
        values = {
            'name': "M-Pesa Mombasa", 'code': 'mpesa', 'company_id': mombasa.id,
            'mpesa_consumer_key': SIM_KEY, 'mpesa_consumer_secret': SIM_SECRET,
            'mpesa_shortcode': SIM_SHORTCODE, 'mpesa_passkey': SIM_PASSKEY,
            'mpesa_api_url': self.simulator.base_url, 'mpesa_callback_base_url': self.base_url(),
        }
        with self.assertRaises(ValidationError) as refused:  # Odoo's assertRaises: in a savepoint
            self.env['payment.provider'].create({**values, 'state': 'test'})
        self.assertIn(f"Shortcode {SIM_SHORTCODE} is already used by {self.provider.name}", str(refused.exception))
        mombasa_provider = self.env['payment.provider'].create(values)  # Disabled: it takes no money.
        with self.assertRaises(ValidationError) as refused:
            mombasa_provider.state = 'test'
        self.assertIn(self.provider.company_id.name, str(refused.exception))
        mombasa_provider.write({'mpesa_shortcode': '600984', 'state': 'test'})
        self.assertEqual(mombasa_provider.state, 'test', "two companies, two shortcodes")
        with self.assertRaises(ValidationError):
            mombasa_provider.mpesa_shortcode = SIM_SHORTCODE
        with self.assertRaises(ValidationError):
            mombasa_provider.mpesa_till_number = SIM_SHORTCODE  # a till is a shortcode of its own too
        mombasa_provider.write({'mpesa_shortcode': SIM_SHORTCODE, 'mpesa_api_url': False})
        self.assertEqual(mombasa_provider.state, 'test', "Safaricom's sandbox is another M-Pesa than this simulator")
        self.assertTrue(self._second_provider(state='test'), "one company may run two providers on its shortcode")


@tagged('post_install', '-at_install')
class TestInitiatorSetup(MpesaInitiatorCommon):

    def test_the_certificate_is_checked_when_saved(self):
        with self.assertRaisesRegex(ValidationError, 'not a usable Safaricom certificate'), self.env.cr.savepoint():
            self.provider.mpesa_initiator_certificate = '-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----'
            self.provider.flush_recordset()
        self.provider.invalidate_recordset()
        self.assertIn('Daraja Simulator', self.provider.mpesa_initiator_certificate_info)
        self.assertEqual(self.provider.support_refund, 'full_only')

    def test_test_connection_says_whether_refunds_work(self):
        message = self.provider.action_mpesa_test_connection()['params']['message']
        self.assertIn('initiator testapi is set up', message)
        self.assertIn("Not checked: the initiator's name and password", message,
                      "Daraja checks them only at the first refund: say so")
        self.provider.mpesa_initiator_password = False
        message = self.provider.action_mpesa_test_connection()['params']['message']
        self.assertIn('Refunds and receipt checks are off', message)
        self.assertIn('initiator password', message)

    def test_the_credential_is_made_with_the_certificate(self):
        credential = self.provider._mpesa_security_credential()
        self.assertNotIn(self.simulator.initiator_password, credential)
        self.assertNotEqual(credential, self.provider._mpesa_security_credential(), "PKCS#1 v1.5 is randomised")


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
class TestLiveHosts(MpesaInitiatorCommon):
    """An enabled provider talks to Safaricom's production API only.

    Payments are taken in test mode at the simulator; the host they remember is then a plain HTTP
    listener on loopback, standing for the old host (a simulator or a developer's machine) that must
    never see the production consumer key and secret, a production SecurityCredential or a ResultURL
    with the callback secret.  The provider goes live; the refund button, the initiator job, saving
    the initiator and the reconciliation cron run; the listener must receive nothing at all.
    """

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
