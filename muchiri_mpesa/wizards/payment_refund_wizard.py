# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from odoo import fields, models


class PaymentRefundWizard(models.TransientModel):
    _inherit = 'payment.refund.wizard'

    # The form says what an M-Pesa refund is: a Reversal of the whole payment.
    provider_code = fields.Selection(related='transaction_id.provider_code')
