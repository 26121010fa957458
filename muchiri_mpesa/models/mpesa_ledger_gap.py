# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""The gap report: for each day (Kenya time) and provider, what the ledger holds against what
Safaricom's Pull Transactions listed, and the alerts when they differ or money waits unmatched.

Every Pull row lands in the ledger, so Safaricom's side of a day is the rows Pull listed, at the
amounts Pull gave; the ledger's side is every row, whatever told us.  They differ when the ledger
holds money Safaricom never listed (a C2B confirmation or STK callback that Pull does not confirm)
or when Pull gives another amount for a receipt.
"""
from datetime import timedelta, timezone

from odoo import api, fields, models, tools

from .. import daraja
from .mpesa_alert import AlertCondition, _listed

# A day is compared once Pull has read past its end by this much (Safaricom lists late rows).
DAY_SETTLED_AFTER = timedelta(hours=1)
# Money waiting unmatched this long is an alert.
UNMATCHED_ALERT_DELAY = timedelta(minutes=15)


class MpesaLedgerDay(models.Model):
    _name = 'muchiri.mpesa.ledger.day'
    _description = "M-Pesa ledger against Safaricom, per day"
    _auto = False
    _order = 'day desc, provider_id'
    _rec_name = 'day'

    provider_id = fields.Many2one('payment.provider', readonly=True)
    company_id = fields.Many2one('res.company', readonly=True)
    currency_id = fields.Many2one('res.currency', readonly=True)
    day = fields.Date(readonly=True, help="In Kenya time, as M-Pesa statements are.")
    ledger_count = fields.Integer(string="Ledger Payments", readonly=True)
    ledger_amount = fields.Monetary(readonly=True)
    pull_count = fields.Integer(string="Safaricom Payments", readonly=True)
    pull_amount = fields.Monetary(string="Safaricom Amount", readonly=True)
    unlisted_count = fields.Integer(
        string="Not Listed by Safaricom", readonly=True,
        help="Payments in the ledger that Pull Transactions has not listed.",
    )
    differs = fields.Boolean(readonly=True)

    def init(self):
        tools.drop_view_if_exists(self.env.cr, self._table)
        self.env.cr.execute(f"""
            CREATE OR REPLACE VIEW {self._table} AS (
                SELECT min(l.id) AS id, l.provider_id, l.company_id, l.currency_id,
                       (l.trans_time AT TIME ZONE 'UTC' AT TIME ZONE 'Africa/Nairobi')::date AS day,
                       count(*) AS ledger_count,
                       sum(l.amount) AS ledger_amount,
                       count(*) FILTER (WHERE l.source_pull) AS pull_count,
                       coalesce(sum(l.pull_amount) FILTER (WHERE l.source_pull), 0) AS pull_amount,
                       count(*) FILTER (WHERE l.source_pull IS NOT TRUE) AS unlisted_count,
                       (count(*) FILTER (WHERE l.source_pull IS NOT TRUE) > 0
                        OR sum(l.amount) <> coalesce(sum(l.pull_amount) FILTER (WHERE l.source_pull), 0)
                       ) AS differs
                  FROM muchiri_mpesa_ledger l
                 WHERE l.trans_time IS NOT NULL
              GROUP BY l.provider_id, l.company_id, l.currency_id, day
            )""")


class MpesaAlert(models.Model):
    _inherit = 'muchiri.mpesa.alert'

    kind = fields.Selection(selection_add=[
        ('ledger_gap', "Ledger differs from Safaricom"),
        ('ledger_unmatched', "M-Pesa money to match"),
        ('pull_cut_short', "Pull Transactions cut short"),
    ], ondelete={'ledger_gap': 'cascade', 'ledger_unmatched': 'cascade', 'pull_cut_short': 'cascade'})

    def _check_receipt_conflicts(self, provider, now):
        """Override of `muchiri_mpesa` to add the ledger's checks to the provider's: the alerts
        stay open while their condition holds, and close with the others when it clears."""
        return super()._check_receipt_conflicts(provider, now) + self._mpesa_ledger_conditions(provider, now)

    @api.model
    def _mpesa_raise_ledger_gaps(self, provider):
        """Raise the ledger's alerts of `provider` now (after a Pull query)."""
        now = fields.Datetime.now()
        for condition in self._mpesa_ledger_conditions(provider, now):
            self._raise_condition(provider, condition, now)

    def _mpesa_ledger_conditions(self, provider, now):
        return [
            *self._mpesa_check_pull_cut_short(provider),
            *self._mpesa_check_ledger_gaps(provider, now),
            *self._mpesa_check_ledger_unmatched(provider, now),
        ]

    def _mpesa_check_pull_cut_short(self, provider):
        """The last Pull run did not read its whole window: what it did not read is neither in the
        ledger nor compared by the gap report yet.  One alert, until a run reads its whole window."""
        reason = provider.sudo().mpesa_pull_cut_short
        if not reason:
            return []
        return [AlertCondition(
            kind='pull_cut_short',
            key=f'pull_cut_short:{provider.id}',
            name=self.env._("%(provider)s: Pull Transactions did not read every payment", provider=provider.name),
            message=self.env._(
                "%(reason)s\nUntil a run reads its whole window, payments after that time are missing"
                " from the ledger if their confirmation was lost, and the ledger per day does not compare"
                " those days.  If this persists, Daraja keeps 48 hours only: check the M-Pesa statement"
                " and tell Safaricom (apisupport@safaricom.co.ke).", reason=reason,
            ),
            transactions=self.env['payment.transaction'],
            orders=self.env['sale.order'],
        )]

    def _mpesa_check_ledger_gaps(self, provider, now):
        """The days Pull has read past, within what Daraja keeps, whose figures differ: one alert."""
        synced = provider.sudo().mpesa_pull_synced_until
        if not synced:
            return []
        kenya_now = _kenya(synced - DAY_SETTLED_AFTER)
        last_day = kenya_now.date() - timedelta(days=1)  # The last day Pull read to its end.
        first_day = _kenya(now - daraja.PULL_WINDOW).date()
        self.env['muchiri.mpesa.ledger'].flush_model()  # The view reads the table.
        days = self.env['muchiri.mpesa.ledger.day'].search([
            ('provider_id', '=', provider.id), ('differs', '=', True),
            ('day', '>=', first_day), ('day', '<=', last_day),
        ])
        if not days:
            return []
        lines = [self.env._(
            "- %(day)s: ledger %(ledger_count)s payments, %(ledger_amount)s; Safaricom %(pull_count)s,"
            " %(pull_amount)s; %(unlisted)s not listed by Safaricom",
            day=day.day, ledger_count=day.ledger_count, ledger_amount=day.ledger_amount,
            pull_count=day.pull_count, pull_amount=day.pull_amount, unlisted=day.unlisted_count,
        ) for day in days]
        return [AlertCondition(
            kind='ledger_gap',
            key=f'ledger_gap:{provider.id}',
            name=self.env._("%(provider)s: the M-Pesa ledger differs from Safaricom on %(count)s days",
                            provider=provider.name, count=len(days)),
            message=self.env._(
                "Safaricom's Pull Transactions does not list what the ledger holds.  Open M-Pesa >"
                " Ledger per Day, then the payments not listed by Safaricom or flagged as conflicting,"
                " and check them on the M-Pesa statement.\n%(lines)s", lines=_listed(self.env, lines),
            ),
            transactions=self.env['payment.transaction'],
            orders=self.env['sale.order'],
        )]

    def _mpesa_check_ledger_unmatched(self, provider, now):
        """Money in the exceptions queue, or awaiting its confirmation, for a while: one alert."""
        rows = self.env['muchiri.mpesa.ledger'].search([
            ('provider_id', '=', provider.id), ('state', 'in', ('awaiting', 'unmatched')),
            ('create_date', '<=', now - UNMATCHED_ALERT_DELAY),
        ], order='id')
        if not rows:
            return []
        lines = [self.env._(
            "- %(receipt)s: %(amount)s, account %(account)s: %(note)s", receipt=row.name,
            amount=row._mpesa_format(row.amount), account=row.bill_ref or '-', note=row.note or '-',
        ) for row in rows]
        return [AlertCondition(
            kind='ledger_unmatched',
            key=f'ledger_unmatched:{provider.id}',
            name=self.env._("%(provider)s: %(count)s M-Pesa payments to match",
                            provider=provider.name, count=len(rows)),
            message=self.env._(
                "These payments reached the shortcode and match no order or invoice.  Match them,"
                " mark them as not ours, or flag them for refund (M-Pesa > Ledger > Exceptions).\n%(lines)s",
                lines=_listed(self.env, lines),
            ),
            transactions=self.env['payment.transaction'],
            orders=self.env['sale.order'],
        )]


def _kenya(value):
    """A naive UTC datetime as Kenya's wall-clock time."""
    return value.replace(tzinfo=timezone.utc).astimezone(daraja.KENYA_TZ)

