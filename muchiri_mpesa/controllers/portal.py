# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from odoo import http
from odoo.http import request

from odoo.addons.payment.controllers.portal import PaymentPortal
from odoo.addons.web.controllers.home import Home


class MpesaPaymentPortal(PaymentPortal):

    def _create_transaction(self, *args, **kwargs):
        """Override of `payment`: an M-Pesa payment of an order or invoice above what one prompt may
        ask is made for its next instalment, decided on the server from what is still due
        (docs/design.md, 5. Money rules).  Every transaction route of the portal (orders, invoices,
        payment links, the shop) comes through here."""
        tx_sudo = super()._create_transaction(*args, **kwargs)
        if tx_sudo.provider_code == 'mpesa':
            tx_sudo._mpesa_limit_to_instalment()
        return tx_sudo


class MpesaHome(Home):

    @http.route()
    def web_login(self, *args, **kwargs):
        """Override of `web`: a portal user's pages open in the user's own language.  Odoo keeps the
        portal's language in the `frontend_lang` cookie, which the login page itself sets (to the
        browser's language, or the last visitor's) and which then wins over the user's: a distributor
        who reads Swahili would get the M-Pesa form, its messages and the paybill details in English.
        The language switcher still changes it afterwards."""
        response = super().web_login(*args, **kwargs)
        if request.params.get('login_success') and request.session.uid:
            user = request.env['res.users'].sudo().browse(request.session.uid)
            if user.share and user.lang in request.env['res.lang']._get_frontend():
                # Through the future response, after any cookie Odoo's routing sets on this request.
                request.future_response.set_cookie('frontend_lang', user.lang)
        return response
