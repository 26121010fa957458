# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from odoo import api, fields, models


class MpesaLedgerMatch(models.TransientModel):
    """Place a payment of the exceptions queue on one or several orders and invoices.

    Invoices are paid first, then orders, each in the order chosen, up to what it owes; what is
    left over is the last document's customer credit, flagged for refund.  The matching posts the
    payments as for any M-Pesa payment, and the ledger row's chatter records who did it.
    """

    _name = 'muchiri.mpesa.ledger.match'
    _description = "Match an M-Pesa payment with orders and invoices"

    ledger_id = fields.Many2one('muchiri.mpesa.ledger', required=True, readonly=True, ondelete='cascade')
    company_id = fields.Many2one(related='ledger_id.company_id')
    currency_id = fields.Many2one(related='ledger_id.currency_id')
    amount = fields.Monetary(related='ledger_id.amount')
    bill_ref = fields.Char(related='ledger_id.bill_ref')
    note = fields.Char(related='ledger_id.note')
    partner_id = fields.Many2one(
        'res.partner', string="Customer", help="Narrows the documents offered below to this customer's.",
    )
    invoice_ids = fields.Many2many(
        'account.move', string="Invoices",
        domain="[('company_id', '=', company_id), ('move_type', '=', 'out_invoice'), ('state', '=', 'posted'),"
               " ('payment_state', 'not in', ('paid', 'in_payment', 'reversed')), ('currency_id', '=', currency_id),"
               " ('commercial_partner_id', '=?', partner_id)]",
    )
    sale_order_ids = fields.Many2many(
        'sale.order', string="Orders",
        domain="[('company_id', '=', company_id), ('state', 'in', ('draft', 'sent', 'sale')),"
               " ('currency_id', '=', currency_id), ('partner_id.commercial_partner_id', '=?', partner_id)]",
    )

    @api.model
    def default_get(self, fields_list):
        values = super().default_get(fields_list)
        row = self.env['muchiri.mpesa.ledger'].browse(self.env.context.get('active_id')).exists()
        if row:
            values['ledger_id'] = row.id
            values['partner_id'] = row.partner_id.id
        return values

    def action_match(self):
        self.ensure_one()
        self.env['payment.provider']._mpesa_check_group('account.group_account_invoice')
        self.ledger_id._mpesa_match_by_hand([*self.invoice_ids, *self.sale_order_ids])
        return {'type': 'ir.actions.act_window_close'}

