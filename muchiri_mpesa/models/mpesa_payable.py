# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
import logging

from odoo import api, fields, models
from odoo.tools.misc import formatLang

_logger = logging.getLogger(__name__)


class MpesaPayable(models.AbstractModel):
    """What an M-Pesa prompt pays: a sale order, or an invoice (portal invoices, payment links).

    The money guards of a push (one prompt at a time, nothing for a paid document, extra money
    flagged for refund) read and change documents through these methods only, whatever their kind.
    """

    _name = 'muchiri.mpesa.payable'
    _description = "Document paid by M-Pesa"

    mpesa_needs_refund = fields.Boolean(
        string="M-Pesa Refund To Check", copy=False, tracking=True,
        help="M-Pesa took more money for this document than it needed; see the chatter.",
    )
    mpesa_last_prompt_at = fields.Datetime(
        string="Last M-Pesa Prompt", copy=False, readonly=True,
        help="When the last M-Pesa prompt for this document was sent.",
    )

    def _mpesa_lock_rows(self):
        """Lock the documents' rows for the rest of the database transaction (one push at a time)."""
        if self:
            self.env.cr.execute(
                f'SELECT id FROM "{self._table}" WHERE id IN %s FOR UPDATE',
                [tuple(self.ids)], log_exceptions=False,
            )

    def _mpesa_touch(self):
        """Record the prompt on its documents.  The write also makes a concurrent push that waits on
        their row locks fail with a serialization error, so that Odoo replays it on a snapshot that
        sees this prompt."""
        self.sudo().write({'mpesa_last_prompt_at': fields.Datetime.now()})

    # === STILL DUE: THE ONE ANSWER === #

    def _mpesa_amount_due(self):
        """What is still to pay on this document, whatever paid the rest (M-Pesa, a card, a bank
        transfer, a hand match, a payment of its invoices): the one answer that matching, the
        overpayment and refund flags, the portal and the payment request ask."""
        self.ensure_one()
        return self.currency_id.round(max(self.amount_total - self._mpesa_paid_amount(), 0.0))

    def _mpesa_extra_amount(self):
        """What the document's payments, less their refunds, exceed its total by."""
        self.ensure_one()
        return self.currency_id.round(self._mpesa_paid_amount() - self.amount_total)

    def _mpesa_paid_amount(self):
        """What was paid of this document so far, by every method; see the models' overrides."""
        self.ensure_one()
        return self._mpesa_net_paid(self.sudo().transaction_ids)

    @api.model
    def _mpesa_net_paid(self, transactions):
        """What `transactions` paid (done or authorized), less their done refunds (a reversed
        payment pays nothing: the customer has the money back), as read now: Odoo's own figures do
        not follow the transactions' states within a request."""
        txs = transactions.filtered(lambda tx: tx.state in ('done', 'authorized') and tx.operation != 'refund')
        # Refund children are not linked to the documents; their amounts are negative.
        refunds = txs.child_transaction_ids.filtered(lambda tx: tx.operation == 'refund' and tx.state == 'done')
        return sum(txs.mapped('amount')) + sum(refunds.mapped('amount'))

    def _mpesa_format_amount(self, amount):
        return formatLang(self.env, amount, currency_obj=self.currency_id)

    def _mpesa_flag_for_refund(self, message, provider):
        """Record a payment the document did not need, and ask the accountants to deal with it: the
        users of the provider's alert group, else the salesperson.  The flag always holds; a problem
        with the chatter or the activities never undoes the payment that raised it."""
        self.ensure_one()
        self.mpesa_needs_refund = True
        try:
            with self.env.cr.savepoint():
                self.message_post(body=message)
                accountants = provider.sudo().mpesa_alert_group_id.users.filtered(
                    lambda user: user.active and not user.share
                ) or self.user_id
                for user in accountants:
                    self.activity_schedule(
                        'mail.mail_activity_data_todo',
                        summary=self.env._("M-Pesa: check and refund an extra payment"),
                        note=message,
                        user_id=user.id,
                    )
        except Exception:
            _logger.warning("The refund request of %s could not be posted.", self.display_name, exc_info=True)


class AccountMove(models.Model):
    _name = 'account.move'
    _inherit = ['account.move', 'muchiri.mpesa.payable']

    def _mpesa_paid_amount(self):
        """Paid so far: what is reconciled, and the done transactions not turned into payments yet."""
        self.ensure_one()
        txs = self.sudo().transaction_ids
        unposted = txs.filtered(lambda tx: tx.state in ('done', 'authorized') and not tx.payment_id)
        # A done refund of money still counted here (unposted, or its payment still reconciled
        # with this invoice: the refund's reconciliation reopens it): the money went back already.
        reconciled = self._get_reconciled_payments()
        unposted |= txs.child_transaction_ids.filtered(
            lambda tx: tx.operation == 'refund' and tx.state == 'done' and (
                tx.source_transaction_id in unposted or tx.source_transaction_id.payment_id & reconciled)
        )
        return self.amount_total - self.amount_residual + sum(unposted.mapped('amount'))
