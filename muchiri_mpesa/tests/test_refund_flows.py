# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""Refunds through the Reversal API: of STK payments and of paybill money.
"""
import json

import psycopg2

from odoo.exceptions import UserError, ValidationError
from odoo.fields import Command
from odoo.tests import new_test_user, tagged
from odoo.tools import is_html_empty, mute_logger

from odoo.addons.muchiri_mpesa import const, daraja

from .common import MpesaCommon, MpesaInitiatorCommon, MpesaPaybillCommon


@tagged('post_install', '-at_install')
class TestRefund(MpesaInitiatorCommon):
    """Refunds through the Reversal API, end to end: Odoo's refund button, the simulator's Reversal, its
    Result posted to Odoo's real HTTP server, the refund payment posted and reconciled.
    """

    def test_refund_from_odoos_refund_button_end_to_end(self):
        tx = self._paid()
        source_payment = tx.payment_id
        invoice = self.quotation.invoice_ids
        self.assertEqual(invoice.payment_state, 'paid')

        refund = self._refund_with_odoos_button(tx)
        self.assertEqual(refund.state, 'pending', "accepted is not reversed")
        self.assertTrue(refund.provider_reference, "the ConversationID finds its result")
        self.assertEqual(refund.amount, -tx.amount)
        [reversal] = self._initiator_requests('reversal')
        self.assertEqual(reversal['TransactionID'], tx.mpesa_receipt_number)
        self.assertEqual(reversal['ConversationID'], refund.provider_reference)

        self._wait_results()
        self.assertEqual(refund.state, 'done')
        self.assertEqual(refund.mpesa_receipt_number, self.simulator.payment(tx.mpesa_receipt_number).reversed_by)
        refund_payment = refund.payment_id
        self.assertEqual((refund_payment.payment_type, refund_payment.amount), ('outbound', tx.amount))
        self.assertEqual(refund_payment.source_payment_id, source_payment)
        self.assertNotEqual(refund_payment.state, 'draft', "posted")
        self.assertIn(tx.mpesa_receipt_number, refund_payment.memo)
        account = refund_payment.destination_account_id
        for payment in (refund_payment, source_payment):
            line = payment.move_id.line_ids.filtered(lambda line: line.account_id == account)
            self.assertTrue(line.reconciled, f"{payment.name} is reconciled")
        self.assertEqual(invoice.payment_state, 'not_paid', "the customer has the money back: the invoice is due")
        self.assertEqual(source_payment.amount_available_for_refund, 0, "nothing left to refund")
        self.assertEqual(self.simulator.payment(tx.mpesa_receipt_number).reversed_by, refund.mpesa_receipt_number)

    @mute_logger('odoo.addons.muchiri_mpesa.models.payment_transaction_refund')
    def test_a_refunded_payment_says_refunded_everywhere(self):
        """After a full refund the distributor's banner, the order's M-Pesa tab and the ledger row
        say refunded, with the reversal's receipt and time; the distributor gets one mail; the
        refund's chatter lines are the accountant's, who clicked."""
        tx = self._paid()
        order, invoice, distributor = self.quotation, self.quotation.invoice_ids, self.distributor
        self.assertEqual(order.mpesa_payment_status, 'paid')
        last_message = self.env['mail.message'].search([], order='id desc', limit=1).id
        refund = self._refund_with_odoos_button(tx)
        self._wait_results()
        self.assertEqual(refund.state, 'done')
        # The order's M-Pesa tab.
        self.assertEqual(order.mpesa_payment_status, 'refunded')
        reversal = self.simulator.payment(tx.mpesa_receipt_number).reversed_by
        self.assertEqual(refund.mpesa_reversal_receipt, reversal)
        self.assertTrue(refund.mpesa_paid_at)
        self.assertEqual(order.mpesa_refund_receipt, reversal)
        self.assertEqual(order.mpesa_refunded_at, refund.mpesa_paid_at)
        # The ledger row.
        row = tx.mpesa_ledger_id
        self.assertEqual((row.state, row.reversal_receipt, row.reversed_at),
                         ('refunded', reversal, refund.mpesa_paid_at))
        self.assertIn(self.accountant.name, row.note)
        # One mail to the distributor, which says refunded and names the reversal.
        with self.registry.test_lock:
            mails = self.env['mail.message'].search([('id', '>', last_message), ('partner_ids', 'in', distributor.ids)])
            self.assertEqual(len(mails), 1, mails.mapped('subject'))
            self.assertIn('refunded', mails.body)
            self.assertIn(reversal, mails.body)
            # The refund's lines are written as the accountant who clicked, never as the distributor.
            lines = self.env['mail.message'].search([
                ('id', '>', last_message), ('model', 'in', ('sale.order', 'account.move', 'account.payment')),
                ('message_type', '!=', 'email'), ('partner_ids', 'not in', distributor.ids),
            ])
            refund_lines = lines.filtered(lambda m: refund.reference in (m.body or ''))
            self.assertTrue(refund_lines.filtered(lambda m: m.model == 'sale.order'))
            self.assertEqual(refund_lines.author_id, self.accountant.partner_id)
            self.assertNotIn(distributor, lines.author_id)
        # The distributor's status banner.
        self.authenticate('distributor', 'distributor')
        page = self.url_open(order.get_portal_url()).text
        self.assertIn('o_mpesa_refunded', page)
        self.assertIn(reversal, page)
        self.assertNotIn('Your M-Pesa payment has been received', page)
        self.assertNotIn('Thank you!', page)
        self.assertEqual(invoice.payment_state, 'not_paid')

    def test_a_swahili_distributor_reads_the_refund_in_swahili(self):
        """What distributors read (the mails, the status banner) is in Swahili for those whose
        language it is."""
        with self.registry.test_lock:
            self.env['res.lang']._activate_lang('sw')
            self.env['ir.module.module']._load_module_terms(['muchiri_mpesa'], ['sw'], overwrite=True)
            self.distributor.lang = 'sw'
        tx = self._paid()
        last_message = self.env['mail.message'].search([], order='id desc', limit=1).id
        refund = self._refund_with_odoos_button(tx)
        self._wait_results()
        self.assertEqual(refund.state, 'done')
        with self.registry.test_lock:
            mail = self.env['mail.message'].search([
                ('id', '>', last_message), ('partner_ids', 'in', self.distributor.ids)])
            self.assertEqual(len(mail), 1)
            self.assertTrue(mail.subject.startswith("Malipo yamerejeshwa"), mail.subject)
            self.assertIn("yamerejeshwa kwenye akaunti yako ya M-Pesa", mail.body)
            banner = self.env['ir.qweb'].with_context(lang='sw')._render('payment.state_header', {
                'tx': tx.sudo(), 'is_html_empty': is_html_empty,
            })
            self.assertIn("Malipo haya ya M-Pesa ya", banner)
            self.assertIn(refund.mpesa_reversal_receipt, banner)

    def test_each_failure_code_says_what_it_means(self):
        # 2001: the initiator password is wrong; nothing was reversed, the payment may be refunded again.
        tx = self._paid()
        self.provider.mpesa_initiator_password = 'not-the-password'
        refund = self._refund_with_odoos_button(tx)
        self._wait_results()
        self.assertEqual(refund.state, 'error')
        self.assertIn(daraja.describe_initiator_result('2001'), refund.state_message)
        self.assertIn('(2001)', refund.state_message)
        self.assertFalse(refund.mpesa_reversal_claim, "the reversal may be sent again")
        self.provider.mpesa_initiator_password = self.simulator.initiator_password

        # R000001: reversed outside Odoo already (customer care); no second attempt from Odoo.
        with self.registry.test_lock:  # Its exchange is logged on the shared connection.
            client = self.provider._mpesa_client()
            initiator, credential = self.provider._mpesa_initiator()
            client.reverse(
                initiator=initiator, security_credential=credential, transaction_id=tx.mpesa_receipt_number,
                amount=int(tx.amount), receiver_party=self.provider.mpesa_shortcode,
                result_url=self.provider._mpesa_daraja_url('reversal_result'),
                timeout_url=self.provider._mpesa_daraja_url('reversal_timeout'), remarks="By customer care",
            )
        self._wait_results(count=2)  # That result matches no refund of Odoo: it is kept, unmatched.
        refund = self._refund_with_odoos_button(tx)
        self._wait_results(count=3)
        self.assertEqual(refund.state, 'error')
        self.assertIn(daraja.describe_initiator_result('R000001'), refund.state_message)
        self.assertTrue(refund.mpesa_reversal_claim, "already reversed: never again")
        with self.assertRaisesRegex(ValidationError, 'already reversed'):
            self._refund_with_odoos_button(tx)

        # R000002: a receipt M-Pesa does not know.
        other = self._paid(self._order())
        other.mpesa_receipt_number = 'SIM0UNKNWN'
        refund = self._refund_with_odoos_button(other)
        self._wait_results(count=4)
        self.assertEqual(refund.state, 'error')
        self.assertIn(daraja.describe_initiator_result('R000002'), refund.state_message)
        self.assertEqual(len(self._initiator_requests('reversal')), 4)

    def test_a_lost_result_is_recovered_by_transaction_status(self):
        tx = self._paid()
        self.simulator.initiator_next('no_result')
        refund = self._refund_with_odoos_button(tx)
        self.assertEqual(refund.state, 'pending')
        self._run_initiator_job()
        self.assertFalse(self._initiator_requests('transaction_status'), "its result has time to come")
        refund.mpesa_status_next_at = refund.mpesa_status_next_at.replace(year=2000)  # N minutes later
        self._run_initiator_job()
        self.assertEqual(len(self._initiator_requests('transaction_status')), 1)
        self._wait_results()
        self.assertEqual(refund.state, 'done', "Transaction Status says the payment is reversed")
        self.assertTrue(refund.payment_id)
        self.assertEqual(len(self._initiator_requests('reversal')), 1, "never a second reversal")

    def test_a_reversed_payment_no_longer_pays_its_documents(self):
        """The customer has the money back: the order reads unpaid, and may be prompted again."""
        tx = self._paid()
        order, invoice = self.quotation, self.quotation.invoice_ids
        self.assertEqual(order._mpesa_amount_due(), 0)
        refund = self._refund_with_odoos_button(tx)
        self._wait_results()
        self.assertEqual(refund.state, 'done')
        with self.registry.test_lock:
            self.env.invalidate_all()
            self.assertEqual(order._mpesa_paid_amount(), 0, "a reversed payment pays nothing")
            self.assertEqual(order._mpesa_amount_due(), order.amount_total)
            self.assertEqual(invoice._mpesa_paid_amount(), 0)

    def test_a_late_reversal_result_wins_over_a_status_that_lagged(self):
        """Transaction Status said 'Completed' while the reversal was still in M-Pesa's queue: the
        refund ends in error, then the reversal's own result says done.  The money went back: the
        refund is done, its payment made, and no second reversal may be sent."""
        tx = self._paid()
        self.simulator.initiator_next('no_result', count=2)
        refund = self._refund_with_odoos_button(tx)
        with self.registry.test_lock:
            refund.mpesa_status_next_at = refund.mpesa_status_next_at.replace(year=2000)
        self._run_initiator_job()
        self.assertEqual(len(self._initiator_requests('transaction_status')), 1)
        self.assertTrue(refund.mpesa_status_conversation_id)
        status = self._initiator_result(
            self.status_result_data, refund.mpesa_status_conversation_id, refund.mpesa_status_originator_id,
            ReceiptNo=tx.mpesa_receipt_number, TransactionStatus='Completed', Amount=tx.amount,
        )
        self._post_result(status, route='status_result')
        self._run_initiator_job()
        self.assertEqual(refund.state, 'error')
        self.assertFalse(refund.mpesa_reversal_claim)
        reversal_id = self.simulator.payment(tx.mpesa_receipt_number).reversed_by
        self.assertTrue(reversal_id, "M-Pesa did reverse it")
        late = self._initiator_result(
            self.reversal_result_data, refund.provider_reference, refund.mpesa_originator_conversation_id,
            transaction_id=reversal_id, OriginalTransactionID=tx.mpesa_receipt_number,
        )
        self._post_result(late)
        self._run_initiator_job()
        self.assertEqual(refund.state, 'done', "a late success still wins")
        self.assertTrue(refund.mpesa_reversal_claim, "it holds the payment's reversal again")
        self.assertTrue(refund.payment_id, "the refund payment is made")
        with self.assertRaisesRegex(ValidationError, 'already refunded'), self.registry.test_lock:
            tx.with_user(self.accountant).action_refund()
        self.assertEqual(len(self._initiator_requests('reversal')), 1)

    def test_a_late_success_after_a_second_reversal_was_refused(self):
        """The refund ended in error by a lagging status; a person sent a second reversal, which
        M-Pesa refused as already reversed (R000001); then the first one's result came."""
        tx = self._paid()
        self.simulator.initiator_next('no_result')
        first = self._refund_with_odoos_button(tx)
        with self.registry.test_lock:  # As the lagging status of the test above would.
            first._mpesa_set_refund_failed(False, "M-Pesa's Transaction Status says the payment was not reversed.")
        second = self._refund_with_odoos_button(tx)
        self._wait_results()
        self.assertEqual((second.state, second.mpesa_result_code), ('error', 'R000001'))
        self.assertTrue(second.mpesa_reversal_claim)
        late = self._initiator_result(
            self.reversal_result_data, first.provider_reference, first.mpesa_originator_conversation_id,
            transaction_id=self.simulator.payment(tx.mpesa_receipt_number).reversed_by,
            OriginalTransactionID=tx.mpesa_receipt_number,
        )
        self._post_result(late)
        self._run_initiator_job()
        self.assertEqual(first.state, 'done')
        self.assertEqual((first.mpesa_reversal_claim, second.mpesa_reversal_claim), (True, False))
        self.assertEqual(len(tx.child_transaction_ids.filtered('payment_id')), 1, "one refund payment")

    def test_a_queue_timeout_is_asked_again_never_sent_twice(self):
        tx = self._paid()
        self.simulator.initiator_next('queue_timeout')
        refund = self._refund_with_odoos_button(tx)
        self._wait_results(kind='initiator_timeout')
        self.assertEqual(refund.state, 'pending')
        self.assertEqual(len(self._initiator_requests('transaction_status')), 1, "asked at once")
        self._wait_results()
        self.assertEqual(refund.state, 'error', "the timed-out reversal was never processed")
        self.assertIn('not reversed', refund.state_message)
        self.assertFalse(refund.mpesa_reversal_claim, "it may be refunded again, by a person")
        self.assertEqual(len(self._initiator_requests('reversal')), 1)

    def test_a_double_click_sends_one_reversal(self):
        tx = self._paid()
        self._refund_with_odoos_button(tx)
        with self.assertRaisesRegex(ValidationError, 'under way'):
            self._refund_with_odoos_button(tx)
        with self.assertRaisesRegex(ValidationError, 'under way'), self.registry.test_lock:
            tx.with_user(self.accountant).action_refund()
        self.assertEqual(len(self._initiator_requests('reversal')), 1)
        self._wait_results()
        with self.assertRaisesRegex(ValidationError, 'already refunded'), self.registry.test_lock:
            tx.with_user(self.accountant).action_refund()
        self.assertEqual(len(self._initiator_requests('reversal')), 1)

    @mute_logger('odoo.sql_db')
    def test_the_database_holds_one_reversal_per_payment(self):
        """A second worker that got past the row lock (it cannot: the first holds it until its
        commit) still meets the unique index.  Real concurrent workers need committed data, which
        Odoo's test cursor never has: tests/odoo_concurrency.py is where such runs live."""
        tx = self._paid()
        refund = self._refund_with_odoos_button(tx)
        with self.assertRaises(psycopg2.errors.UniqueViolation), self.env.cr.savepoint():
            refund.copy({'reference': 'R-SECOND', 'mpesa_reversal_claim': True,
                         'source_transaction_id': tx.id}).flush_recordset()

    def test_only_whole_and_proven_payments_are_reversed(self):
        tx = self._paid()
        with self.assertRaisesRegex(ValidationError, 'whole payments'), self.registry.test_lock:
            tx.with_user(self.accountant).action_refund(amount_to_refund=tx.amount / 2)
        tx.mpesa_receipt_status = 'unverified'
        with self.assertRaisesRegex(ValidationError, 'not verified'), self.registry.test_lock:
            tx.with_user(self.accountant).action_refund()
        self.assertFalse(self.simulator.initiator_requests, "nothing left for Daraja")

    def test_without_an_initiator_nothing_is_sent(self):
        tx = self._paid()
        self.provider.mpesa_initiator_password = False
        with self.assertRaisesRegex(Exception, 'initiator password'), self.registry.test_lock:
            tx.with_user(self.accountant).action_refund()
        self.assertFalse(tx.child_transaction_ids, "no refund left behind")
        self.assertFalse(self.simulator.initiator_requests)

    def test_a_flagged_payment_is_refunded_in_one_click(self):
        first = self._paid()
        order = self.quotation
        # A second payment of the paid order (it came through another order's prompt, then moved here).
        other_order = self._order()
        second = self._paid(other_order)
        with self.registry.test_lock:
            second.sale_order_ids = [Command.set(order.ids)]
            second._mpesa_flag_overpaid_documents()
            self.assertTrue(order.mpesa_needs_refund)
            order.with_user(self.accountant).action_mpesa_refund_extra_payment()
        self.assertEqual(first.child_transaction_ids, self.env['payment.transaction'], "the order's own stays")
        refund = self._refund_of(second)
        self._wait_results()
        self.assertEqual(refund.state, 'done')
        self.assertFalse(order.mpesa_needs_refund, "refunded: nothing left to check")
        self.assertEqual(order.mpesa_payment_status, 'paid', "its own payment still pays it")
        self.assertEqual(order.mpesa_refund_receipt, refund.mpesa_reversal_receipt)
        self.assertFalse(order.activity_ids.filtered(lambda a: 'refund' in (a.summary or '')))
        self.assertEqual(len(self._initiator_requests('reversal')), 1)


@tagged('post_install', '-at_install')
class TestPaybillRefund(MpesaPaybillCommon):
    """Refunds of paybill money: a phone pays the simulator's paybill, Daraja's confirmation reaches
    Odoo, Transaction Status at the simulator confirms it; the accountant refunds it through Odoo's
    refund flow, the simulator's Reversal gives it back and posts its result to Odoo's real HTTP server.

    M-Pesa reverses whole receipts only: a receipt placed on several documents is reversed whole and
    the refund is booked on each of them; an overpayment inside one receipt is either reversed whole or
    its difference paid back by hand.
    """

    def setUp(self):
        super().setUp()
        self._with_initiator()

    def _paid_by_paybill(self, amount, bill_ref, results=1):
        """A phone pays the paybill; Transaction Status confirms it (its `results`-th result of the
        test); the ledger row, its transactions."""
        trans_id = self._pay(amount, bill_ref)
        self._confirm_by_status(results)
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

    def test_a_refund_of_one_overpayment_keeps_the_flag_of_another(self):
        """Two paybill payments overpaid one invoice: 500 of the first, the whole second.  Reversing the
        second leaves the first's 500 to refund: the flag and its activity stay until that is refunded."""
        invoice = self._invoice(4000)
        first = self._paid_by_paybill(4500, invoice.name)
        second = self._paid_by_paybill(4500, invoice.name, results=2)
        self.assertEqual([(first.state, first.refund_amount), (second.state, second.refund_amount)],
                         [('over', 500), ('over', 4500)])
        self.assertTrue(invoice.mpesa_needs_refund)
        self._refund(second.transaction_ids)
        self.assertEqual(second.state, 'refunded', "the second payment went back whole")
        self.assertEqual((first.state, first.refund_amount), ('over', 500))
        self.assertEqual(invoice._mpesa_extra_to_refund(), 500)
        self.assertTrue(invoice.mpesa_needs_refund, "the first payment's 500 is still to refund")
        self.assertTrue(invoice.activity_ids.filtered(lambda a: 'refund' in (a.summary or '')))
        # The refund action now offers the first payment's 500.
        with self.registry.test_lock:
            action = invoice.with_user(self.accountant).action_mpesa_refund_extra_payment()
            wizard = self.env[action['res_model']].browse(action['res_id'])
            self.assertEqual((wizard.transaction_id, wizard.extra_amount), (first.transaction_ids, 500))
            wizard.with_user(self.accountant).action_refund_by_hand()
            self.env.invalidate_all()
        self.assertFalse(invoice.mpesa_needs_refund, "nothing left to refund")
        self.assertEqual(len(self._reversals()), 1)

    def test_nothing_to_refund_says_why(self):
        invoice = self._invoice(4000)
        invoice.mpesa_needs_refund = True
        with self.assertRaisesRegex(UserError, 'reverses whole payments'), self.registry.test_lock:
            invoice.with_user(self.accountant).action_mpesa_refund_extra_payment()


@tagged('post_install', '-at_install')
class TestRefundFlag(MpesaCommon):
    """The one rule of the refund flag (`_mpesa_update_refund_flag`) on an order that one prompt paid
    beyond its total: M-Pesa's answer handled as Odoo's providers handle theirs, no HTTP."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.accountant = new_test_user(
            cls.env, login='mpesa_flag_accountant', groups='base.group_user,account.group_account_invoice',
        )

    def _overpaid_order(self):
        """The quotation (4500) paid 5000 by one prompt: 500 beyond its total, inside one payment."""
        order = self.quotation
        tx = self._prompt_on_phone(5000, order)
        self._handle_notification(self._notification_data(tx, receipt='FLG0000001'))
        self.assertEqual(tx.state, 'done')
        self.assertTrue(order.mpesa_needs_refund)
        return order, tx

    def _refund_wizard(self, order):
        """The refund button of the order, as the accountant: the wizard it opens."""
        action = order.with_user(self.accountant).action_mpesa_refund_extra_payment()
        return self.env[action['res_model']].with_user(self.accountant).browse(action['res_id'])

    def _pay_back_by_hand(self, order, amount):
        wizard = self._refund_wizard(order)
        wizard.amount = amount
        wizard.action_refund_by_hand()

    def _refund_activities(self, order):
        return order.activity_ids.filtered(lambda a: 'refund' in (a.summary or ''))

    def test_an_extra_partly_paid_back_by_hand_is_not_offered_again(self):
        order, tx = self._overpaid_order()
        wizard = self._refund_wizard(order)
        self.assertEqual((wizard.transaction_id, wizard.extra_amount, wizard.amount), (tx, 500, 500))
        self._pay_back_by_hand(order, 200)
        self.assertEqual(tx.mpesa_paid_back_by_hand, 200)
        self.assertEqual(order._mpesa_extra_amount(), 500, "the order's payments still exceed its total by 500")
        self.assertEqual(order._mpesa_extra_to_refund(), 300, "less what went back by hand")
        self.assertTrue(order.mpesa_needs_refund)
        wizard = self._refund_wizard(order)
        self.assertEqual((wizard.extra_amount, wizard.amount), (300, 300), "the refund offers the rest only")
        wizard.amount = 301
        with self.assertRaisesRegex(UserError, 'at most the extra'):
            wizard.action_refund_by_hand()
        self.assertEqual(tx.mpesa_paid_back_by_hand, 200)

    def test_the_flag_clears_once_less_than_a_shilling_is_left(self):
        order, tx = self._overpaid_order()
        self._pay_back_by_hand(order, 500 - const.ROUNDING_TOLERANCE)
        self.assertAlmostEqual(order._mpesa_extra_to_refund(), const.ROUNDING_TOLERANCE)
        self.assertTrue(order.mpesa_needs_refund, "a whole shilling is still money owed back")
        self.assertTrue(self._refund_activities(order))
        self._pay_back_by_hand(order, const.ROUNDING_TOLERANCE / 2)
        self.assertAlmostEqual(order._mpesa_extra_to_refund(), const.ROUNDING_TOLERANCE / 2)
        self.assertFalse(order.mpesa_needs_refund, "less than a shilling is rounding")
        self.assertFalse(self._refund_activities(order), "the accountants' activity is closed")
        self.assertAlmostEqual(tx.mpesa_paid_back_by_hand, 500 - const.ROUNDING_TOLERANCE / 2)
