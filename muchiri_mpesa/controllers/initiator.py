# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
import logging

from werkzeug.exceptions import NotFound

from odoo import http
from odoo.http import request

from .. import const

_logger = logging.getLogger(__name__)

_ROUTE = {'type': 'http', 'methods': ['POST'], 'auth': 'public', 'csrf': False, 'save_session': False}


class MpesaInitiatorController(http.Controller):
    """Daraja's results of Reversal and Transaction Status requests (ResultURL) and its queue
    timeouts (QueueTimeOutURL): plain JSON on the provider's secret path.  The model keeps the
    body, queues it and answers at once; the initiator job settles it."""

    @http.route(const.LNM_ROUTES['reversal_result'], **_ROUTE)
    def mpesa_reversal_result(self, secret):
        return self._mpesa_receive(secret, 'reversal', timeout=False)

    @http.route(const.LNM_ROUTES['reversal_timeout'], **_ROUTE)
    def mpesa_reversal_timeout(self, secret):
        return self._mpesa_receive(secret, 'reversal', timeout=True)

    @http.route(const.LNM_ROUTES['status_result'], **_ROUTE)
    def mpesa_status_result(self, secret):
        return self._mpesa_receive(secret, 'status', timeout=False)

    @http.route(const.LNM_ROUTES['status_timeout'], **_ROUTE)
    def mpesa_status_timeout(self, secret):
        return self._mpesa_receive(secret, 'status', timeout=True)

    def _mpesa_receive(self, secret, api_name, timeout):
        provider_sudo = request.env['payment.provider'].sudo()._mpesa_find_by_secret(secret)
        if not provider_sudo:
            _logger.warning("M-Pesa result on an unknown secret path was refused.")
            raise NotFound()
        status, answer = request.env['muchiri.mpesa.event'].sudo()._mpesa_receive_initiator_result(
            provider_sudo, api_name, timeout, request.httprequest.get_data(cache=True),
            request.httprequest.remote_addr,
        )
        return request.make_json_response(answer, status=status)
