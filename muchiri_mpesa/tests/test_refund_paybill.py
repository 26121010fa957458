# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""Refunds of paybill money: a phone pays the simulator's paybill, Daraja's confirmation reaches
Odoo, Transaction Status at the simulator confirms it; the accountant refunds it through Odoo's
refund flow, the simulator's Reversal gives it back and posts its result to Odoo's real HTTP server.

M-Pesa reverses whole receipts only: a receipt placed on several documents is reversed whole and
the refund is booked on each of them; an overpayment inside one receipt is either reversed whole or
its difference paid back by hand.
"""
import json

from odoo.exceptions import UserError, ValidationError
from odoo.tests import tagged

from .test_c2b_confirmation import PaybillConfirmationCommon


@tagged('post_install', '-at_install')
class TestPaybillRefund(PaybillConfirmationCommon):

    def setUp(self):
        super().setUp()
        self._with_initiator()

    def _paid_by_paybill(self, amount, bill_ref):
        """A phone pays the paybill; Transaction Status confirms it; the ledger row, its transactions."""
        trans_id = self._pay(amount, bill_ref)
        self._confirm_by_status()
        row = self._row(trans_id)
        self.assertEqual(row.confirmation, 'status', row.note)
        return row

    def _reversals(self):
        return [request for request in self.simulator.initiator_requests if request['api'] == 'reversal']

    def _reversal_amounts(self):
        """The amounts of the Reversal requests Odoo sent, as its exchange log kept them."""
        return [int(json.loads(event.request_body)['Amount']) for event in self._events(kind='reversal')]

    def _refund(self, tx):
        """Odoo's refund of the payment, as the accountant; then the simulator's results are settled."""
        with self.registry.test_lock:
            tx.with_user(self.accountant).action_refund()
            self.env.invalidate_all()
        results = len(self._status_requests()) + len(self._reversals())
        self.simulator.wait_for_deliveries('initiator_result', count=results, timeout=15)
        self._run_initiator_job()

    def _done_refunds(self, txs):
        return txs.child_transaction_ids.filtered(lambda child: child.operation == 'refund' and child.state == 'done')

    def test_paybill_money_confirmed_by_transaction_status_is_refunded(self):
        order = self.quotation
        row = self._paid_by_paybill(order.amount_total, order.name)
        tx = row.transaction_ids
        self.assertEqual((row.state, tx.mpesa_receipt_status), ('matched', 'confirmed'),
                         "confirmed money is verified money")
        self._refund(tx)
        [reversal] = self._reversals()
        self.assertEqual((reversal['TransactionID'], reversal['ResultCode']), (row.name, '0'))
        self.assertEqual(self._reversal_amounts(), [int(order.amount_total)])
        refund = self._done_refunds(tx)
        self.assertTrue(refund, "sent, not refused")
        self.assertEqual(refund.mpesa_receipt_number, self.simulator.payment(row.name).reversed_by)
        self.assertEqual(row.state, 'refunded')
        self.assertEqual(row.reversal_receipt, refund.mpesa_receipt_number)
        self.assertEqual(order.mpesa_payment_status, 'refunded')

    def test_paybill_money_confirmed_by_a_pull_row_is_refunded(self):
        self.provider.mpesa_initiator_password = False  # No Transaction Status: the Pull list confirms it.
        self.provider.mpesa_pull_nominated_number = '0708374149'
        self.provider.action_mpesa_pull_register()
        invoice = self._invoice(4500)
        trans_id = self._pay(4500, invoice.name)
        self.simulator.age_transaction(trans_id, 0.01)
        with self.registry.test_lock:
            self.env['payment.provider']._cron_mpesa_pull_transactions()
            self.env.invalidate_all()
        self._settle_callbacks()
        row = self._row(trans_id)
        self.assertEqual((row.state, row.confirmation), ('matched', 'pull'), row.note)
        tx = row.transaction_ids
        self.assertEqual(tx.mpesa_receipt_status, 'confirmed', "confirmed money is verified money")
        self._with_initiator()
        self._refund(tx)
        [reversal] = self._reversals()
        self.assertEqual((reversal['TransactionID'], reversal['ResultCode']), (trans_id, '0'))
        self.assertTrue(self._done_refunds(tx), "sent, not refused")
        self.assertEqual(invoice.payment_state, 'not_paid')
        self.assertEqual(row.state, 'refunded')

    def test_a_receipt_placed_on_several_documents_is_reversed_whole(self):
        """A hand match places one receipt on two invoices; a refund asked from either share
        reverses the whole receipt, and each invoice gets its refund and is due again."""
        first, second = self._invoice(3000), self._invoice(1500)
        row = self._paid_by_paybill(4500, 'NO-SUCH-DOC')
        self.assertEqual(row.state, 'unmatched', row.note)
        with self.registry.test_lock:
            row.with_user(self.accountant)._mpesa_match_by_hand([first, second])
            self.env.invalidate_all()
        self._settle_callbacks()
        holder = first.transaction_ids
        share = second.transaction_ids
        self.assertEqual((holder.mpesa_receipt_number, share.mpesa_receipt_number), (row.name, False))
        for invoice in (first, second):
            self.assertIn(invoice.payment_state, ('paid', 'in_payment'))

        last_message = self.env['mail.message'].search([], order='id desc', limit=1).id
        self._refund(share)  # From the share that does not hold the receipt.
        [reversal] = self._reversals()
        self.assertEqual((reversal['TransactionID'], reversal['ResultCode']), (row.name, '0'))
        self.assertEqual(self._reversal_amounts(), [4500], "the whole receipt")
        refunds = self._done_refunds(holder + share)
        self.assertEqual(len(refunds), 2, "booked on each document it paid")
        self.assertEqual(sorted(refunds.mapped('amount')), [-3000, -1500])
        for refund in refunds:
            self.assertEqual(refund.payment_id.amount, -refund.amount)
            self.assertEqual(refund.mpesa_reversal_receipt, self.simulator.payment(row.name).reversed_by)
        for invoice in (first, second):
            self.assertEqual(invoice.payment_state, 'not_paid', "the customer has the money back")
            self.assertEqual(invoice._mpesa_amount_due(), invoice.amount_total)
        self.assertEqual(row.state, 'refunded')
        with self.registry.test_lock:
            mails = self.env['mail.message'].search([
                ('id', '>', last_message), ('partner_ids', 'in', self.distributor.ids)])
        self.assertEqual(len(mails), 1, "one mail for one reversal")
        self.assertIn(first.name, mails.body)
        self.assertIn(second.name, mails.body)
        with self.assertRaisesRegex(UserError, 'already refunded'), self.registry.test_lock:
            share.with_user(self.accountant).action_refund()
        self.assertEqual(len(self._reversals()), 1)

    def _overpaid_invoice(self):
        invoice = self._invoice(4000)
        row = self._paid_by_paybill(4500, invoice.name)
        self.assertEqual((row.state, row.refund_amount), ('over', 500), row.note)
        self.assertTrue(invoice.mpesa_needs_refund)
        with self.registry.test_lock:
            action = invoice.with_user(self.accountant).action_mpesa_refund_extra_payment()
            wizard = self.env[action['res_model']].with_user(self.accountant).browse(action['res_id'])
            self.assertEqual((wizard.extra_amount, wizard.amount, wizard.receipt), (500, 500, row.name))
        return invoice, row, wizard

    def test_an_overpayment_inside_one_receipt_is_paid_back_by_hand(self):
        invoice, row, wizard = self._overpaid_invoice()
        with self.registry.test_lock:
            wizard.action_refund_by_hand()
            self.env.invalidate_all()
        self.assertFalse(self._reversals(), "nothing asked of M-Pesa")
        self.assertFalse(invoice.mpesa_needs_refund)
        self.assertFalse(invoice.activity_ids.filtered(lambda a: 'refund' in (a.summary or '')))
        self.assertEqual((row.state, row.refund_amount), ('matched', 0))
        payment = row.transaction_ids.payment_id
        hand = self.env['account.payment'].search([('memo', 'ilike', row.name), ('payment_type', '=', 'outbound')])
        self.assertEqual((hand.amount, hand.partner_id), (500, self.distributor.commercial_partner_id))
        account = hand.destination_account_id
        for record in (hand, payment):
            line = record.move_id.line_ids.filtered(lambda line: line.account_id == account)
            self.assertTrue(line.reconciled, f"{record.name}: the customer's credit is settled")
        self.assertIn(invoice.payment_state, ('paid', 'in_payment'))
        self.assertTrue(invoice.message_ids.filtered(
            lambda m: m.author_id == self.accountant.partner_id and 'by hand' in (m.body or '')))

    def test_paying_back_by_hand_refuses_bad_input_and_a_second_click(self):
        """More than the extra, a sales journal, another payment: refused, nothing posted.  Part of
        the extra leaves the rest due and the payment no longer reversible; a click after the last
        part finds nothing left to pay back."""
        invoice, row, wizard = self._overpaid_invoice()
        outbound = [('payment_type', '=', 'outbound'), ('partner_id', '=', self.distributor.commercial_partner_id.id)]
        sales = self.env['account.journal'].search([('type', '=', 'sale'), ('company_id', '=', invoice.company_id.id)],
                                                   limit=1)
        other_tx = self.env['payment.transaction'].create({
            'provider_id': self.provider.id, 'payment_method_id': self.provider.payment_method_ids[:1].id,
            'reference': 'OTHER-HAND-1', 'amount': 500, 'currency_id': invoice.currency_id.id,
            'partner_id': self.distributor.id,
        })
        with self.registry.test_lock:
            for values in ({'amount': 501}, {'amount': -500}, {'journal_id': sales.id}):
                with self.subTest(values=values), self.assertRaises(UserError):
                    wizard.copy(values).action_refund_by_hand()
            with self.assertRaises(UserError):
                wizard.copy({'transaction_id': other_tx.id}).action_refund_by_hand()
            self.env.invalidate_all()
            self.assertFalse(self.env['account.payment'].search(outbound), "nothing posted")
            self.assertEqual((row.state, row.refund_amount), ('over', 500))
            # Part of it: the rest stays to pay back, and M-Pesa may no longer reverse the whole payment
            # (the customer would get that part twice).
            wizard.copy({'amount': 200}).action_refund_by_hand()
            self.env.invalidate_all()
            self.assertEqual((row.state, row.refund_amount, invoice.mpesa_needs_refund), ('over', 300, True))
            with self.assertRaises(ValidationError):
                wizard.copy().action_reverse_whole_payment()
            self.assertFalse(self._reversals(), "nothing asked of M-Pesa")
            wizard.copy({'amount': 300}).action_refund_by_hand()
            with self.assertRaises(UserError):
                wizard.action_refund_by_hand()
            self.env.invalidate_all()
        self.assertEqual((row.state, row.refund_amount, invoice.mpesa_needs_refund), ('matched', 0, False))
        self.assertEqual(sorted(self.env['account.payment'].search(outbound).mapped('amount')), [200, 300])

    def test_an_overpayment_inside_one_receipt_is_reversed_whole(self):
        invoice, row, wizard = self._overpaid_invoice()
        with self.registry.test_lock:
            wizard.action_reverse_whole_payment()
            self.env.invalidate_all()
        results = len(self._status_requests()) + len(self._reversals())
        self.simulator.wait_for_deliveries('initiator_result', count=results, timeout=15)
        self._run_initiator_job()
        [reversal] = self._reversals()
        self.assertEqual((reversal['TransactionID'], reversal['ResultCode']), (row.name, '0'))
        self.assertEqual(self._reversal_amounts(), [4500], "the whole receipt")
        self.assertEqual(row.state, 'refunded')
        self.assertEqual(invoice.payment_state, 'not_paid')
        self.assertFalse(invoice.mpesa_needs_refund)

    def test_nothing_to_refund_says_why(self):
        invoice = self._invoice(4000)
        invoice.mpesa_needs_refund = True
        with self.assertRaisesRegex(UserError, 'reverses whole payments'), self.registry.test_lock:
            invoice.with_user(self.accountant).action_mpesa_refund_extra_payment()
