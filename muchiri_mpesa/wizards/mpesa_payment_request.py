# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from odoo import api, fields, models


class MpesaPaymentRequest(models.TransientModel):
    """Staff send an M-Pesa prompt for a sales order to the distributor's phone."""

    _name = 'muchiri.mpesa.payment.request'
    _description = "M-Pesa Payment Request"

    sale_order_id = fields.Many2one(
        'sale.order', string="Order", required=True, readonly=True, ondelete='cascade',
    )
    currency_id = fields.Many2one(related='sale_order_id.currency_id')
    partner_id = fields.Many2one(
        'res.partner', string="Customer", compute='_compute_partner_id',
        help="The partner of the payment: the order's invoice address.",
    )
    amount_due = fields.Monetary(
        string="Still Due", compute='_compute_amount_due', currency_field='currency_id',
    )
    phone = fields.Char(
        compute='_compute_phone', store=True, readonly=False,
        help="The Safaricom number that receives the prompt, e.g. 0712 345 678.",
    )
    pay_from = fields.Selection(
        [('phone', "A phone"), ('till', "The customer's till")], default='phone', required=True,
        help="The customer's till: its operator gets an M-Pesa prompt to pay from it (B2B Express Checkout).",
    )
    till = fields.Char(
        compute='_compute_till', store=True, readonly=False,
        help="The customer's M-Pesa till (5 to 7 digits).",
    )
    can_pay_from_till = fields.Boolean(compute='_compute_can_pay_from_till')
    amount = fields.Monetary(
        compute='_compute_amount', store=True, readonly=False, required=True,
        currency_field='currency_id',
        help="Whole shillings are sent to M-Pesa; a fraction is rounded up.  Above what one prompt may"
             " ask, the request asks the first instalment; request again for the rest.",
    )
    instalment_note = fields.Char(compute='_compute_instalment_note')

    @api.depends('sale_order_id')
    def _compute_partner_id(self):
        for wizard in self:
            order = wizard.sale_order_id
            wizard.partner_id = order.partner_invoice_id or order.partner_id

    @api.depends('sale_order_id')
    def _compute_amount_due(self):
        for wizard in self:
            wizard.amount_due = wizard.sale_order_id._mpesa_amount_due() if wizard.sale_order_id else 0.0

    @api.depends('sale_order_id')
    def _compute_phone(self):
        for wizard in self:
            order = wizard.sale_order_id
            partner = order.partner_invoice_id or order.partner_id
            wizard.phone = order.mpesa_phone or partner.mobile or partner.phone or False

    @api.depends('sale_order_id')
    def _compute_till(self):
        for wizard in self:
            order = wizard.sale_order_id
            partner = order.partner_invoice_id or order.partner_id
            wizard.till = partner._mpesa_payment_till() if partner else False

    @api.depends('sale_order_id')
    def _compute_can_pay_from_till(self):
        for wizard in self:
            provider = wizard.sale_order_id._mpesa_provider() if wizard.sale_order_id else False
            wizard.can_pay_from_till = bool(provider) and provider._mpesa_takes_till_payments()

    @api.depends('sale_order_id')
    def _compute_amount(self):
        for wizard in self:
            wizard.amount = max(wizard.amount_due, 0.0)

    @api.depends('sale_order_id', 'amount')
    def _compute_instalment_note(self):
        for wizard in self:
            order = wizard.sale_order_id
            wizard.instalment_note = (order and order._mpesa_instalment_note(wizard.amount)) or False

    def _sent_message(self, message):
        """The notification's text, with what was split off when one prompt could not take it all."""
        note = self.sale_order_id._mpesa_instalment_note(self.amount)
        return f"{note}  {message}" if note else message

    def action_send(self):
        """Send the prompt.  A refusal is noted in the order's chatter and shown.

        Bad input and the transaction's rules raise a ValidationError (nothing is created or sent).
        Daraja's refusal is returned as a notification rather than raised, as Odoo's wizards report
        an outcome (account.move.send's batch wizard): raising would roll back the chatter note and
        the transaction, whose error state records a real, audited attempt.
        """
        self.ensure_one()
        self.env['payment.provider']._mpesa_check_group('sales_team.group_sale_salesman')
        if self.pay_from == 'till':
            return self._action_send_to_till()
        tx, error = self.sale_order_id._mpesa_request_payment(self.phone, self.amount)
        if error:
            params = {
                'type': 'danger',
                'title': self.env._("M-Pesa refused the payment request"),
                'message': error,
                'sticky': True,
            }
        else:
            params = {
                'type': 'success',
                'title': self.env._("M-Pesa prompt sent"),
                'message': self._sent_message(self.env._(
                    "The customer confirms %(amount)s on %(phone)s with their M-Pesa PIN; the"
                    " order is updated when M-Pesa answers.",
                    amount=tx._mpesa_format_amount(tx.mpesa_requested_amount), phone=tx.mpesa_phone,
                )),
                'sticky': False,
            }
        return {
            'type': 'ir.actions.client',
            'tag': 'display_notification',
            'params': {**params, 'next': {'type': 'ir.actions.act_window_close'}},
        }

    # === BUSINESS METHODS - B2B EXPRESS CHECKOUT === #

    def _action_send_to_till(self):
        tx, error = self.sale_order_id._mpesa_request_till_payment(self.till, self.amount)
        params = {
            'type': 'danger' if error else 'success',
            'title': self.env._("M-Pesa refused the payment request") if error else self.env._("M-Pesa prompt sent"),
            'message': error or self._sent_message(self.env._(
                "The operator of till %(till)s confirms %(amount)s on M-Pesa's prompt; the order is updated"
                " once M-Pesa confirms the payment.",
                till=tx.mpesa_b2b_till, amount=tx._mpesa_format_amount(tx.mpesa_requested_amount),
            )),
            'sticky': bool(error),
        }
        return {
            'type': 'ir.actions.client',
            'tag': 'display_notification',
            'params': {**params, 'next': {'type': 'ir.actions.act_window_close'}},
        }
