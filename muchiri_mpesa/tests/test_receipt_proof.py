# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""Receipts recorded after the fact are proven by M-Pesa's Transaction Status, or visibly not.
A late receipt, a payment matched by hand, a receipt M-Pesa contradicts."""
from odoo.tests import tagged

from .common import PHONE_CALLBACK_LOST
from .test_money_safety import MoneySafetyCommon
from .test_refund import InitiatorCommon


class ReceiptProofCommon(InitiatorCommon, MoneySafetyCommon):

    def _settled_by_query(self):
        """A payment settled by STK Query: done, its receipt pending (the query carries none)."""
        tx = self._pending_tx(PHONE_CALLBACK_LOST)
        self._answered(tx)
        with self.registry.test_lock:
            tx._mpesa_settle_by_query()
        self.assertEqual((tx.state, tx.mpesa_receipt_status), ('done', 'pending'))
        return tx

    def _real_receipt(self, tx):
        return self.simulator.transaction(tx.provider_reference).receipt

    def _statuses(self):
        return self._initiator_requests('transaction_status')


@tagged('post_install', '-at_install')
class TestReceiptProof(ReceiptProofCommon):

    def test_a_late_receipt_is_verified_by_transaction_status(self):
        tx = self._settled_by_query()
        receipt = self._real_receipt(tx)
        self._post_callback(self._body(tx, receipt=receipt))
        self.assertEqual((tx.mpesa_receipt_number, tx.mpesa_receipt_status), (receipt, 'unverified'))
        self.assertFalse(self._statuses(), "not asked by the callback's settlement: by the initiator job")
        self.assertIn('being asked', tx.mpesa_receipt_proof_note)
        self.assertEqual(self.quotation.mpesa_receipt_unverified, 'unverified', "visible on the order")
        self._run_initiator_job()
        [status] = self._statuses()
        self.assertEqual(status['TransactionID'], receipt)
        self._wait_results()
        self.assertEqual(tx.mpesa_receipt_status, 'confirmed')
        self.assertIn('Confirmed by', tx.mpesa_receipt_proof)
        self.assertFalse(tx.mpesa_status_next_at)
        self.assertFalse(self.quotation.mpesa_receipt_unverified)

    def test_a_receipt_mpesa_does_not_know_is_a_conflict_for_accountants(self):
        tx = self._settled_by_query()
        self._post_callback(self._body(tx, receipt='FORGED0001'))
        self._run_initiator_job()
        self._wait_results()
        self.assertEqual(tx.mpesa_receipt_status, 'conflict')
        self.assertEqual(tx.mpesa_receipt_number, 'FORGED0001', "kept as it came, never replaced")
        self.assertIn('does not know', tx.mpesa_receipt_proof)
        alert = self.env['muchiri.mpesa.alert'].search([('kind', '=', 'receipt_conflict'), ('state', '=', 'open')])
        self.assertEqual(alert.transaction_ids, tx, "raised at once")
        self.assertEqual(self.quotation.mpesa_receipt_unverified, 'conflict')
        self.env['muchiri.mpesa.alert']._cron_check_alerts()
        self.assertEqual(alert.state, 'open', "the monitoring keeps it open while unresolved")

    def test_a_receipt_of_another_payment_is_a_conflict(self):
        other = self._paid(self.quotation.copy({'order_line': [(0, 0, {
            'product_id': self.product.id, 'product_uom_qty': 1, 'price_unit': 100.0, 'tax_id': [(5,)],
        })]}))
        tx = self._settled_by_query()
        self._post_callback(self._body(tx, receipt=other.mpesa_receipt_number))
        self.assertEqual(tx.mpesa_receipt_status, 'pending', "refused: that receipt belongs to another payment")
        # The same receipt, unknown to Odoo yet (another shop's payment to this shortcode, say).
        receipt = other.mpesa_receipt_number
        other.mpesa_receipt_number = False
        self._post_callback(self._body(tx, receipt=receipt))
        self.assertEqual(tx.mpesa_receipt_status, 'unverified')
        self._run_initiator_job()
        self._wait_results()
        self.assertEqual(tx.mpesa_receipt_status, 'conflict')
        self.assertIn('amount', tx.mpesa_receipt_proof)

    def test_without_an_initiator_the_receipt_stays_visibly_unverified(self):
        self.provider.mpesa_initiator_name = False
        tx = self._settled_by_query()
        self._post_callback(self._body(tx, receipt=self._real_receipt(tx)))
        self._run_initiator_job()
        self.assertFalse(self._statuses())
        self.assertEqual(tx.mpesa_receipt_status, 'unverified')
        self.assertIn('no initiator', tx.mpesa_receipt_proof_note)
        # Once the initiator is set up, the waiting receipts are asked about.
        self.provider.mpesa_initiator_name = self.simulator.initiator_name
        self._run_initiator_job()
        self._wait_results()
        self.assertEqual(tx.mpesa_receipt_status, 'confirmed')

    def test_a_payment_matched_by_hand_is_verified(self):
        tx = self._pending_tx(PHONE_CALLBACK_LOST)
        self._answered(tx)
        receipt = self._real_receipt(tx)
        event = self._kept_unmatched(tx, receipt=receipt)
        tx.write({'provider_reference': False, 'state': 'error', 'mpesa_outcome_unknown': True})
        with self.registry.test_lock:
            self.env['muchiri.mpesa.callback.match'].with_context(active_id=event.id).create({
                'transaction_id': tx.id,
            }).action_match()
        self.assertEqual((tx.state, tx.mpesa_receipt_status), ('done', 'unverified'))
        self._run_initiator_job()
        self._wait_results()
        self.assertEqual(tx.mpesa_receipt_status, 'confirmed')

    def test_a_lost_status_result_is_asked_again_then_left_to_a_person(self):
        tx = self._settled_by_query()
        self._post_callback(self._body(tx, receipt=self._real_receipt(tx)))
        self.simulator.initiator_next('no_result', count=10)
        for _i in range(8):
            self._run_initiator_job()
            tx.mpesa_status_next_at = tx.mpesa_status_next_at and tx.mpesa_status_next_at.replace(year=2000)
        self.assertEqual(len(self._statuses()), 6, "at most INITIATOR_MAX_CHECKS queries")
        self.assertFalse(tx.mpesa_status_next_at)
        self.assertEqual(tx.mpesa_receipt_status, 'unverified')
