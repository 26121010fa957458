# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from odoo import api, fields, models
from odoo.exceptions import ValidationError


class PaymentProvider(models.Model):
    _inherit = 'payment.provider'

    # === MONITORING (see muchiri.mpesa.alert) === #
    mpesa_alert_group_id = fields.Many2one(
        'res.groups', string="Alert Recipients", ondelete='set null',
        default=lambda self: self.env.ref('account.group_account_manager', raise_if_not_found=False),
        help="Each user of this group gets an activity when an M-Pesa alert is raised. Empty: alerts"
             " are only listed under M-Pesa Alerts.",
    )
    mpesa_alert_window = fields.Integer(
        string="Success Rate Window (min)", default=60,
        help="The success rate is measured over the payments settled in this many last minutes.",
    )
    mpesa_alert_min_rate = fields.Float(
        string="Minimum Success Rate (%)", default=90.0,
        help="Below this success rate, an alert is raised.",
    )
    mpesa_alert_min_sample = fields.Integer(
        string="Minimum Sample", default=10,
        help="The success rate alert needs at least this many settled payments in the window.",
    )
    mpesa_alert_pending_delay = fields.Integer(
        string="Callback Alert Delay (s)", default=60,
        help="Payments still pending without any callback this many seconds after their prompt are"
             " reported, together, in one alert.",
    )
    mpesa_alert_order_failures = fields.Integer(
        string="Failures per Order", default=3,
        help="An order with this many failed M-Pesa payments in the look-back raises an alert.",
    )
    mpesa_alert_order_window = fields.Integer(
        string="Failures Look-back (h)", default=24,
    )
    mpesa_alert_quiet_period = fields.Integer(
        string="Alert Quiet Period (min)", default=60,
        help="Users are notified of the same alert at most once in this many minutes.",
    )

    @api.constrains(
        'mpesa_alert_window', 'mpesa_alert_min_rate', 'mpesa_alert_min_sample',
        'mpesa_alert_pending_delay', 'mpesa_alert_order_failures', 'mpesa_alert_order_window',
        'mpesa_alert_quiet_period',
    )
    def _check_mpesa_alert_settings(self):
        for provider in self.filtered(lambda p: p.code == 'mpesa'):
            if not 0 <= provider.mpesa_alert_min_rate <= 100:
                raise ValidationError(self.env._("The minimum success rate is a percentage, 0 to 100."))
            if min(provider.mpesa_alert_window, provider.mpesa_alert_min_sample,
                   provider.mpesa_alert_order_failures, provider.mpesa_alert_order_window) < 1:
                raise ValidationError(self.env._(
                    "The alert window, minimum sample, failures per order and look-back must be"
                    " at least 1."
                ))
            if provider.mpesa_alert_pending_delay < 0 or provider.mpesa_alert_quiet_period < 0:
                raise ValidationError(self.env._("Alert delays cannot be negative."))
