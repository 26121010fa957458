# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from odoo import models
from odoo.http import request

from .. import const


class IrHttp(models.AbstractModel):
    _inherit = 'ir.http'

    @classmethod
    def _pre_dispatch(cls, rule, args):
        """Keep a callback's raw bytes before Odoo reads its parameters: a body sent as a form
        would otherwise be consumed by the form parser, and could not be kept exactly."""
        if rule.rule in const.INBOUND_ROUTES:
            request.httprequest.get_data(cache=True, parse_form_data=False)
        return super()._pre_dispatch(rule, args)
