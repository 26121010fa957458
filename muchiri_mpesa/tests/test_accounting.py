# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""The accounting loop, end to end through the portal and the simulator: a distributor's payment
leaves an invoiced order, a posted and reconciled payment in the M-Pesa journal with the receipt as
its memo, and one mail.  An invoice takes one prompt at a time, and a second payment of it is flagged.
"""
from datetime import timedelta

from odoo import fields
from odoo.exceptions import AccessError, ValidationError
from odoo.fields import Command
from odoo.tests import new_test_user, tagged
from odoo.tools import is_html_empty

from .common import PHONE_CALLBACK_LOST, PHONE_CANCELLED, PHONE_SUCCESS, MpesaCommon


@tagged('post_install', '-at_install')
class TestAccountingLoop(MpesaCommon):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.provider.mpesa_invoice_on_payment = True  # A paid order is invoiced.

    def _order(self, invoice_policy='order', price_unit=1500.0):
        product = self.env['product.product'].create({
            'name': f"Maize flour ({invoice_policy})", 'type': 'consu', 'invoice_policy': invoice_policy,
            'list_price': price_unit,
        })
        return self.env['sale.order'].create({
            'partner_id': self.distributor.id,
            'pricelist_id': self.quotation.pricelist_id.id,
            'require_payment': True,
            'require_signature': False,
            'prepayment_percent': 1.0,
            'order_line': [Command.create({
                'product_id': product.id, 'product_uom_qty': 3, 'price_unit': price_unit,
                'tax_id': [Command.clear()],
            })],
        })

    def _pay(self, order, phone=PHONE_SUCCESS):
        tx, result = self._pay_from_portal(phone, order=order)
        self.assertEqual(result, {})
        self._wait_final(tx)  # The settlement job also confirms and invoices (post-processing).
        return tx

    def _mails_to_distributor(self, order, since_id):
        return order.message_ids.filtered(lambda m: m.id > since_id and self.distributor in m.partner_ids)

    def test_the_provider_has_its_own_journal(self):
        journal = self.provider.journal_id
        self.assertEqual((journal.code, journal.type), ('MPESA', 'bank'))
        line = journal.inbound_payment_method_line_ids.filtered(lambda pm: pm.payment_provider_id == self.provider)
        self.assertEqual(line.payment_account_id.name, "M-Pesa Outstanding Receipts")
        self.assertNotEqual(line.payment_account_id, journal.default_account_id, "not the bank account itself")
        self.assertTrue(line.payment_account_id.reconcile)
        self.assertEqual(self.provider.mpesa_cash_rounding_id.rounding, 1.0)

    def _assert_paid_in_the_mpesa_journal(self, order, tx):
        self.assertEqual(order.state, 'sale')
        invoice = order.invoice_ids
        self.assertEqual(len(invoice), 1)
        self.assertEqual(invoice.state, 'posted')
        self.assertEqual(invoice.payment_state, 'paid')
        payment = tx.payment_id
        self.assertEqual(payment.journal_id, self.provider.journal_id)
        self.assertEqual(payment.state, 'paid')
        self.assertTrue(payment.memo.startswith(tx.mpesa_receipt_number), payment.memo)
        self.assertIn(order.name, payment.memo)
        self.assertEqual(payment.move_id.ref, payment.memo, "the journal entry carries the receipt too")
        self.assertIn(invoice, payment.reconciled_invoice_ids)

    def test_a_paid_order_is_invoiced_and_reconciled(self):
        order = self._order('order')
        tx = self._pay(order)
        self._assert_paid_in_the_mpesa_journal(order, tx)

    def test_a_paid_order_of_delivered_goods_is_invoiced_too(self):
        order = self._order('delivery')
        tx = self._pay(order)
        self._assert_paid_in_the_mpesa_journal(order, tx)

    def test_the_whole_shilling_difference_is_on_the_invoice(self):
        order = self._order('order', price_unit=1500.40)  # KES 4,501.20: the phone is asked 4,502.
        tx = self._pay(order)
        self.assertEqual(tx.amount, 4502)
        self._assert_paid_in_the_mpesa_journal(order, tx)
        invoice = order.invoice_ids
        self.assertEqual(invoice.amount_total, 4502, "cash rounding: the invoice is what the phone paid")
        self.assertEqual(invoice.amount_residual, 0)
        rounding_line = invoice.line_ids.filtered(lambda line: line.display_type == 'rounding')
        self.assertAlmostEqual(abs(rounding_line.amount_currency), 0.80, places=2)

    def test_one_mail_for_a_payment_and_one_for_a_cancellation(self):
        order = self._order('order')
        since = max(order.message_ids.ids or [0])
        self._pay(order)
        mails = self._mails_to_distributor(order, since)
        self.assertEqual(len(mails), 1, mails.mapped('subject'))  # Odoo's order confirmation only.

        cancelled = self._order('order')
        since = max(cancelled.message_ids.ids or [0])
        self._pay(cancelled, phone=PHONE_CANCELLED)
        mails = self._mails_to_distributor(cancelled, since)
        self.assertEqual(len(mails), 1, "the addon's own mail, in the order's chatter")
        self.assertIn("not completed", mails.body)

    def test_a_swahili_distributor_reads_why_a_payment_failed_in_swahili(self):
        """M-Pesa's plain words for a result code are terms of the addon: the job writes them in
        English, the distributor whose language is Swahili reads them in Swahili, in the mail and
        on the status page; an English reader still reads English."""
        with self.registry.test_lock:
            self.env['res.lang']._activate_lang('sw')
            self.env['ir.module.module']._load_module_terms(['muchiri_mpesa'], ['sw'], overwrite=True)
            self.distributor.lang = 'sw'
        order = self._order('order')
        since = max(order.message_ids.ids or [0])
        tx = self._pay(order, phone=PHONE_CANCELLED)
        self.assertEqual(tx.state_message, "You cancelled the M-Pesa prompt.", "kept in English")
        mails = self._mails_to_distributor(order, since)
        self.assertEqual(len(mails), 1)
        self.assertIn("Ulighairi ombi la M-Pesa.", mails.body)
        self.assertNotIn("You cancelled", mails.body)
        for lang, expected in (('sw', "Ulighairi ombi la M-Pesa."), ('en_US', "You cancelled the M-Pesa prompt.")):
            with self.subTest(lang=lang):
                banner = self.env['ir.qweb'].with_context(lang=lang)._render('payment.state_header', {
                    'tx': tx.sudo(), 'is_html_empty': is_html_empty,
                })
                self.assertIn(expected, banner)
        paid = self._pay(self._order('order'))
        self.assertEqual(paid.state, 'done')
        banner = self.env['ir.qweb'].with_context(lang='sw')._render('payment.state_header', {
            'tx': paid.sudo(), 'is_html_empty': is_html_empty,
        })
        self.assertIn(f"Risiti ya M-Pesa {paid.mpesa_receipt_number}", banner)

    def test_a_payment_settled_by_query_shows_its_receipt_pending(self):
        order = self._order('order')
        tx, _result = self._pay_from_portal(PHONE_CALLBACK_LOST, order=order)
        self._wait(lambda: self._result_known(tx), message="the answer")
        tx._mpesa_settle_by_query()
        tx._mpesa_post_process()
        self.assertTrue(order.mpesa_receipt_pending)
        self.assertIn(order, self.env['sale.order'].search([('mpesa_receipt_pending', '=', True)]))
        self.assertIn("receipt pending", tx.payment_id.memo)
        # Then the callback brings the receipt: the payment says it, for the statement.
        self._post_callback(self._body(tx, receipt='LATE000042'))
        self.assertFalse(order.mpesa_receipt_pending)
        self.assertEqual(tx.payment_id.memo, f"LATE000042 - {order.name}")
        self.assertEqual(tx.payment_id.move_id.ref, tx.payment_id.memo)

    def test_the_status_badge_says_what_happened(self):
        self.assertFalse(self.quotation.copy().mpesa_payment_status, "no badge on an order without M-Pesa")
        order = self._order('order')
        tx = self._pay(order, phone=PHONE_CANCELLED)
        self.assertEqual(tx.state, 'cancel')
        self.assertEqual(order.mpesa_payment_status, 'cancelled', "a customer's cancellation is no failure")
        self.assertIn("(1032)", order.mpesa_last_result)
        self.assertNotIn("Request cancelled by user", order.mpesa_last_result, "plain words, not Daraja's")

    def test_the_form_tells_the_whole_shillings_before_the_prompt(self):
        order = self._order('order', price_unit=1500.40)
        self.authenticate('distributor', 'distributor')
        page = self.url_open(order.get_portal_url()).text
        self.assertIn('o_mpesa_whole_shillings', page)
        self.assertIn('4,502.00', page)
        page = self.url_open(self._order('order').get_portal_url()).text
        self.assertNotIn('o_mpesa_whole_shillings', page, "said only when it matters")

    def test_who_sees_what(self):
        """Salespeople and accountants read an order's M-Pesa figures; only administrators see or
        change Odoo's invoicing setting from the provider."""
        order = self._order('order')
        self._pay(order)
        salesman = new_test_user(self.env, login='seller', groups='sales_team.group_sale_salesman_all_leads')
        accountant = new_test_user(self.env, login='books', groups='account.group_account_invoice')
        for user in (salesman, accountant):
            values = order.with_user(user).read(['mpesa_payment_status', 'mpesa_receipt_number', 'mpesa_last_result'])
            self.assertEqual(values[0]['mpesa_payment_status'], 'paid', user.login)
        with self.assertRaises(AccessError):
            self.provider.with_user(salesman).read(['mpesa_invoice_on_payment'])


@tagged('post_install', '-at_install')
class TestInvoiceGuards(MpesaCommon):

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
