# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from lxml import etree
from markupsafe import Markup

from odoo.exceptions import AccessError, UserError
from odoo.fields import Command
from odoo.tests import tagged

from .common import MpesaCommon

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
