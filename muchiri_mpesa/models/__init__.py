# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from . import (
    account_bank_statement_line,
    account_journal,
    ir_http,
    mpesa_alert,
    mpesa_event,
    mpesa_ledger,
    mpesa_ledger_day,
    mpesa_matching,
    mpesa_payable,
    mpesa_report,
    mpesa_statement,
    mpesa_token,
    payment_provider,
    payment_transaction,
    res_partner,
    res_partner_bank,
    sale_order,
)

# isort: split
# account.move inherits muchiri.mpesa.payable: imported after mpesa_payable.
from . import account_move
