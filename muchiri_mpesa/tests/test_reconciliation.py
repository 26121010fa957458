# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from datetime import timedelta

from odoo import fields
from odoo.tests import tagged

from odoo.addons.muchiri_mpesa import const, daraja

from .common import PHONE_CALLBACK_LOST, PHONE_SUCCESS, MpesaCommon


@tagged('post_install', '-at_install')
class TestReconciliation(MpesaCommon):
    """The cron settles what callbacks do not, by STK Query against the simulator."""

    def _lost_callback_tx(self, phone=PHONE_CALLBACK_LOST, order=None):
        values = self._start_portal_payment(order)
        self._stk_push(values, phone)
        tx = self._get_tx(values['reference'])
        if phone == PHONE_CALLBACK_LOST:
            self.assertEqual(tx.state, 'pending')
        return tx

    def _make_due(self, *txs, age=timedelta(seconds=40)):
        now = fields.Datetime.now()
        for tx in txs:
            tx.write({'mpesa_push_sent_at': now - age, 'mpesa_next_check_at': now - timedelta(seconds=1)})

    def _two_answered_lost_callback_txs(self):
        """Two orders paid from the same phone: Daraja locks a phone while its prompt is open."""
        first = self._lost_callback_tx()
        self._wait(lambda: self._result_known(first), message="the first answer")
        second = self._lost_callback_tx(order=self.quotation.copy())
        self._wait(lambda: self._result_known(second), message="the second answer")
        return first, second

    def _queries(self):
        return len(self.simulator.requests_for('stk_query'))

    def _cron(self):
        with self.registry.test_lock:  # Callbacks may reach Odoo's test server meanwhile.
            checked = self.env['payment.transaction']._cron_mpesa_reconcile()
            self.env.flush_all()
        return checked

    def test_first_check_is_scheduled_after_the_push(self):
        tx = self._lost_callback_tx()
        delay = (tx.mpesa_next_check_at - tx.mpesa_push_sent_at).total_seconds()
        self.assertEqual(delay, const.RECONCILE_FIRST_CHECK)
        self.assertEqual(self._cron(), 0, "not due yet")
        self.assertEqual(self._queries(), 0)

    def test_lost_callback_is_recovered_by_the_cron(self):
        tx = self._lost_callback_tx()
        self._wait(lambda: self._result_known(tx), message="the customer's answer")
        self._make_due(tx)
        self.assertEqual(self._cron(), 1)
        self.assertEqual(self._queries(), 1, "exactly one query per due transaction")
        self.assertEqual(tx.state, 'done')
        self.assertEqual(tx.mpesa_settled_by, 'query')
        self.assertFalse(tx.mpesa_next_check_at)
        tx._post_process()
        self.assertEqual(self.quotation.state, 'sale')
        self.assertEqual(self._cron(), 0, "a settled transaction is not queried again")
        self.assertEqual(self._queries(), 1)

    def test_being_processed_stays_pending_on_a_back_off_schedule(self):
        self.patch(self.simulator.settings, 'callback_delay', 3600)  # The customer never answers during the test.
        tx = self._lost_callback_tx()
        self._make_due(tx)
        self._cron()
        self.assertEqual(tx.state, 'pending')
        self.assertEqual(tx.mpesa_check_count, 1)
        delay = (tx.mpesa_next_check_at - fields.Datetime.now()).total_seconds()
        self.assertAlmostEqual(delay, const.RECONCILE_FAST_INTERVAL, delta=5)

        self._make_due(tx, age=timedelta(minutes=6))
        self._cron()
        delay = (tx.mpesa_next_check_at - fields.Datetime.now()).total_seconds()
        self.assertAlmostEqual(delay, const.RECONCILE_SLOW_INTERVAL, delta=5)
        self.assertEqual(tx.state, 'pending')

    def test_cutoff_ends_in_error_and_a_late_success_still_wins(self):
        self.patch(self.simulator.settings, 'callback_delay', 2)  # Still "being processed" when the cron gives up.
        tx = self._lost_callback_tx()
        self._make_due(tx, age=timedelta(hours=25))
        self._cron()
        self.assertEqual(tx.state, 'error')
        self.assertIn('24 hours', tx.state_message)
        self.assertFalse(tx.mpesa_next_check_at)
        self.assertEqual(self._cron(), 0, "an error is not queried by the cron")

        # The customer paid after all: the callback, confirmed by the query, settles it.
        self._wait(lambda: self._result_known(tx), message="the late answer")
        response = self._post_callback(self._success_body(tx))
        self.assertEqual(response.status_code, 200)
        self._wait(lambda: tx.state == 'done', message="the late success")
        self.assertEqual(tx.mpesa_receipt_number, 'LATE000001')

    def _success_body(self, tx, checkout_request_id=None):
        return daraja.stk_callback_body(
            tx.mpesa_merchant_request_id, checkout_request_id or tx.provider_reference, 0, "Success",
            amount=tx.mpesa_requested_amount, receipt='LATE000001', phone=tx.mpesa_phone,
        )

    def test_spike_arrest_stops_the_run_and_backs_off(self):
        first, second = self._two_answered_lost_callback_txs()
        self._make_due(first, second)
        self.simulator.fail_next(1, 'spike_arrest', operations=['stk_query'])
        self._cron()
        self.assertEqual(self._queries(), 1, "the run stopped at the spike arrest")
        self.assertEqual((first | second).mapped('state'), ['pending', 'pending'])
        throttled = (first | second).filtered(lambda tx: tx.mpesa_check_count)
        delay = (throttled.mpesa_next_check_at - fields.Datetime.now()).total_seconds()
        self.assertAlmostEqual(delay, const.RECONCILE_THROTTLE_DELAY, delta=5)

        self._make_due(first, second)
        self._cron()
        self.assertEqual((first | second).mapped('state'), ['done', 'done'])

    def test_one_failing_query_does_not_block_the_rest(self):
        broken, good = self._two_answered_lost_callback_txs()
        broken.provider_reference = 'ws_CO_unknown_to_daraja'  # Daraja answers 400 for it.
        self._make_due(broken, good)
        self._cron()
        self.assertEqual(good.state, 'done')
        self.assertEqual(broken.state, 'pending')
        self.assertGreater(broken.mpesa_next_check_at, fields.Datetime.now())

    def test_kept_callback_is_matched_by_the_cron(self):
        tx = self._lost_callback_tx()
        self._wait(lambda: self._result_known(tx), message="the answer")
        real_id = tx.provider_reference
        tx.provider_reference = 'ws_CO_not_committed_yet'  # As if the push answer were not saved.
        self._post_callback(self._success_body(tx, checkout_request_id=real_id))
        kept = self._events(kind='stk_callback', checkout_request_id=real_id)
        self.assertEqual(kept.state, 'unmatched')
        tx.provider_reference = real_id
        self._make_due(tx)
        self._cron()  # The scheduled query settles it; the kept callback waits for that.
        self.assertEqual(tx.state, 'done')
        self.assertEqual(self._queries(), 1)
        # The kept callback, due again (its back-off, or the push's answer, wakes it), brings its
        # receipt without another query; nothing Daraja said proves that receipt yet.
        kept.sudo().next_attempt_at = fields.Datetime.now() - timedelta(seconds=1)
        self._settle_callbacks()
        self.assertEqual(self._queries(), 1)
        self.assertEqual(tx.mpesa_receipt_number, 'LATE000001')
        self.assertEqual(tx.mpesa_receipt_status, 'unverified')
        self.assertEqual(kept.state, 'processed')

    def test_callback_and_cron_racing_settle_once(self):
        """The simulator's callback arrives while the cron holds the transaction: Odoo's test
        server serializes them as the row lock does between workers; whichever is second finds a
        final transaction and changes nothing."""
        tx = self._lost_callback_tx(PHONE_SUCCESS)
        self._wait(lambda: self._result_known(tx), message="the answer")
        self._make_due(tx)
        self._cron()  # The callback waits for the lock meanwhile (or came just before).
        self._wait_callbacks(tx)
        self.assertEqual(tx.state, 'done')
        callback = self._events(kind='stk_callback', transaction_id=tx.id)
        self.assertEqual(len(callback), 1)
        self.assertEqual(callback.state, 'processed', "it settled it, or brought its receipt")
        self.assertTrue(tx.mpesa_receipt_number)
        tx._post_process()
        self.assertEqual(len(self.quotation.transaction_ids.payment_id), 1)
