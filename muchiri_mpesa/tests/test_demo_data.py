# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
import os
from unittest.mock import patch

from odoo.tests import TransactionCase, tagged
from odoo.tools import convert_file

from odoo.addons.muchiri_mpesa.daraja.simulator import DarajaSimulator
from odoo.addons.muchiri_mpesa.demo.mpesa_demo import DEMO_QUOTATIONS, demo_vat

DEMO_FILE = 'demo/mpesa_demo.xml'


@tagged('post_install', '-at_install')
class TestDemoData(TransactionCase):
    """The demo data: nothing of it on a database without demo data, and a working shop on the
    simulator when it is loaded (installed with the addon, or loaded again here, inside the test)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.provider = cls.env.ref('muchiri_mpesa.payment_provider_mpesa')
        cls.ICP = cls.env['ir.config_parameter'].sudo()

    def _load_demo(self, **environ):
        env_vars = {'MPESA_DEMO_API_URL': '', 'MPESA_DEMO_CALLBACK_URL': '', **environ}
        with patch.dict(os.environ, env_vars):
            convert_file(self.env, 'muchiri_mpesa', DEMO_FILE, {}, mode='init', noupdate=True, kind='demo')
        self.env.invalidate_all()

    def test_demo_records_only_with_demo_data(self):
        """Nothing of the demo on a database without demo data; on one with demo data (where
        Odoo's runbot installs addons), the demo's shop, in test mode on the simulator."""
        module = self.env['ir.module.module'].search([('name', '=', 'muchiri_mpesa')])
        demo_records = self.env['ir.model.data'].search_count([
            ('module', '=', 'muchiri_mpesa'), ('name', '=like', 'demo\\_%'),
        ])
        users = self.env['res.users'].search([('login', 'in', ('wanjiku', 'accountant'))])
        if not module.demo:
            self.assertFalse(demo_records, "no demo record exists")
            self.assertFalse(users)
            self.assertEqual(self.provider.state, 'disabled')
            self.assertFalse(self.provider.mpesa_api_url, "no provider talks to a simulator")
            self.assertFalse(self.provider.mpesa_consumer_key)
            return
        self.assertTrue(demo_records)
        self.assertEqual(sorted(users.mapped('login')), ['accountant', 'wanjiku'])
        self.assertEqual(self.provider.state, 'test', "demo data never enables the provider")
        self.assertTrue(self.provider.mpesa_api_url, "the simulator")
        self.assertNotIn('safaricom', self.provider.mpesa_api_url)
        self.assertEqual(self.provider.mpesa_consumer_key, 'sim-consumer-key')
        contact = self.env.ref('muchiri_mpesa.demo_distributor_contact')
        for name, _lines in DEMO_QUOTATIONS:
            self.assertEqual(self.env.ref(f'muchiri_mpesa.{name}').partner_id, contact, name)

    def test_demo_points_at_the_configured_simulator(self):
        self.ICP.set_param('muchiri_mpesa.demo_api_url', 'http://sim.internal:9000/')
        self._load_demo(MPESA_DEMO_CALLBACK_URL='http://odoo:8069')
        provider = self.provider
        self.assertEqual(provider.state, 'test')
        self.assertTrue(provider.is_published)
        self.assertEqual(provider.mpesa_api_url, 'http://sim.internal:9000', "the system parameter")
        self.assertEqual(provider._mpesa_callback_base_url(), 'http://odoo:8069', "the environment")
        self.assertEqual(provider.mpesa_consumer_key, 'sim-consumer-key')
        self.assertEqual(provider.mpesa_shortcode, '174379')
        self.assertTrue(self.env.ref('payment.payment_method_mpesa').active)
        self.assertFalse(provider.mpesa_setup_warnings, "nothing keeps M-Pesa from being offered")

        contact = self.env.ref('muchiri_mpesa.demo_distributor_contact')
        user = self.env['res.users'].search([('login', '=', 'wanjiku')])
        self.assertEqual(user.partner_id, contact)
        self.assertTrue(user._is_portal())
        self.assertTrue(contact._mpesa_is_distributor())
        self.assertEqual(contact.country_id, self.env.ref('base.ke'))
        self.assertEqual(self.env.ref('muchiri_mpesa.demo_distributor_contact_cancels').mobile, '0700 000 001')
        accountant = self.env['res.users'].search([('login', '=', 'accountant')])
        self.assertIn(accountant, provider.mpesa_alert_group_id.users)
        self.assertTrue(provider.mpesa_invoice_on_payment, "a paid demo order is invoiced")

        orders = self.env['sale.order'].search([('partner_id', '=', contact.id)])
        self.assertEqual(len(orders), len(DEMO_QUOTATIONS))
        self.assertEqual(set(orders.mapped('state')), {'sent'})
        self.assertEqual(orders.currency_id, self.env.ref('base.KES'))
        self.assertIn(contact, orders.message_partner_ids, "listed in the distributor's portal")
        self.assertEqual(orders.with_user(accountant).search_count([('id', 'in', orders.ids)]), len(orders),
                         "the accountant opens the distributors' orders")
        for order in orders:
            self.assertFalse(provider._mpesa_unavailability_reason(order.partner_id, order.currency_id))
            self.assertIn(provider, self.env['payment.provider']._get_compatible_providers(
                order.company_id.id, order.partner_id.id, order.amount_total, currency_id=order.currency_id.id,
            ))

    def test_defaults_and_reload(self):
        """Without settings the simulator's default address and the web base URL; loading the demo
        data again (a container's restart: -i) re-points the provider and resets no quotation."""
        self._load_demo()
        self.assertEqual(self.provider.mpesa_api_url, 'http://127.0.0.1:8089')
        self.assertFalse(self.provider.mpesa_callback_base_url)
        self.assertEqual(self.provider._mpesa_callback_base_url(), self.provider.get_base_url().rstrip('/'))
        order = self.env.ref('muchiri_mpesa.demo_quotation_maize')
        order.action_confirm()

        self._load_demo(MPESA_DEMO_API_URL='http://daraja:8089')
        self.assertEqual(self.provider.mpesa_api_url, 'http://daraja:8089')
        self.assertEqual(order.state, 'sale', "a paid quotation stays paid")
        self.assertEqual(self.env['sale.order'].search_count([
            ('partner_id', '=', self.env.ref('muchiri_mpesa.demo_distributor_contact').id),
        ]), len(DEMO_QUOTATIONS))

    def test_the_simulators_initiator_when_it_answers(self):
        """The simulator answering at the demo's address: its initiator and certificate are set, so
        the distributor's till is offered and refunds work; not answering: no initiator, no till."""
        simulator = DarajaSimulator(host='127.0.0.1', port=0)
        simulator.start()
        self.addCleanup(simulator.stop)
        url = simulator.base_url
        self.provider.write({'mpesa_initiator_name': False, 'mpesa_initiator_certificate': False})

        self._load_demo(MPESA_DEMO_API_URL=url)
        contact = self.env.ref('muchiri_mpesa.demo_distributor_contact')
        self.assertEqual(self.provider.mpesa_initiator_name, simulator.initiator_name)
        self.assertEqual(self.provider.mpesa_initiator_certificate, simulator.certificate_pem)
        self.assertEqual(contact._mpesa_payment_till(), '600100', "the company's till, one of the simulator's")
        self.assertTrue(self.provider._mpesa_takes_till_payments())

        simulator.stop()
        self.provider.write({'mpesa_initiator_name': False, 'mpesa_initiator_certificate': False})
        self._load_demo(MPESA_DEMO_API_URL=url)
        self.assertFalse(self.provider.mpesa_initiator_name, "nothing answered: no initiator")
        self.assertFalse(self.provider._mpesa_takes_till_payments())

    def test_a_kenyan_company_quotes_with_its_vat(self):
        """The demo's quotations carry Kenya's VAT where the company keeps Kenyan books (scripts/demo
        makes it so), and no tax elsewhere, so that their amounts stay the same on any demo database."""
        company = self.env.company
        company.account_fiscal_country_id = self.env.ref('base.us')
        self.assertFalse(demo_vat(self.env))
        kenya = self.env.ref('base.ke')
        company.account_fiscal_country_id = kenya
        group = self.env['account.tax.group'].create({'name': "VAT", 'country_id': kenya.id, 'company_id': company.id})
        vat = self.env['account.tax'].create({
            'name': "VAT 16%", 'amount': 16.0, 'type_tax_use': 'sale', 'company_id': company.id,
            'country_id': kenya.id, 'tax_group_id': group.id,
        })
        company.account_sale_tax_id = vat
        self.assertEqual(demo_vat(self.env), vat)

    def test_never_touches_an_enabled_provider(self):
        self.provider.write({
            'state': 'enabled', 'mpesa_consumer_key': 'live-key', 'mpesa_consumer_secret': 'live-secret',
            'mpesa_shortcode': '888880', 'mpesa_passkey': 'live-passkey',
            'mpesa_callback_base_url': 'https://shop.example.com',
            'mpesa_api_url': False,  # Safaricom's production API (installed demo data set the simulator's).
        })
        self._load_demo(MPESA_DEMO_API_URL='http://daraja:8089')
        self.assertEqual(self.provider.state, 'enabled')
        self.assertFalse(self.provider.mpesa_api_url)
        self.assertEqual(self.provider.mpesa_consumer_key, 'live-key')
