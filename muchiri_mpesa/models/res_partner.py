# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""Distributors, and partners by the SHA-256 of their M-Pesa number: C2B confirmations carry the
payer's MSISDN hashed, so the partners' numbers are hashed the way Daraja hashes them, stored and
indexed (one indexed lookup per payment, however many partners)."""
from odoo import api, fields, models

from .. import daraja


class ResPartner(models.Model):
    _inherit = 'res.partner'

    is_distributor = fields.Boolean(
        string="Distributor",
        help="Distributors may pay their orders with M-Pesa.  Set it on the company: its contacts"
             " inherit it.",
    )
    mpesa_msisdn = fields.Char(
        string="M-Pesa Number", compute='_compute_mpesa_msisdn', store=True, index='btree_not_null',
        help="The mobile number (else the phone) as M-Pesa writes it: 2547XXXXXXXX.",
    )
    mpesa_msisdn_hash = fields.Char(
        string="M-Pesa Number Hash", compute='_compute_mpesa_msisdn', store=True, index='btree_not_null',
        groups='account.group_account_invoice',
        help="The SHA-256 of the M-Pesa number, as C2B confirmations carry the payer's.",
    )

    # === COMPUTE METHODS === #

    @api.depends('mobile', 'phone')
    def _compute_mpesa_msisdn(self):
        for partner in self:
            msisdn = _msisdn(partner.mobile) or _msisdn(partner.phone)
            partner.mpesa_msisdn = msisdn or False
            partner.mpesa_msisdn_hash = daraja.hash_msisdn(msisdn) if msisdn else False

    # === BUSINESS METHODS === #

    def _mpesa_is_distributor(self):
        """A contact pays as its company does."""
        self.ensure_one()
        return self.is_distributor or self.commercial_partner_id.is_distributor


def _msisdn(number):
    """The normalised MSISDN of `number`, or None when it is no Kenyan mobile number (a number
    ported to Safaricom from another network pays by M-Pesa too)."""
    if not number:
        return None
    try:
        return daraja.normalize_msisdn(number, safaricom_only=False)
    except daraja.DarajaValidationError:
        return None
