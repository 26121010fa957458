# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
import logging
import re

from psycopg2 import OperationalError
from werkzeug.exceptions import NotFound

from odoo import http
from odoo.exceptions import ValidationError
from odoo.http import request
from odoo.tools import consteq

from .. import daraja

_logger = logging.getLogger(__name__)

_CALLBACK_SECRET = re.compile(r'(/payment/mpesa/callback/)[^/\s?"]+')


class _MaskCallbackSecret(logging.Filter):
    """The callback secret is part of the URL: keep it out of the HTTP access log."""

    def filter(self, record):
        if isinstance(record.args, tuple) and any(
            isinstance(arg, str) and '/payment/mpesa/callback/' in arg for arg in record.args
        ):
            record.args = tuple(
                _CALLBACK_SECRET.sub(r'\1***', arg) if isinstance(arg, str) else arg
                for arg in record.args
            )
        return True


logging.getLogger('werkzeug').addFilter(_MaskCallbackSecret())


class MpesaController(http.Controller):
    _stk_push_url = '/payment/mpesa/stk_push'
    _callback_url = '/payment/mpesa/callback/<string:secret>'

    @http.route(_stk_push_url, type='json', auth='public')
    def mpesa_stk_push(self, reference, phone, access_token):
        """Send the STK Push of a transaction made by Odoo's transaction route.

        The access token, signed over the transaction's reference, amount, currency and partner,
        proves that the caller is the one Odoo gave the processing values to.

        :return: {} when the prompt is on its way, else {'error': message}
        """
        tx_sudo = request.env['payment.transaction'].sudo().search([
            ('reference', '=', reference), ('provider_code', '=', 'mpesa'),
        ], limit=1)
        if not tx_sudo or not tx_sudo._mpesa_check_access_token(access_token):
            raise ValidationError(request.env._("M-Pesa: this payment request is not valid."))
        error = tx_sudo._mpesa_send_stk_push(phone)
        return {'error': error} if error else {}

    @http.route(_callback_url, type='http', methods=['POST'], auth='public', csrf=False,
                save_session=False)
    def mpesa_callback(self, secret):
        """Receive Daraja's stkCallback: plain JSON, not JSON-RPC.

        The raw body is kept before anything else; whatever then goes wrong, Daraja gets its
        acknowledgement for a well-formed callback, and the kept body is processed again later.
        """
        provider_sudo = self._find_provider_by_secret(secret)
        if not provider_sudo:
            _logger.warning("M-Pesa callback on an unknown secret path was refused.")
            raise NotFound()

        raw_body = request.httprequest.get_data(cache=True)
        remote_addr = request.httprequest.remote_addr
        Event = request.env['muchiri.mpesa.event'].sudo()
        event = Event._record_callback(provider_sudo, raw_body, remote_addr)
        if not provider_sudo._mpesa_is_allowed_source(remote_addr):
            event._mark('rejected', request.env._("The source address %s is not allowed.", remote_addr))
            return request.make_json_response(
                {'ResultCode': 1, 'ResultDesc': "Rejected"}, status=403
            )
        try:
            callback = daraja.parse_stk_callback(raw_body)
        except daraja.CallbackParseError as error:
            event._mark('rejected', str(error))
            return request.make_json_response(
                {'ResultCode': 1, 'ResultDesc': "Rejected: not an stkCallback"}, status=400
            )
        event._set_parsed(callback)
        try:
            with request.env.cr.savepoint():
                request.env['payment.transaction'].sudo()._mpesa_handle_callback(callback, event)
        except OperationalError:
            raise  # A serialization failure: Odoo retries the whole request.
        except Exception as error:
            _logger.exception("M-Pesa callback %s could not be processed now.", event.id)
            event._mark('error', str(error))
        return request.make_json_response(daraja.ACCEPTED_RESPONSE)

    @staticmethod
    def _find_provider_by_secret(secret):
        providers = request.env['payment.provider'].sudo().search([('code', '=', 'mpesa')])
        for provider in providers:
            if provider.mpesa_callback_secret and consteq(provider.mpesa_callback_secret, secret):
                return provider
        return providers.browse()
