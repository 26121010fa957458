# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from odoo.addons.payment.controllers.portal import PaymentPortal


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
