# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from . import (
    mpesa_callback_match,
    mpesa_ledger_decide,
    mpesa_ledger_match,
    mpesa_payment_request,
    mpesa_refund_extra,
    mpesa_statement_import,
    payment_refund_wizard,
)
