# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from odoo import models

from .. import const


class AccountMove(models.Model):
    _name = 'account.move'
    _inherit = ['account.move', 'muchiri.mpesa.payable']

    # === CRUD METHODS === #

    def init(self):
        res = super().init()
        self._mpesa_create_reference_index("move_type = 'out_invoice'")
        return res

    def _post(self, soft=True):
        """Override of `sale` to also reconcile the invoice with M-Pesa payments the statement
        already took out of *In Process*: `sale` attaches only payments in process, so a part-payment
        reconciled with the M-Pesa statement before its order was invoiced would be asked again."""
        posted = super()._post(soft)
        for invoice in posted.filtered(lambda move: move.is_invoice(include_receipts=True)):
            payments = invoice.transaction_ids.filtered(
                lambda tx: tx.provider_code == const.PROVIDER_CODE and tx.operation != 'refund'
                # A payment M-Pesa reversed is no money for the invoice, whatever its lines say.
                and not tx.child_transaction_ids.filtered(lambda child: child.operation == 'refund'
                                                          and child.state == 'done')
            ).payment_id.filtered(lambda payment: payment.state == 'paid' and payment.payment_type == 'inbound')
            for line in payments.move_id.line_ids.filtered(
                lambda line: line.account_type in ('asset_receivable', 'liability_payable') and not line.reconciled
            ):
                invoice.js_assign_outstanding_line(line.id)
        return posted

    # === BUSINESS METHODS === #

    def _mpesa_search_reference(self, company, key, limit=5):
        """The customer invoices (sudo) of `company` whose number normalises to `key`: one indexed
        lookup."""
        return self._mpesa_search_key(company, key, "move_type = 'out_invoice'",
                                      ['name', 'company_id', 'move_type'], limit)

    def _generate_qr_code(self, silent_errors=False):
        """Override of `account` to keep an M-Pesa QR code on the invoice (`_mpesa_kept_qr_code`)
        when the invoice's bank account is the company's M-Pesa paybill or till."""
        return super(AccountMove, self.with_context(mpesa_qr_document=(self._name, self.id)))._generate_qr_code(
            silent_errors=silent_errors)
