# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from odoo import api, fields, models

from odoo.addons.muchiri_mpesa import const


class SaleOrder(models.Model):
    _inherit = 'sale.order'

    mpesa_phone = fields.Char(
        string="M-Pesa Phone", copy=False, tracking=True,
        help="The phone that receives the M-Pesa prompt.",
    )
    mpesa_receipt_number = fields.Char(
        string="M-Pesa Receipt", compute='_compute_mpesa_payment', store=True, index='btree_not_null',
    )
    mpesa_payment_status = fields.Selection(
        string="M-Pesa Status", selection=const.ORDER_PAYMENT_STATUSES,
        compute='_compute_mpesa_payment', store=True, default='unpaid',
    )
    mpesa_last_result = fields.Char(
        string="M-Pesa Last Result", compute='_compute_mpesa_payment', store=True,
    )
    mpesa_paid_at = fields.Datetime(
        string="M-Pesa Paid On", compute='_compute_mpesa_payment', store=True,
    )
    mpesa_needs_refund = fields.Boolean(
        string="M-Pesa Refund To Check", copy=False, tracking=True,
        help="M-Pesa took more money for this order than it needed; see the chatter.",
    )

    @api.depends(
        'amount_total', 'transaction_ids.state', 'transaction_ids.amount',
        'transaction_ids.mpesa_receipt_number', 'transaction_ids.mpesa_result_desc',
        'transaction_ids.mpesa_paid_at',
    )
    def _compute_mpesa_payment(self):
        for order in self:
            txs = order.transaction_ids.filtered(lambda tx: tx.provider_code == 'mpesa').sorted('id')
            paid = txs.filtered(lambda tx: tx.state == 'done')
            last = txs[-1:]
            if paid and order.currency_id.compare_amounts(
                sum(paid.mapped('amount')), order.amount_total
            ) >= 0:
                status = 'paid'
            elif paid:
                status = 'partial'
            elif txs.filtered(lambda tx: tx.state == 'pending'):
                status = 'pending'
            elif last.state in ('cancel', 'error'):
                status = 'failed'
            else:
                status = 'unpaid'
            order.mpesa_payment_status = status
            order.mpesa_receipt_number = ', '.join(filter(None, paid.mapped('mpesa_receipt_number'))) or False
            order.mpesa_paid_at = paid[-1:].mpesa_paid_at or paid[-1:].last_state_change
            order.mpesa_last_result = last.mpesa_result_desc or last.state_message or False

    def _mpesa_flag_for_refund(self, message):
        """Record a payment the order did not need, and ask the accountants to deal with it."""
        self.ensure_one()
        self.mpesa_needs_refund = True
        self.message_post(body=message)
        self.activity_schedule(
            'mail.mail_activity_data_todo',
            summary=self.env._("M-Pesa: check and refund an extra payment"),
            note=message,
            user_id=self.user_id.id or self.env.ref('base.user_admin').id,
        )
