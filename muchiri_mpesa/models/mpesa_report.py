# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""Reporting over M-Pesa transactions: one row per payment attempt, read live from the transactions.

A SQL view (``_auto = False``, built by ``_table_query``) rather than stored fields on
payment.transaction: the figures are derived from columns the payment flow already writes, so they
can never be stale, need no recomputation when a transaction changes, and add no column to a table
every provider shares.  ``_depends`` makes Odoo flush pending transaction writes before reading it.
"""
from odoo import fields, models
from odoo.tools import SQL

from .. import const

FINAL_STATES = ('done', 'cancel', 'error')

# A customer's cancellation (ResultCode 1032, the only way an M-Pesa transaction is cancelled) is
# the customer's decision, not a failed payment: it is counted apart, and left out of the success
# rate, which measures whether payments the customer went through with succeed.
OUTCOMES = [
    ('success', "Paid"),
    ('failure', "Failed"),
    ('cancelled', "Cancelled by the customer"),
    ('pending', "Pending"),
]

# Where the final answer came from; 'none' when the transaction ended without any M-Pesa answer
# (Daraja refused the push, or nothing settled it before the cut-off).
SETTLED_BY = [*const.SETTLEMENT_SOURCES, ('none', "No M-Pesa answer")]


class MpesaReport(models.Model):
    _name = 'muchiri.mpesa.report'
    _description = "M-Pesa Payments Analysis"
    _auto = False
    _rec_name = 'transaction_id'
    _order = 'date desc, id desc'
    _depends = {
        'payment.transaction': [
            'provider_id', 'company_id', 'partner_id', 'currency_id', 'amount', 'state',
            'last_state_change', 'sale_order_ids', 'mpesa_phone', 'mpesa_push_sent_at',
            'mpesa_callback_at', 'mpesa_settled_at', 'mpesa_settled_by', 'mpesa_result_code',
            'mpesa_result_desc',
        ],
        'payment.provider': ['code'],
    }

    # === DIMENSIONS === #
    transaction_id = fields.Many2one('payment.transaction', readonly=True)
    provider_id = fields.Many2one('payment.provider', readonly=True)
    company_id = fields.Many2one('res.company', readonly=True)
    partner_id = fields.Many2one('res.partner', string="Customer", readonly=True)
    sale_order_id = fields.Many2one(
        'sale.order', string="Order", readonly=True,
        help="The order the payment is for (the first one if it pays several).",
    )
    currency_id = fields.Many2one('res.currency', readonly=True)
    date = fields.Datetime(
        string="Prompt Sent", readonly=True,
        help="When the STK Push was sent (when the payment was created if Daraja refused it).",
    )
    final_at = fields.Datetime(string="Settled On", readonly=True)
    state = fields.Selection(
        string="Status", readonly=True,
        selection=lambda self: self.env['payment.transaction']._fields['state'].selection,
    )
    outcome = fields.Selection(selection=OUTCOMES, readonly=True)
    result_code = fields.Char(readonly=True)
    result_desc = fields.Char(string="Result", readonly=True)
    settled_by = fields.Selection(selection=SETTLED_BY, readonly=True)
    has_callback = fields.Boolean(string="Callback Received", readonly=True)

    # === MEASURES === #
    amount = fields.Monetary(
        string="Amount Asked", readonly=True, aggregator='sum',
        help="The amount of the prompt, whatever its outcome; see Amount Paid for the money received.",
    )
    paid_amount = fields.Monetary(
        string="Amount Paid", readonly=True, aggregator='sum',
        help="The amount of the paid payments (zero for the others).",
    )
    success_count = fields.Integer(string="Paid", readonly=True, aggregator='sum')
    failure_count = fields.Integer(
        string="Failed", readonly=True, aggregator='sum',
        help="Payments that ended in error: refused by M-Pesa, failed on the phone, or never answered."
             "  Customers' cancellations are counted apart.",
    )
    cancelled_count = fields.Integer(
        string="Cancelled by the Customer", readonly=True, aggregator='sum',
        help="Prompts the customer cancelled on the phone (ResultCode 1032).",
    )
    pending_count = fields.Integer(string="Pending", readonly=True, aggregator='sum')
    # 100 when paid, 0 when failed, empty otherwise: the average is the rate of the settled.
    success_rate = fields.Float(
        string="Success Rate (%)", readonly=True, aggregator='avg', digits=(16, 1),
        help="Paid payments among the paid and failed ones.  Customers' cancellations are not"
             " counted (a customer who says no is not a failed payment: see Cancelled by the"
             " Customer), nor are pending payments.",
    )
    # 100 when an STK Query settled it, 0 when a callback did, empty otherwise.
    query_settled_rate = fields.Float(
        string="Settled by Query (%)", readonly=True, aggregator='avg', digits=(16, 1),
        help="The share of the answered payments that the reconciliation's STK Query settled"
             " because no callback had.",
    )
    settle_seconds = fields.Float(
        string="Push to Final (s)", readonly=True, aggregator='avg', digits=(16, 1),
        help="Seconds from the STK Push to the final state; the average leaves out pending"
             " payments and those Daraja refused.",
    )
    callback_delay_seconds = fields.Float(
        string="Callback Delay (s)", readonly=True, aggregator='avg', digits=(16, 1),
        help="Seconds from the STK Push to Daraja's first callback; the average leaves out the"
             " payments no callback came for (settled by STK Query, or still waiting).",
    )

    @property
    def _table_query(self):
        final = SQL("tx.state IN %s", FINAL_STATES)
        final_at = SQL("COALESCE(tx.mpesa_settled_at, tx.last_state_change)")
        return SQL(
            """
            SELECT tx.id AS id,
                   tx.id AS transaction_id,
                   tx.provider_id AS provider_id,
                   tx.company_id AS company_id,
                   tx.partner_id AS partner_id,
                   tx_order.sale_order_id AS sale_order_id,
                   tx.currency_id AS currency_id,
                   tx.amount AS amount,
                   CASE WHEN tx.state = 'done' THEN tx.amount ELSE 0 END AS paid_amount,
                   COALESCE(tx.mpesa_push_sent_at, tx.create_date) AS date,
                   CASE WHEN %(final)s THEN %(final_at)s END AS final_at,
                   tx.state AS state,
                   CASE WHEN tx.state = 'done' THEN 'success'
                        WHEN tx.state = 'cancel' THEN 'cancelled'
                        WHEN %(final)s THEN 'failure'
                        ELSE 'pending' END AS outcome,
                   tx.mpesa_result_code AS result_code,
                   tx.mpesa_result_desc AS result_desc,
                   CASE WHEN %(final)s THEN COALESCE(tx.mpesa_settled_by, 'none') END AS settled_by,
                   tx.mpesa_callback_at IS NOT NULL AS has_callback,
                   CASE WHEN tx.state = 'done' THEN 1 ELSE 0 END AS success_count,
                   CASE WHEN tx.state = 'error' THEN 1 ELSE 0 END AS failure_count,
                   CASE WHEN tx.state = 'cancel' THEN 1 ELSE 0 END AS cancelled_count,
                   CASE WHEN %(final)s THEN 0 ELSE 1 END AS pending_count,
                   -- Empty, not 0, where it does not apply: AVG() leaves NULLs out.
                   CASE WHEN tx.state = 'done' THEN 100.0
                        WHEN tx.state = 'error' THEN 0.0 END AS success_rate,
                   CASE WHEN NOT %(final)s THEN NULL
                        WHEN tx.mpesa_settled_by = 'query' THEN 100.0
                        WHEN tx.mpesa_settled_by = 'callback' THEN 0.0 END AS query_settled_rate,
                   CASE WHEN %(final)s AND tx.mpesa_push_sent_at IS NOT NULL
                        THEN EXTRACT(EPOCH FROM %(final_at)s - tx.mpesa_push_sent_at)::float8
                   END AS settle_seconds,
                   CASE WHEN tx.mpesa_callback_at IS NOT NULL AND tx.mpesa_push_sent_at IS NOT NULL
                        THEN EXTRACT(EPOCH FROM tx.mpesa_callback_at - tx.mpesa_push_sent_at)::float8
                   END AS callback_delay_seconds
              FROM payment_transaction tx
              JOIN payment_provider provider ON provider.id = tx.provider_id
         LEFT JOIN LATERAL (
                       SELECT MIN(rel.sale_order_id) AS sale_order_id
                         FROM sale_order_transaction_rel rel
                        WHERE rel.transaction_id = tx.id
                   ) tx_order ON TRUE
             WHERE provider.code = %(code)s
               -- A payment attempt: the push was sent, or Daraja refused it (the phone is then
               -- recorded too).  Drafts that never reached M-Pesa are not attempts.
               AND tx.state != 'draft'
               AND (tx.mpesa_push_sent_at IS NOT NULL OR tx.mpesa_phone IS NOT NULL)
            """,
            final=final, final_at=final_at, code=const.PROVIDER_CODE,
        )
