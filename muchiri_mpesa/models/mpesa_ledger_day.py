# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""The gap report: for each day (Kenya time) and provider, what the ledger holds against the
sources that list Safaricom's side, Pull Transactions and the imported M-Pesa statement (its
alerts are in mpesa_alert.py).

A day is judged only against a source that runs (docs/design.md, 3. Daraja facts: Pull is
approved for few shortcodes; the statement is what every business can download):

- Pull checks a ledger row when Pull is registered on the provider, the row is within the 48
  hours Pull reads back from its registration, and Pull has read past it.  A till's B2B payment,
  proven by Transaction Status, is compared only once Pull lists it (Pull does not list them).
- The statement checks a ledger row when an imported statement covers its time
  (``_statement_covered_until_sql``).

Every Pull or statement row lands in the ledger, so a source's gap is a ledger row it lacks; the
rows that only Pull or the statement reported (a lost confirmation) are counted as not notified.
A day no source checks is "Not checked", never "Differs".
"""
from datetime import datetime, time, timedelta

from odoo import api, fields, models, tools

from .. import const, daraja
from ..utils import kenya_time, naive_utc

DAY_STATES = [
    ('unchecked', "Not Checked"),
    ('agrees', "Agrees"),
    ('differs', "Differs"),
]


class MpesaLedgerDay(models.Model):
    _name = 'muchiri.mpesa.ledger.day'
    _description = "M-Pesa ledger against Safaricom, per day"
    _auto = False
    _order = 'day desc, provider_id'
    _rec_name = 'day'
    # Searching the view flushes what it reads (Pull writes the provider's fields, then reads the view).
    _depends = {
        'muchiri.mpesa.ledger': [
            'provider_id', 'company_id', 'currency_id', 'amount', 'pull_amount', 'trans_time', 'source_pull',
            'source_statement', 'source_stk', 'source_c2b', 'source_b2b',
        ],
        'payment.provider': ['mpesa_pull_registered_at', 'mpesa_pull_synced_until'],
    }

    provider_id = fields.Many2one('payment.provider', readonly=True)
    company_id = fields.Many2one('res.company', readonly=True)
    currency_id = fields.Many2one('res.currency', readonly=True)
    day = fields.Date(readonly=True, help="In Kenya time, as M-Pesa statements are.")
    state = fields.Selection(
        DAY_STATES, readonly=True,
        help="Not Checked: no source that lists Safaricom's side runs for this day (Pull is not"
             " registered, no imported statement covers it).",
    )
    checked_against = fields.Char(readonly=True, help="The sources this day is compared with.")
    ledger_count = fields.Integer(string="Ledger Payments", readonly=True)
    ledger_amount = fields.Monetary(readonly=True)
    pull_checked = fields.Boolean(string="Pull Checks It", readonly=True)
    pull_count = fields.Integer(string="Pull Payments", readonly=True)
    pull_amount = fields.Monetary(readonly=True)
    unlisted_count = fields.Integer(
        string="Not Listed by Pull", readonly=True,
        help="Payments in the ledger that Pull Transactions should list and has not.",
    )
    pull_differs = fields.Boolean(readonly=True)
    statement_checked = fields.Boolean(string="Statement Checks It", readonly=True)
    statement_until = fields.Datetime(string="Statement Covers Until", readonly=True)
    statement_count = fields.Integer(string="Statement Payments", readonly=True)
    statement_amount = fields.Monetary(readonly=True)
    unstated_count = fields.Integer(
        string="Not on the Statement", readonly=True,
        help="Payments in the ledger within the time an imported statement covers that it does not list.",
    )
    statement_differs = fields.Boolean(readonly=True)
    unnotified_count = fields.Integer(
        string="Not Notified", readonly=True,
        help="Payments only Pull or the statement reported: their callback or confirmation never came.",
    )
    differs = fields.Boolean(readonly=True)
    balance_checked = fields.Boolean(
        compute='_compute_balance_difference',
        help="The last M-Pesa statement import checked the M-Pesa journal's balance on this day.",
    )
    balance_difference = fields.Monetary(
        compute='_compute_balance_difference',
        help="At the last imported statement's last row: M-Pesa's balance minus the M-Pesa journal's (zero when"
             " they agree; the provider's Statement Check says which rows explain it).",
    )

    # === CRUD METHODS === #

    def init(self):
        # The view reads the provider's Pull fields, whose columns this module adds after this model.
        self.pool.post_init(self._create_view)

    def _create_view(self):
        tools.drop_view_if_exists(self.env.cr, self._table)
        self.env.cr.execute(f"""
            CREATE OR REPLACE VIEW {self._table} AS (
                WITH coverage AS (
                    -- The time the imported statement lines of each provider's M-Pesa journal span
                    -- (a provider's journal is the one of its payment method lines).
                    SELECT pml.payment_provider_id AS provider_id, min(line.mpesa_completed_at) AS since,
                           max(line.mpesa_completed_at) AS until
                      FROM account_bank_statement_line line
                      JOIN account_payment_method_line pml ON pml.journal_id = line.journal_id
                     WHERE line.mpesa_statement_key IS NOT NULL AND pml.payment_provider_id IS NOT NULL
                  GROUP BY pml.payment_provider_id
                ), ledger AS (
                    SELECT l.id, l.provider_id, l.company_id, l.currency_id, l.amount, l.pull_amount,
                           l.trans_time, l.source_pull, l.source_statement,
                           cov.since AS statement_since, cov.until AS statement_lines_until,
                           (l.source_stk OR l.source_c2b OR l.source_b2b) IS TRUE AS notified,
                           (l.trans_time AT TIME ZONE 'UTC' AT TIME ZONE 'Africa/Nairobi')::date AS day,
                           (p.mpesa_pull_registered_at IS NOT NULL
                            AND l.trans_time >= p.mpesa_pull_registered_at - interval '48 hours'
                            AND l.trans_time <= p.mpesa_pull_synced_until
                            AND (l.source_pull OR l.source_b2b IS NOT TRUE)) IS TRUE AS pull_checks
                      FROM muchiri_mpesa_ledger l
                      JOIN payment_provider p ON p.id = l.provider_id
                 LEFT JOIN coverage cov ON cov.provider_id = l.provider_id
                     WHERE l.trans_time IS NOT NULL
                ), covered AS (
                    SELECT ledger.*, {self._statement_covered_until_sql()} AS statement_until
                      FROM ledger
                ), checked AS (
                    SELECT covered.*,
                           (trans_time <= statement_until) IS TRUE AS statement_checks
                      FROM covered
                ), days AS (
                    SELECT min(id) AS id, provider_id, company_id, currency_id, day,
                           count(*) AS ledger_count,
                           sum(amount) AS ledger_amount,
                           bool_or(pull_checks) AS pull_checked,
                           count(*) FILTER (WHERE pull_checks AND source_pull) AS pull_count,
                           coalesce(sum(pull_amount) FILTER (WHERE pull_checks AND source_pull), 0)
                               AS pull_amount,
                           count(*) FILTER (WHERE pull_checks AND source_pull IS NOT TRUE) AS unlisted_count,
                           coalesce(sum(amount) FILTER (WHERE pull_checks), 0) AS pull_checked_amount,
                           bool_or(statement_checks) AS statement_checked,
                           max(statement_until) AS statement_until,
                           count(*) FILTER (WHERE source_statement) AS statement_count,
                           coalesce(sum(amount) FILTER (WHERE source_statement), 0) AS statement_amount,
                           count(*) FILTER (WHERE statement_checks AND source_statement IS NOT TRUE)
                               AS unstated_count,
                           count(*) FILTER (WHERE NOT notified) AS unnotified_count
                      FROM checked
                  GROUP BY provider_id, company_id, currency_id, day
                )
                SELECT id, provider_id, company_id, currency_id, day, ledger_count, ledger_amount,
                       pull_checked, pull_count, pull_amount, unlisted_count,
                       statement_checked, statement_until, statement_count, statement_amount, unstated_count,
                       unnotified_count,
                       pull_differs, statement_differs,
                       pull_differs OR statement_differs AS differs,
                       CASE WHEN pull_differs OR statement_differs THEN 'differs'
                            WHEN pull_checked OR statement_checked THEN 'agrees'
                            ELSE 'unchecked' END AS state,
                       concat_ws(', ', CASE WHEN pull_checked THEN 'Pull' END,
                                 CASE WHEN statement_checked THEN 'Statement' END) AS checked_against
                  FROM (SELECT days.*,
                               pull_checked AND (unlisted_count > 0 OR pull_checked_amount <> pull_amount)
                                   AS pull_differs,
                               statement_checked AND unstated_count > 0 AS statement_differs
                          FROM days) judged
            )""")

    @api.model
    def _statement_covered_until_sql(self):
        """SQL, over a ledger row of the CTE ``ledger`` (provider_id, day, trans_time, ...): up to
        when an imported statement covers the row's day, NULL when none does.

        The imported statement lines of the provider's M-Pesa journal span a period (its first
        row to its last): a row inside it is judged.  Rows a statement listed cover their day up to
        the last of them too (a statement downloaded at noon does not judge the afternoon).
        """
        return ("GREATEST(CASE WHEN trans_time >= statement_since THEN statement_lines_until END,"
                " max(trans_time) FILTER (WHERE source_statement) OVER (PARTITION BY provider_id, day))")

    # === COMPUTE METHODS === #

    def _compute_balance_difference(self):
        for day in self:
            provider = day.provider_id.sudo()  # An accountant may not read payment providers.
            checked_at = provider.mpesa_statement_checked_at
            day.balance_checked = bool(checked_at) and kenya_time(checked_at).date() == day.day
            day.balance_difference = provider.mpesa_statement_difference if day.balance_checked else 0.0

    # === ACTION METHODS === #

    def action_open_gaps(self):
        """The day's receipts that a checked source lacks, or that only Pull or the statement reported."""
        self.env['payment.provider']._mpesa_check_group('account.group_account_invoice')
        self.ensure_one()
        start = naive_utc(datetime.combine(self.day, time(0), daraja.KENYA_TZ))
        gaps = [[('source_stk', '=', False), ('source_c2b', '=', False), ('source_b2b', '=', False)]]
        if self.pull_checked:
            gaps.append([('source_pull', '=', False)])
        if self.statement_checked:
            gaps.append([('source_statement', '=', False), ('trans_time', '<=', self.statement_until)])
        domain = ['|'] * (len(gaps) - 1) + [term for gap in gaps for term in (['&'] * (len(gap) - 1) + gap)]
        return {
            'type': 'ir.actions.act_window',
            'name': self.env._("M-Pesa receipts of %(day)s to check", day=self.day),
            'res_model': 'muchiri.mpesa.ledger',
            'view_mode': 'list,form',
            'domain': [
                ('provider_id', '=', self.provider_id.id),
                ('trans_time', '>=', start), ('trans_time', '<', start + timedelta(days=1)),
                *domain,
            ],
        }

    def action_mpesa_sources_help(self):
        """Say, for each M-Pesa provider, which sources of Safaricom's side are off and how to
        turn one on: a day is judged only against a source that runs.  The list's header button:
        called on the selected days, or none; it is about every provider of the user's companies,
        whatever days are selected."""
        Provider = self.env['payment.provider']
        Provider._mpesa_check_group('account.group_account_invoice')
        # An accountant may not read payment providers: what is said of them here is no secret.
        providers = Provider.sudo().search([
            ('code', '=', const.PROVIDER_CODE), ('state', '!=', 'disabled'),
            *Provider._check_company_domain(self.env.companies),
        ])
        lines = [self._mpesa_sources_text(provider) for provider in providers]
        return {
            'type': 'ir.actions.client',
            'tag': 'display_notification',
            'params': {
                'title': self.env._("What the ledger is checked against"),
                'message': "\n".join(lines) or self.env._("No M-Pesa provider is set up."),
                'type': 'info',
                'sticky': True,
            },
        }

    # === BUSINESS METHODS === #

    @api.model
    def _mpesa_sources_text(self, provider):
        """One line on `provider`'s sources: Pull and the statement, on or off, and how to turn on."""
        pull = (
            self.env._("Pull Transactions runs")
            if provider.mpesa_pull_registered_at else
            self.env._("Pull Transactions is off (Safaricom approves it per shortcode: register it on the"
                       " provider, M-Pesa tab)")
        )
        statement = (
            self.env._("an imported M-Pesa statement checks the days it covers")
            if self.env['muchiri.mpesa.ledger'].search_count(
                [('provider_id', '=', provider.id), ('source_statement', '=', True)], limit=1)
            else self.env._("no M-Pesa statement is imported (download it from the M-Pesa org portal and"
                            " import it on the M-Pesa journal)")
        )
        return self.env._("%(provider)s: %(pull)s; %(statement)s.", provider=provider.name, pull=pull,
                          statement=statement)
