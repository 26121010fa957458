# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""A shop that takes cards or bank transfers besides M-Pesa sees no change in them: the M-Pesa
provider's *Invoice on Payment* invoices the orders M-Pesa paid, and only those; Odoo's own
Automatic Invoice stays the shop's to set.
"""
from odoo.tests import tagged
from odoo.tools import str2bool

from .common import MpesaCommon

AUTOMATIC_INVOICE = 'sale.automatic_invoice'


@tagged('post_install', '-at_install')
class TestOtherProviders(MpesaCommon):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.env['ir.config_parameter'].sudo().set_param(AUTOMATIC_INVOICE, False)  # Odoo's default.
        cls.provider.mpesa_invoice_on_payment = True
        cls.other_provider = cls.dummy_provider  # Odoo's own tests' provider, in its bank journal.
        cls.other_method = cls.env.ref('payment.payment_method_unknown')

    def _automatic_invoice(self):
        return str2bool(self.env['ir.config_parameter'].sudo().get_param(AUTOMATIC_INVOICE, 'False'))

    def _paid(self, provider, order=None, state='done', amount=None, **values):
        """A payment of `order` by `provider`, as its provider's notification leaves it."""
        order = order or self.quotation
        if provider == self.other_provider:
            values['payment_method_id'] = self.other_method.id
        else:
            values.setdefault('mpesa_receipt_number', f'TST{order.id:07d}{state[:1].upper()}')
        tx = self._create_transaction(
            'direct', provider_id=provider.id, sale_order_ids=[order.id], state=state,
            amount=order.amount_total if amount is None else amount,
            reference=f'{provider.code}-{order.id}-{state}-{amount}', **values,
        )
        if state == 'done':
            tx._post_process()
        return tx

    def test_the_switch_leaves_odoo_s_automatic_invoice_alone(self):
        self.provider.mpesa_invoice_on_payment = False
        self.provider.mpesa_invoice_on_payment = True
        self.assertFalse(self._automatic_invoice(), "Odoo's own setting is the shop's, for every provider")
        self.assertFalse(self.provider.mpesa_automatic_invoice)
        self.env['ir.config_parameter'].sudo().set_param(AUTOMATIC_INVOICE, True)
        self.provider.invalidate_recordset(['mpesa_automatic_invoice'])
        self.assertTrue(self.provider.mpesa_automatic_invoice, "the form says when Odoo's setting is on")
        self.provider.mpesa_invoice_on_payment = False
        self.assertTrue(self._automatic_invoice())

    def test_another_provider_s_payment_is_not_invoiced(self):
        """As Odoo's TestSalePayment.test_11_so_payment_link expects it, with M-Pesa's switch on."""
        tx = self._paid(self.other_provider)
        self.assertEqual(self.quotation.state, 'sale', "confirmed by Odoo, as always")
        self.assertFalse(self.quotation.invoice_ids, "no invoice: Odoo's Automatic Invoice is off")
        self.assertFalse(tx.invoice_ids)
        self.assertEqual(tx.payment_id.journal_id, self.other_provider.journal_id)
        self.assertEqual(tx.payment_id.state, 'in_process', "posted, waiting for the bank statement")
        self.assertFalse(tx.payment_id.is_reconciled)

    def test_another_provider_s_invoices_are_linked_as_odoo_links_them(self):
        """As Odoo's TestSalePayment.test_linked_transactions_when_invoicing expects it."""
        order = self.quotation
        done = self._paid(self.other_provider, amount=order.amount_total - 2)
        pending = self._paid(self.other_provider, state='pending', amount=2)
        self.assertFalse(order.invoice_ids, "no invoice: Odoo's Automatic Invoice is off")
        order.action_confirm()
        first_invoice = order._create_invoices()
        self.assertEqual(first_invoice.transaction_ids, done + pending)
        self.assertFalse(done.payment_id.is_reconciled)
        done._post_process()  # Again, as Odoo's test does: the invoice is posted and reconciled.
        self.assertTrue(done.payment_id.is_reconciled)
        self.assertEqual(order.invoice_ids, first_invoice, "no invoice of our own")
        order.order_line[0].product_uom_qty += 2
        second_invoice = order._create_invoices()
        self.assertEqual(second_invoice.transaction_ids, pending, "only the pending payment is still to link")

    def test_an_m_pesa_payment_is_invoiced_and_reconciled(self):
        tx = self._paid(self.provider)
        invoice = self.quotation.invoice_ids
        self.assertEqual(self.quotation.state, 'sale')
        self.assertEqual(len(invoice), 1, "M-Pesa's Invoice on Payment invoices the order it paid")
        self.assertEqual(tx.invoice_ids, invoice)
        self.assertEqual(invoice.state, 'posted')
        self.assertIn(invoice.payment_state, ('paid', 'in_payment'))
        self.assertIn(invoice, tx.payment_id.reconciled_invoice_ids)
        self.assertTrue(invoice.is_move_sent, "sent to the customer, as Odoo's Automatic Invoice does")

    def test_an_order_paid_in_parts_is_invoiced_once(self):
        """Odoo's down payment is all that was paid so far: a second part must not invoice the first
        again.  Never more invoiced than paid; once paid, invoiced exactly once."""
        order = self.quotation
        order.write({'require_payment': True, 'prepayment_percent': 0.5})
        total = order.amount_total
        parts = [round(total * 0.6), round(total * 0.25)]
        parts.append(total - sum(parts))
        for step, amount in enumerate(parts):
            self._paid(self.provider, amount=amount, mpesa_receipt_number=f'TSTPART{step:03d}')
            invoiced = sum(order.invoice_ids.filtered(lambda move: move.state != 'cancel').mapped('amount_total'))
            with self.subTest(step=step):
                self.assertEqual(order.state, 'sale')
                self.assertLessEqual(invoiced, order.amount_paid + 0.01, "never invoiced beyond what was paid")
        self.assertAlmostEqual(invoiced, total, places=2)
        self.assertEqual(order.invoice_status, 'invoiced')

    def test_without_the_switch_an_m_pesa_payment_is_not_invoiced(self):
        self.provider.mpesa_invoice_on_payment = False
        tx = self._paid(self.provider)
        self.assertEqual(self.quotation.state, 'sale')
        self.assertFalse(self.quotation.invoice_ids)
        self.assertFalse(tx.invoice_ids)

    def test_with_odoo_s_automatic_invoice_every_order_is_invoiced_once(self):
        self.env['ir.config_parameter'].sudo().set_param(AUTOMATIC_INVOICE, True)
        other_order = self.quotation.copy()
        self._paid(self.provider)
        self._paid(self.other_provider, order=other_order)
        self.assertEqual(len(self.quotation.invoice_ids), 1, "Odoo invoices it: M-Pesa steps aside")
        self.assertEqual(len(other_order.invoice_ids), 1, "Odoo's setting, for every provider")
