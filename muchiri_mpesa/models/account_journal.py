# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from odoo import fields, models
from odoo.exceptions import UserError

from .. import const


class AccountJournal(models.Model):
    _inherit = 'account.journal'

    mpesa_statement_journal = fields.Boolean(
        string="M-Pesa Journal", compute='_compute_mpesa_statement_journal',
        help="An M-Pesa provider's journal: its statement can be imported here.",
    )

    # === COMPUTE METHODS === #

    def _compute_mpesa_statement_journal(self):
        journals = self._mpesa_provider_lines().journal_id
        for journal in self:
            journal.mpesa_statement_journal = journal in journals

    # === ACTION METHODS === #

    def action_mpesa_import_statement(self):
        """The M-Pesa statement import of this journal's provider."""
        self.ensure_one()
        self.env['payment.provider']._mpesa_check_group('account.group_account_manager')
        provider = self._mpesa_provider_lines().payment_provider_id[:1]
        if not provider:
            raise UserError(self.env._("%s is no M-Pesa provider's journal.", self.display_name))
        return provider.action_mpesa_import_statement()

    # === BUSINESS METHODS === #

    def _mpesa_provider_lines(self):
        """The payment method lines (sudo) by which M-Pesa providers pay into these journals.  A
        provider's journal_id is computed from them and cannot be searched."""
        return self.env['account.payment.method.line'].sudo().search([
            ('journal_id', 'in', self.ids), ('payment_provider_id.code', '=', const.PROVIDER_CODE),
        ])
