# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""The distributor's side: paying from the portal, the payment status page, and the tour in a browser.
"""
from datetime import timedelta
from unittest.mock import patch

from odoo import fields
from odoo.tests import JsonRpcException, tagged
from odoo.tools import mute_logger

from .common import (
    PHONE_CALLBACK_EARLY,
    PHONE_CALLBACK_LATE,
    PHONE_CALLBACK_LOST,
    PHONE_CALLBACK_TWICE,
    PHONE_CANCELLED,
    PHONE_LOCKED,
    PHONE_NO_ANSWER,
    PHONE_NO_FUNDS,
    PHONE_SUCCESS,
    PHONE_WRONG_PIN,
    DarajaDuringToursMixin,
    MpesaCommon,
)


@tagged('post_install', '-at_install')
class TestPortalPayment(MpesaCommon):

    def _assert_paid(self, tx, by='callback'):
        self.assertEqual(tx.state, 'done')
        self.assertEqual(tx.mpesa_settled_by, by)
        if by == 'callback':
            self.assertTrue(tx.mpesa_receipt_number)
        self.assertEqual(tx.mpesa_paid_amount, 4500)
        tx._post_process()  # What /payment/status polling and Odoo's cron do.
        order = self.quotation
        self.assertEqual(order.state, 'sale', "a paid quotation is confirmed")
        self.assertEqual(order.mpesa_payment_status, 'paid')
        self.assertEqual(order.mpesa_receipt_number, tx.mpesa_receipt_number)
        self.assertTrue(tx.payment_id, "Odoo's post-processing creates the account.payment")
        self.assertEqual(tx.payment_id.amount, 4500)
        self.assertEqual(tx.payment_id.journal_id, self.provider.journal_id)

    def test_success_confirms_the_quotation_and_creates_the_payment(self):
        tx, result = self._pay_from_portal('0708 374 149')
        self.assertEqual(result, {})
        self.assertEqual(tx.state, 'pending')
        self.assertTrue(tx.provider_reference.startswith('ws_CO_'))
        self.assertEqual(tx.mpesa_phone, PHONE_SUCCESS)
        self.assertEqual(self.quotation.mpesa_payment_status, 'pending')
        self._wait_final(tx)
        self._assert_paid(tx)
        self.assertIn(tx.mpesa_receipt_number, tx.state_message, "the status page shows the receipt")
        callbacks = self._events(kind='stk_callback', transaction_id=tx.id)
        self.assertEqual(callbacks.mapped('state'), ['processed'])
        mine = self.env['mail.mail'].search([('model', '=', 'payment.transaction'), ('res_id', '=', tx.id)])
        self.assertFalse(mine, "Odoo's own order confirmation is the one mail of a success")

    def _assert_failed(self, phone, state, message_part):
        tx, _result = self._pay_from_portal(phone)
        self.assertEqual(tx.state, 'pending')
        self._wait_final(tx)
        self.assertEqual(tx.state, state)
        self.assertIn(message_part, tx.state_message)
        self.assertEqual(self.quotation.state, 'draft')
        self.assertEqual(self.quotation.mpesa_payment_status, 'cancelled' if state == 'cancel' else 'failed')
        self.assertFalse(tx.mpesa_receipt_number)
        mail = self.quotation.message_ids.filtered(
            lambda m: self.distributor in m.partner_ids and 'not completed' in (m.body or ''))
        self.assertEqual(len(mail), 1, "the failure mail, in the order's chatter")
        return tx

    def test_cancelled_by_the_user(self):
        tx = self._assert_failed(PHONE_CANCELLED, 'cancel', 'cancel')
        self.assertEqual(tx.mpesa_result_code, '1032')

    def test_no_answer(self):
        tx = self._assert_failed(PHONE_NO_ANSWER, 'error', '')
        self.assertEqual(tx.mpesa_result_code, '1037')

    def test_insufficient_funds(self):
        self.assertEqual(self._assert_failed(PHONE_NO_FUNDS, 'error', '').mpesa_result_code, '1')

    def test_wrong_pin(self):
        self.assertEqual(self._assert_failed(PHONE_WRONG_PIN, 'error', '').mpesa_result_code, '2001')

    def test_retry_after_a_cancelled_payment(self):
        self._assert_failed(PHONE_CANCELLED, 'cancel', 'cancel')
        tx, result = self._pay_from_portal(PHONE_SUCCESS)
        self.assertEqual(result, {})
        self._wait_final(tx)
        self._assert_paid(tx)

    def test_callback_sent_twice_is_counted_once(self):
        tx, _result = self._pay_from_portal(PHONE_CALLBACK_TWICE)
        self._wait_final(tx, callbacks=2)
        self._assert_paid(tx)
        states = sorted(self._events(kind='stk_callback', transaction_id=tx.id).mapped('state'))
        self.assertEqual(states, ['ignored', 'processed'])
        self.assertEqual(len(self.quotation.transaction_ids.payment_id), 1)

    def test_lost_callback_is_recovered_by_the_query(self):
        tx, _result = self._pay_from_portal(PHONE_CALLBACK_LOST)
        self._wait(lambda: self._result_known(tx),
                   message="the simulator to know the result")
        self.assertEqual(tx.state, 'pending', "no callback came")
        tx._mpesa_settle_by_query()
        self._assert_paid(tx, by='query')

    def test_query_before_the_late_callback(self):
        tx, _result = self._pay_from_portal(PHONE_CALLBACK_LATE)
        self._wait(lambda: self._result_known(tx),
                   message="the simulator to know the result")
        with self.registry.test_lock:  # The late callback may come in meanwhile.
            tx._mpesa_settle_by_query()
            self.env.flush_all()  # What the cron's commit does: the callback's request reads it.
        self.assertEqual(tx.state, 'done')
        self._wait_callbacks(tx)
        late = self._events(kind='stk_callback', transaction_id=tx.id)
        self.assertEqual(late.state, 'processed')
        self.assertEqual(tx.state, 'done')
        self.assertEqual(tx.mpesa_settled_by, 'query')
        self.assertEqual(tx.mpesa_receipt_number, late.receipt_number, "the late receipt is kept")
        self.assertFalse(self.quotation.mpesa_needs_refund, "one payment, not two")

    def test_callback_before_the_push_answer(self):
        """Odoo's test server handles one request at a time, so here the early callback waits for
        the push's request to end; with real workers it finds no transaction and waits in the
        inbox (test_callback.test_unknown_checkout_request_is_kept_then_matched)."""
        tx, _result = self._pay_from_portal(PHONE_CALLBACK_EARLY)
        self._wait(lambda: tx.state == 'done', message="the early callback")
        self._wait_callbacks(tx)
        self._assert_paid(tx)

    def test_subscriber_locked_leaves_nothing_pending(self):
        tx, result = self._pay_from_portal(PHONE_LOCKED)
        self.assertIn('already waiting', result['error'])
        self.assertEqual(tx.state, 'error')
        self.assertFalse(tx.provider_reference)
        self.assertEqual(self.quotation.state, 'draft')

    @mute_logger('odoo.http')
    def test_one_pending_prompt_per_order(self):
        tx, _result = self._pay_from_portal(PHONE_CALLBACK_LOST)
        self.assertEqual(tx.state, 'pending')
        values = self._start_portal_payment()
        self.assertIn('already sent', self._stk_push_refusal(values, PHONE_SUCCESS))
        refused = self._get_tx(values['reference'])
        self.assertEqual(refused.state, 'cancel', "a refused attempt is not left initiated forever")
        self.assertIn('already sent', refused.state_message)
        self.assertEqual(len(self.simulator.pushes), 1, "no second prompt reached Daraja")

    @mute_logger('odoo.http')
    def test_bad_phone_is_refused_before_anything_leaves(self):
        for phone in ('0812 345 678', '12345', '+255712345678', ''):
            values = self._start_portal_payment()  # Each try of the form is a transaction of its own.
            self.assertTrue(self._stk_push_refusal(values, phone))
            tx = self._get_tx(values['reference'])
            self.assertEqual(tx.state, 'cancel', phone)
            self.assertFalse(tx.mpesa_push_sent_at)
        self.assertEqual(len(self.simulator.pushes), 0)

    @mute_logger('odoo.http')
    def test_tampered_access_token_is_refused(self):
        values = self._start_portal_payment()
        values['mpesa_access_token'] = 'x' * 64
        with self.assertRaises(JsonRpcException):
            self._stk_push(values, PHONE_SUCCESS)
        self.assertEqual(len(self.simulator.pushes), 0)

    @mute_logger('odoo.http')
    def test_portal_user_cannot_pay_another_partners_order(self):
        other_order = self.quotation.copy({'partner_id': self.partner_a.id})
        self.authenticate('distributor', 'distributor')
        with self.assertRaises(JsonRpcException):
            self.make_jsonrpc_request(self._build_url(f'/my/orders/{other_order.id}/transaction'), {
                'provider_id': self.provider.id, 'payment_method_id': self.payment_method_id,
                'token_id': None, 'amount': other_order.amount_total, 'flow': 'direct',
                'tokenization_requested': False, 'landing_route': '/my',
                'access_token': 'not-the-token',
            })
        self.assertFalse(other_order.transaction_ids)

    def test_fraction_of_a_shilling_is_rounded_up_and_recorded(self):
        order = self.quotation.copy()
        order.order_line.price_unit = 1500.40  # 3 units: KES 4,501.20
        tx, result = self._pay_from_portal(PHONE_CALLBACK_LOST, order=order)
        self.assertEqual(result, {})
        self.assertEqual(self.simulator.pushes[-1].amount, 4502, "M-Pesa takes whole shillings, rounded up")
        self.assertEqual(tx.mpesa_requested_amount, 4502)
        self.assertEqual(tx.amount, 4502, "the transaction records what the phone is asked")


@tagged('post_install', '-at_install')
class TestPaymentStatusPage(MpesaCommon):
    """Odoo's payment status page, which the distributor's browser polls."""

    def test_the_status_page_settles_a_received_callback_at_once(self):
        """The cron worker may be busy with other jobs: the distributor's page does not wait for it."""
        values = self._start_portal_payment()
        self._stk_push(values, PHONE_CALLBACK_LOST)
        tx = self._get_tx(values['reference'])
        self._answered(tx)
        self._post_callback(self._body(tx), settle=False)
        self.assertEqual(tx.state, 'pending')
        status = self.make_jsonrpc_request(self._build_url('/payment/status/poll'), {})
        self.assertEqual(status['state'], 'done')
        self.env.invalidate_all()
        self.assertEqual(tx.mpesa_receipt_number, 'SIM1234567')
        self.assertEqual(self._queries(), 1)

    def test_the_status_page_waits_while_another_worker_confirms_the_order(self):
        values = self._start_portal_payment()
        self._stk_push(values, PHONE_CALLBACK_LOST)
        tx = self._get_tx(values['reference'])
        self._answered(tx)
        self._post_callback(self._body(tx), settle=False)
        with self.registry.test_lock:  # The settlement job only: paid, not post-processed yet.
            self.env['muchiri.mpesa.event'].sudo()._cron_mpesa_settle_callbacks()
        self.assertEqual((tx.state, tx.is_post_processed), ('done', False))
        poll = self._build_url('/payment/status/poll')
        # Odoo's job holds the transaction (`_post_process` leaves what another worker locked): one
        # shared test cursor cannot hold a second worker's lock, so its post-processing is left out here.
        with patch.object(type(self.env['payment.transaction']), '_post_process', lambda txs: None):
            self.assertEqual(self.make_jsonrpc_request(poll, {})['state'], 'pending',
                             "the page waits instead of landing on an order not confirmed yet")
        self.assertEqual(self.make_jsonrpc_request(poll, {})['state'], 'done')
        self.assertTrue(tx.is_post_processed)
        self.assertEqual(self.quotation.state, 'sale')

    def test_the_status_page_asks_about_a_late_callback_once_in_a_while(self):
        values = self._start_portal_payment()
        self._stk_push(values, PHONE_CALLBACK_LOST)
        tx = self._get_tx(values['reference'])
        self._answered(tx)
        tx.write({'mpesa_push_sent_at': fields.Datetime.now() - timedelta(seconds=10),
                  'mpesa_next_check_at': fields.Datetime.now() + timedelta(minutes=10)})
        poll = self._build_url('/payment/status/poll')
        self.assertEqual(self.make_jsonrpc_request(poll, {})['state'], 'pending', "young: its callback may come")
        self.assertEqual(self._queries(), 0)
        tx.write({'mpesa_push_sent_at': fields.Datetime.now() - timedelta(seconds=30),
                  'mpesa_last_check_at': fields.Datetime.now() - timedelta(seconds=2)})
        self.assertEqual(self.make_jsonrpc_request(poll, {})['state'], 'pending', "asked 2 s ago: not again")
        self.assertEqual(self._queries(), 0)
        tx.mpesa_last_check_at = fields.Datetime.now() - timedelta(seconds=15)
        self.assertEqual(self.make_jsonrpc_request(poll, {})['state'], 'done', "the late callback's answer")
        self.assertEqual(self._queries(), 1)
        self.assertEqual(tx.mpesa_settled_by, 'query')


@tagged('post_install', '-at_install')
class TestPortalTour(DarajaDuringToursMixin, MpesaCommon):
    """The distributor pays a quotation on the portal, in a real browser: the tours are in
    static/tests/tours/portal_payment_tour.js."""

    def _order_txs(self):
        self.env.invalidate_all()
        return self.quotation.transaction_ids.sudo()

    def test_portal_payment_success(self):
        with self._settling_in_background():
            self.start_tour('/web/login', 'muchiri_mpesa_portal_pay_success', timeout=90)

        txs = self._order_txs()
        self.assertEqual(len(txs), 1, "the refused phone number made no transaction")
        self.assertEqual(len(self.simulator.pushes), 1, "only one prompt reached Daraja")
        self.assertEqual(txs.state, 'done')
        self.assertEqual(txs.mpesa_phone, PHONE_SUCCESS)
        self.assertTrue(txs.mpesa_receipt_number)
        self.assertTrue(txs.is_post_processed, "the status page post-processed the transaction")
        order = self.quotation
        self.assertEqual(order.state, 'sale')
        self.assertEqual(order.mpesa_payment_status, 'paid')
        self.assertEqual(order.mpesa_receipt_number, txs.mpesa_receipt_number)
        self.assertEqual(txs.payment_id.amount, 4500)

    def test_portal_payment_cancelled(self):
        with self._settling_in_background():
            self.start_tour('/web/login', 'muchiri_mpesa_portal_pay_cancelled', timeout=90)

        txs = self._order_txs()
        self.assertEqual(len(txs), 1)
        self.assertEqual(txs.state, 'cancel')
        self.assertEqual(txs.mpesa_phone, PHONE_CANCELLED)
        self.assertEqual(txs.mpesa_result_code, '1032')
        self.assertFalse(txs.mpesa_receipt_number)
        order = self.quotation
        self.assertEqual(order.state, 'sent', "the order is still a quotation")
        self.assertEqual(order.mpesa_payment_status, 'cancelled', "a customer's cancellation, no failure")
        self.assertFalse(order.mpesa_receipt_number)

    def test_portal_form_tells_the_whole_shillings(self):
        self.quotation.order_line.price_unit = 1500.40  # 3 units: KES 4,501.20, the phone asks 4,502.
        self.start_tour('/web/login', 'muchiri_mpesa_portal_whole_shillings', timeout=90)
        self.assertFalse(self.quotation.transaction_ids, "only looked at: nothing was sent")
