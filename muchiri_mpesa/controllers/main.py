# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
import logging
import re

from werkzeug.exceptions import HTTPException, NotFound
from werkzeug.routing import Map, Rule

from odoo import http
from odoo.exceptions import ValidationError
from odoo.http import request

from odoo.addons.payment.controllers.post_processing import PaymentPostProcessing

from .. import const

_logger = logging.getLogger(__name__)

# The secret path of every inbound route (the old STK one and the neutral prefix).
_SECRET_PATHS = ('/payment/mpesa/callback/', const.LNM_PREFIX + '/')
_CALLBACK_SECRET = re.compile('(' + '|'.join(map(re.escape, _SECRET_PATHS)) + r')[^/\s?"]+')


class _MaskCallbackSecret(logging.Filter):
    """The callback secret is part of the URL: keep it out of the HTTP access log."""

    def filter(self, record):
        if isinstance(record.args, tuple) and any(
            isinstance(arg, str) and any(path in arg for path in _SECRET_PATHS) for arg in record.args
        ):
            record.args = tuple(
                _CALLBACK_SECRET.sub(r'\1***', arg) if isinstance(arg, str) else arg
                for arg in record.args
            )
        return True


logging.getLogger('werkzeug').addFilter(_MaskCallbackSecret())

# The inbound routes again, to tell which one a request came on (Odoo's dispatch does not say).
_INBOUND_MAP = Map([Rule(route, endpoint=route) for route in const.INBOUND_ROUTE_KINDS],
                   strict_slashes=False, merge_slashes=False).bind('localhost')


def _route_kind(path):
    """The (kind, initiator API) of the inbound route `path` came on."""
    try:
        route, _args = _INBOUND_MAP.match(path, method='POST')
    except HTTPException as error:  # Odoo's map matched it: never here.
        raise NotFound() from error
    return const.INBOUND_ROUTE_KINDS[route]


class MpesaController(http.Controller):
    _stk_push_url = '/payment/mpesa/stk_push'

    @staticmethod
    def _mpesa_transaction(reference, access_token):
        """The M-Pesa transaction (sudo) `reference` names, if `access_token` is the one Odoo gave
        with its processing values (signed over its reference, amount, currency and partner)."""
        tx_sudo = request.env['payment.transaction'].sudo().search([
            ('reference', '=', reference), ('provider_code', '=', 'mpesa'),
        ], limit=1)
        if not tx_sudo or not tx_sudo._mpesa_check_access_token(access_token):
            raise ValidationError(request.env._("M-Pesa: this payment request is not valid."))
        return tx_sudo

    @http.route(_stk_push_url, type='json', auth='public')
    def mpesa_stk_push(self, reference, phone, access_token):
        """Send the STK Push of a transaction made by Odoo's transaction route.

        The access token, signed over the transaction's reference, amount, currency and partner,
        proves that the caller is the one Odoo gave the processing values to.

        :return: {} when the prompt is on its way, else {'error': message}
        """
        tx_sudo = self._mpesa_transaction(reference, access_token)
        error = tx_sudo._mpesa_send_stk_push_or_refuse(phone)
        return {'error': error} if error else {}

    @http.route('/payment/mpesa/till_push', type='json', auth='public')
    def mpesa_till_push(self, reference, till, access_token):
        """Prompt the distributor's till to pay a transaction made by Odoo's transaction route (B2B
        Express Checkout), with the access-token check of the STK Push route.

        :return: {} when the prompt is on its way, else {'error': message}
        """
        tx_sudo = self._mpesa_transaction(reference, access_token)
        if str(till or '').strip() != tx_sudo.partner_id._mpesa_payment_till():
            # Only the contact's own till is prompted: never a till the caller typed.
            return {'error': request.env._("M-Pesa: this is not the till of your account.")}
        error = tx_sudo._mpesa_send_b2b_checkout_or_refuse(till)
        return {'error': error} if error else {}

    # auth='none', the public user set below: Odoo's 'public' reads the public user on every
    # request (does it still exist?), one statement per callback.  Only a database's routing map
    # holds this addon's routes, so the request always has its database; the secret path and the
    # source check are the route's security, as before.  Read/write, as a 'public' route is: an
    # auth='none' route would start on a read-only cursor, and run again on a read/write one.
    @http.route(list(const.INBOUND_ROUTE_KINDS), type='http', methods=['POST'], auth='none', csrf=False,
                save_session=False, readonly=False)
    def mpesa_inbound(self, secret):
        """Receive what Daraja posts: STK callbacks, C2B validations and confirmations, Pull
        notifications, Reversal and Transaction Status results.  Plain JSON, not JSON-RPC.

        The secret path names the provider (404 for any other path), the route the kind
        (const.INBOUND_ROUTE_KINDS).  The model keeps the body on its own committed cursor before
        anything reads it, admits it and answers at once; what waits (an STK callback confirmed by
        STK Query, a result) is settled by the settlement job: no HTTP worker waits on Daraja while
        Daraja is calling us.
        """
        # The public user, as auth='public' gives it (its id cached by Odoo): the kept rows are its.
        request.update_env(user=request.env['ir.model.data']._xmlid_to_res_id('base.public_user', True))
        kind, initiator_api = _route_kind(request.httprequest.path)
        _logger.debug("M-Pesa %s received.", kind)  # With the SQL log: what the intake itself costs.
        provider_sudo = request.env['payment.provider'].sudo()._mpesa_find_by_secret(secret)
        if not provider_sudo:
            _logger.warning("M-Pesa %s on an unknown secret path was refused.", kind)
            raise NotFound()
        status, answer = request.env['muchiri.mpesa.event'].sudo()._mpesa_receive(
            provider_sudo, kind, request.httprequest.get_data(cache=True), request.httprequest.remote_addr,
            initiator_api=initiator_api,
        )
        _logger.debug("M-Pesa %s answered %s.", kind, status)
        return request.make_json_response(answer, status=status)


class MpesaPaymentPostProcessing(PaymentPostProcessing):

    @http.route()
    def poll_status(self, **kwargs):
        """Override of `payment` to bring the status check of a late M-Pesa prompt forward while
        the distributor watches its status page, and to keep the page waiting while another worker
        post-processes the payment."""
        monitored_tx = self._get_monitored_transaction()
        if monitored_tx.provider_code == 'mpesa':
            monitored_tx._mpesa_expedite_status_check()
        values = super().poll_status(**kwargs)
        if monitored_tx.provider_code == 'mpesa' and values['state'] == 'done' and not monitored_tx.is_post_processed:
            # Odoo's job is confirming the order right now (`_post_process`): the page asks again
            # in a moment rather than land on a quotation not confirmed yet.
            values['state'] = 'pending'
        return values
