# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from odoo import fields, models
from odoo.exceptions import UserError
from odoo.tools import SQL

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
        result comes, its refund payment, reconciled.  When the extra is part of one payment,
        M-Pesa cannot give back only that part: the accountant chooses between reversing the whole
        payment and paying the difference back by hand (a wizard with a button for each)."""
        self.ensure_one()
        self.env['payment.provider']._mpesa_check_group('account.group_account_invoice')
        try:
            tx = self._mpesa_extra_payment()
        except UserError:
            overpaying = self._mpesa_refundable_payments().sorted('id')[-1:]
            if not overpaying or self.currency_id.compare_amounts(self._mpesa_extra_to_refund(), 0) <= 0:
                raise
            return self.env['muchiri.mpesa.refund.extra']._mpesa_open(self, overpaying)
        return self._mpesa_reverse_payment(tx)

    def _mpesa_reverse_payment(self, tx):
        """Reverse the whole M-Pesa payment `tx` of this document, as the accountant (Odoo's own
        checks); the notification says what happens next."""
        self.ensure_one()
        tx.sudo(False).action_refund()
        # The refund just made (a refused one no longer holds the reversal): its state says how it went.
        refund = tx.sudo()._mpesa_receipt_shares()[:1].child_transaction_ids.filtered(
            lambda child: child.operation == 'refund').sorted('id')[-1:]
        failed = refund.state == 'error'
        return {
            'type': 'ir.actions.client',
            'tag': 'display_notification',
            'params': {
                'type': 'danger' if failed else 'success',
                'message': refund.state_message if failed else self.env._(
                    "M-Pesa is reversing %(receipt)s (%(ref)s); its result settles the refund.",
                    receipt=refund.source_transaction_id.mpesa_receipt_number, ref=refund.reference,
                ),
                'next': {'type': 'ir.actions.client', 'tag': 'soft_reload'},
            },
        }

    def _mpesa_extra_to_refund(self):
        """What this document's M-Pesa payments gave beyond its total: its own figure, or what the
        ledger flagged when one payment overpaid it (an invoice counts only what it needed)."""
        self.ensure_one()
        rows = self._mpesa_refundable_payments().mpesa_ledger_id.filtered(lambda row: row.state == 'over')
        return self.currency_id.round(max(self._mpesa_extra_amount(), sum(rows.mapped('refund_amount'))))

    def _mpesa_refund_extra_by_hand(self, tx, journal, amount):
        """The accountant paid the extra of M-Pesa payment `tx` back by hand (from the M-Pesa
        account to the customer's phone, in cash, by bank): recorded as the customer's outbound
        payment from `journal`, reconciled with the credit the extra left; the flag, its activity
        and the ledger row say it is settled, in the name of the accountant.

        :return: the posted payment
        :rtype: account.payment
        """
        self.ensure_one()
        self.env['payment.provider']._mpesa_check_group('account.group_account_invoice')
        if tx not in self._mpesa_refundable_payments():
            raise UserError(self.env._("%s is not an M-Pesa payment of this document.", tx.display_name))
        # One accountant at a time: the document's row is the one both would write, so a second
        # click waits here and then fails to serialize (Odoo retries it: it finds nothing left).
        self.env.cr.execute(SQL("SELECT id FROM %s WHERE id = %s FOR NO KEY UPDATE",
                                SQL.identifier(self._table), self.id))
        self.invalidate_recordset(['mpesa_needs_refund'])
        if not self.mpesa_needs_refund:
            raise UserError(self.env._("%s has no extra M-Pesa payment to refund.", self.display_name))
        if journal.type not in ('bank', 'cash') or journal.company_id != self.company_id:
            raise UserError(self.env._("Pay it back from a bank or cash journal of %s.", self.company_id.name))
        currency = self.currency_id
        extra = self._mpesa_extra_to_refund()
        if currency.compare_amounts(amount, 0) <= 0 or currency.compare_amounts(amount, extra) > 0:
            raise UserError(self.env._(
                "The amount paid back must be above zero and at most the extra %s.",
                self._mpesa_format_amount(extra),
            ))
        receipt = tx.mpesa_receipt_number or tx.mpesa_ledger_id.name or tx.reference
        payment = self.env['account.payment'].create({
            'payment_type': 'outbound',
            'partner_type': 'customer',
            'partner_id': tx.partner_id.commercial_partner_id.id,
            'amount': amount,
            'currency_id': currency.id,
            'journal_id': journal.id,
            'company_id': journal.company_id.id,
            'memo': self.env._("Extra of M-Pesa payment %(receipt)s - %(document)s, paid back by hand",
                               receipt=receipt, document=self.display_name),
        })
        payment.action_post()
        source = tx.sudo().payment_id
        account = payment.destination_account_id
        lines = (payment.move_id.line_ids + source.move_id.line_ids).filtered(
            lambda line: line.account_id == account and not line.reconciled)
        if source and len(lines) > 1:
            lines.sudo().reconcile()
        rest = currency.round(extra - amount)
        note = self.env._(
            "%(amount)s of the extra of M-Pesa payment %(receipt)s was paid back by hand by %(user)s"
            " (%(payment)s); still to pay back: %(rest)s.",
            amount=self._mpesa_format_amount(amount), receipt=receipt, user=self.env.user.name,
            payment=payment.name, rest=self._mpesa_format_amount(rest),
        )
        tx.sudo().mpesa_paid_back_by_hand += amount
        tx.sudo().mpesa_ledger_id._mpesa_extra_paid_back(amount, note)
        document = self.sudo()
        document.message_post(body=note, author_id=self.env.user.partner_id.id)
        if currency.compare_amounts(rest, 0) <= 0:
            document.mpesa_needs_refund = False
            document.activity_ids.filtered(
                lambda activity: activity.summary == self.env._("M-Pesa: check and refund an extra payment")
            ).action_feedback(feedback=note)
        return payment

    def _mpesa_refundable_payments(self):
        """The document's done M-Pesa payments that no reversal holds yet."""
        self.ensure_one()
        return self.sudo().transaction_ids.filtered(
            lambda tx: tx.provider_code == 'mpesa' and tx.state == 'done' and tx.operation != 'refund'
            and not tx.child_transaction_ids.filtered(
                lambda child: child.mpesa_reversal_claim or (child.operation == 'refund' and child.state == 'done'))
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
