# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from odoo import api, fields, models
from odoo.exceptions import UserError


class MpesaCallbackMatch(models.TransientModel):
    """Give a kept success callback the transaction whose push answer was never read.

    When Daraja took a push but we could not read its answer (a timeout), the transaction has no
    CheckoutRequestID and its callback cannot find it.  An accountant who recognises the payment
    attaches it here; the callback is then processed as any other: confirmed by STK Query, with
    the exact amount the phone was asked, its receipt unique.  A payment that does not fit the
    prompt (amount, phone) is matched only by an accounting manager who gives the reason.
    """

    _name = 'muchiri.mpesa.callback.match'
    _description = "Match an M-Pesa payment with its transaction"

    event_id = fields.Many2one('muchiri.mpesa.event', required=True, readonly=True)
    provider_id = fields.Many2one(related='event_id.provider_id')
    receipt_number = fields.Char(related='event_id.receipt_number')
    phone = fields.Char(related='event_id.phone')
    transaction_id = fields.Many2one(
        'payment.transaction', required=True,
        domain="[('provider_id', '=', provider_id), ('mpesa_outcome_unknown', '=', True),"
               " ('provider_reference', '=', False)]",
        help="A prompt whose answer was never read: its M-Pesa payment may be this one.",
    )
    amount = fields.Float(related='event_id.amount', string="Amount Paid (KES)")
    override_reason = fields.Text(
        string="Reason to Match Anyway",
        help="When the amount or the payer's phone does not fit the prompt: why this payment is still"
             " its payment.  Accounting managers only; it is written in the chatter.",
    )

    @api.model
    def default_get(self, fields_list):
        values = super().default_get(fields_list)
        event = self.env['muchiri.mpesa.event'].browse(self.env.context.get('active_id')).exists()
        if event:
            values['event_id'] = event.id
        return values

    def action_match(self):
        self.ensure_one()
        self.env['payment.provider']._mpesa_check_group('account.group_account_invoice')
        event, tx = self.event_id.sudo(), self.transaction_id.sudo()
        outcome = event._mpesa_match_by_hand(tx, self.override_reason)
        if event.state != 'processed':
            # Raising rolls everything back: the transaction keeps no borrowed CheckoutRequestID.
            raise UserError(self.env._("The payment was not accepted: %s", event.message or outcome))
        tx.mpesa_outcome_unknown = False
        tx._mpesa_post_process()
        for document in tx._mpesa_documents():
            document.message_post(body=self.env._(
                "M-Pesa payment %(receipt)s matched by hand with %(ref)s by %(user)s.",
                receipt=event.receipt_number, ref=tx.reference, user=self.env.user.name,
            ))
        return {'type': 'ir.actions.act_window_close'}
