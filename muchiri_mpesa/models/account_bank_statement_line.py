# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from odoo import fields, models

STATEMENT_KINDS = [
    ('payment', "Paid in"),
    ('charge', "M-Pesa charge"),
    ('sweep', "Sweep to the bank"),
    ('reversal', "Reversal"),
    ('other', "Other"),
    ('opening', "Opening balance"),
]


class AccountBankStatementLine(models.Model):
    _inherit = 'account.bank.statement.line'

    mpesa_receipt = fields.Char(string="M-Pesa Receipt", readonly=True, index='btree_not_null', copy=False)
    mpesa_statement_key = fields.Char(
        string="M-Pesa Statement Key", readonly=True, copy=False,
        help="The receipt (and for a charge, its role): one line per key and company, whatever is imported again.",
    )
    mpesa_linked_receipt = fields.Char(
        string="M-Pesa Linked Receipt", readonly=True, copy=False,
        help="The receipt a reversal row reversed (Linked Transaction ID).",
    )
    mpesa_kind = fields.Selection(STATEMENT_KINDS, string="M-Pesa Row", readonly=True, copy=False)
    mpesa_completed_at = fields.Datetime(string="M-Pesa Completion Time", readonly=True, copy=False)
    mpesa_balance = fields.Float(
        string="M-Pesa Balance", digits=(16, 2), readonly=True, copy=False,
        help="The shortcode's balance after this row, per the statement.",
    )

    def init(self):
        """One line per M-Pesa statement row and company, in the database itself: an import run
        twice, two overlapping periods or two imports at once never count a row twice
        (docs/design.md, 16. The M-Pesa statement)."""
        self.env.cr.execute(
            "CREATE UNIQUE INDEX IF NOT EXISTS account_bank_statement_line_mpesa_key_uniq"
            " ON account_bank_statement_line (company_id, mpesa_statement_key)"
            " WHERE mpesa_statement_key IS NOT NULL"
        )
