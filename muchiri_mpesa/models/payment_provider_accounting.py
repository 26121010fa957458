# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""Where M-Pesa money lands in the books: the provider's own journal, the whole-shilling rounding of
its invoices, and the invoicing of the orders it pays."""
import logging

from odoo import api, fields, models

from .. import const

_logger = logging.getLogger(__name__)

JOURNAL_CODE = 'MPESA'
JOURNAL_SEQUENCE = 90


class PaymentProvider(models.Model):
    _inherit = 'payment.provider'

    mpesa_cash_rounding_id = fields.Many2one(
        'account.cash.rounding', string="Whole-Shilling Rounding",
        help="M-Pesa takes whole shillings, rounded up: the invoices of orders it pays get this cash"
             " rounding, so that the invoice total is what the phone was asked and nothing stays open.",
    )
    mpesa_invoice_on_payment = fields.Boolean(
        string="Invoice on Payment", groups='base.group_system',
        help="An order this provider's M-Pesa payment pays is invoiced, the invoice posted and"
             " reconciled with the payment, even for products invoiced on delivered quantities. Other"
             " providers' payments are left as they are: Odoo's own Automatic Invoice (Sales > Settings)"
             " does this for every provider, M-Pesa included.",
    )
    mpesa_automatic_invoice = fields.Boolean(
        string="Odoo's Automatic Invoice", compute='_compute_mpesa_automatic_invoice',
        groups='base.group_system',
    )

    def _compute_mpesa_automatic_invoice(self):
        enabled = self.env['payment.transaction']._mpesa_automatic_invoice_enabled()
        for provider in self:
            provider.mpesa_automatic_invoice = enabled

    # === BUSINESS METHODS - ACCOUNTING SET-UP === #

    @api.model_create_multi
    def create(self, vals_list):
        """Override of `payment` to give a new M-Pesa provider (another company's) its journal."""
        providers = super().create(vals_list)
        providers.filtered(lambda p: p.code == const.PROVIDER_CODE)._mpesa_setup_accounting()
        return providers

    def _mpesa_setup_accounting(self):
        """Give each M-Pesa provider (all of them when called on none) its own bank journal, with
        its own outstanding receipts account, and a whole-shilling cash rounding; idempotent.
        Skipped for a company without a chart of accounts."""
        providers = self or self.search([('code', '=', const.PROVIDER_CODE)])
        for provider in providers.sudo():
            company = provider.company_id
            if not self.env['account.account'].sudo().search_count(
                [*self.env['account.account']._check_company_domain(company)], limit=1,
            ):
                _logger.info("M-Pesa: %s has no chart of accounts yet; no M-Pesa journal.", company.name)
                continue
            provider._mpesa_setup_journal()
            # Also for a copy that kept another company's rounding: its accounts are per company.
            provider.mpesa_cash_rounding_id = provider._mpesa_whole_shilling_rounding()

    def _mpesa_setup_journal(self):
        self.ensure_one()
        company = self.company_id
        Journal = self.env['account.journal'].sudo().with_company(company)
        journal = Journal.search([*Journal._check_company_domain(company), ('code', '=', JOURNAL_CODE)], limit=1)
        if not journal:
            kes = self.env.ref('base.KES')
            journal = Journal.create({
                'name': "M-Pesa",
                'code': JOURNAL_CODE,
                'type': 'bank',
                # After the shop's own bank journals: where Odoo looks for the first bank journal
                # (another provider's default journal, a payment's), it finds theirs, not M-Pesa's.
                'sequence': JOURNAL_SEQUENCE,
                'company_id': company.id,
                'currency_id': kes.id if company.currency_id != kes else False,
            })
        self.journal_id = journal  # account_payment then adds the provider's payment method line.
        line = journal.inbound_payment_method_line_ids.filtered(lambda pm_line: pm_line.payment_provider_id == self)
        if line and not line.payment_account_id:
            line.payment_account_id = self._mpesa_outstanding_receipts_account(journal)
        return journal

    def _mpesa_outstanding_receipts_account(self, journal):
        """An account of its own for M-Pesa money received and not yet on a statement, as Odoo's
        outstanding receipts account is for the bank journal's."""
        company = journal.company_id
        Account = self.env['account.account'].sudo().with_company(company)
        existing = Account.search([
            *Account._check_company_domain(company), ('name', '=', "M-Pesa Outstanding Receipts"),
        ], limit=1)
        if existing:
            return existing
        return Account.create({
            'name': "M-Pesa Outstanding Receipts",
            'code': Account._search_new_account_code(journal.default_account_id.code or '101400'),
            'account_type': 'asset_current',
            'reconcile': True,
        })

    def _mpesa_whole_shilling_rounding(self):
        company = self.company_id
        Rounding = self.env['account.cash.rounding'].sudo().with_company(company)
        rounding = self.mpesa_cash_rounding_id.with_company(company) \
            or Rounding.search([('name', '=', "M-Pesa: whole shillings")], limit=1) or Rounding.create({
            'name': "M-Pesa: whole shillings",
            'rounding': 1.0,
            'rounding_method': 'UP',
            'strategy': 'add_invoice_line',
        })
        Account = self.env['account.account'].sudo()
        domain = Account._check_company_domain(company)
        rounding.profit_account_id = rounding.profit_account_id or company.default_cash_difference_income_account_id \
            or Account.search([*domain, ('account_type', '=', 'income_other')], limit=1) \
            or Account.search([*domain, ('account_type', '=', 'income')], limit=1)
        rounding.loss_account_id = rounding.loss_account_id or company.default_cash_difference_expense_account_id \
            or Account.search([*domain, ('account_type', '=', 'expense')], limit=1)
        return rounding
