# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""Payment transactions and the M-Pesa ledger.

A done STK prompt's receipt lands in the ledger as source 'stk', linked to the prompt: the same
receipt reported later by C2B or Pull only adds its source, and is never paid again.  Money the
ledger matches to a document becomes a transaction of the provider (operation 'offline') set done
with the receipt, so that Odoo's own post-processing makes the payment, as for a prompt.
"""
import logging

from odoo import api, fields, models
from odoo.fields import Command

from .. import daraja
from .mpesa_ledger import DARAJA_CONFIRMATIONS

_logger = logging.getLogger(__name__)


class PaymentTransaction(models.Model):
    _inherit = 'payment.transaction'

    mpesa_ledger_id = fields.Many2one(
        'muchiri.mpesa.ledger', string="M-Pesa Ledger", readonly=True, copy=False,
        index='btree_not_null', ondelete='restrict',
    )

    # === STK PROMPTS IN THE LEDGER === #

    def _process_notification_data(self, notification_data):
        """Override of `muchiri_mpesa`: a prompt's M-Pesa receipt lands in the ledger."""
        res = super()._process_notification_data(notification_data)
        if self.provider_code == 'mpesa' and self.state == 'done' and self.mpesa_receipt_number:
            self._mpesa_ledger_record_stk()
        return res

    def _mpesa_record_late_receipt(self, callback):
        """Override of `muchiri_mpesa`: the receipt of a prompt settled by STK Query, recorded
        late, lands in the ledger too."""
        state, message = super()._mpesa_record_late_receipt(callback)
        if state == 'processed' and self.mpesa_receipt_number:
            self._mpesa_ledger_record_stk()
        return state, message

    def _mpesa_ledger_record_stk(self):
        """Record this done prompt's receipt in the ledger, linked to it.

        In a savepoint: the ledger never undoes a settled payment (a Pull row records the receipt
        later, and rule 1 of the matching links it to this prompt then).
        """
        self.ensure_one()
        try:
            with self.env.cr.savepoint():
                row, created = self.env['muchiri.mpesa.ledger'].sudo()._mpesa_record(
                    self.provider_id, self.mpesa_receipt_number, 'stk', self._mpesa_ledger_values(),
                )
                if created or row.state in ('awaiting', 'unmatched'):
                    self._mpesa_ledger_link(row)
                elif self.mpesa_ledger_id != row:
                    # Placed already (by C2B or Pull, before its prompt said it was ours): the same
                    # money now pays two things.  Never hidden, never undone by guessing.
                    self.mpesa_ledger_id = row
                    row.conflict = True
                    row._mpesa_ask_accountants(self.env._(
                        "Receipt %(receipt)s was matched to %(documents)s, and prompt %(reference)s says"
                        " it paid it: the money is counted twice.  Cancel one of the payments.",
                        receipt=row.name, reference=self.reference,
                        documents=', '.join(row.sale_order_ids.mapped('name') + row.invoice_ids.mapped('name'))
                        or '-',
                    ))
        except Exception:
            _logger.warning("M-Pesa receipt %s of %s is not in the ledger yet.", self.mpesa_receipt_number,
                            self.reference, exc_info=True)

    def _mpesa_ledger_values(self):
        self.ensure_one()
        try:
            account = daraja.account_reference(self.reference)
        except daraja.DarajaValidationError:
            account = False
        provider = self.provider_id.sudo()
        return {
            'amount': self.mpesa_paid_amount or self.amount,
            'trans_time': self.mpesa_paid_at or fields.Datetime.now(),
            'phone': self.mpesa_phone or False,
            'msisdn': self.mpesa_phone or False,
            'shortcode': (provider.mpesa_till_number if provider.mpesa_shortcode_type == 'till'
                          else provider.mpesa_shortcode) or False,
            'bill_ref': account,
            'transaction_type': "STK Push",
            # Daraja's STK Query confirmed the callback that brought the receipt (not a late one).
            'confirmation': self.mpesa_receipt_status == 'confirmed' and 'stk',
        }

    def _mpesa_ledger_link(self, row):
        """This transaction holds `row`'s receipt: the row's money is its money."""
        self.ensure_one()
        if self.mpesa_ledger_id == row and row.state != 'unmatched':
            return
        self.mpesa_ledger_id = row
        documents = self._mpesa_documents()
        row.write({
            'state': 'matched',
            'note': self.env._("Paid by M-Pesa prompt %s.", self.reference),
            'sale_order_ids': [Command.link(order.id) for order in self.sale_order_ids],
            'invoice_ids': [Command.link(move.id) for move in self.invoice_ids],
            'partner_id': row.partner_id.id or self.partner_id.commercial_partner_id.id,
        })
        row.message_post(body=self.env._(
            "Paid by M-Pesa prompt %(reference)s%(documents)s.", reference=self.reference,
            documents=f" ({', '.join(documents.mapped('name'))})" if documents else '',
        ))

    # === LEDGER MONEY AS TRANSACTIONS === #

    @api.model
    def _mpesa_ledger_create_tx(self, row, document, amount, holds_receipt):
        """A done transaction of `amount` of the row's money for `document` (an order or an
        invoice), as Odoo's payment form would have made it; post-processing does the rest.

        :param bool holds_receipt: whether the transaction carries the receipt (one per receipt:
                                   the first of the row's transactions)
        """
        provider = row.provider_id
        field = 'sale_order_ids' if document._name == 'sale.order' else 'invoice_ids'
        command = [Command.set(document.ids)]
        partner = document.partner_invoice_id if document._name == 'sale.order' else document.partner_id
        tx = self.sudo().create({
            'provider_id': provider.id,
            'payment_method_id': self.env.ref('payment.payment_method_mpesa').id,
            'reference': self._compute_reference(provider.code, **{field: command}),
            'amount': amount,
            'currency_id': document.currency_id.id,
            'partner_id': partner.id,
            field: command,
            'operation': 'offline',
            'provider_reference': row.name,
            'mpesa_ledger_id': row.id,
            'mpesa_receipt_number': row.name if holds_receipt else False,
            'mpesa_receipt_status': 'confirmed' if row.confirmation in DARAJA_CONFIRMATIONS else 'unverified',
            'mpesa_phone': row.phone or False,
            'mpesa_paid_amount': amount,
            'mpesa_paid_at': row.trans_time or fields.Datetime.now(),
            'mpesa_api_url': provider._mpesa_api_base_url(),  # Test mode or production: see _mpesa_client.
        })
        tx._set_done(state_message=self.env._("M-Pesa receipt %s", row.name))
        if tx.mpesa_receipt_number and tx.mpesa_receipt_status == 'unverified':
            tx._mpesa_request_receipt_proof()  # Booked on the source check or a hand: Daraja's word still counts.
        return tx

    def _mpesa_payment_memo(self):
        """Override of `muchiri_mpesa`: the ledger's receipt is the memo of its payments, also of
        those whose transaction does not carry it (one receipt, several documents)."""
        if self.mpesa_ledger_id and not self.mpesa_push_sent_at:
            documents = ', '.join(self._mpesa_documents().mapped('name')) or self.reference
            return f"{self.mpesa_ledger_id.name} - {documents}"
        return super()._mpesa_payment_memo()
