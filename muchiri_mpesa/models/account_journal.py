# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from odoo import fields, models

from .. import const


class AccountJournal(models.Model):
    _inherit = 'account.journal'

    mpesa_statement_journal = fields.Boolean(
        string="M-Pesa Journal", compute='_compute_mpesa_statement_journal',
        help="An M-Pesa provider's journal: its statement can be imported here.",
    )

    # === COMPUTE METHODS === #

    def _compute_mpesa_statement_journal(self):
        journals = self.env['payment.provider'].sudo().search([
            ('code', '=', const.PROVIDER_CODE), ('journal_id', 'in', self.ids),
        ]).journal_id
        for journal in self:
            journal.mpesa_statement_journal = journal in journals

    # === ACTION METHODS === #

    def action_mpesa_import_statement(self):
        """The M-Pesa statement import of this journal's provider."""
        self.ensure_one()
        self.env['payment.provider']._mpesa_check_group('account.group_account_manager')
        provider = self.env['payment.provider'].sudo().search([
            ('code', '=', const.PROVIDER_CODE), ('journal_id', '=', self.id),
        ], limit=1)
        return provider.action_mpesa_import_statement()
