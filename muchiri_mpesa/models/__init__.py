# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from . import (
    ir_http,
    mpesa_alert,
    mpesa_event,
    mpesa_payable,
    mpesa_report,
    mpesa_token,
    payment_provider,
    payment_provider_accounting,
    payment_provider_monitoring,
    payment_transaction,
    res_partner,
    sale_order,
)
