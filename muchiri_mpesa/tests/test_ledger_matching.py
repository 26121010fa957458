# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""The ledger's matching, one test per rule, through this Odoo's real C2B confirmation route."""
from unittest.mock import patch

from odoo.exceptions import AccessError, UserError
from odoo.fields import Command
from odoo.tests import JsonRpcException, tagged
from odoo.tools import mute_logger

from odoo.addons.muchiri_mpesa import daraja

from .ledger_common import MpesaLedgerCommon


@tagged('post_install', '-at_install')
class TestLedgerMatching(MpesaLedgerCommon):

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

    # === DUPLICATES AND HOSTILE INPUT === #

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

    def test_hostile_bodies_get_a_4xx_and_no_money(self):
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
