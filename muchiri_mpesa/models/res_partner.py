# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""Distributors, and partners by the SHA-256 of their M-Pesa number: C2B confirmations carry the
payer's MSISDN hashed, so the partners' numbers are hashed the way Daraja hashes them, stored and
indexed (one indexed lookup per payment, however many partners)."""
import re

from odoo import api, fields, models
from odoo.exceptions import ValidationError

from .. import daraja
from ..utils import strong

# A till number as Daraja's B2B Express Checkout takes it (its primaryShortCode).
TILL_NUMBER = re.compile(r'[0-9]{5,7}')


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
    mpesa_till_number = fields.Char(
        string="M-Pesa Till", copy=False,
        help="The distributor's own M-Pesa till (Buy Goods number, 5 to 7 digits): an order or invoice may be"
             " paid from it, its operator confirming M-Pesa's prompt (B2B Express Checkout).",
    )

    # === COMPUTE METHODS === #

    @api.depends('mobile', 'phone')
    def _compute_mpesa_msisdn(self):
        for partner in self:
            msisdn = _msisdn(partner.mobile) or _msisdn(partner.phone)
            partner.mpesa_msisdn = msisdn or False
            partner.mpesa_msisdn_hash = daraja.hash_msisdn(msisdn) if msisdn else False

    # === CONSTRAINT METHODS === #

    @api.constrains('mpesa_till_number')
    def _check_mpesa_till_number(self):
        for partner in self.filtered('mpesa_till_number'):
            if not TILL_NUMBER.fullmatch(partner.mpesa_till_number):
                raise ValidationError(self.env._(
                    "An M-Pesa till number is 5 to 7 digits (got %(till)s).", till=partner.mpesa_till_number))

    # === BUSINESS METHODS === #

    def _mpesa_is_distributor(self):
        """A contact pays as its company does."""
        self.ensure_one()
        return self.is_distributor or self.commercial_partner_id.is_distributor


    # === BUSINESS METHODS - B2B EXPRESS CHECKOUT === #

    @api.model
    def _mpesa_clean_till(self, till):
        """`till` as M-Pesa takes it (its digits, spaces dropped), or a ValidationError saying why not."""
        text = ''.join(str(till or '').split())
        if not TILL_NUMBER.fullmatch(text):
            raise ValidationError(self.env._(
                "An M-Pesa till number is 5 to 7 digits (got %(till)s).", till=till or '-'))
        return text

    def _mpesa_payment_till(self):
        """The till this contact pays from: its own, else its company's."""
        self.ensure_one()
        return self.mpesa_till_number or self.commercial_partner_id.mpesa_till_number or False

    def _mpesa_pay_from_till_label(self):
        """The payment form's choice to pay from this contact's till, the till number inside."""
        self.ensure_one()
        return self.env._("Pay from your till %(till)s", till=strong(self._mpesa_payment_till()))


def _msisdn(number):
    """The normalised MSISDN of `number`, or None when it is no Kenyan mobile number (a number
    ported to Safaricom from another network pays by M-Pesa too)."""
    if not number:
        return None
    try:
        return daraja.normalize_msisdn(number, safaricom_only=False)
    except daraja.DarajaValidationError:
        return None
