# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
import logging
from datetime import datetime, timedelta

from odoo.exceptions import UserError
from odoo.tests import tagged

from odoo.addons.muchiri_mpesa import const, daraja
from odoo.addons.muchiri_mpesa.controllers.main import _MaskCallbackSecret

from .common import CALLBACK_DELAY, PHONE_CALLBACK_LOST, PHONE_NO_ANSWER, MpesaCommon


@tagged('post_install', '-at_install')
class TestCallback(MpesaCommon):
    """Callbacks posted by hand to Odoo's HTTP server, for prompts the simulator really sent with
    its callback switched off (PHONE_CALLBACK_LOST): the query then tells the truth."""

    def _pending_tx(self, phone=PHONE_CALLBACK_LOST):
        tx, _result = self._pay_from_portal(phone)
        self.assertEqual(tx.state, 'pending')
        return tx

    def _settled_at_simulator(self, tx):
        self._wait(lambda: self._result_known(tx),
                   message="the simulator to know the result")

    def _success_body(self, tx, amount=4500, receipt='SIM1234567', checkout_request_id=None):
        return daraja.stk_callback_body(
            tx.mpesa_merchant_request_id or '1-2-3', checkout_request_id or tx.provider_reference,
            0, "The service request is processed successfully.",
            amount=amount, receipt=receipt, transaction_date=datetime(2026, 11, 26, 12, 0, 0),
            phone=tx.mpesa_phone,
        )

    def test_accepted_answer_is_dajara_shaped(self):
        tx = self._pending_tx()
        self._settled_at_simulator(tx)
        response = self._post_callback(self._success_body(tx))
        self.assertEqual(response.status_code, 200)
        self.assertEqual(response.json(), {'ResultCode': 0, 'ResultDesc': 'Accepted'})
        self.env.invalidate_all()
        self.assertEqual(tx.state, 'done')
        self.assertEqual(tx.mpesa_receipt_number, 'SIM1234567')

    def test_old_callback_path_still_settles_prompts_in_flight(self):
        """Prompts sent before the neutral prefix named the first path as their CallBackURL."""
        tx = self._pending_tx()
        self._settled_at_simulator(tx)
        response = self._post_callback(self._success_body(tx), route=const.CALLBACK_ROUTE)
        self.assertEqual(response.status_code, 200)
        self.env.invalidate_all()
        self.assertEqual(tx.state, 'done')

    def test_daraja_urls_hold_no_word_daraja_refuses(self):
        """Every URL handed to Daraja, and the push's CallBackURL the simulator really received."""
        banned = ('mpesa', 'm-pesa', 'safaricom', 'exe', 'exec', 'cmd', 'sql', 'query')
        base = self.provider._mpesa_callback_base_url()
        for name in const.LNM_ROUTES:
            path = self.provider._mpesa_daraja_url(name).removeprefix(base).lower()
            self.assertTrue(path.startswith(const.LNM_PREFIX + '/'), path)
            self.assertFalse([word for word in banned if word in path], path)
        tx = self._pending_tx()
        sent = self.simulator.transaction(tx.provider_reference).callback_url
        self.assertEqual(sent, self.provider._mpesa_daraja_url('stk'))

    def test_access_log_masks_the_secret_of_every_inbound_path(self):
        secret = self.provider.mpesa_callback_secret
        paths = [self.provider._mpesa_daraja_url(name) for name in const.LNM_ROUTES]
        paths.append(f'/payment/mpesa/callback/{secret}')
        for path in paths:
            record = logging.LogRecord('werkzeug', logging.INFO, __file__, 1, '%s - "%s" %s',
                                       ('127.0.0.1', f'POST {path} HTTP/1.1', '200'), None)
            _MaskCallbackSecret().filter(record)
            self.assertNotIn(secret, record.getMessage())
            self.assertIn('/***', record.getMessage())

    def test_wrong_secret_changes_nothing(self):
        tx = self._pending_tx()
        self._settled_at_simulator(tx)
        events_before = self.env['muchiri.mpesa.event'].search_count([])
        response = self._post_callback(self._success_body(tx), secret='guessed-secret')
        self.assertEqual(response.status_code, 404)
        self.env.invalidate_all()
        self.assertEqual(tx.state, 'pending')
        self.assertEqual(self.env['muchiri.mpesa.event'].search_count([]), events_before)

    def test_short_amount_is_refused(self):
        tx = self._pending_tx()
        self._settled_at_simulator(tx)
        response = self._post_callback(self._success_body(tx, amount=1))
        self.assertEqual(response.status_code, 200, "Daraja is still acknowledged")
        self.env.invalidate_all()
        event = self._events(kind='stk_callback', transaction_id=tx.id)
        self.assertEqual(event.state, 'rejected')
        self.assertIn(tx._mpesa_format_amount(1), event.message)
        # Daraja's own answer says the prompt was paid: the amount asked, not the callback's.
        self.assertEqual(tx.state, 'done')
        self.assertEqual(tx.mpesa_settled_by, 'query')
        self.assertEqual(tx.mpesa_paid_amount, 4500)
        self.assertFalse(tx.mpesa_receipt_number, "the lying callback's receipt is not taken")
        self.assertEqual(tx.mpesa_receipt_status, 'pending')

    def test_success_without_receipt_is_refused(self):
        tx = self._pending_tx()
        self._settled_at_simulator(tx)
        self._post_callback(self._success_body(tx, receipt=None))
        self.env.invalidate_all()
        event = self._events(kind='stk_callback', transaction_id=tx.id)
        self.assertEqual(event.state, 'rejected')
        self.assertIn('without a receipt', event.message)
        self.assertEqual((tx.state, tx.mpesa_settled_by), ('done', 'query'), "Daraja's own answer settles it")

    def test_reused_receipt_is_refused(self):
        paid = self._pending_tx()
        self._settled_at_simulator(paid)
        self._post_callback(self._success_body(paid, receipt='REUSED0001'))
        self.env.invalidate_all()
        self.assertEqual(paid.state, 'done')

        other_order = self.quotation.copy()
        values = self._start_portal_payment(other_order)
        self._stk_push(values, '254700000005')
        tx = self._get_tx(values['reference'])
        self._settled_at_simulator(tx)
        self._post_callback(self._success_body(tx, receipt='REUSED0001'))
        self.env.invalidate_all()
        self.assertEqual(self._events(kind='stk_callback', transaction_id=tx.id).state, 'rejected')
        self.assertNotEqual(tx.mpesa_receipt_number, 'REUSED0001')
        self.assertEqual(paid.mpesa_receipt_number, 'REUSED0001')

    def test_success_not_confirmed_by_the_query_is_refused(self):
        tx = self._pending_tx(PHONE_NO_ANSWER)
        self._wait(lambda: self._result_known(tx), message="timeout")
        # Keep the simulator's own 1037 callback from settling it first.
        self._post_callback(self._success_body(tx, receipt='FORGED0001'))
        self._wait_callbacks(tx)
        self.assertNotEqual(tx.state, 'done')
        self.assertFalse(tx.mpesa_receipt_number)
        forged = self._events(kind='stk_callback', receipt_number='FORGED0001')
        self.assertIn(forged.state, ('rejected', 'ignored'))

    def test_success_while_daraja_still_processing_waits(self):
        self.patch(self.simulator.settings, 'callback_delay', 60)  # The customer has not answered: "being processed".
        tx = self._pending_tx()
        self._post_callback(self._success_body(tx))
        self.env.invalidate_all()
        self.assertEqual(tx.state, 'pending')
        event = self._events(kind='stk_callback', transaction_id=tx.id)
        self.assertEqual(event.state, 'queued', "kept for the settlement job to try again")
        self.assertTrue(event.next_attempt_at)

    def test_unknown_checkout_request_is_kept_then_matched(self):
        tx = self._pending_tx()
        self._settled_at_simulator(tx)
        real_id = tx.provider_reference
        tx.provider_reference = 'ws_CO_not_yet_known'  # As if the push answer were not committed.
        self._post_callback(self._success_body(tx, checkout_request_id=real_id))
        event = self._events(kind='stk_callback', checkout_request_id=real_id)
        self.assertEqual(event.state, 'unmatched')
        self.env.invalidate_all()
        self.assertEqual(tx.state, 'pending')

        tx.provider_reference = real_id
        self.env['muchiri.mpesa.event']._mpesa_wake_unmatched(self.provider, real_id)  # As the push's answer does.
        self._settle_callbacks()
        self.assertEqual(tx.state, 'done')
        self.assertEqual(event.state, 'processed')

    def test_malformed_bodies_get_400_and_change_nothing(self):
        tx = self._pending_tx()
        for raw in ('not json', '[]', '{}', '{"Body": {}}',
                    '{"Body": {"stkCallback": {"ResultCode": 0}}}'):
            response = self._post_callback(None, raw=raw)
            self.assertEqual(response.status_code, 400, raw)
        self.env.invalidate_all()
        self.assertEqual(tx.state, 'pending')
        self.assertEqual(set(self._events(kind='stk_callback').mapped('state')), {'rejected'})

    def test_enforced_source_check_refuses_unknown_addresses(self):
        tx = self._pending_tx()
        self._settled_at_simulator(tx)
        self.provider.mpesa_ip_check = 'enforce'
        response = self._post_callback(self._success_body(tx))
        self.assertEqual(response.status_code, 403)
        self.env.invalidate_all()
        self.assertEqual(tx.state, 'pending')
        self.provider.mpesa_allowed_ips = '127.0.0.0/8'
        response = self._post_callback(self._success_body(tx))
        self.assertEqual(response.status_code, 200)
        self.env.invalidate_all()
        self.assertEqual(tx.state, 'done')

    def test_second_receipt_for_one_prompt_is_not_trusted(self):
        tx = self._pending_tx()
        self._settled_at_simulator(tx)
        self._post_callback(self._success_body(tx, receipt='FIRST00001'))
        self._post_callback(self._success_body(tx, receipt='SECOND0001'))
        self.env.invalidate_all()
        self.assertEqual(tx.mpesa_receipt_number, 'FIRST00001')
        second = self._events(kind='stk_callback', receipt_number='SECOND0001')
        self.assertEqual(second.state, 'conflict', "kept for an accountant, never taken")
        self.assertFalse(self.quotation.mpesa_needs_refund, "Daraja sends one receipt per prompt")

    def test_new_prompt_waits_for_the_previous_one(self):
        first = self._pending_tx()
        values = self._start_portal_payment()
        self.assertIn('already sent', self._stk_push_refusal(values, PHONE_CALLBACK_LOST))
        # Past the cooldown, Daraja is asked about the first prompt: paid, so no second one.
        self._settled_at_simulator(first)
        first.mpesa_push_sent_at = first.mpesa_push_sent_at - timedelta(minutes=10)
        values = self._start_portal_payment()  # The distributor's next try.
        self.assertIn('already paid', self._stk_push_refusal(values, PHONE_CALLBACK_LOST))
        self.assertEqual(len(self.simulator.pushes), 1)
        self.assertEqual(len(self.simulator.requests_for('stk_query')), 1, "the first was asked about")

    def test_late_payment_of_an_abandoned_prompt_is_flagged_for_refund(self):
        self.patch(self.simulator.settings, 'callback_delay', 2)  # The first customer takes their time.
        first = self._pending_tx()
        # The cron gave up on it (cut-off), and the order was paid by a second prompt.
        first.write({'mpesa_push_sent_at': first.mpesa_push_sent_at - timedelta(hours=25),
                     'mpesa_next_check_at': first.mpesa_push_sent_at - timedelta(hours=25)})
        with self.registry.test_lock:
            self.env['payment.transaction']._cron_mpesa_reconcile()
        self.assertEqual(first.state, 'error')
        self.simulator.callback_delay = CALLBACK_DELAY
        second = self._pending_tx('254708374149')
        self._wait_callbacks(second)
        self.assertEqual(second.state, 'done')
        self.assertFalse(self.quotation.mpesa_needs_refund)
        # Then the first customer pays after all: recorded, never hidden, flagged for refund.
        self._wait(lambda: self._result_known(first), message="the late answer")
        self._post_callback(self._success_body(first, receipt='LATE000001'))
        self.env.invalidate_all()
        self.assertEqual(first.state, 'done')
        self.assertTrue(self.quotation.mpesa_needs_refund)
        self.assertTrue(self.quotation.activity_ids)

    def test_forged_failure_does_not_cancel_a_paid_prompt(self):
        tx = self._pending_tx()
        self._settled_at_simulator(tx)  # Daraja's query says: paid.
        body = daraja.stk_callback_body(
            tx.mpesa_merchant_request_id, tx.provider_reference, 1032, "Request cancelled by user",
        )
        self._post_callback(body)
        self.env.invalidate_all()
        self.assertEqual(tx.state, 'done', "Daraja's own answer wins over the forged callback")
        self.assertEqual(tx.mpesa_settled_by, 'query')
        self.assertEqual(self._events(kind='stk_callback', transaction_id=tx.id).state, 'rejected')

    def test_payment_of_a_lost_push_answer_is_matched_by_hand(self):
        tx = self._pending_tx()
        self._settled_at_simulator(tx)
        # Daraja took the push, but its answer was never read (a timeout): no CheckoutRequestID to
        # match, in the transaction or in the exchange log.
        checkout_id = tx.provider_reference
        tx.write({'provider_reference': False, 'state': 'error', 'mpesa_outcome_unknown': True})
        self._events(kind='stk_push', transaction_id=tx.id).sudo().write({'checkout_request_id': False})
        self._post_callback(self._success_body(tx, checkout_request_id=checkout_id))
        event = self._events(kind='stk_callback', checkout_request_id=checkout_id)
        self.assertEqual(event.state, 'unmatched')
        Match = self.env['muchiri.mpesa.callback.match'].with_context(active_id=event.id)

        other = tx.copy({'reference': 'OTHER-1', 'mpesa_requested_amount': 100,
                         'mpesa_outcome_unknown': True, 'state': 'error'})
        with self.assertRaises(UserError, msg="a payment of KES 4,500 is not a KES 100 prompt's"):
            Match.create({'transaction_id': other.id}).action_match()
        self.assertFalse(other.provider_reference)
        self.assertEqual(event.state, 'unmatched')

        Match.create({'transaction_id': tx.id}).action_match()
        self.assertEqual(tx.state, 'done', "confirmed by Daraja's query, then settled")
        self.assertEqual(tx.provider_reference, checkout_id)
        self.assertEqual(tx.mpesa_receipt_number, 'SIM1234567')
        self.assertFalse(tx.mpesa_outcome_unknown)
        self.assertEqual(event.state, 'processed')
