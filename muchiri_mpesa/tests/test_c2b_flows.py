# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""Paybill (C2B) payments: URL registration, validation, confirmation, and what is still due.
"""
from odoo.exceptions import AccessError, UserError
from odoo.tests import tagged

from odoo.addons.muchiri_mpesa.daraja.simulator import C2B_CONFIRMATION
from odoo.addons.muchiri_mpesa.daraja.simulator.c2b import DUPLICATE_CONFIRMATION

from .common import PHONE_SUCCESS, MpesaLedgerCommon, MpesaPaybillCommon


@tagged('post_install', '-at_install')
class TestC2B(MpesaLedgerCommon):
    """Paybill payments made from the phone's menu, end to end: the simulator registers this Odoo's URLs,
    plays the phone, validates with this Odoo and posts the confirmation to its real HTTP server.
    """

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

    def test_a_simulator_that_forgot_the_urls_is_seen(self):
        self.assertFalse(self.provider._mpesa_simulator_forgot_c2b(), "nothing registered, nothing to forget")
        self._register()
        self.assertFalse(self.provider._mpesa_simulator_forgot_c2b())
        self.assertTrue(self.provider.mpesa_c2b_registered_at)
        # A restart without its state file: the simulator's registrations are gone.
        shortcode = self.provider.mpesa_shortcode
        forgotten = self.simulator.c2b_registrations[shortcode]
        with self.simulator._state.lock:
            del self.simulator._state.c2b_urls[shortcode]
        self.addCleanup(self.simulator._state.c2b_urls.__setitem__, shortcode, forgotten)
        self.assertTrue(self.provider._mpesa_simulator_forgot_c2b())
        self.assertFalse(self.provider.mpesa_c2b_registered_at)
        self.assertIn("register them again", self.provider.mpesa_c2b_registration)

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


@tagged('post_install', '-at_install')
class TestPaybillConfirmation(MpesaPaybillCommon):
    """Paybill money pays a document only once Daraja confirmed it: Transaction Status or a Pull row,
    else the source check when it refuses unknown addresses, else an accountant with the statement.

    A forged confirmation posted on the provider's real secret path, as anyone who learned the path
    could post it, is the attack: it must never confirm an order, pay an invoice or move its ledger row
    past 'awaiting'.  The simulator plays Daraja over real HTTP; it knows only the payments made on it.
    """

    # === NO WAY TO ASK DARAJA, SOURCE CHECK AT 'LOG': AN ACCOUNTANT CONFIRMS === #

    def test_a_forged_confirmation_on_the_secret_path_pays_nothing(self):
        """The reproduced attack: an invented receipt for the amount of a sent quotation."""
        order = self.quotation
        order.action_quotation_sent()
        row = self._confirm(order.amount_total, order.name, receipt='FORGED00A1')
        self.assertPaysNothing(row, order=order)
        self.assertIn('accountant', row.note)
        self.assertTrue(row.activity_ids, "the accountants are asked to confirm it")
        self.assertIn('wait for an accountant', self.provider.mpesa_c2b_confirmation)
        self.assertTrue(self.provider.mpesa_c2b_confirmation_weak)
        # The hourly job asks again how to confirm it, and still pays nothing.
        with self.registry.test_lock:
            self.env['muchiri.mpesa.ledger']._cron_mpesa_rematch()
        self.assertPaysNothing(row, order=order)

    def test_an_accounting_manager_confirms_against_the_statement(self):
        invoice = self._invoice(4500)
        row = self._confirm(4500, invoice.name)
        self.assertPaysNothing(row, invoice=invoice)
        with self.assertRaises(AccessError):
            row.with_user(self.accountant).action_mpesa_confirm_by_hand()
        with self.assertRaises(UserError):  # Nor does the queue's match place unconfirmed money.
            row.with_user(self.accountant)._mpesa_match_by_hand([invoice])
        self.assertPaysNothing(row, invoice=invoice)

        row.with_user(self.manager).action_mpesa_confirm_by_hand()
        self._settle_callbacks()
        self.assertEqual((row.state, row.confirmation), ('matched', 'hand'), row.note)
        self.assertIn(invoice.payment_state, ('paid', 'in_payment'))
        self.assertTrue(row.message_ids.filtered(lambda m: self.manager.name in (m.body or '')),
                        "the chatter says who confirmed it")
        self.assertFalse(row.activity_ids, "the request to confirm it is done")
        with self.assertRaises(UserError):
            row.with_user(self.manager).action_mpesa_confirm_by_hand()

    def test_a_forged_confirmation_can_still_be_marked_not_ours(self):
        row = self._confirm(4500, 'X1', receipt='FORGED00A2')
        row.with_user(self.accountant)._mpesa_mark_not_ours("Not on the statement.")
        self.assertEqual(row.state, 'not_ours')

    # === THE SOURCE CHECK REFUSES UNKNOWN ADDRESSES: BOOKED ON IT, SAID TO BE WEAKER === #

    def test_the_enforced_source_check_books_money_and_says_it_is_the_weaker_lock(self):
        self.provider.write({'mpesa_ip_check': 'enforce', 'mpesa_allowed_ips': '127.0.0.1'})
        invoice = self._invoice(4500)
        row = self._confirm(4500, invoice.name)
        self.assertEqual((row.state, row.confirmation), ('matched', 'source'), row.note)
        self.assertIn(invoice.payment_state, ('paid', 'in_payment'))
        self.assertEqual(row.transaction_ids.mpesa_receipt_status, 'unverified', "no word from Daraja")
        self.assertIn('weaker lock', self.provider.mpesa_c2b_confirmation)
        # From any other address, the same body changes nothing.
        self.provider.mpesa_allowed_ips = '196.201.214.200'
        other = self._invoice(4500)
        body = self._c2b_body(4500, other.name)
        self._post_c2b(body)
        self.assertFalse(self._row(body['TransID']))
        self.assertEqual(other.payment_state, 'not_paid')

    # === TRANSACTION STATUS CONFIRMS AT ONCE === #

    def test_transaction_status_confirms_a_real_payment_within_the_jobs(self):
        self._with_initiator()
        self.assertIn('Transaction Status', self.provider.mpesa_c2b_confirmation)
        order = self.quotation
        trans_id = self._pay(order.amount_total, order.name)
        row = self._row(trans_id)
        self.assertPaysNothing(row, order=order)
        self.assertTrue(row.status_next_at, "asked at once, by the job the confirmation woke")
        self._confirm_by_status()
        [status] = self._status_requests()
        self.assertEqual(status['TransactionID'], trans_id)
        row.invalidate_recordset()
        self.assertEqual((row.state, row.confirmation), ('matched', 'status'), row.note)
        self.assertEqual(order.state, 'sale', "post-processing confirmed the order")
        # Confirmed money is verified money: it can be refunded by Reversal.
        tx = row.transaction_ids
        self.assertEqual(tx.mpesa_receipt_status, 'confirmed')
        self.assertFalse(tx.mpesa_status_next_at, "no second question")
        tx._mpesa_check_refundable(None)

    def test_transaction_status_refuses_an_invented_receipt(self):
        self._with_initiator()
        order = self.quotation
        row = self._confirm(order.amount_total, order.name, receipt='FORGED00B1')
        self._confirm_by_status()
        row.invalidate_recordset()
        self.assertPaysNothing(row, order=order)
        self.assertTrue(row.conflict)
        self.assertIn('does not know', row.confirmation_note)
        alert = self.env['muchiri.mpesa.alert'].search([('kind', '=', 'receipt_conflict'), ('state', '=', 'open')])
        self.assertTrue(alert, "raised at once")
        with self.assertRaises(UserError):
            row.with_user(self.manager).action_mpesa_confirm_by_hand()
        self.assertPaysNothing(row, order=order)

    def test_transaction_status_refuses_a_real_receipt_with_another_amount(self):
        self._with_initiator()
        invoice = self._invoice(45000)
        trans_id = self._lost_payment(100, 'X1')
        row = self._confirm(45000, invoice.name, receipt=trans_id)
        self._confirm_by_status()
        self.assertPaysNothing(row, invoice=invoice)
        self.assertTrue(row.conflict)
        self.assertIn('amount', row.confirmation_note)

    def test_a_real_receipt_claimed_for_another_shortcode_pays_nothing(self):
        self._with_initiator()
        invoice = self._invoice(4500)
        trans_id = self._lost_payment(4500, invoice.name)
        row = self._confirm(4500, invoice.name, receipt=trans_id, shortcode='600999')
        self._confirm_by_status()
        row.invalidate_recordset()
        # Daraja confirms the money reached our shortcode; the claim of another shortcode keeps it
        # out of the matching all the same.
        self.assertEqual(row.state, 'unmatched', row.note)
        self.assertIn('600999', row.note)
        self.assertFalse(row.transaction_ids)
        self.assertEqual(invoice.payment_state, 'not_paid')

    def test_a_receipt_a_prompt_holds_pays_nothing_again(self):
        tx, _result = self._pay_from_portal(PHONE_SUCCESS)
        self._wait_final(tx)
        self.assertEqual(tx.state, 'done')
        invoice = self._invoice(4500)
        row = self._confirm(4500, invoice.name, receipt=tx.mpesa_receipt_number)
        self.assertEqual(row.transaction_ids, tx, "linked to the prompt that holds the receipt")
        self.assertEqual(invoice.payment_state, 'not_paid')

    # === PULL TRANSACTIONS CONFIRMS === #

    def test_pull_confirms_a_real_payment_and_never_an_invented_one(self):
        self.provider.mpesa_pull_nominated_number = '0708374149'
        self.provider.action_mpesa_pull_register()
        self.assertIn('Pull', self.provider.mpesa_c2b_confirmation)
        invoice = self._invoice(4500)
        trans_id = self._pay(4500, invoice.name)
        forged_invoice = self._invoice(4500)
        forged = self._confirm(4500, forged_invoice.name, receipt='FORGED00C1')
        row = self._row(trans_id)
        self.assertPaysNothing(row, invoice=invoice)
        self.assertIn('Pull', row.note)
        for payment in self.simulator.payments:
            self.simulator.age_transaction(payment.receipt, 0.01)
        with self.registry.test_lock:
            self.env['payment.provider']._cron_mpesa_pull_transactions()
            self.env.invalidate_all()
        self._settle_callbacks()
        self.assertEqual((row.state, row.confirmation), ('matched', 'pull'), row.note)
        self.assertIn(invoice.payment_state, ('paid', 'in_payment'))
        self.assertEqual(row.transaction_ids.mpesa_receipt_status, 'confirmed')
        self.assertPaysNothing(forged, invoice=forged_invoice)

    def test_a_pull_row_verifies_a_receipt_booked_on_the_source_check(self):
        self.provider.write({'mpesa_ip_check': 'enforce', 'mpesa_allowed_ips': '127.0.0.1'})
        invoice = self._invoice(4500)
        trans_id = self._pay(4500, invoice.name)
        tx = self._row(trans_id).transaction_ids
        self.assertEqual(tx.mpesa_receipt_status, 'unverified')
        self.provider.mpesa_pull_nominated_number = '0708374149'
        self.provider.action_mpesa_pull_register()
        self.simulator.age_transaction(trans_id, 0.01)
        with self.registry.test_lock:
            self.env['payment.provider']._cron_mpesa_pull_transactions()
            self.env.invalidate_all()
        self.assertEqual(tx.mpesa_receipt_status, 'confirmed', "Daraja's own list proves it")


@tagged('post_install', '-at_install')
class TestStillDue(MpesaLedgerCommon):
    """One answer to "how much of this order or invoice is still due", whatever paid it."""

    def _invoiced_order(self):
        order = self.quotation.copy()
        order.action_confirm()
        invoice = order._create_invoices()
        invoice.action_post()
        return order, invoice

    def test_a_second_payment_of_an_order_whose_invoice_is_paid_is_flagged(self):
        order, invoice = self._invoiced_order()
        first = self._confirm(invoice.amount_total, invoice.name)
        self.assertEqual(first.state, 'matched', first.note)
        self.assertIn(invoice.payment_state, ('paid', 'in_payment'))
        self.assertEqual(order._mpesa_amount_due(), 0.0)
        second = self._confirm(order.amount_total, order.name)
        self.assertEqual(second.state, 'over', second.note)
        self.assertEqual(second.refund_amount, order.amount_total)
        self.assertTrue(order.mpesa_needs_refund)
        self.assertTrue(order.activity_ids, "the accountants are asked to refund it")

    def test_an_order_paid_by_bank_transfer_is_not_paid_again_by_mpesa(self):
        order, invoice = self._invoiced_order()
        bank = self.env['account.journal'].search([
            ('type', '=', 'bank'), ('company_id', '=', self.env.company.id), ('id', '!=', self.provider.journal_id.id),
        ], limit=1)
        self.env['account.payment.register'].with_context(
            active_model='account.move', active_ids=invoice.ids,
        ).create({'journal_id': bank.id}).action_create_payments()
        self.assertIn(invoice.payment_state, ('paid', 'in_payment'))
        self.assertEqual(order._mpesa_amount_due(), 0.0)
        row = self._confirm(order.amount_total, order.name)
        self.assertEqual(row.state, 'over', row.note)
        self.assertTrue(order.mpesa_needs_refund)
        # Nor does the back office propose a prompt for it.
        self.assertFalse(order.mpesa_can_request_payment)
        with self.assertRaises(UserError):
            order.action_mpesa_request_payment()

    def test_a_partly_paid_invoice_leaves_only_its_rest_due_on_the_order(self):
        order, invoice = self._invoiced_order()
        self._confirm(1000, invoice.name)
        self.assertEqual(order._mpesa_amount_due(), order.amount_total - 1000)
        self.assertEqual(invoice._mpesa_amount_due(), invoice.amount_total - 1000)
