# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""The gap report: for each day (Kenya time) and provider, what the ledger holds against what
Safaricom's Pull Transactions listed (its alerts are in mpesa_alert.py).

Every Pull row lands in the ledger, so Safaricom's side of a day is the rows Pull listed, at the
amounts Pull gave; the ledger's side is every row, whatever told us.  They differ when the ledger
holds money Safaricom never listed (a C2B confirmation or STK callback that Pull does not confirm)
or when Pull gives another amount for a receipt.
"""
from odoo import fields, models, tools


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

    # === CRUD METHODS === #

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
                   -- A till's B2B payment, proven by Transaction Status, is compared only once Pull lists it.
                   AND (l.source_pull OR l.source_b2b IS NOT TRUE)
              GROUP BY l.provider_id, l.company_id, l.currency_id, day
            )""")
