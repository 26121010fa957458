# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from odoo import fields, models


class ResPartner(models.Model):
    _inherit = 'res.partner'

    is_distributor = fields.Boolean(
        string="Distributor",
        help="Distributors may pay their orders with M-Pesa.  Set it on the company: its contacts"
             " inherit it.",
    )

    def _mpesa_is_distributor(self):
        """A contact pays as its company does."""
        self.ensure_one()
        return self.is_distributor or self.commercial_partner_id.is_distributor
