# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""The money rules under attack: each test here failed before its fix (issue "Money safety under
attack").  Callbacks really travel over HTTP to Odoo's test server; Daraja is the simulator."""
import inspect
import json
from datetime import datetime, timedelta
from unittest.mock import patch

import psycopg2

from odoo import fields, models
from odoo.exceptions import AccessError, UserError, ValidationError
from odoo.fields import Command
from odoo.tests import JsonRpcException, new_test_user, tagged
from odoo.tools import mute_logger

from odoo.addons.muchiri_mpesa import const, daraja

from .common import (
    PHONE_CALLBACK_LOST,
    PHONE_SUCCESS,
    SIM_KEY,
    SIM_PASSKEY,
    SIM_SECRET,
    SIM_SHORTCODE,
    MpesaCommon,
)

TX_LOGGER = 'odoo.addons.muchiri_mpesa.models.payment_transaction'
EVENT_LOGGER = 'odoo.addons.muchiri_mpesa.models.mpesa_event'


class MoneySafetyCommon(MpesaCommon):

    def _pending_tx(self, phone=PHONE_CALLBACK_LOST, order=None):
        values = self._start_portal_payment(order)
        self._stk_push(values, phone)
        tx = self._get_tx(values['reference'])
        self.assertEqual(tx.state, 'pending')
        return tx

    def _answered(self, tx):
        self._wait(lambda: self._result_known(tx), message="the customer's answer", settle=False)

    def _body(self, tx, code=0, amount=4500, receipt='SIM1234567', checkout_request_id=None, phone=None):
        metadata = {
            'amount': amount, 'receipt': receipt, 'transaction_date': datetime(2026, 11, 26, 12, 0, 0),
            'phone': phone or tx.mpesa_phone,
        } if code == 0 else {}
        return daraja.stk_callback_body(
            tx.mpesa_merchant_request_id or '1-2-3', checkout_request_id or tx.provider_reference, code,
            "The service request is processed successfully." if code == 0 else "Request cancelled by user",
            **metadata,
        )

    def _queries(self):
        return len(self.simulator.requests_for('stk_query'))

    def _kept_unmatched(self, tx, **body):
        """A success callback kept before its transaction held the CheckoutRequestID."""
        checkout_id = tx.provider_reference
        tx.provider_reference = f'{checkout_id}-not-yet'
        self._post_callback(self._body(tx, checkout_request_id=checkout_id, **body))
        tx.provider_reference = checkout_id
        event = self._events(kind='stk_callback', checkout_request_id=checkout_id)
        self.assertEqual(event.state, 'unmatched')
        return event

    def _second_provider(self, **values):
        return self.provider.copy({
            'name': "M-Pesa (second shortcode)",
            'mpesa_consumer_key': SIM_KEY, 'mpesa_consumer_secret': SIM_SECRET,
            'mpesa_shortcode': SIM_SHORTCODE, 'mpesa_passkey': SIM_PASSKEY,
            'mpesa_api_url': self.simulator.base_url, 'mpesa_callback_base_url': self.base_url(),
            **values,
        })


@tagged('post_install', '-at_install')
class TestProviderScoping(MoneySafetyCommon):

    def test_callback_on_another_providers_path_settles_nothing(self):
        tx = self._pending_tx()
        self._answered(tx)
        other = self._second_provider(mpesa_confirm_by_query=False)
        self.assertNotEqual(other.mpesa_callback_secret, self.provider.mpesa_callback_secret)

        response = self._post_callback(self._body(tx), secret=other.mpesa_callback_secret)
        self.assertEqual(response.status_code, 200, "acknowledged: a CheckoutRequestID can come before its answer")
        event = self._events(kind='stk_callback', checkout_request_id=tx.provider_reference)
        self.assertEqual(event.provider_id, other, "filed under the provider whose path it came on")
        self.assertEqual(event.state, 'unmatched')
        self.assertFalse(event.transaction_id)
        self.assertEqual(tx.state, 'pending', "another provider's transaction is never touched")
        self.assertFalse(tx.mpesa_receipt_number)
        self.assertFalse(tx.mpesa_callback_at)

    def test_disabled_provider_still_settles_its_own_prompts(self):
        tx = self._pending_tx()
        self._answered(tx)
        self.assertEqual(tx.mpesa_api_url, self.simulator.base_url)
        # Switched off, and no longer pointed anywhere: its prompt's query still goes where the push went.
        self.provider.write({'state': 'disabled', 'mpesa_api_url': False})
        response = self._post_callback(self._body(tx))
        self.assertEqual(response.status_code, 200)
        self.assertEqual(tx.state, 'done')
        self.assertEqual(tx.mpesa_receipt_number, 'SIM1234567')
        self.assertEqual(self._queries(), 1, "confirmed by Daraja: a disabled provider is no test provider")

    @mute_logger('odoo.sql_db')
    def test_checkout_request_id_is_unique_per_provider(self):
        tx = self._pending_tx()
        twin_values = {'reference': 'TWIN-1', 'mpesa_push_sent_at': fields.Datetime.now(),
                       'provider_reference': tx.provider_reference}
        with self.assertRaises(psycopg2.IntegrityError), self.cr.savepoint():
            tx.copy(twin_values)
            self.env.flush_all()
        other = self._second_provider()
        twin = tx.copy({**twin_values, 'provider_id': other.id})
        self.env.flush_all()  # Another provider may know the same CheckoutRequestID.
        self.assertEqual(twin.provider_reference, tx.provider_reference)

    def test_two_companies_never_share_a_shortcode(self):
        """A receipt is one payment, whatever the company: a second company's provider on the same
        shortcode would be listed the same money by Pull, could never book it, and its Pull window
        would never move.  The set-up is refused; another shortcode, or another M-Pesa, is fine."""
        mombasa = self.env['res.company'].create({'name': "Mombasa Wholesale", 'currency_id': self.currency_kes.id})
        values = {
            'name': "M-Pesa Mombasa", 'code': 'mpesa', 'company_id': mombasa.id,
            'mpesa_consumer_key': SIM_KEY, 'mpesa_consumer_secret': SIM_SECRET,
            'mpesa_shortcode': SIM_SHORTCODE, 'mpesa_passkey': SIM_PASSKEY,
            'mpesa_api_url': self.simulator.base_url, 'mpesa_callback_base_url': self.base_url(),
        }
        with self.assertRaises(ValidationError) as refused:  # Odoo's assertRaises: in a savepoint
            self.env['payment.provider'].create({**values, 'state': 'test'})
        self.assertIn(f"Shortcode {SIM_SHORTCODE} is already used by {self.provider.name}", str(refused.exception))
        mombasa_provider = self.env['payment.provider'].create(values)  # Disabled: it takes no money.
        with self.assertRaises(ValidationError) as refused:
            mombasa_provider.state = 'test'
        self.assertIn(self.provider.company_id.name, str(refused.exception))
        mombasa_provider.write({'mpesa_shortcode': '600984', 'state': 'test'})
        self.assertEqual(mombasa_provider.state, 'test', "two companies, two shortcodes")
        with self.assertRaises(ValidationError):
            mombasa_provider.mpesa_shortcode = SIM_SHORTCODE
        with self.assertRaises(ValidationError):
            mombasa_provider.mpesa_till_number = SIM_SHORTCODE  # a till is a shortcode of its own too
        mombasa_provider.write({'mpesa_shortcode': SIM_SHORTCODE, 'mpesa_api_url': False})
        self.assertEqual(mombasa_provider.state, 'test', "Safaricom's sandbox is another M-Pesa than this simulator")
        self.assertTrue(self._second_provider(state='test'), "one company may run two providers on its shortcode")


@tagged('post_install', '-at_install')
class TestMatchByHand(MoneySafetyCommon):

    def _lost_answer_tx(self, tx, **values):
        return tx.copy({
            'reference': values.pop('reference', 'LOST-1'), 'state': 'error', 'mpesa_outcome_unknown': True,
            'mpesa_requested_amount': 4500, 'mpesa_phone': tx.mpesa_phone,
            'mpesa_push_sent_at': fields.Datetime.now(), 'provider_reference': False, **values,
        })

    def _match(self, event, tx, user=None, reason=None):
        Match = self.env['muchiri.mpesa.callback.match']
        if user:
            Match = Match.with_user(user)
        return Match.with_context(active_id=event.id).create({
            'transaction_id': tx.id, 'override_reason': reason,
        }).action_match()

    def test_event_keeps_its_transaction_when_the_query_fails(self):
        tx = self._pending_tx()
        self._answered(tx)
        self.simulator.fail_next(1, error='invalid', operations=['stk_query'])
        self._post_callback(self._body(tx))
        event = self._events(kind='stk_callback', transaction_id=tx.id)
        self.assertEqual(event.state, 'error')
        self.assertEqual(event.transaction_id, tx, "the match is never lost")
        lost = self._lost_answer_tx(tx)
        with self.assertRaises(UserError):
            self._match(event, lost)
        self.assertFalse(lost.provider_reference)

    def test_a_checkout_request_id_held_by_another_transaction_is_refused(self):
        tx = self._pending_tx()
        self._answered(tx)
        event = self._kept_unmatched(tx)
        with self.assertRaisesRegex(UserError, 'already belongs to'):
            self._match(event, self._lost_answer_tx(tx))
        self.assertEqual(event.state, 'unmatched')

    def test_a_receipt_held_by_another_transaction_is_refused(self):
        tx = self._pending_tx()
        self._answered(tx)
        self._post_callback(self._body(tx, receipt='HELD000001'))
        self.assertEqual(tx.mpesa_receipt_number, 'HELD000001')
        other = self._pending_tx(order=self.quotation.copy())
        self._answered(other)
        event = self._kept_unmatched(other, receipt='HELD000001')
        lost = self._lost_answer_tx(other)
        other.provider_reference = False  # Nobody holds its CheckoutRequestID: only the receipt is taken.
        with self.assertRaisesRegex(UserError, 'already belongs to'):
            self._match(event, lost)

    def test_a_payment_that_does_not_fit_needs_a_manager_and_a_reason(self):
        tx = self._pending_tx()
        self._answered(tx)
        event = self._kept_unmatched(tx, phone='254711000111')
        checkout_id = tx.provider_reference
        tx.write({'provider_reference': False, 'state': 'error', 'mpesa_outcome_unknown': True})
        accountant = new_test_user(self.env, login='clerk', groups='base.group_user,account.group_account_invoice')

        with self.assertRaisesRegex(UserError, "payer's phone is 254711000111"):
            self._match(event, tx, user=accountant)
        with self.assertRaises(AccessError):
            self._match(event, tx, user=accountant, reason="The customer paid from his wife's phone.")
        self.assertFalse(tx.provider_reference)

        manager = new_test_user(self.env, login='chief', groups='base.group_user,account.group_account_manager')
        self._match(event, tx, user=manager, reason="The customer paid from his wife's phone.")
        self.assertEqual(tx.state, 'done', "still confirmed by Daraja's query")
        self.assertEqual(tx.provider_reference, checkout_id)
        self.assertEqual(event.state, 'processed')
        notes = self.quotation.message_ids.mapped('body')
        self.assertTrue(any("wife" in (note or '') for note in notes), "the reason is in the chatter")


@tagged('post_install', '-at_install')
class TestUnconfirmedCallbacks(MoneySafetyCommon):

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
class TestInvoiceGuards(MoneySafetyCommon):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.invoice = cls.env['account.move'].create({
            'move_type': 'out_invoice', 'partner_id': cls.distributor.id, 'currency_id': cls.currency_kes.id,
            'invoice_line_ids': [Command.create({
                'product_id': cls.product.id, 'quantity': 3, 'price_unit': 1500.0, 'tax_ids': [Command.clear()],
            })],
        })
        cls.invoice.action_post()

    def _invoice_tx(self, reference):
        return self.env['payment.transaction'].sudo().create({
            'provider_id': self.provider.id, 'payment_method_id': self.payment_method_id,
            'reference': reference, 'amount': self.invoice.amount_total, 'currency_id': self.currency_kes.id,
            'partner_id': self.distributor.id, 'invoice_ids': [Command.set(self.invoice.ids)],
            'operation': 'online_direct',
        })

    def test_one_prompt_per_invoice_and_none_once_paid(self):
        first = self._invoice_tx('INV-MP-1')
        self.assertIsNone(first._mpesa_send_stk_push(PHONE_CALLBACK_LOST))
        with self.assertRaisesRegex(ValidationError, 'already sent'):
            self._invoice_tx('INV-MP-2')._mpesa_send_stk_push(PHONE_CALLBACK_LOST)
        self._answered(first)
        first.mpesa_push_sent_at -= timedelta(minutes=10)  # Past the cooldown: Daraja is asked.
        with self.assertRaisesRegex(ValidationError, 'already paid'):
            self._invoice_tx('INV-MP-3')._mpesa_send_stk_push(PHONE_CALLBACK_LOST)
        self.assertEqual(first.state, 'done', "the old prompt was settled by the query")
        self.assertEqual(len(self.simulator.pushes), 1)

    def test_a_second_payment_of_an_invoice_is_flagged_for_refund(self):
        first = self._invoice_tx('INV-MP-1')
        first._mpesa_send_stk_push(PHONE_CALLBACK_LOST)
        self._answered(first)
        first._mpesa_settle_by_query()
        self.assertEqual(first.state, 'done')
        self.assertFalse(self.invoice.mpesa_needs_refund)
        second = self._invoice_tx('INV-MP-2')
        second.write({'mpesa_requested_amount': 4500, 'provider_reference': 'ws_CO_second',
                      'mpesa_push_sent_at': fields.Datetime.now(), 'state': 'pending'})
        second._handle_notification_data('mpesa', second._mpesa_notification('0', "Paid", 'query'))
        self.assertEqual(second.state, 'done')
        self.assertTrue(self.invoice.mpesa_needs_refund, "recorded, never hidden")
        self.assertTrue(self.invoice.activity_ids)


@tagged('post_install', '-at_install')
class TestButtonsCheckTheirGroup(MoneySafetyCommon):
    """A view's groups= hides a button; only the server protects it.  Every public method of the
    addon's models is called over RPC as a portal user and as a plain internal user."""

    def _addon_public_methods(self):
        base = set(dir(models.BaseModel))
        found = []
        for name in self.env.registry:
            model = self.env[name]
            if model._abstract and any(not self.env[child]._abstract for child in model._inherit_children):
                continue  # A mixin: its methods are called on the models that inherit it, listed too.
            for cls in type(self.env[name]).__mro__:
                if not cls.__module__.startswith('odoo.addons.muchiri_mpesa.'):
                    continue
                for attr, value in vars(cls).items():
                    if attr.startswith('_') or attr in base or not inspect.isfunction(value):
                        continue
                    found.append((name, attr))
        return sorted(set(found))

    def _records_to_call(self):
        """One record of each model with buttons (created as the administrator)."""
        tx = self._pending_tx()  # Something for the status check to ask Daraja about.
        event = self.env['muchiri.mpesa.event'].sudo().create({'kind': 'stk_callback', 'provider_id': self.provider.id})
        ledger_row = self.env['muchiri.mpesa.ledger'].sudo()._mpesa_record(
            self.provider, 'TSTSEC0001', 'c2b', {'amount': 100.0})[0]
        return {
            'payment.provider': self.provider,
            'sale.order': self.quotation,
            'account.move': self.env['account.move'].create({
                'move_type': 'out_invoice', 'partner_id': self.distributor.id,
            }),
            'muchiri.mpesa.ledger': ledger_row,
            'muchiri.mpesa.ledger.match': self.env['muchiri.mpesa.ledger.match'].create({'ledger_id': ledger_row.id}),
            'muchiri.mpesa.ledger.decide': self.env['muchiri.mpesa.ledger.decide'].create({
                'ledger_id': ledger_row.id, 'reason': "Not ours",
            }),
            'muchiri.mpesa.alert': self.env['muchiri.mpesa.alert'].create({
                'name': "Alert", 'kind': 'success_rate', 'key': 'test', 'provider_id': self.provider.id,
            }),
            'muchiri.mpesa.payment.request': self.env['muchiri.mpesa.payment.request'].create({
                'sale_order_id': self.quotation.id, 'phone': PHONE_SUCCESS, 'amount': 4500,
            }),
            'muchiri.mpesa.callback.match': self.env['muchiri.mpesa.callback.match'].create({
                'event_id': event.id, 'transaction_id': tx.id,
            }),
            'muchiri.mpesa.refund.extra': self.env['muchiri.mpesa.refund.extra'].create({
                'res_model': 'sale.order', 'res_id': self.quotation.id, 'transaction_id': tx.id,
                'company_id': self.quotation.company_id.id, 'currency_id': self.quotation.currency_id.id,
                'amount': 100, 'journal_id': self.provider.journal_id.id,
            }),
        }

    @mute_logger('odoo.http')
    def test_every_button_refuses_portal_and_plain_internal_users(self):
        methods = self._addon_public_methods()
        self.assertIn(('payment.provider', 'action_mpesa_regenerate_callback_secret'), methods)
        self.assertIn(('sale.order', 'action_mpesa_check_status'), methods)
        records = self._records_to_call()
        secret = self.provider.mpesa_callback_secret
        requests_before = len(self.simulator.requests)
        for login in ('distributor', 'internal_user'):
            for model, method in methods:
                # A service (an abstract model inherited by none) has no records: called on none.
                record = self.env[model] if self.env[model]._abstract else records.get(model)
                self.assertIsNotNone(record, f"add a record of {model} to _records_to_call")
                with self.subTest(login=login, method=f'{model}.{method}'):
                    self.authenticate(login, login)
                    with self.assertRaises(JsonRpcException) as caught:
                        self.make_jsonrpc_request('/web/dataset/call_kw', {
                            'model': model, 'method': method, 'args': [record.ids], 'kwargs': {},
                        })
                    self.assertEqual(caught.exception.args[0], 'odoo.exceptions.AccessError')
        self.env.invalidate_all()
        self.assertEqual(self.provider.mpesa_callback_secret, secret, "the secret was not rotated")
        self.assertEqual(len(self.simulator.requests), requests_before, "no Daraja quota was spent")


@tagged('post_install', '-at_install')
class TestSettlementQueue(MoneySafetyCommon):

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
class TestSmallerDefects(MoneySafetyCommon):

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

    @mute_logger(TX_LOGGER)
    def test_any_reconciliation_error_still_reaches_the_cutoff(self):
        tx = self._pending_tx()
        past = fields.Datetime.now() - timedelta(hours=25)
        tx.write({'mpesa_push_sent_at': past, 'mpesa_next_check_at': past})
        with patch.object(type(tx), '_mpesa_settle_by_query', side_effect=RuntimeError("boom")):
            self.env['payment.transaction']._cron_mpesa_reconcile()
        self.assertEqual(tx.state, 'error')
        self.assertEqual(tx.mpesa_settled_by, 'cutoff')

    def test_a_forged_callback_does_not_mute_the_missing_callback_alert(self):
        tx = self._pending_tx()
        self._answered(tx)  # The customer paid; Daraja's callback is lost.
        self._post_callback(self._body(tx, code=1032))  # Forged: the query answers success.
        self.assertEqual(self._events(kind='stk_callback', transaction_id=tx.id).state, 'rejected')
        self.assertFalse(tx.mpesa_callback_at, "the forged callback is not counted as a callback")

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

    def test_matching_by_hand_while_daraja_is_down_says_so(self):
        tx = self._pending_tx()
        self._answered(tx)
        event = self._kept_unmatched(tx)
        tx.write({'provider_reference': False, 'state': 'error', 'mpesa_outcome_unknown': True})
        self.simulator.fail_next(1, error='unavailable', operations=['stk_query'])
        with self.assertRaisesRegex(UserError, 'cannot confirm this payment now'), self.env.cr.savepoint():
            self.env['muchiri.mpesa.callback.match'].with_context(active_id=event.id).create({
                'transaction_id': tx.id,
            }).action_match()
        self.assertFalse(tx.provider_reference)

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
