# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""Paybill payments made from the phone's menu, end to end: the simulator registers this Odoo's URLs,
plays the phone, validates with this Odoo and posts the confirmation to its real HTTP server."""
from odoo.exceptions import AccessError, UserError
from odoo.tests import tagged

from odoo.addons.muchiri_mpesa.daraja.simulator import C2B_CONFIRMATION
from odoo.addons.muchiri_mpesa.daraja.simulator.c2b import DUPLICATE_CONFIRMATION

from .common import PHONE_SUCCESS
from .ledger_common import MpesaLedgerCommon


@tagged('post_install', '-at_install')
class TestC2B(MpesaLedgerCommon):

    def _sim_setting(self, **values):
        for name, value in values.items():
            previous = getattr(self.simulator, name)
            setattr(self.simulator, name, value)
            self.addCleanup(setattr, self.simulator, name, previous)

    def _register(self):
        return self.provider.action_mpesa_c2b_register()

    def _pay(self, amount, bill_ref, phone=PHONE_SUCCESS, confirmations=1):
        """A phone pays the paybill; the simulator's confirmations reach Odoo and are handled."""
        self.env.flush_all()  # Odoo's requests read the database on cursors of their own.
        trans_id = self.simulator.c2b_pay(amount, phone, bill_ref)
        decided = self.simulator.wait_for_c2b(trans_id, timeout=10)
        if decided['state'] == 'completed' and confirmations:
            self.simulator.wait_for_deliveries(C2B_CONFIRMATION, count=confirmations, reference=trans_id, timeout=10)
        self._settle_callbacks()  # Odoo's post-processing, which the confirmation wakes.
        return trans_id, decided

    # === REGISTRATION === #

    def test_register_c2b_urls(self):
        action = self._register()
        self.assertEqual(action['params']['type'], 'success')
        registered = self.simulator.c2b_registrations[self.provider.mpesa_shortcode]
        self.assertEqual(registered['version'], 'v2')
        self.assertEqual(registered['ConfirmationURL'], self.provider._mpesa_daraja_url('c2b_confirmation'))
        self.assertEqual(registered['ValidationURL'], self.provider._mpesa_daraja_url('c2b_validation'))
        self.assertEqual(registered['ResponseType'], 'Completed')
        self.assertTrue(self.provider.mpesa_c2b_registered_at)

    def test_register_falls_back_to_v1(self):
        self._sim_setting(c2b_versions=('v1',))
        self._register()
        self.assertEqual(self.simulator.c2b_registrations[self.provider.mpesa_shortcode]['version'], 'v1')

    def test_urls_already_registered_says_what_to_do(self):
        self._sim_setting(c2b_register_once=True)
        self._register()
        action = self._register()
        self.assertEqual(action['params']['type'], 'warning')
        self.assertIn('one-time', action['params']['message'])

    def test_only_administrators_register(self):
        with self.assertRaises(AccessError):
            self.provider.with_user(self.accountant).action_mpesa_c2b_register()
        self.assertFalse(self.simulator.c2b_registrations)

    def test_daraja_refuses_a_banned_word_in_the_url(self):
        self.provider.mpesa_callback_base_url = 'https://mpesa.example.com'
        with self.assertRaises(UserError):
            self._register()

    # === PAYMENTS (the "done when") === #

    def test_a_paybill_payment_with_an_invoice_number_lands_reconciled(self):
        self._register()
        invoice = self._invoice(4500)
        trans_id, _decided = self._pay(4500, invoice.name.lower().replace('/', ' '), phone=self._own_number())
        row = self._row(trans_id)
        self.assertEqual((row.state, row.sources), ('matched', 'C2B'), row.note)
        self.assertIn(invoice.payment_state, ('paid', 'in_payment'))
        self.assertEqual(row.payment_ids.journal_id, self.provider.journal_id)
        self.assertTrue(row.payment_ids.memo.startswith(trans_id))
        self.assertEqual(row.partner_id, self.distributor, "by the SHA-256 of the payer's number")

    def test_an_unmatched_payment_waits_in_the_queue(self):
        self._register()
        trans_id, _decided = self._pay(300, 'my shop')
        row = self._row(trans_id)
        self.assertEqual(row.state, 'unmatched')
        self.assertFalse(row.payment_ids)

    def test_a_confirmation_sent_twice_is_one_payment(self):
        self._register()
        invoice = self._invoice(4500)
        trans_id, _decided = self._pay(4500, invoice.name, phone=DUPLICATE_CONFIRMATION, confirmations=2)
        row = self._row(trans_id)
        self.assertEqual(len(row), 1)
        self.assertEqual(len(row.transaction_ids), 1)
        self.assertEqual(invoice.amount_residual, 0)

    # === VALIDATION === #

    def test_validation_refuses_an_unknown_account(self):
        self._sim_setting(c2b_external_validation=True)
        self.provider.mpesa_c2b_validation_rule = 'open_document'
        self._register()
        trans_id, decided = self._pay(500, 'NOT-AN-INVOICE')
        self.assertEqual((decided['state'], decided['validation']), ('cancelled', 'C2B00012'))
        self.assertFalse(self._row(trans_id), "no money, no row")
        validation = self._events(kind='c2b_validation')
        self.assertEqual(validation.state, 'rejected')
        self.assertLess(validation.duration_ms, 2000, "well inside Daraja's 8 s")

    def test_validation_accepts_an_open_invoice(self):
        self._sim_setting(c2b_external_validation=True)
        self.provider.mpesa_c2b_validation_rule = 'open_document'
        self._register()
        invoice = self._invoice(800)
        trans_id, decided = self._pay(800, invoice.name)
        self.assertEqual((decided['state'], decided['validation']), ('completed', '0'))
        self.assertEqual(self._row(trans_id).state, 'matched')

    def test_validation_of_any_account(self):
        self._sim_setting(c2b_external_validation=True)
        self._register()
        trans_id, decided = self._pay(800, 'anything')
        self.assertEqual(decided['state'], 'completed')
        self.assertEqual(self._row(trans_id).state, 'unmatched')
