# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
import logging

from werkzeug.exceptions import NotFound

from odoo import http
from odoo.http import request

from .. import const

_logger = logging.getLogger(__name__)


class MpesaC2BController(http.Controller):
    """The routes Daraja posts C2B validations and confirmations, and Pull notifications, to.

    Plain JSON on the provider's secret path, as for the STK callback: the secret names the
    provider (404 for any other path), the body is kept on its own committed cursor before anything
    reads it, and the event model decides and answers.  Nothing that follows the keeping may turn
    into a 5xx: a confirmation is then accepted (it is kept, and the retry job handles it).
    """

    @http.route(const.LNM_ROUTES['c2b_validation'], type='http', methods=['POST'], auth='public', csrf=False,
                save_session=False)
    def mpesa_c2b_validation(self, secret):
        return self._mpesa_inbound(secret, 'c2b_validation')

    @http.route(const.LNM_ROUTES['c2b_confirmation'], type='http', methods=['POST'], auth='public', csrf=False,
                save_session=False)
    def mpesa_c2b_confirmation(self, secret):
        return self._mpesa_inbound(secret, 'c2b_confirmation')

    @http.route(const.LNM_ROUTES['pull'], type='http', methods=['POST'], auth='public', csrf=False,
                save_session=False)
    def mpesa_pull_callback(self, secret):
        return self._mpesa_inbound(secret, 'pull_callback')

    def _mpesa_inbound(self, secret, kind):
        provider_sudo = request.env['payment.provider'].sudo()._mpesa_find_by_secret(secret)
        if not provider_sudo:
            _logger.warning("M-Pesa %s on an unknown secret path was refused.", kind)
            raise NotFound()
        Event = request.env['muchiri.mpesa.event'].sudo()
        # A body that could not be kept is not acknowledged (Odoo's own error answer): only what is
        # kept may be accepted, or the payment's report would be lost.
        with Event._mpesa_keep_inbound(
            provider_sudo, kind, request.httprequest.get_data(cache=True), request.httprequest.remote_addr,
        ) as event:
            try:
                status, answer = event._mpesa_handle_inbound()
            except Exception:  # The body is kept: never a 5xx (see the class docstring).
                _logger.warning("M-Pesa %s %s could not be handled now; it is kept.", kind, event.id, exc_info=True)
                event.env.cr.rollback()  # Back to the kept body, committed: the retry job takes it.
                status, answer = Event._mpesa_inbound_fallback(provider_sudo, kind)
        return request.make_json_response(answer, status=status)
