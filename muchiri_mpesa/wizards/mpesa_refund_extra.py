# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from odoo import api, fields, models
from odoo.exceptions import UserError


class MpesaRefundExtra(models.TransientModel):
    """An extra M-Pesa payment that is part of one payment (the customer paid more than was due, in
    one go): M-Pesa reverses whole payments only.  The accountant chooses: reverse the whole
    payment (the document is then due again, and the customer pays it anew), or pay the difference
    back by hand and record it here."""

    _name = 'muchiri.mpesa.refund.extra'
    _description = "Refund the extra of an M-Pesa payment"

    res_model = fields.Char(required=True, readonly=True)
    res_id = fields.Many2oneReference(model_field='res_model', required=True, readonly=True)
    document_name = fields.Char(string="Document", readonly=True)
    transaction_id = fields.Many2one('payment.transaction', string="Payment", required=True, readonly=True)
    receipt = fields.Char(string="M-Pesa Receipt", readonly=True)
    company_id = fields.Many2one('res.company', required=True, readonly=True)
    currency_id = fields.Many2one('res.currency', required=True, readonly=True)
    receipt_amount = fields.Monetary(string="Payment Amount", readonly=True)
    extra_amount = fields.Monetary(string="Paid Beyond the Total", readonly=True)
    amount = fields.Monetary(string="Paid Back by Hand", help="What you paid back to the customer yourself.")
    journal_id = fields.Many2one(
        'account.journal', string="Paid Back From",
        domain="[('type', 'in', ('bank', 'cash')), ('company_id', '=', company_id)]",
        help="Where the money you paid back came from: the M-Pesa account, cash, a bank account.",
    )

    @api.model
    def _mpesa_open(self, document, tx):
        """The wizard for the extra of `document` inside M-Pesa payment `tx`, as an action."""
        tx = tx.sudo()
        extra = document._mpesa_extra_to_refund()
        wizard = self.create({
            'res_model': document._name,
            'res_id': document.id,
            'document_name': document.display_name,
            'transaction_id': tx.id,
            'receipt': tx.mpesa_receipt_number or tx.mpesa_ledger_id.name,
            'company_id': document.company_id.id,
            'currency_id': document.currency_id.id,
            'receipt_amount': tx._mpesa_receipt_amount(),
            'extra_amount': extra,
            'amount': extra,
            'journal_id': tx.provider_id.journal_id.id,
        })
        return {
            'type': 'ir.actions.act_window',
            'name': self.env._("Refund the extra M-Pesa payment"),
            'res_model': self._name,
            'res_id': wizard.id,
            'view_mode': 'form',
            'target': 'new',
        }

    def _document(self):
        self.ensure_one()
        if self.res_model not in ('sale.order', 'account.move'):
            raise UserError(self.env._("Not a document M-Pesa pays."))
        return self.env[self.res_model].browse(self.res_id).exists()

    def action_reverse_whole_payment(self):
        """Reverse the whole M-Pesa payment (Odoo's refund flow, as the accountant)."""
        self.ensure_one()
        return self._document()._mpesa_reverse_payment(self.transaction_id)

    def action_refund_by_hand(self):
        """Record the difference the accountant paid back by hand."""
        self.ensure_one()
        if not self.journal_id:
            raise UserError(self.env._("Say where the money you paid back came from."))
        self._document()._mpesa_refund_extra_by_hand(self.transaction_id, self.journal_id, self.amount)
        return {'type': 'ir.actions.act_window_close'}
