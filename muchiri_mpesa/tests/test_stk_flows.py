# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""The STK Push flow, over real HTTP to the simulator and back: the prompt, its callback, the settlement
job that admits callbacks, the query that settles a prompt whose callback is lost, and the proof of
a receipt recorded after the fact.
"""
import json
import logging
from datetime import timedelta
from unittest.mock import patch

from odoo import fields
from odoo.exceptions import UserError
from odoo.fields import Command
from odoo.tests import tagged
from odoo.tools import mute_logger

from odoo.addons.muchiri_mpesa import const
from odoo.addons.muchiri_mpesa.controllers.main import _MaskCallbackSecret

from .common import (
    CALLBACK_DELAY,
    EVENT_LOGGER,
    PHONE_CALLBACK_LOST,
    PHONE_NO_ANSWER,
    PHONE_SUCCESS,
    TX_LOGGER,
    MpesaCommon,
    MpesaInitiatorCommon,
)


@tagged('post_install', '-at_install')
class TestStkPrompt(MpesaCommon):
    """A prompt whose sending failed, or whose answer from Daraja was lost."""

    def test_a_configuration_error_leaves_no_attempt_behind(self):
        values = self._start_portal_payment()
        tx = self._get_tx(values['reference'])
        # As on a copy of the database that neutralize.sql cleared: the secret is gone.
        self.env.cr.execute("UPDATE payment_provider SET mpesa_consumer_secret = NULL WHERE id = %s",
                            [self.provider.id])
        self.env.invalidate_all()
        with self.assertRaises(UserError):
            tx._mpesa_send_stk_push(PHONE_SUCCESS)
        self.assertEqual(tx.state, 'draft')
        self.assertFalse(tx.mpesa_push_sent_at, "no attempt: the push can still be sent once mended")
        self.assertFalse(tx.mpesa_outcome_unknown)

    def test_a_replayed_push_takes_the_answer_it_lost(self):
        values = self._start_portal_payment()
        self._stk_push(values, PHONE_CALLBACK_LOST)
        tx = self._get_tx(values['reference'])
        checkout_id = tx.provider_reference
        # The request's answer writes were lost (a serialization failure before the commit).
        tx.write({'state': 'draft', 'provider_reference': False, 'mpesa_merchant_request_id': False})
        self.assertIsNone(tx._mpesa_send_stk_push(PHONE_CALLBACK_LOST))
        self.assertEqual((tx.state, tx.provider_reference), ('pending', checkout_id))
        self.assertEqual(len(self.simulator.pushes), 1, "never a second prompt")

    def _push_answer_lost(self):
        """A prompt on the phone whose transaction lost Daraja's answer (its worker was killed
        between the two commits): only the exchange log holds the CheckoutRequestID."""
        values = self._start_portal_payment()
        self._stk_push(values, PHONE_CALLBACK_LOST)
        tx = self._get_tx(values['reference'])
        checkout_id = tx.provider_reference
        tx.write({'state': 'draft', 'provider_reference': False, 'mpesa_merchant_request_id': False})
        return tx, checkout_id

    def test_a_callback_finds_the_push_its_transaction_lost(self):
        tx, checkout_id = self._push_answer_lost()
        self._wait(lambda: self.simulator.transaction(checkout_id).is_final(), message="the answer", settle=False)
        self._post_callback(self._body(tx, checkout_request_id=checkout_id))
        self.assertEqual(tx.provider_reference, checkout_id)
        self.assertEqual(tx.state, 'done')
        self.assertEqual(self._events(kind='stk_callback', checkout_request_id=checkout_id).transaction_id, tx)

    def test_the_cron_takes_a_lost_push_answer_from_the_log(self):
        tx, checkout_id = self._push_answer_lost()
        tx.mpesa_push_sent_at -= timedelta(minutes=10)
        self.env['payment.transaction']._mpesa_expire_unanswered_pushes()
        self.assertEqual((tx.state, tx.provider_reference), ('pending', checkout_id))
        self.assertFalse(tx.mpesa_outcome_unknown, "Daraja's answer is known: no prompt of unknown outcome")


@tagged('post_install', '-at_install')
class TestCallback(MpesaCommon):
    """Callbacks posted by hand to Odoo's HTTP server, for prompts the simulator really sent with
    its callback switched off (PHONE_CALLBACK_LOST): the query then tells the truth."""

    def _settled_at_simulator(self, tx):
        self._wait(lambda: self._result_known(tx),
                   message="the simulator to know the result")

    def _success_body(self, tx, amount=4500, receipt='SIM1234567', checkout_request_id=None):
        return self._body(tx, amount=amount, receipt=receipt, checkout_request_id=checkout_request_id)

    def test_accepted_answer_is_dajara_shaped(self):
        tx = self._pending_tx()
        self._settled_at_simulator(tx)
        response = self._post_callback(self._success_body(tx))
        self.assertEqual(response.status_code, 200)
        self.assertEqual(response.json(), {'ResultCode': 0, 'ResultDesc': 'Accepted'})
        self.env.invalidate_all()
        self.assertEqual(tx.state, 'done')
        self.assertEqual(tx.mpesa_receipt_number, 'SIM1234567')

    def test_ledger_row_tells_its_story_in_one_message(self):
        """The receipt's row: reported, confirmed and paid in one message, with its tracked values
        (tracking on, as in Odoo's cron; the tests' environment turns it off)."""
        tx = self._pending_tx()
        self._settled_at_simulator(tx)
        self._post_callback(self._success_body(tx), settle=False)
        with self.registry.test_lock:
            self.env(context={})['muchiri.mpesa.event'].sudo()._cron_mpesa_settle_callbacks()
            self.env.flush_all()
            self.env.cr.flush()  # The tracking message is logged at commit.
            self.env.invalidate_all()
            row = tx.mpesa_ledger_id
            self.assertEqual((row.name, row.state, row.confirmation), ('SIM1234567', 'matched', 'stk'))
            self.assertEqual(len(row.message_ids), 1, "one message, not three posts and a tracking message")
            message = row.message_ids
            for said in ("Reported by STK.", "Confirmed: Reported by Daraja's STK.",
                         f"Paid by M-Pesa prompt {tx.reference} ({self.quotation.name})."):
                self.assertIn(said, message.body)
            moved = {value.field_id.name: value for value in message.sudo().tracking_value_ids}
            self.assertEqual(set(moved), {'state', 'confirmation', 'amount', 'partner_id'})
            self.assertEqual(moved['state'].new_value_char, "Matched")
            self.assertEqual(moved['confirmation'].new_value_char, "STK Query")
            self.assertEqual(moved['amount'].new_value_float, 4500)

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
        self._post_callback(self._stk_body(self.stk_cancelled_data, tx))
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

    @mute_logger(TX_LOGGER)
    def test_a_refund_flag_failure_never_undoes_a_payment(self):
        first = self._pending_tx()
        self._answered(first)
        self._post_callback(self._body(first, receipt='FIRST00001'))
        self.assertEqual(first.state, 'done')
        # A second prompt of the same order that Daraja confirms paid as well (a late customer).
        # Not the first one's payment: with Odoo's automatic invoice (demo data turns it on), that
        # one paid the order's invoice by now.
        late = first.copy({'reference': 'LATE-1', 'state': 'pending', 'provider_reference': 'ws_CO_late',
                           'mpesa_requested_amount': 4500, 'mpesa_push_sent_at': fields.Datetime.now(),
                           'sale_order_ids': [Command.set(self.quotation.ids)], 'payment_id': False})
        with patch.object(type(self.quotation), 'activity_schedule', side_effect=RuntimeError("activities down")), \
                mute_logger('odoo.addons.muchiri_mpesa.models.mpesa_payable'):
            late._handle_notification_data('mpesa', late._mpesa_notification('0', "Paid", 'query'))
        self.assertEqual(late.state, 'done', "the real payment stands")
        self.assertTrue(self.quotation.mpesa_needs_refund)

    def test_a_late_receipt_is_unverified_and_a_conflicting_one_raises_an_alert(self):
        tx = self._pending_tx()
        self._answered(tx)
        tx._mpesa_settle_by_query()
        self.assertEqual((tx.state, tx.mpesa_receipt_status), ('done', 'pending'))
        self._post_callback(self._body(tx, receipt='FIRST00001'))
        self.assertEqual(tx.mpesa_receipt_number, 'FIRST00001')
        self.assertEqual(tx.mpesa_receipt_status, 'unverified')
        self._post_callback(self._body(tx, receipt='SECOND0001'))
        self.assertEqual(tx.mpesa_receipt_number, 'FIRST00001', "never silently replaced")
        conflict = self._events(kind='stk_callback', receipt_number='SECOND0001')
        self.assertEqual(conflict.state, 'conflict', "kept, never dropped")
        self.env['muchiri.mpesa.alert']._cron_check_alerts()
        alert = self.env['muchiri.mpesa.alert'].search([('kind', '=', 'receipt_conflict')])
        self.assertEqual(alert.transaction_ids, tx)


@tagged('post_install', '-at_install')
class TestUnconfirmedCallbacks(MpesaCommon):

    def test_an_enabled_provider_always_confirms(self):
        enabled = self.provider.new({'code': 'mpesa', 'state': 'enabled', 'mpesa_confirm_by_query': False})
        self.assertTrue(enabled._mpesa_confirms_callbacks())
        testing = self.provider.new({'code': 'mpesa', 'state': 'test', 'mpesa_confirm_by_query': False})
        self.assertFalse(testing._mpesa_confirms_callbacks())

    def test_an_unconfirmed_failure_never_blocks_a_confirmed_success(self):
        self.provider.mpesa_confirm_by_query = False
        tx = self._pending_tx()
        self._answered(tx)  # The customer paid.
        self._post_callback(self._body(tx, code=1032))  # Forged.
        self.assertEqual(tx.state, 'error', "an unconfirmed failure is no cancellation")
        self.provider.mpesa_confirm_by_query = True
        self._post_callback(self._body(tx))
        self.assertEqual(tx.state, 'done')
        self.assertEqual(tx.mpesa_receipt_number, 'SIM1234567')


@tagged('post_install', '-at_install')
class TestSettlementQueue(MpesaCommon):

    def test_the_callback_is_acknowledged_without_asking_daraja(self):
        tx = self._pending_tx()
        self._answered(tx)
        response = self._post_callback(self._body(tx), settle=False)
        self.assertEqual(response.json(), {'ResultCode': 0, 'ResultDesc': 'Accepted'})
        self.assertEqual(self._queries(), 0, "no worker waits on Daraja while Daraja calls us")
        event = self._events(kind='stk_callback', transaction_id=tx.id)
        self.assertEqual(event.state, 'queued')
        self.assertEqual(event._mpesa_raw_body(), response.request.body.encode()
                         if isinstance(response.request.body, str) else response.request.body)
        self.env.invalidate_all()
        self.assertEqual(tx.state, 'pending')
        trigger = self.env['ir.cron.trigger'].search([
            ('cron_id', '=', self.env.ref('muchiri_mpesa.cron_mpesa_settle_callbacks').id),
        ])
        self.assertTrue(trigger, "the settlement job is woken")
        self._settle_callbacks()
        self.assertEqual(tx.state, 'done')
        self.assertEqual(self._queries(), 1)

    def test_duplicates_ride_on_one_confirmation(self):
        tx = self._pending_tx()
        self._answered(tx)
        for _attempt in range(3):
            self._post_callback(self._body(tx), settle=False)
        self._settle_callbacks()
        self.assertEqual(tx.state, 'done')
        self.assertEqual(self._queries(), 1)
        states = sorted(self._events(kind='stk_callback', transaction_id=tx.id).mapped('state'))
        self.assertEqual(states, ['ignored', 'ignored', 'processed'])

    def _two_queued_callbacks(self):
        """Two paid prompts of two orders, their callbacks received and waiting for the job."""
        first = self._pending_tx()
        self._answered(first)
        second = self._pending_tx(order=self.quotation.copy())
        self._answered(second)
        self._post_callback(self._body(first, receipt='FIRST00001'), settle=False)
        self._post_callback(self._body(second, receipt='SECOND0001'), settle=False)
        return first, second

    def test_one_refused_callback_does_not_hold_the_others(self):
        first, second = self._two_queued_callbacks()
        self.simulator.fail_next(1, error='invalid', operations=['stk_query'])  # Refused for good.
        tried_from = fields.Datetime.now()
        self._settle_callbacks()
        refused = self._events(kind='stk_callback', transaction_id=first.id)
        self.assertEqual(refused.state, 'error')
        # From when it was tried (settling the other may take longer than the back-off itself).
        self.assertGreaterEqual(refused.next_attempt_at, tried_from + timedelta(seconds=const.SETTLE_RETRY_FIRST),
                                "it backs off on its own")
        self.assertEqual(first.state, 'pending')
        self.assertEqual(second.state, 'done', "the next callback was not held up")

    def test_a_callback_whose_request_died_is_admitted_by_the_job(self):
        """Kept, then the worker died: the job checks the source as the request would have."""
        tx = self._pending_tx()
        self._answered(tx)
        self.provider.write({'mpesa_ip_check': 'enforce', 'mpesa_allowed_ips': '196.201.214.200'})
        Event = self.env['muchiri.mpesa.event'].sudo()
        forged = Event._mpesa_keep(self.provider, 'stk_callback', json.dumps(self._body(tx)).encode(), '6.6.6.6')
        self._settle_callbacks()
        self.assertEqual(forged.state, 'received', "its request may still be admitting it")
        forged.next_attempt_at = fields.Datetime.now() - timedelta(seconds=1)  # Past the grace.
        self._settle_callbacks()
        self.assertEqual(forged.state, 'rejected')
        self.assertEqual(tx.state, 'pending')
        genuine = Event._mpesa_keep(
            self.provider, 'stk_callback', json.dumps(self._body(tx)).encode(), '196.201.214.200')
        genuine.next_attempt_at = fields.Datetime.now() - timedelta(seconds=1)
        self._settle_callbacks()
        self.assertEqual(genuine.state, 'processed')
        self.assertEqual(tx.state, 'done')

    @mute_logger(EVENT_LOGGER)
    def test_any_failure_backs_off_instead_of_repeating(self):
        tx = self._pending_tx()
        self._answered(tx)
        self._post_callback(self._body(tx), settle=False)
        event = self._events(kind='stk_callback', transaction_id=tx.id)
        with patch.object(type(tx), '_mpesa_apply_callback', side_effect=RuntimeError("bad data")):
            self._settle_callbacks()
            self._settle_callbacks()
        self.assertEqual(event.state, 'error')
        self.assertEqual(event.attempt_count, 1, "not retried on every run")
        self.assertGreater(event.next_attempt_at, fields.Datetime.now())

    def test_throttling_ends_the_run(self):
        _first, second = self._two_queued_callbacks()
        self.simulator.fail_next(1, error='spike_arrest', operations=['stk_query'])
        self._settle_callbacks()
        self.assertEqual(self._queries(), 1, "Daraja asked us to wait: nothing more is sent")
        self.assertEqual(self._events(kind='stk_callback', transaction_id=second.id).state, 'queued')


@tagged('post_install', '-at_install')
class TestStkQuery(MpesaCommon):
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
        return self._body(tx, amount=tx.mpesa_requested_amount, receipt='LATE000001',
                          checkout_request_id=checkout_request_id)

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

    @mute_logger(TX_LOGGER)
    def test_any_reconciliation_error_still_reaches_the_cutoff(self):
        tx = self._pending_tx()
        past = fields.Datetime.now() - timedelta(hours=25)
        tx.write({'mpesa_push_sent_at': past, 'mpesa_next_check_at': past})
        with patch.object(type(tx), '_mpesa_settle_by_query', side_effect=RuntimeError("boom")):
            self.env['payment.transaction']._cron_mpesa_reconcile()
        self.assertEqual(tx.state, 'error')
        self.assertEqual(tx.mpesa_settled_by, 'cutoff')


@tagged('post_install', '-at_install')
class TestReceiptProof(MpesaInitiatorCommon):
    """Receipts recorded after the fact are proven by M-Pesa's Transaction Status, or visibly not.
    A late receipt, a payment matched by hand, a receipt M-Pesa contradicts.
    """

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
