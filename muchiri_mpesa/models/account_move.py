# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from odoo import models


class AccountMove(models.Model):
    _name = 'account.move'
    _inherit = ['account.move', 'muchiri.mpesa.payable']

    # === CRUD METHODS === #

    def init(self):
        res = super().init()
        self._mpesa_create_reference_index("move_type = 'out_invoice'")
        return res

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
