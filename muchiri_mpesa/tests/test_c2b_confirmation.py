# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""Paybill money pays a document only once Daraja confirmed it: Transaction Status or a Pull row,
else the source check when it refuses unknown addresses, else an accountant with the statement.

A forged confirmation posted on the provider's real secret path, as anyone who learned the path
could post it, is the attack: it must never confirm an order, pay an invoice or move its ledger row
past 'awaiting'.  The simulator plays Daraja over real HTTP; it knows only the payments made on it.
"""
from odoo.exceptions import AccessError, UserError
from odoo.tests import new_test_user, tagged

from odoo.addons.muchiri_mpesa.daraja.simulator import C2B_CONFIRMATION
from odoo.addons.muchiri_mpesa.daraja.simulator.c2b import LOST_CONFIRMATION

from .common import PHONE_SUCCESS
from .ledger_common import MpesaLedgerCommon


class PaybillConfirmationCommon(MpesaLedgerCommon):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # The default of a provider: the source check only logs unknown addresses.
        cls.provider.write({'mpesa_ip_check': 'log'})
        cls.manager = new_test_user(
            cls.env, login='mpesa_confirm_manager', groups='base.group_user,account.group_account_manager',
        )

    def setUp(self):
        super().setUp()
        self.provider.action_mpesa_c2b_register()

    def _with_initiator(self):
        self.provider.write({
            'mpesa_initiator_name': self.simulator.initiator_name,
            'mpesa_initiator_password': self.simulator.initiator_password,
            'mpesa_initiator_certificate': self.simulator.certificate_pem,
        })

    def _run_initiator_job(self):
        """The initiator job, as the cron the confirmation wakes would run it (no cron runs in tests)."""
        with self.registry.test_lock:
            self.env['payment.transaction'].sudo()._cron_mpesa_initiator()
            self.env.invalidate_all()
        self._settle_callbacks()  # Odoo's post-processing, which the confirmation runs or wakes.

    def _status_requests(self):
        return [request for request in self.simulator.initiator_requests if request['api'] == 'transaction_status']

    def _confirm_by_status(self, results=1):
        """The job asks Transaction Status; Daraja's result reaches Odoo; the job settles it."""
        self._run_initiator_job()
        self.simulator.wait_for_deliveries('initiator_result', count=results, timeout=15)
        self._run_initiator_job()

    def _lost_payment(self, amount, bill_ref):
        """A real payment to the paybill whose confirmation the simulator never sends: its receipt
        is real, so a body forged with it can be told apart only by what Daraja says of it."""
        self.env.flush_all()
        trans_id = self.simulator.c2b_pay(amount, LOST_CONFIRMATION, bill_ref)
        self.assertEqual(self.simulator.wait_for_c2b(trans_id)['state'], 'completed')
        return trans_id

    def _pay(self, amount, bill_ref):
        """A phone pays the paybill; the simulator's confirmation reaches Odoo."""
        self.env.flush_all()
        trans_id = self.simulator.c2b_pay(amount, PHONE_SUCCESS, bill_ref)
        self.assertEqual(self.simulator.wait_for_c2b(trans_id)['state'], 'completed')
        self.simulator.wait_for_deliveries(C2B_CONFIRMATION, count=1, reference=trans_id, timeout=10)
        self._settle_callbacks()
        return trans_id

    def assertPaysNothing(self, row, order=None, invoice=None):
        row.invalidate_recordset()
        self.assertEqual(row.state, 'awaiting', row.note)
        self.assertFalse(row.confirmation)
        self.assertFalse(row.transaction_ids, "no transaction, so no payment")
        if order:
            order.invalidate_recordset()
            self.assertIn(order.state, ('draft', 'sent'), "the order is not confirmed")
            self.assertFalse(order.transaction_ids)
        if invoice:
            invoice.invalidate_recordset()
            self.assertEqual(invoice.payment_state, 'not_paid')


@tagged('post_install', '-at_install')
class TestPaybillConfirmation(PaybillConfirmationCommon):

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
