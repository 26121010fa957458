# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""The M-Pesa ledger: how paybill money is matched to documents, matching by hand, and Pull
Transactions completing it.
"""
from datetime import datetime, time, timedelta
from unittest.mock import patch

from odoo import fields
from odoo.exceptions import AccessError, UserError
from odoo.fields import Command
from odoo.tests import JsonRpcException, RecordCapturer, new_test_user, tagged
from odoo.tools import mute_logger

from odoo.addons.muchiri_mpesa import daraja
from odoo.addons.muchiri_mpesa.daraja.simulator import C2B_CONFIRMATION
from odoo.addons.muchiri_mpesa.daraja.simulator.c2b import LOST_CONFIRMATION
from odoo.addons.muchiri_mpesa.daraja.simulator.pull import REPEAT_PAGE, WITH_REVERSALS
from odoo.addons.muchiri_mpesa.utils import kenya_time, naive_utc, reference_key

from .common import (
    PAYER_PHONE,
    PHONE_CALLBACK_LOST,
    PHONE_SUCCESS,
    MpesaCommon,
    MpesaInitiatorCommon,
    MpesaLedgerCommon,
)


def _run_pull(test):
    """The hourly cron, once the simulator's payments are a little older than the query's end
    (Daraja's EndDate is to the second: a payment of this very second comes in the next run)."""
    for payment in test.simulator.payments:
        test.simulator.age_transaction(payment.receipt, 0.01)
    with test.registry.test_lock:
        test.env['payment.provider']._cron_mpesa_pull_transactions()
        test.env.invalidate_all()


@tagged('post_install', '-at_install')
class TestLedgerMatching(MpesaLedgerCommon):
    """The ledger's matching, one test per rule, through this Odoo's real C2B confirmation route."""

    def _typed(self, name):
        """A document number as a distributor types it on the phone: lower case, spaces for slashes."""
        return name.lower().replace('/', ' ', 1).replace('/', '')

    def _assert_paid_by(self, row, invoice, amount):
        payment = row.payment_ids
        self.assertEqual(len(payment), 1)
        self.assertIn(payment.state, ('in_process', 'paid'), "posted")
        self.assertEqual(payment.journal_id, self.provider.journal_id, "the provider's M-Pesa journal")
        self.assertEqual(payment.amount, amount, "every shilling received is booked")
        self.assertTrue(payment.memo.startswith(row.name), payment.memo)
        self.assertIn(invoice, payment.reconciled_invoice_ids)

    # === AMOUNT RULES === #

    def test_exact_payment_lands_reconciled_on_the_invoice(self):
        invoice = self._invoice(4500)
        row = self._confirm(4500, self._typed(invoice.name), phone=self._own_number())
        self.assertEqual(row.state, 'matched', row.note)
        self.assertEqual(row.invoice_ids, invoice)
        self._assert_paid_by(row, invoice, 4500)
        self.assertIn(invoice.payment_state, ('paid', 'in_payment'))
        self.assertEqual(row.partner_id, self.distributor)

    def test_partial_payment_leaves_the_rest_due(self):
        invoice = self._invoice(4500)
        row = self._confirm(1000, invoice.name)
        self.assertEqual(row.state, 'partial')
        self._assert_paid_by(row, invoice, 1000)
        self.assertEqual(invoice.amount_residual, 3500)
        self.assertFalse(invoice.mpesa_needs_refund)

    def test_overpayment_pays_the_invoice_and_flags_the_rest(self):
        invoice = self._invoice(4500)
        row = self._confirm(6000, invoice.name)
        self.assertEqual(row.state, 'over')
        self.assertEqual(row.refund_amount, 1500)
        self._assert_paid_by(row, invoice, 6000)
        self.assertIn(invoice.payment_state, ('paid', 'in_payment'))
        self.assertTrue(invoice.mpesa_needs_refund)
        self.assertTrue(invoice.activity_ids, "the accountants are asked to refund the rest")
        credit = row.payment_ids.move_id.line_ids.filtered(
            lambda line: line.account_id.account_type == 'asset_receivable')
        self.assertAlmostEqual(abs(credit.amount_residual_currency), 1500, msg="the rest is the customer's credit")

    def test_a_second_payment_of_a_paid_invoice_is_all_to_refund(self):
        invoice = self._invoice(4500)
        self._confirm(4500, invoice.name)
        row = self._confirm(4500, invoice.name)
        self.assertEqual((row.state, row.refund_amount), ('over', 4500))

    def test_an_order_number_confirms_and_invoices_the_order(self):
        order = self.quotation
        row = self._confirm(order.amount_total, order.name)
        self.assertEqual(row.state, 'matched', row.note)
        self.assertEqual(order.state, 'sale', "Odoo's post-processing confirmed it")
        self.assertIn(order.invoice_ids.payment_state, ('paid', 'in_payment'))
        self.assertEqual(row.sale_order_ids, order)
        self.assertTrue(row.payment_ids.memo.startswith(row.name))

    # === ACCOUNT AND PARTNER RULES === #

    def test_an_unknown_account_waits_in_the_exceptions_queue(self):
        row = self._confirm(4500, "NOSUCH-42", phone=self._own_number())
        self.assertEqual(row.state, 'unmatched')
        self.assertIn("NOSUCH-42", row.note)
        self.assertFalse(row.transaction_ids)
        self.assertEqual(row.partner_id, self.distributor, "the payer is known by the phone's hash")

    def test_the_hashed_phone_finds_the_payer(self):
        phone = self._own_number()
        self.assertEqual(self.distributor.sudo().mpesa_msisdn_hash, daraja.hash_msisdn(self.distributor.mobile))
        row = self._confirm(100, "whatever", phone=phone)
        self.assertEqual(row.msisdn_hash, daraja.hash_msisdn('0711222333'))
        self.assertEqual(row.partner_id, self.distributor)

    def test_a_reference_of_two_documents_is_never_guessed(self):
        first, second = self._invoice(100), self._invoice(100)
        first.name, second.name = 'INV/AMB/1', 'INV-AMB-1'  # Both normalise to invamb1.
        row = self._confirm(100, 'inv amb 1')
        self.assertEqual(row.state, 'unmatched')
        self.assertFalse(row.transaction_ids)
        self.assertIn('INV/AMB/1', row.note)

    def test_a_document_of_another_company_is_not_matched(self):
        other = self.env['res.company'].create({'name': "Other Co", 'currency_id': self.currency_kes.id})
        order = self.env['sale.order'].with_company(other).create({
            'partner_id': self.distributor.id, 'company_id': other.id,
            'order_line': [(0, 0, {'product_id': self.product.id, 'price_unit': 100, 'tax_id': [(5,)]})],
        })
        row = self._confirm(order.amount_total, order.name)
        self.assertEqual(row.state, 'unmatched', "the provider's company only")
        self.assertEqual(order.state, 'draft')

    # === DUPLICATES AND MALFORMED INPUT === #

    def test_a_replayed_confirmation_is_one_row_and_one_payment(self):
        invoice = self._invoice(4500)
        body = self._c2b_body(4500, invoice.name)
        for _attempt in range(2):
            self.assertEqual(self._post_c2b(body).json(), {'ResultCode': 0, 'ResultDesc': "Accepted"})
        row = self._row(body['TransID'])
        self.assertEqual(len(row), 1)
        self.assertEqual(len(row.payment_ids), 1)
        self.assertEqual(invoice.amount_residual, 0)
        states = self._events(kind='c2b_confirmation', receipt_number=body['TransID']).mapped('state')
        self.assertEqual(sorted(states), ['ignored', 'processed'])

    @mute_logger('odoo.addons.muchiri_mpesa.controllers.main', 'odoo.http')
    def test_a_forged_confirmation_on_a_wrong_secret_is_refused(self):
        invoice = self._invoice(4500)
        body = self._c2b_body(4500, invoice.name)
        self.assertEqual(self._post_c2b(body, secret='not-the-secret').status_code, 404)
        self.assertFalse(self._row(body['TransID']))
        self.assertFalse(self._events(kind='c2b_confirmation'))
        self.assertEqual(invoice.amount_residual, 4500)

    def test_malformed_bodies_get_a_4xx_and_no_money(self):
        invoice = self._invoice(4500)
        for raw in (b'\x00\xff not json', b'[]', b'{"TransID": {"a": 1}}', b'{' * 5000,
                    self._raw({**self._c2b_body(1e30, invoice.name)})):
            with self.subTest(raw=raw[:40]):
                response = self._post_c2b(None, raw=raw)
                self.assertEqual(response.status_code, 400, response.text)
        self.assertFalse(self.env['muchiri.mpesa.ledger'].search([]))
        self.assertEqual(invoice.amount_residual, 4500)

    def test_no_money_is_no_payment(self):
        invoice = self._invoice(4500)
        for amount in ("0.00", "-5.00"):
            with self.subTest(amount=amount):
                body = self._c2b_body(amount, invoice.name)
                response = self._post_c2b(body)
                self.assertEqual(response.status_code, 400, response.text)
                self.assertFalse(self._row(body['TransID']))
        self.assertEqual(invoice.amount_residual, 4500)

    def test_a_kept_confirmation_whose_request_died_is_recorded_by_the_retry_job(self):
        invoice = self._invoice(900)
        body = self._c2b_body(900, invoice.name)
        Event = self.env['muchiri.mpesa.event'].sudo()
        event = Event.create(Event._mpesa_inbound_values(
            self.provider, 'c2b_confirmation', self._raw(body).encode(), '196.201.214.200'))
        self.env.flush_all()
        self.env.cr.execute(  # Kept three minutes ago by a request that never got further.
            "UPDATE muchiri_mpesa_event SET create_date = create_date - interval '3 minutes' WHERE id = %s",
            [event.id])
        event.invalidate_recordset()
        self.assertEqual(Event._cron_mpesa_settle_callbacks(), 1)
        self.assertEqual(event.state, 'processed')
        self.assertEqual(self._row(body['TransID']).state, 'matched')
        self.assertEqual(Event._cron_mpesa_settle_callbacks(), 0, "once")

    @mute_logger('odoo.addons.muchiri_mpesa.controllers.main')
    def test_a_confirmation_whose_handling_fails_is_kept_accepted_and_recorded_later(self):
        """A fault after the body is kept (patched in: no network is patched) answers Accepted, never
        a 5xx, leaves no money half-recorded, and the retry job records the kept body."""
        invoice = self._invoice(700)
        body = self._c2b_body(700, invoice.name)
        Event = self.env.registry['muchiri.mpesa.event']
        with patch.object(Event, '_mpesa_admit', side_effect=RuntimeError("worker fault")):
            response = self._post_c2b(body)
        self.assertEqual(response.status_code, 200, response.text)
        self.assertEqual(response.json(), {'ResultCode': 0, 'ResultDesc': "Accepted"})
        self.assertFalse(self._row(body['TransID']), "nothing recorded by the failed handling")
        event = self.env['muchiri.mpesa.event'].sudo().search([('kind', '=', 'c2b_confirmation')], order='id desc',
                                                              limit=1)
        self.assertEqual(event.state, 'received', "kept for the retry job")
        self.assertIn(body['TransID'].encode(), event._mpesa_raw_body())
        self.env.cr.execute(
            "UPDATE muchiri_mpesa_event SET create_date = create_date - interval '3 minutes' WHERE id = %s",
            [event.id])
        event.invalidate_recordset()
        self.assertEqual(self.env['muchiri.mpesa.event'].sudo()._cron_mpesa_settle_callbacks(), 1)
        self.assertEqual(self._row(body['TransID']).state, 'matched')

    @mute_logger('odoo.http')
    def test_a_confirmation_that_could_not_be_kept_is_not_acknowledged(self):
        """Only a kept body may be accepted: Daraja (or the Pull job) must still bring one we lost."""
        invoice = self._invoice(600)
        body = self._c2b_body(600, invoice.name)
        Event = self.env.registry['muchiri.mpesa.event']
        with patch.object(Event, '_mpesa_inbound_values', side_effect=RuntimeError("disk full")):
            response = self._post_c2b(body)
        self.assertNotEqual(response.status_code, 200, response.text)
        self.assertNotIn('Accepted', response.text)
        self.assertFalse(self._row(body['TransID']))

    # === THE EXCEPTIONS QUEUE === #

    def _wizard(self, model, row, user=None, **values):
        env = self.env(user=user or self.accountant)
        return env[model].with_context(active_id=row.id).create(values)

    def test_the_queue_matches_one_payment_to_several_documents(self):
        first, second = self._invoice(1000), self._invoice(2000)
        row = self._confirm(3500, "for two invoices")
        wizard = self._wizard('muchiri.mpesa.ledger.match', row, invoice_ids=[first.id, second.id])
        wizard.action_match()
        self.assertEqual(row.state, 'over')
        self.assertEqual((first.amount_residual, second.amount_residual), (0, 0))
        self.assertEqual(row.refund_amount, 500)
        self.assertEqual(len(row.payment_ids), 2)
        self.assertTrue(all(payment.memo.startswith(row.name) for payment in row.payment_ids))
        self.assertIn(self.accountant.name, row.message_ids.mapped('body')[0] + ''.join(row.message_ids.mapped('body')))
        with self.assertRaises(UserError, msg="matched once"):
            self._wizard('muchiri.mpesa.ledger.match', row, invoice_ids=[first.id]).action_match()

    def test_the_match_wizard_proposes_documents_best_guess_first(self):
        """The payer typed a wrong account but paid from the distributor's number: the wizard
        proposes the distributor's open invoices (the one owing exactly the amount first), then
        another customer's invoice owing that amount; nothing is ticked for the accountant."""
        self._own_number()
        other_customer = self.env['res.partner'].create({'name': "Wanjiru Traders"})
        older, exact = self._invoice(1200), self._invoice(700)
        stranger = self._invoice(700, partner=other_customer)
        paid = self._invoice(700)
        self._confirm(700, paid.name)
        row = self._confirm(700, "NO-SUCH-DOC", phone=PAYER_PHONE)
        self.assertEqual(row.state, 'unmatched', row.note)
        wizard = self._wizard('muchiri.mpesa.ledger.match', row)
        self.assertEqual(wizard.partner_id, self.distributor.commercial_partner_id, "the payer's number")
        proposed = wizard.line_ids.sorted('sequence')
        invoices = proposed.filtered('invoice_id')
        self.assertEqual(proposed[0].invoice_id, exact, "the customer's, owing this amount")
        self.assertEqual([line.invoice_id for line in invoices], [exact, older, stranger],
                         "then the customer's, then another's owing this amount; the paid invoice not at all")
        self.assertEqual(invoices.mapped('amount_due'), [700, 1200, 700])
        self.assertEqual(proposed[0].partner_id, self.distributor.commercial_partner_id)
        self.assertEqual(proposed[0].date, exact.invoice_date)
        self.assertIn("owes this amount", proposed[0].reason)
        self.assertFalse(any(proposed.mapped('selected')), "the accountant decides")
        with self.assertRaises(UserError, msg="nothing ticked, nothing picked"):
            wizard.action_match()
        invoices[1].selected = True
        action = wizard.action_match()
        self.assertEqual(action['params']['next'], {'type': 'ir.actions.act_window_close'})
        self.assertIn(row.name, action['params']['message'])
        self.assertEqual((row.state, older.amount_residual, exact.amount_residual), ('partial', 500, 700))

    def test_the_match_wizard_confirms_an_order_in_the_background(self):
        """An order's confirmation renders and mails its PDF: Odoo's post-processing job does it
        at once after the match, and the dialog closes without waiting for it."""
        order = self.quotation.copy()
        row = self._confirm(order.amount_total, "NO-SUCH-DOC")
        wizard = self._wizard('muchiri.mpesa.ledger.match', row, partner_id=order.partner_id.id)
        line = wizard.line_ids.filtered(lambda line: line.sale_order_id == order)
        self.assertTrue(line, "the customer's open order is proposed")
        line.selected = True
        cron = self.env.ref('payment.cron_post_process_payment_tx')
        with RecordCapturer(self.env['ir.cron.trigger'].sudo(), [('cron_id', '=', cron.id)]) as triggers:
            action = wizard.action_match()
        self.assertIn("background", action['params']['message'])
        self.assertTrue(triggers.records, "the job is woken")
        self.assertEqual(row.state, 'matched')
        self.assertEqual(order.state, 'draft', "not confirmed inside the dialog's request")
        row.transaction_ids._post_process()  # What the job runs (it commits: not inside a test).
        self.assertEqual(order.state, 'sale')
        self.assertEqual(row.payment_ids.amount, order.amount_total)

    def test_the_match_wizard_does_not_promise_a_part_paid_order(self):
        order = self.quotation.copy()
        row = self._confirm(1000, "NO-SUCH-DOC")
        wizard = self._wizard('muchiri.mpesa.ledger.match', row, sale_order_ids=[order.id])
        message = wizard.action_match()['params']['message']
        self.assertEqual(row.state, 'partial')
        self.assertNotIn("in the background", message)
        self.assertIn(f"Not paid enough to be confirmed yet: {order.name}", message)
        row.transaction_ids._post_process()
        self.assertIn(order.state, ('draft', 'sent'), "the rest is due")

    def test_the_ledger_chatter_is_signed_by_odoobot_not_the_public_user(self):
        row = self._confirm(700, "NO-SUCH-DOC")
        authors = row.message_ids.author_id
        self.assertEqual(authors, self.env.ref('base.partner_root'), row.message_ids.mapped('body'))

    def test_the_queue_marks_not_ours_and_flags_refunds_with_a_reason(self):
        row = self._confirm(700, "wrong paybill")
        with self.assertRaises(UserError):
            self._wizard('muchiri.mpesa.ledger.decide', row, decision='not_ours', reason=' ').action_confirm()
        self._wizard('muchiri.mpesa.ledger.decide', row, decision='not_ours', reason="Meant for KPLC").action_confirm()
        self.assertEqual((row.state, row.not_ours_reason), ('not_ours', "Meant for KPLC"))
        other = self._confirm(800, "unknown")
        self._wizard('muchiri.mpesa.ledger.decide', other, decision='refund', reason="Paid twice").action_confirm()
        self.assertEqual((other.state, other.refund_amount), ('refund', 800))
        self.assertTrue(other.activity_ids, "the accountants are asked to refund it")
        self.assertIn("Paid twice", ''.join(other.message_ids.mapped('body')))

    def test_the_queue_is_closed_to_portal_and_plain_internal_users(self):
        invoice = self._invoice(700)
        row = self._confirm(700, "unknown")
        for user in (self.internal_user, self.distributor_user):
            with self.subTest(user=user.login), self.assertRaises(AccessError):
                row.with_user(user).read(['amount'])
            with self.subTest(user=user.login), self.assertRaises(AccessError):
                self.env['muchiri.mpesa.ledger.match'].with_user(user).create(
                    {'ledger_id': row.id, 'invoice_ids': [invoice.id]}).action_match()
        with self.assertRaises(AccessError, msg="the accountant reads, never writes a row"):
            row.with_user(self.accountant).write({'state': 'matched'})
        self.assertEqual(row.state, 'unmatched')

    @mute_logger('odoo.http')
    def test_the_queue_buttons_refuse_portal_and_plain_internal_users_over_rpc(self):
        invoice = self._invoice(700)
        row = self._confirm(700, "unknown")
        wizards = {
            'muchiri.mpesa.ledger.match': self._wizard('muchiri.mpesa.ledger.match', row, invoice_ids=[invoice.id]),
            'muchiri.mpesa.ledger.decide': self._wizard('muchiri.mpesa.ledger.decide', row, reason="Test"),
        }
        self.env.flush_all()
        for login in ('distributor', 'internal_user'):
            for model, method in (('muchiri.mpesa.ledger.match', 'action_match'),
                                  ('muchiri.mpesa.ledger.decide', 'action_confirm')):
                with self.subTest(login=login, method=method):
                    self.authenticate(login, login)
                    with self.assertRaises(JsonRpcException) as caught:
                        self.make_jsonrpc_request('/web/dataset/call_kw', {
                            'model': model, 'method': method, 'args': [wizards[model].ids], 'kwargs': {},
                        })
                    self.assertEqual(caught.exception.args[0], 'odoo.exceptions.AccessError')
        self.assertEqual(self._row(row.name).state, 'unmatched')
        self.assertEqual(invoice.amount_residual, 700)

    def test_the_queue_refuses_draft_invoices_and_vendor_bills(self):
        """The wizard's domain is the browser's: over RPC any move may be sent.  Customer money
        pays posted customer invoices only (a draft cannot be reconciled, a bill is a supplier's)."""
        row = self._confirm(700, "unknown")
        lines = [Command.create({'name': "Maize", 'quantity': 1, 'price_unit': 700, 'tax_ids': [Command.clear()]})]
        draft = self.env['account.move'].create({
            'move_type': 'out_invoice', 'partner_id': self.distributor.id, 'currency_id': self.currency_kes.id,
            'invoice_line_ids': lines,
        })
        bill = self.env['account.move'].create({
            'move_type': 'in_invoice', 'partner_id': self.distributor.id, 'currency_id': self.currency_kes.id,
            'invoice_date': '2026-01-15', 'invoice_line_ids': lines,
        })
        bill.action_post()
        for move in (draft, bill):
            with self.subTest(move=move.move_type, state=move.state), self.assertRaises(UserError):
                self._wizard('muchiri.mpesa.ledger.match', row, invoice_ids=[move.id]).action_match()
        self.assertEqual(row.state, 'unmatched')
        self.assertFalse(row.transaction_ids)


@tagged('post_install', '-at_install')
class TestMatchByHand(MpesaCommon):

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


@tagged('post_install', '-at_install')
class TestPull(MpesaLedgerCommon):
    """Pull Transactions completes the ledger: a confirmation the simulator never sends is recovered by
    the hourly cron, a prompt whose callback was lost gets its receipt, nothing is counted twice, and
    the gap report shows (and alerts on) what Safaricom does not list.
    """

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
class TestPullReversal(MpesaInitiatorCommon):
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


@tagged('post_install', '-at_install')
class TestLedgerDay(MpesaLedgerCommon):
    """The gap report judges a day only against a source that runs: Pull where it is registered,
    an imported statement for the time it covers."""

    def _day(self, row):
        with self.registry.test_lock:
            self.env.flush_all()
            self.env.invalidate_all()
            return self.env['muchiri.mpesa.ledger.day'].search([
                ('provider_id', '=', self.provider.id), ('day', '=', kenya_time(row.trans_time).date())])

    def _at(self, row, moment, **values):
        with self.registry.test_lock:
            row.write({'trans_time': moment, **values})

    def test_a_day_no_source_checks_is_not_checked(self):
        row = self._confirm(250, "unknown account")
        day = self._day(row)
        self.assertEqual((day.state, day.differs, day.pull_checked, day.statement_checked),
                         ('unchecked', False, False, False), "never red where nothing runs")
        self.assertEqual((day.ledger_count, day.unlisted_count, day.unstated_count, day.unnotified_count),
                         (1, 0, 0, 0))
        self.assertFalse(day.checked_against)
        self.assertFalse(self.env['muchiri.mpesa.alert']._watch_ledger_gaps(self.provider, fields.Datetime.now()))
        # Asked by the accountant, who reconciles but may not read payment providers.
        accountant = new_test_user(self.env, login='ledger_day_accountant',
                                   groups='base.group_user,account.group_account_invoice')
        Day = self.env['muchiri.mpesa.ledger.day'].with_user(accountant)
        message = Day.action_mpesa_sources_help()['params']['message']
        self.assertIn("Pull Transactions is off", message)
        self.assertIn("no M-Pesa statement is imported", message)
        with self.assertRaises(AccessError):
            Day.with_user(self.distributor_user).action_mpesa_sources_help()

    def test_a_statement_gap_is_an_alert_within_the_time_it_covers(self):
        noon = naive_utc(datetime.combine(kenya_time(fields.Datetime.now()).date(), time(12), daraja.KENYA_TZ))
        missing, listed, later = (self._confirm(amount, f"unknown {amount}") for amount in (400, 300, 500))
        self._at(missing, noon - timedelta(minutes=3))
        self._at(listed, noon - timedelta(minutes=2), source_statement=True)
        self._at(later, noon - timedelta(minutes=1))  # After the statement's last row: not judged.
        day = self._day(listed)
        self.assertEqual((day.state, day.checked_against, day.pull_checked), ('differs', 'Statement', False))
        self.assertEqual((day.ledger_count, day.statement_count, day.unstated_count), (3, 1, 1))
        self.assertTrue(day.statement_differs)
        self.assertEqual(day.statement_until, listed.trans_time)
        gaps = self.env['muchiri.mpesa.ledger'].search(day.action_open_gaps()['domain'])
        self.assertEqual(gaps, missing, "the receipt the statement lacks, not the one after it")

        self.env['muchiri.mpesa.alert']._mpesa_raise_ledger_gaps(self.provider)
        alert = self.env['muchiri.mpesa.alert'].search([('kind', '=', 'ledger_gap'), ('state', '=', 'open'),
                                                        ('provider_id', '=', self.provider.id)])
        self.assertEqual(len(alert), 1)
        self.assertIn("not on the imported M-Pesa statement", alert.message)

        self._at(missing, missing.trans_time, source_statement=True)  # The next statement lists it.
        day = self._day(listed)
        self.assertEqual((day.state, day.unstated_count), ('agrees', 0))

    def test_a_receipt_only_the_statement_reported_is_not_notified(self):
        row = self._confirm(700, "unknown 700")
        self._at(row, row.trans_time, source_c2b=False, source_statement=True)
        day = self._day(row)
        self.assertEqual((day.state, day.unnotified_count, day.statement_count), ('agrees', 1, 1))
        self.assertEqual(self.env['muchiri.mpesa.ledger'].search(day.action_open_gaps()['domain']), row)
