# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from odoo import api, fields, models

DECISIONS = [
    ('not_ours', "Not ours"),
    ('refund', "Refund it"),
]


class MpesaLedgerDecide(models.TransientModel):
    """Decide what becomes of a payment that matches nothing: not ours, or to refund; with why."""

    _name = 'muchiri.mpesa.ledger.decide'
    _description = "Decide what becomes of an unmatched M-Pesa payment"

    ledger_id = fields.Many2one('muchiri.mpesa.ledger', required=True, readonly=True, ondelete='cascade')
    state = fields.Selection(related='ledger_id.state', string="Status")
    decision = fields.Selection(selection=DECISIONS, required=True, default='not_ours')
    reason = fields.Text(required=True)

    @api.model
    def default_get(self, fields_list):
        values = super().default_get(fields_list)
        row = self.env['muchiri.mpesa.ledger'].browse(self.env.context.get('active_id')).exists()
        if row:
            values['ledger_id'] = row.id
        if self.env.context.get('default_decision') in dict(DECISIONS):
            values['decision'] = self.env.context['default_decision']
        return values

    def action_confirm(self):
        self.ensure_one()
        self.env['payment.provider']._mpesa_check_group('account.group_account_invoice')
        if self.decision == 'not_ours':
            self.ledger_id._mpesa_mark_not_ours(self.reason)
        else:
            self.ledger_id._mpesa_mark_for_refund(self.reason)
        return {'type': 'ir.actions.act_window_close'}

