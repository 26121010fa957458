# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""Partners by the SHA-256 of their M-Pesa number: C2B confirmations carry the payer's MSISDN
hashed, so the partners' numbers are hashed the way Daraja hashes them, stored and indexed (one
indexed lookup per payment, however many partners)."""
from odoo import api, fields, models

from .. import daraja


def _msisdn(number):
    """The normalised MSISDN of `number`, or None when it is no Kenyan mobile number (a number
    ported to Safaricom from another network pays by M-Pesa too)."""
    if not number:
        return None
    try:
        return daraja.normalize_msisdn(number, safaricom_only=False)
    except daraja.DarajaValidationError:
        return None


class ResPartner(models.Model):
    _inherit = 'res.partner'

    mpesa_msisdn = fields.Char(
        string="M-Pesa Number", compute='_compute_mpesa_msisdn', store=True, index='btree_not_null',
        help="The mobile number (else the phone) as M-Pesa writes it: 2547XXXXXXXX.",
    )
    mpesa_msisdn_hash = fields.Char(
        string="M-Pesa Number Hash", compute='_compute_mpesa_msisdn', store=True, index='btree_not_null',
        groups='account.group_account_invoice',
        help="The SHA-256 of the M-Pesa number, as C2B confirmations carry the payer's.",
    )

    @api.depends('mobile', 'phone')
    def _compute_mpesa_msisdn(self):
        for partner in self:
            msisdn = _msisdn(partner.mobile) or _msisdn(partner.phone)
            partner.mpesa_msisdn = msisdn or False
            partner.mpesa_msisdn_hash = daraja.hash_msisdn(msisdn) if msisdn else False
