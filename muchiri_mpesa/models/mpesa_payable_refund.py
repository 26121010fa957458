# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from odoo import fields, models
from odoo.exceptions import UserError

from .. import const


class MpesaPayable(models.AbstractModel):
    """A document flagged for refund (an overpayment, a second payment of a paid order) is
    refunded in one click: the extra M-Pesa payment is reversed through Odoo's own refund flow."""

    _inherit = 'muchiri.mpesa.payable'

    mpesa_receipt_unverified = fields.Selection(
        selection=[('unverified', "Unverified"), ('conflict', "Conflict")],
        string="M-Pesa Receipt Proof", compute='_compute_mpesa_receipt_unverified',
        help="A receipt that came after the payment, not (or not yet) confirmed by M-Pesa's"
             " Transaction Status, or one that M-Pesa contradicts.",
    )
    mpesa_receipt_unverified_note = fields.Char(compute='_compute_mpesa_receipt_unverified')

    def _compute_mpesa_receipt_unverified(self):
        # Not stored, no dependencies: read afresh each time (an abstract model names no
        # transaction_ids of its own).
        for document in self:
            txs = document.sudo().transaction_ids.filtered(
                lambda tx: tx.provider_code == 'mpesa' and tx.mpesa_receipt_status in ('unverified', 'conflict'))
            conflicts = txs.filtered(lambda tx: tx.mpesa_receipt_status == 'conflict')
            document.mpesa_receipt_unverified = 'conflict' if conflicts else 'unverified' if txs else False
            document.mpesa_receipt_unverified_note = '  '.join(
                f"{tx.mpesa_receipt_number}: {tx.mpesa_receipt_proof_note}" for tx in (conflicts or txs)
            ) or False

    def action_mpesa_refund_extra_payment(self):
        """Refund the extra M-Pesa payment of this document through Odoo's refund flow (the
        payment's own Refund button does the same): its refund transaction and, once M-Pesa's
        result comes, its refund payment, reconciled."""
        self.ensure_one()
        self.env['payment.provider']._mpesa_check_group('account.group_account_invoice')
        tx = self._mpesa_extra_payment()
        tx.sudo(False).action_refund()  # Odoo's own checks, as the accountant.
        refund = tx.sudo().child_transaction_ids.filtered('mpesa_reversal_claim')[:1]
        failed = refund.state == 'error'
        return {
            'type': 'ir.actions.client',
            'tag': 'display_notification',
            'params': {
                'type': 'danger' if failed else 'success',
                'message': refund.state_message if failed else self.env._(
                    "M-Pesa is reversing %(receipt)s (%(ref)s); its result settles the refund.",
                    receipt=tx.mpesa_receipt_number, ref=refund.reference,
                ),
                'next': {'type': 'ir.actions.client', 'tag': 'soft_reload'},
            },
        }

    def _mpesa_refundable_payments(self):
        """The document's done M-Pesa payments that no reversal holds yet."""
        self.ensure_one()
        return self.sudo().transaction_ids.filtered(
            lambda tx: tx.provider_code == 'mpesa' and tx.state == 'done' and tx.operation != 'refund'
            and not tx.child_transaction_ids.filtered('mpesa_reversal_claim')
        )

    def _mpesa_extra_payment(self):
        """The M-Pesa payment the document did not need: the latest one without which it is still
        paid.  M-Pesa reverses whole payments: an extra that is part of one payment is no
        one-click refund.

        :raise UserError: when no single payment is extra, saying why
        """
        self.ensure_one()
        extra = self._mpesa_extra_amount()
        for tx in self._mpesa_refundable_payments().sorted('id', reverse=True):
            # Less than a shilling short is M-Pesa's whole-shilling rounding.
            if extra - tx.amount > -const.ROUNDING_TOLERANCE:
                return tx
        raise UserError(self.env._(
            "No single M-Pesa payment of %(document)s is extra (%(extra)s paid beyond its total):"
            " M-Pesa reverses whole payments only.  Refund the difference by hand, or refund a whole"
            " payment from the payment itself.",
            document=self.display_name, extra=self._mpesa_format_amount(max(extra, 0)),
        ))
