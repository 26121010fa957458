# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""Pull Transactions completes the ledger: a confirmation the simulator never sends is recovered by
the hourly cron, a prompt whose callback was lost gets its receipt, nothing is counted twice, and
the gap report shows (and alerts on) what Safaricom does not list."""
from datetime import timedelta
from unittest.mock import patch

from odoo import fields
from odoo.exceptions import UserError
from odoo.tests import tagged
from odoo.tools import mute_logger

from odoo.addons.muchiri_mpesa import daraja
from odoo.addons.muchiri_mpesa.daraja.simulator import C2B_CONFIRMATION
from odoo.addons.muchiri_mpesa.daraja.simulator.c2b import LOST_CONFIRMATION
from odoo.addons.muchiri_mpesa.daraja.simulator.pull import REPEAT_PAGE, WITH_REVERSALS
from odoo.addons.muchiri_mpesa.models.mpesa_payable_reference import reference_key

from .common import PHONE_CALLBACK_LOST, PHONE_SUCCESS
from .ledger_common import MpesaLedgerCommon
from .test_refund import InitiatorCommon


def _run_pull(test):
    """The hourly cron, once the simulator's payments are a little older than the query's end
    (Daraja's EndDate is to the second: a payment of this very second comes in the next run)."""
    for payment in test.simulator.payments:
        test.simulator.age_transaction(payment.receipt, 0.01)
    with test.registry.test_lock:
        test.env['payment.provider']._cron_mpesa_pull_transactions()
        test.env.invalidate_all()


@tagged('post_install', '-at_install')
class TestPull(MpesaLedgerCommon):

    def setUp(self):
        super().setUp()
        self.provider.mpesa_pull_nominated_number = '0708374149'
        self.provider.action_mpesa_c2b_register()
        self.provider.action_mpesa_pull_register()

    def _pull(self):
        _run_pull(self)

    def test_registration_needs_production_or_a_simulator(self):
        self.assertIn(self.provider.mpesa_shortcode, self.simulator.pull_registrations)
        self.provider.mpesa_api_url = False  # Safaricom's sandbox has no Pull Transactions.
        with self.assertRaises(UserError):
            self.provider.action_mpesa_pull_register()

    def test_a_lost_confirmation_is_recovered_by_the_pull_cron(self):
        invoice = self._invoice(4500)
        self.env.flush_all()  # Odoo's requests read the database on cursors of their own.
        trans_id = self.simulator.c2b_pay(4500, LOST_CONFIRMATION, invoice.name)
        self.assertEqual(self.simulator.wait_for_c2b(trans_id)['state'], 'completed')
        self.assertFalse(self.simulator.deliveries(C2B_CONFIRMATION, reference=trans_id))
        self.assertFalse(self._row(trans_id))
        self._pull()
        row = self._row(trans_id)
        self.assertEqual((row.state, row.sources), ('matched', 'Pull'), row.note)
        self.assertIn(invoice.payment_state, ('paid', 'in_payment'))
        self.assertTrue(self.provider.mpesa_pull_synced_until)

    def test_pull_rows_already_in_the_ledger_are_not_paid_again(self):
        invoice = self._invoice(4500)
        self.env.flush_all()  # Odoo's requests read the database on cursors of their own.
        trans_id = self.simulator.c2b_pay(4500, '254708374149', invoice.name)
        self.simulator.wait_for_deliveries(C2B_CONFIRMATION, reference=trans_id, timeout=10)
        self._settle_callbacks()
        self._pull()
        self._pull()
        row = self._row(trans_id)
        self.assertEqual(row.sources, 'C2B, Pull')
        self.assertEqual(len(row.transaction_ids), 1)
        self.assertEqual(row.pull_amount, 4500)
        self.assertFalse(row.conflict)

    def test_a_prompt_settled_by_query_gets_its_receipt_from_pull(self):
        tx, _result = self._pay_from_portal(PHONE_CALLBACK_LOST)
        self._wait(lambda: self._result_known(tx), message="the customer's answer", settle=False)
        with self.registry.test_lock:
            tx.mpesa_next_check_at = fields.Datetime.now() - timedelta(seconds=1)
            self.env['payment.transaction']._cron_mpesa_reconcile()
            self.env.invalidate_all()
        self.assertEqual((tx.state, tx.mpesa_receipt_status), ('done', 'pending'))
        payments_before = tx.payment_id
        self._pull()
        receipt = self.simulator.transaction(tx.provider_reference).receipt
        self.assertEqual(tx.mpesa_receipt_number, receipt)
        self.assertEqual(tx.mpesa_receipt_status, 'confirmed', "Safaricom's own list proves it")
        row = self._row(receipt)
        self.assertEqual(row.state, 'matched')
        self.assertEqual(row.transaction_ids, tx, "linked to the prompt, never paid a second time")
        self.assertEqual(tx.payment_id, payments_before)
        self.assertTrue(tx.payment_id.memo.startswith(receipt))

    def test_a_prompt_and_pull_report_one_receipt_once(self):
        tx, _result = self._pay_from_portal(PHONE_SUCCESS)
        self._wait_final(tx)
        row = self._row(tx.mpesa_receipt_number)
        self.assertEqual((row.state, row.sources, row.transaction_ids), ('matched', 'STK', tx))
        self._pull()
        self.assertEqual(row.sources, 'STK, Pull')
        self.assertEqual(row.transaction_ids, tx, "no second payment")
        self.assertEqual(self.quotation.state, 'sale')

    def test_the_gap_report_shows_money_safaricom_does_not_list(self):
        row = self._confirm(250, "unknown account")  # Posted to Odoo only: the simulator never took it.
        with self.registry.test_lock:
            row.trans_time = fields.Datetime.now() - timedelta(hours=30)
        self._pull()
        self.env.flush_all()
        day = self.env['muchiri.mpesa.ledger.day'].search([
            ('provider_id', '=', self.provider.id), ('differs', '=', True)])
        self.assertEqual((day.ledger_count, day.pull_count, day.unlisted_count), (1, 0, 1))
        alert = self.env['muchiri.mpesa.alert'].search([('kind', '=', 'ledger_gap'), ('state', '=', 'open')])
        self.assertEqual(len(alert), 1)
        self.assertIn(row, self.env['muchiri.mpesa.ledger'].search([('source_pull', '=', False)]))

    def test_a_row_that_failed_is_pulled_again(self):
        """A row whose recording failed keeps the window where it was: the next run asks again,
        however old the row is by then (within Daraja's 48 hours)."""
        invoice = self._invoice(4500)
        self.env.flush_all()  # Odoo's requests read the database on cursors of their own.
        trans_id = self.simulator.c2b_pay(4500, LOST_CONFIRMATION, invoice.name)
        self.assertEqual(self.simulator.wait_for_c2b(trans_id)['state'], 'completed')
        self.simulator.age_transaction(trans_id, 2)  # Older than the queries' overlap.
        Ledger = self.registry['muchiri.mpesa.ledger']
        with patch.object(Ledger, '_mpesa_record_pull', side_effect=ValueError("database hiccup")), \
                mute_logger('odoo.addons.muchiri_mpesa.models.payment_provider'):
            self._pull()
        self.assertFalse(self._row(trans_id))
        self._pull()
        row = self._row(trans_id)
        self.assertEqual((row.state, row.sources), ('matched', 'Pull'), "the failed row was pulled again")
        self.assertIn(invoice.payment_state, ('paid', 'in_payment'))

    def test_a_payment_with_nothing_of_the_prompt_never_takes_its_place(self):
        """A prompt settled by STK Query (no receipt) takes the receipt of a report that names its
        account or its payer; a till payment of the same amount from a masked number is anybody's."""
        tx, _result = self._pay_from_portal(PHONE_CALLBACK_LOST)
        self._wait(lambda: self._result_known(tx), message="the customer's answer", settle=False)
        with self.registry.test_lock:
            tx.mpesa_next_check_at = fields.Datetime.now() - timedelta(seconds=1)
            self.env['payment.transaction']._cron_mpesa_reconcile()
            self.env.invalidate_all()
        self.assertEqual((tx.state, tx.mpesa_receipt_number), ('done', False))
        body = self._c2b_body(tx.amount, '', phone='25470****149', hashed=False)
        body['TransactionType'] = "Buy Goods"
        body['TransTime'] = (fields.Datetime.now() + timedelta(hours=3)).strftime('%Y%m%d%H%M%S')  # Kenya time.
        response = self._post_c2b(body)
        self.assertEqual(response.json(), {'ResultCode': 0, 'ResultDesc': "Accepted"})
        row = self._row(body['TransID'])
        self.assertEqual(row.state, 'awaiting', "Pull has not listed it: nothing is placed yet")
        self._confirm_by_hand(row)
        self.assertEqual(row.state, 'unmatched', row.note)
        self.assertFalse(tx.mpesa_receipt_number, "another payer's receipt is not the prompt's")

    def test_a_confirmation_of_a_prompt_whose_outcome_is_unknown_waits_for_it(self):
        """A prompt whose push answer never came (timed out: 'error', outcome unknown) may still be
        paid: the C2B report of its money waits for it instead of paying the order a second time
        when the prompt's callback, late, settles it."""
        tx, _result = self._pay_from_portal(PHONE_CALLBACK_LOST)
        with self.registry.test_lock:
            tx.write({'state': 'error', 'mpesa_outcome_unknown': True})
            self.env.flush_all()
        body = self._c2b_body(tx.amount, daraja.account_reference(tx.reference), phone=PHONE_CALLBACK_LOST)
        body['TransTime'] = (fields.Datetime.now() + timedelta(hours=3)).strftime('%Y%m%d%H%M%S')  # Kenya time.
        self.assertEqual(reference_key(body['BillRefNumber']), reference_key(self.quotation.name))
        response = self._post_c2b(body)
        self.assertEqual(response.json(), {'ResultCode': 0, 'ResultDesc': "Accepted"})
        row = self._row(body['TransID'])
        self.assertEqual(row.state, 'awaiting', "Pull has not listed it: nothing is placed yet")
        self.assertFalse(row.transaction_ids)
        self._confirm_by_hand(row)
        self.assertEqual(row.state, 'unmatched', row.note)
        self.assertIn(tx.reference, row.note)
        self.assertFalse(row.transaction_ids, "not paid while the prompt may say it is its money")

    @mute_logger('odoo.addons.muchiri_mpesa.daraja.client', 'odoo.addons.muchiri_mpesa.models.payment_provider')
    def test_a_pull_cut_short_moves_the_window_only_past_what_it_read(self):
        """A Daraja that repeats a page (it ignores OffSetValue) cuts the run short: the window stops
        at the last payment read, an alert says so, and the next run reads what the first did not."""
        page_size = self.simulator.pull_page_size
        self.simulator.pull_page_size = 1
        self.addCleanup(setattr, self.simulator, 'pull_page_size', page_size)
        invoices = [self._invoice(1000 + step) for step in range(3)]
        self.env.flush_all()  # Odoo's requests read the database on cursors of their own.
        paid = []
        for hours, invoice in zip((3, 2, 1), invoices, strict=True):
            trans_id = self.simulator.c2b_pay(invoice.amount_total, LOST_CONFIRMATION, invoice.name)
            self.assertEqual(self.simulator.wait_for_c2b(trans_id)['state'], 'completed')
            self.simulator.age_transaction(trans_id, hours)
            paid.append(trans_id)
        self.simulator.pull_next(REPEAT_PAGE, count=2)  # the first page, then the first page again
        self._pull()
        self.assertEqual(self._row(paid[0]).state, 'matched')
        self.assertFalse(self._row(paid[1]) | self._row(paid[2]), "Daraja never listed them")
        synced = self.provider.mpesa_pull_synced_until
        read = self.simulator.payment(paid[0]).at.replace(tzinfo=None)
        self.assertLess(synced, fields.Datetime.now() - timedelta(hours=2), "not past what was read")
        self.assertAlmostEqual(synced, read, delta=timedelta(seconds=1))
        alert = self.env['muchiri.mpesa.alert'].search([
            ('kind', '=', 'pull_cut_short'), ('provider_id', '=', self.provider.id), ('state', '=', 'open')])
        self.assertEqual(len(alert), 1, "a run cut short says so")
        self.assertIn("cut short", alert.message)
        self.assertIn("ignored the offset", self.provider.mpesa_pull_cut_short)

        self._pull()  # Daraja pages again: the run goes on from where the last one stopped.
        self.assertEqual((self._row(paid[1]) | self._row(paid[2])).mapped('state'), ['matched', 'matched'])
        for invoice in invoices:
            self.assertIn(invoice.payment_state, ('paid', 'in_payment'))
        self.assertFalse(self.provider.mpesa_pull_cut_short)
        self.assertEqual(alert.state, 'closed')
        self.assertGreater(self.provider.mpesa_pull_synced_until, fields.Datetime.now() - timedelta(minutes=5))


    def test_a_pull_that_fails_says_so_and_keeps_its_window(self):
        """Daraja unavailable for a whole run: nothing read, the window stays, an alert says so
        (Daraja keeps 48 hours); the next run that reads its window closes it."""
        self._pull()
        synced = self.provider.mpesa_pull_synced_until
        self.assertTrue(synced)
        self.simulator.fail_next(error='unavailable', operations=('pull_query',))  # The run's first page.
        self._pull()
        self.assertEqual(self.provider.mpesa_pull_synced_until, synced, "nothing read, nothing skipped")
        self.assertIn("failed", self.provider.mpesa_pull_cut_short or '')
        alert = self.env['muchiri.mpesa.alert'].search([
            ('kind', '=', 'pull_cut_short'), ('provider_id', '=', self.provider.id), ('state', '=', 'open')])
        self.assertEqual(len(alert), 1, "a failing Pull is said, not only logged")
        self._pull()
        self.assertFalse(self.provider.mpesa_pull_cut_short)
        self.assertEqual(alert.state, 'closed')


@tagged('post_install', '-at_install')
class TestPullReversal(InitiatorCommon):
    """Pull lists money going out too: it is never booked as money in."""

    def setUp(self):
        super().setUp()
        self.provider.mpesa_pull_nominated_number = '0708374149'
        self.provider.action_mpesa_pull_register()

    def test_a_reversal_listed_by_pull_is_never_money_in(self):
        tx = self._paid()
        refund = self._refund_with_odoos_button(tx)
        self._wait_results()
        self.assertEqual(refund.state, 'done')
        reversal = refund.mpesa_receipt_number
        self.assertTrue(reversal)
        self.env.flush_all()
        # A payment whose confirmation was lost, in the same answer as the reversal (listed negative).
        trans_id = self.simulator.c2b_pay(700, LOST_CONFIRMATION, "NOTHING-42")
        self.assertEqual(self.simulator.wait_for_c2b(trans_id)['state'], 'completed')
        self.simulator.pull_next(WITH_REVERSALS, count=4)  # two runs of two queries (rows, then none)
        _run_pull(self)
        Ledger = self.env['muchiri.mpesa.ledger']
        self.assertFalse(Ledger.search([('name', '=', reversal)]), "a reversal is never money in")
        lost = Ledger.search([('name', '=', trans_id)])
        self.assertEqual((lost.sources, lost.amount), ('Pull', 700), "the rest of the answer is read")
        self.assertFalse(self.provider.mpesa_pull_cut_short)
        noted = tx.mpesa_ledger_id or tx._mpesa_documents()
        self.assertTrue(noted)
        self.assertIn(f"Pull Transactions lists {reversal}", ' '.join(noted.message_ids.mapped('body')),
                      "the reversal is shown beside the payment it reversed")
        _run_pull(self)  # Listed again (the windows overlap): said once.
        listed = f"Pull Transactions lists {reversal}"
        self.assertEqual(len(noted.message_ids.filtered(lambda m: listed in (m.body or ''))), 1)
