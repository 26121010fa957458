# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from odoo.exceptions import AccessError, UserError, ValidationError
from odoo.tests import tagged
from odoo.tools import mute_logger

from .common import PHONE_SUCCESS, MpesaCommon

SECRET_FIELDS = ('mpesa_consumer_key', 'mpesa_consumer_secret', 'mpesa_passkey',
                 'mpesa_callback_secret')


@tagged('post_install', '-at_install')
class TestProviderAndSecurity(MpesaCommon):

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

    @mute_logger('odoo.http')
    def test_non_distributor_cannot_push_through_the_routes(self):
        self.distributor.is_distributor = False
        values = self._start_portal_payment()
        self.assertIn('distributors only', self._stk_push_refusal(values, PHONE_SUCCESS))
        self.assertEqual(len(self.simulator.pushes), 0)

    def test_secrets_unreadable_without_admin_rights(self):
        for user in (self.internal_user, self.distributor_user):
            provider = self.provider.with_user(user)
            for field in SECRET_FIELDS:
                with self.assertRaises(AccessError, msg=f"{user.login} read {field}"):
                    provider.read([field])

    def test_portal_page_does_not_leak_secrets(self):
        self.authenticate('distributor', 'distributor')
        response = self.url_open(self.quotation.get_portal_url())
        self.assertEqual(response.status_code, 200)
        self.assertIn('o_mpesa_phone', response.text, "the M-Pesa inline form is offered")
        for field in SECRET_FIELDS:
            value = self.provider.sudo()[field]
            if value:
                self.assertNotIn(value, response.text, field)

    def test_audit_log_is_for_accountants_not_portal_users(self):
        self._pay_from_portal(PHONE_SUCCESS)
        events = self.env['muchiri.mpesa.event'].search([])
        self.assertTrue(events)
        with self.assertRaises(AccessError):
            events.with_user(self.distributor_user).read(['request_body'])
        for event in events:
            for field in ('mpesa_consumer_secret', 'mpesa_passkey'):
                secret = self.provider.sudo()[field]
                self.assertNotIn(secret, event.request_body or '')
                self.assertNotIn(secret, event.response_body or '')

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
