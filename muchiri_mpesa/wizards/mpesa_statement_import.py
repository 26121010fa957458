# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
import base64

from odoo import fields, models
from odoo.exceptions import UserError


class MpesaStatementImport(models.TransientModel):
    """The M-Pesa statement, as downloaded from the M-Pesa org portal (CSV or XLSX), imported into
    the provider's M-Pesa journal in one go (models/mpesa_statement.py)."""

    _name = 'muchiri.mpesa.statement.import'
    _description = "Import an M-Pesa statement"

    provider_id = fields.Many2one(
        'payment.provider', required=True, domain="[('code', '=', 'mpesa')]",
    )
    journal_id = fields.Many2one(related='provider_id.journal_id', string="M-Pesa Journal")
    statement_file = fields.Binary(
        help="The CSV or Excel (XLSX) file of the M-Pesa org portal.",
    )
    filename = fields.Char()
    statement_id = fields.Many2one('account.bank.statement', readonly=True)
    result = fields.Text(readonly=True)

    def action_import(self):
        self.ensure_one()
        self.env['payment.provider']._mpesa_check_group('account.group_account_manager')
        if not self.statement_file:
            raise UserError(self.env._("Choose the statement file first."))
        statement, message = self.env['muchiri.mpesa.statement']._mpesa_import(
            self.provider_id, base64.b64decode(self.statement_file), self.filename,
        )
        self.write({'statement_id': statement.id, 'result': message, 'statement_file': False})
        return {
            'type': 'ir.actions.act_window',
            'name': self.env._("M-Pesa statement imported"),
            'res_model': self._name,
            'res_id': self.id,
            'view_mode': 'form',
            'target': 'new',
        }

    def action_open_statement_lines(self):
        self.ensure_one()
        self.env['payment.provider']._mpesa_check_group('account.group_account_manager')
        return {
            'type': 'ir.actions.act_window',
            'name': self.statement_id.display_name,
            'res_model': 'account.bank.statement.line',
            'view_mode': 'list,form',
            'domain': [('statement_id', '=', self.statement_id.id)],
        }
