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
