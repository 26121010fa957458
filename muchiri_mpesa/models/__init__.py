# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from . import mpesa_event, mpesa_token, payment_provider, payment_transaction, res_partner, sale_order
