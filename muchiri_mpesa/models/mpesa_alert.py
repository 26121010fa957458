# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""Alerts on the health of M-Pesa payments, raised by a cron and sent as activities.

One record per alerting condition, identified by a key (what it is about: a provider's success
rate, a provider's missing callbacks, one order's failures).  While the condition holds, the
same record stays open and is updated in place; it is closed when a watch no longer finds the
condition.  Users are notified when the alert opens, and again only when the condition brings
transactions they were not told about and the provider's quiet period has passed since the last
notification: a condition that merely persists never repeats.

The notification is an activity for each user of the provider's alert group (Odoo e-mails the
assignee): it lands in their to-do list, links to the alert with its chatter, and is removed when
the condition clears on its own.  The details are written once, on the alert: the activity only
says what it is about and points to it, and the chatter records who was notified.

Result codes read as the catalogue's plain words with the code beside them ("The M-Pesa PIN
entered was wrong (2001)"), never Daraja's raw wording; amounts in the currency's format.

The ledger's conditions compare it per day with the sources of Safaricom's side that run, Pull
Transactions and the imported M-Pesa statement (the muchiri.mpesa.ledger.day view), and watch the
money that waits unmatched.
"""
import logging
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta

from markupsafe import Markup

from odoo import api, fields, models
from odoo.fields import Command
from odoo.tools.misc import formatLang

from .. import const, daraja, utils

_logger = logging.getLogger(__name__)

# A success callback still unmatched after this long needs a person.
UNMATCHED_CALLBACK_DELAY = timedelta(minutes=5)
# A day is compared once Pull has read past its end by this much (Safaricom lists late rows).
DAY_SETTLED_AFTER = timedelta(hours=1)
# An imported statement's gaps are alerts for this many days back.
STATEMENT_GAP_DAYS = 31
# Ledger money waiting unmatched this long is an alert.
UNMATCHED_ALERT_DELAY = timedelta(minutes=15)

ALERT_KINDS = [
    ('success_rate', "Low success rate"),
    ('pending_callback', "Callbacks missing"),
    ('order_failures', "Repeated failures on an order"),
    ('unmatched_callback', "Payments matching no transaction"),
    ('receipt_conflict', "Conflicting receipts"),
    ('ledger_gap', "Ledger differs from Safaricom"),
    ('ledger_unmatched', "M-Pesa money to match"),
    ('pull_cut_short', "Pull Transactions cut short"),
]

ALERT_STATES = [
    ('open', "Open"),
    ('closed', "Closed"),
]

# Transactions listed in a message; the alert links them all.
MAX_LISTED = 30


@dataclass
class AlertCondition:
    """What a watch found: an alert to open or keep open."""
    kind: str
    key: str
    name: str
    message: str
    transactions: models.BaseModel  # payment.transaction
    orders: models.BaseModel  # sale.order


def _format_age(env, seconds):
    seconds = max(int(seconds), 0)
    if seconds < 120:
        return env._("%s s", seconds)
    minutes = seconds // 60
    if minutes < 120:
        return env._("%s min", minutes)
    return env._("%(hours)s h %(minutes)s min", hours=minutes // 60, minutes=minutes % 60)


def _listed(env, lines):
    if len(lines) > MAX_LISTED:
        lines = [*lines[:MAX_LISTED], env._("... and %s more.", len(lines) - MAX_LISTED)]
    return '\n'.join(lines)


class MpesaAlert(models.Model):
    _name = 'muchiri.mpesa.alert'
    _description = "M-Pesa Alert"
    _inherit = ['mail.thread', 'mail.activity.mixin']
    _order = 'state desc, last_seen_at desc, id desc'

    name = fields.Char(string="Alert", required=True, readonly=True)
    kind = fields.Selection(selection=ALERT_KINDS, required=True, readonly=True)
    key = fields.Char(
        required=True, readonly=True, index=True,
        help="What the alert is about: a condition that persists keeps its key, and its alert.",
    )
    state = fields.Selection(
        string="Status", selection=ALERT_STATES, default='open', required=True, readonly=True,
        tracking=True,
    )
    provider_id = fields.Many2one(
        'payment.provider', required=True, readonly=True, ondelete='cascade',
    )
    company_id = fields.Many2one(related='provider_id.company_id', store=True, index=True)
    message = fields.Text(string="Details", readonly=True)
    transaction_ids = fields.Many2many(
        'payment.transaction', 'muchiri_mpesa_alert_transaction_rel', 'alert_id', 'transaction_id',
        string="Transactions", readonly=True, help="The transactions of the last watch.",
    )
    reported_transaction_ids = fields.Many2many(
        'payment.transaction', 'muchiri_mpesa_alert_reported_transaction_rel', 'alert_id',
        'transaction_id', string="Reported Transactions", readonly=True,
        help="The transactions users were notified about.",
    )
    sale_order_ids = fields.Many2many(
        'sale.order', 'muchiri_mpesa_alert_sale_order_rel', 'alert_id', 'order_id',
        string="Orders", readonly=True,
    )
    last_seen_at = fields.Datetime(string="Last Seen", readonly=True)
    notified_at = fields.Datetime(string="Last Notified", readonly=True)
    notification_count = fields.Integer(string="Notifications", readonly=True)
    closed_at = fields.Datetime(string="Closed On", readonly=True)

    # === CRUD METHODS === #

    def init(self):
        # One open alert per key, even if a watch is started by hand while the cron runs.
        self.env.cr.execute(
            "CREATE UNIQUE INDEX IF NOT EXISTS muchiri_mpesa_alert_open_key_uniq"
            " ON muchiri_mpesa_alert (key) WHERE state = 'open'"
        )

    # === ACTION METHODS === #

    def action_close(self):
        """Acknowledge: if the condition persists, the next watch reopens the alert, quietly
        within the quiet period."""
        self.env['payment.provider']._mpesa_check_group('account.group_account_invoice')
        self.filtered(lambda alert: alert.state == 'open')._close(
            self.env._("Closed by %s.", self.env.user.name)
        )

    # === BUSINESS METHODS - WATCHING === #

    @api.model
    def _cron_check_alerts(self):
        """Watch every active M-Pesa provider; one failing watch never blocks the others."""
        alerts = self.sudo()
        providers = self.env['payment.provider'].sudo().search([
            ('code', '=', const.PROVIDER_CODE), ('state', '!=', 'disabled'),
        ])
        for provider in providers:
            try:
                with self.env.cr.savepoint():
                    alerts._watch_provider(provider)
            except Exception:
                _logger.exception("M-Pesa monitoring: the watch of provider %s failed.", provider.id)
        alerts.search([
            ('state', '=', 'open'), ('provider_id', 'not in', providers.ids),
        ])._close(self.env._("The provider is disabled."))

    def _watch_provider(self, provider):
        """Watch every condition of `provider`: raise what is found, close what is no longer found.

        :return: the open alerts of the provider
        """
        now = fields.Datetime.now()
        # A simulator restarted without its state file: the provider stops saying its URLs are registered.
        provider._mpesa_simulator_forgot_c2b()
        conditions = [
            *self._watch_success_rate(provider, now),
            *self._watch_pending_callbacks(provider, now),
            *self._watch_order_failures(provider, now),
            *self._watch_unmatched_callbacks(provider, now),
            *self._watch_receipt_conflicts(provider, now),
            *self._watch_ledger(provider, now),
        ]
        alerts = self.browse()
        for condition in conditions:
            alerts |= self._raise_condition(provider, condition, now)
        self.search([
            ('provider_id', '=', provider.id), ('state', '=', 'open'), ('id', 'not in', alerts.ids),
        ])._close(self.env._("The condition has cleared."))
        return alerts

    @api.model
    def _mpesa_raise_receipt_proof_alert(self, provider):
        """Raise the contradicted receipts now, not at the next monitoring run: accountants must
        hear of it."""
        now = fields.Datetime.now()
        for condition in self._watch_contradicted_receipts(provider):
            self._raise_condition(provider, condition, now)

    @api.model
    def _mpesa_raise_ledger_gaps(self, provider):
        """Raise the ledger's alerts of `provider` now (after a Pull query)."""
        now = fields.Datetime.now()
        for condition in self._watch_ledger(provider, now):
            self._raise_condition(provider, condition, now)

    # === BUSINESS METHODS - CONDITIONS === #

    def _condition(self, kind, provider, name, message, transactions=None, orders=None, key=None):
        """What a watch found: one alert per provider and kind unless `key` says otherwise; the
        orders are those of the transactions unless given."""
        transactions = self.env['payment.transaction'] if transactions is None else transactions
        return AlertCondition(
            kind=kind, key=key or f'{kind}:{provider.id}', name=name, message=message,
            transactions=transactions,
            orders=transactions.sale_order_ids if orders is None else orders,
        )

    def _recent_callbacks(self, provider, now, domain):
        """The STK callbacks of `provider` matching `domain`, within the retention window."""
        return self.env['muchiri.mpesa.event'].search([
            ('provider_id', '=', provider.id),
            ('kind', '=', 'stk_callback'),
            *domain,
            ('create_date', '>=', now - timedelta(days=const.KEEP_WORKING_DAYS)),
        ], order='id')

    def _watch_success_rate(self, provider, now):
        """The share of payments settled in the window that succeeded, against the threshold.

        Read through the report, so that the alert and the analysis agree on what a payment
        attempt, a success and a failure are.  A customer's cancellation is neither: the rate is
        over the paid and failed payments (the report's Success Rate), so customers who say no do
        not raise an alert about M-Pesa; the message mentions them.
        """
        report = self.env['muchiri.mpesa.report']
        in_window = [
            ('provider_id', '=', provider.id),
            ('final_at', '>=', now - timedelta(minutes=provider.mpesa_alert_window)),
        ]
        domain = [*in_window, ('outcome', 'in', ('success', 'failure'))]
        counts = dict(report._read_group(domain, ['outcome'], ['__count']))
        total = sum(counts.values())
        if not total or total < provider.mpesa_alert_min_sample:
            return []
        succeeded = counts.get('success', 0)
        rate = 100.0 * succeeded / total
        if rate >= provider.mpesa_alert_min_rate:
            return []
        failures = report.search([*domain, ('outcome', '=', 'failure')]).transaction_id
        by_result = Counter(tx._mpesa_result_text() for tx in failures)
        lines = [
            self.env._("- %(result)s: %(count)s", result=result, count=count)
            for result, count in by_result.most_common()
        ]
        cancelled = report.search_count([*in_window, ('outcome', '=', 'cancelled')])
        cancelled_note = self.env._(
            "  Prompts cancelled by the customer, not counted: %s.", cancelled,
        ) if cancelled else ''
        # Formatted outside _(): Odoo's term extraction cannot read f-strings.
        rounded_rate, exact_rate = f'{rate:.0f}', f'{rate:.1f}'
        threshold = f'{provider.mpesa_alert_min_rate:g}'
        return [self._condition(
            'success_rate', provider,
            name=self.env._("%(provider)s: success rate %(rate)s%%", provider=provider.name, rate=rounded_rate),
            message=self.env._(
                "Only %(rate)s%% of the M-Pesa payments settled in the last %(window)s minutes"
                " succeeded (%(succeeded)s of %(total)s), under the %(threshold)s%% threshold."
                "%(cancelled)s\nFailures by result:\n%(lines)s",
                rate=exact_rate, window=provider.mpesa_alert_window, succeeded=succeeded,
                total=total, threshold=threshold, cancelled=cancelled_note,
                lines=_listed(self.env, lines),
            ),
            transactions=failures,
        )]

    def _watch_pending_callbacks(self, provider, now):
        """Payments still pending with no callback at all long after their prompt: one alert."""
        txs = self.env['payment.transaction'].search([
            ('provider_id', '=', provider.id),
            ('state', '=', 'pending'),
            ('mpesa_callback_at', '=', False),
            ('mpesa_push_sent_at', '!=', False),
            ('mpesa_push_sent_at', '<=', now - timedelta(seconds=provider.mpesa_alert_pending_delay)),
        ], order='mpesa_push_sent_at, id')
        if not txs:
            return []
        lines = [
            self.env._(
                "- %(reference)s: %(amount)s to %(phone)s%(orders)s, prompt sent %(age)s ago",
                reference=tx.reference, amount=formatLang(self.env, tx.amount, currency_obj=tx.currency_id),
                phone=tx.mpesa_phone or '-',  # Accountants read alerts: the full number.
                # No f-string inside _(): Odoo's term extraction cannot read one.
                orders=' (' + ', '.join(tx.sale_order_ids.mapped('name')) + ')' if tx.sale_order_ids else '',
                age=_format_age(self.env, (now - tx.mpesa_push_sent_at).total_seconds()),
            )
            for tx in txs
        ]
        return [self._condition(
            'pending_callback', provider,
            name=self.env._("%(provider)s: %(count)s payments without a callback",
                            provider=provider.name, count=len(txs)),
            message=self.env._(
                "%(count)s M-Pesa payments are still pending without any callback more than"
                " %(delay)s seconds after their prompt.  The reconciliation queries Daraja for"
                " them; if this persists, check that Safaricom can reach the callback URL.\n%(lines)s",
                count=len(txs), delay=provider.mpesa_alert_pending_delay, lines=_listed(self.env, lines),
            ),
            transactions=txs,
        )]

    def _watch_unmatched_callbacks(self, provider, now):
        """Success callbacks that no transaction took after five minutes: money M-Pesa took that
        no order shows (a prompt whose answer was lost, or a forged callback).  One alert."""
        events = self._recent_callbacks(provider, now, [
            # Every state a callback waits in: one stuck anywhere is money no order shows.
            ('state', 'in', const.CALLBACK_WAITING_STATES),
            ('result_code', '=', '0'),
            ('create_date', '<=', now - UNMATCHED_CALLBACK_DELAY),
        ])
        # Those of a pending transaction wait for its scheduled query: the reconciliation's job.
        events = events.filtered(lambda event: event.transaction_id.state != 'pending')
        if not events:
            return []
        lines = [
            self.env._(
                "- CheckoutRequestID %(checkout)s, receipt %(receipt)s, from %(phone)s, %(age)s ago",
                checkout=event.checkout_request_id, receipt=event.receipt_number or '-',
                phone=event.phone or '-',
                age=_format_age(self.env, (now - event.create_date).total_seconds()),
            )
            for event in events
        ]
        return [self._condition(
            'unmatched_callback', provider,
            name=self.env._("%(provider)s: %(count)s M-Pesa payments match no transaction",
                            provider=provider.name, count=len(events)),
            message=self.env._(
                "M-Pesa reported %(count)s successful payments that no transaction has taken.  Find"
                " them in M-Pesa Exchanges, match them with their order and record the payment,"
                " or refund the customer.\n%(lines)s",
                count=len(events), lines=_listed(self.env, lines),
            ),
            transactions=events.transaction_id,
        )]

    def _watch_receipt_conflicts(self, provider, now):
        """Receipts that disagree with the one a payment holds, and receipts M-Pesa's Transaction
        Status contradicts: one alert each, open while any of them is unresolved."""
        return [
            *self._watch_second_receipts(provider, now),
            *self._watch_contradicted_receipts(provider),
        ]

    def _watch_second_receipts(self, provider, now):
        """Callbacks that brought another receipt than the one a payment already holds: one alert,
        until each is resolved by an accountant (the callbacks stay in the log, nothing was
        replaced)."""
        events = self._recent_callbacks(provider, now, [('state', '=', 'conflict')])
        if not events:
            return []
        lines = [
            self.env._(
                "- %(reference)s holds receipt %(held)s; a callback brought %(receipt)s",
                reference=event.transaction_id.reference, held=event.transaction_id.mpesa_receipt_number,
                receipt=event.receipt_number or '-',
            )
            for event in events
        ]
        return [self._condition(
            'receipt_conflict', provider,
            name=self.env._("%(provider)s: %(count)s conflicting M-Pesa receipts",
                            provider=provider.name, count=len(events)),
            message=self.env._(
                "These payments got a second, different receipt after an unverified one.  Check both"
                " receipts on the M-Pesa statement and correct the payment.\n%(lines)s",
                lines=_listed(self.env, lines),
            ),
            transactions=events.transaction_id,
        )]

    def _watch_contradicted_receipts(self, provider):
        """Receipts that M-Pesa's Transaction Status contradicts, of payments and of paybill
        payments awaiting confirmation (forged, most likely): one alert."""
        txs = self.env['payment.transaction'].search([
            ('provider_id', '=', provider.id), ('mpesa_receipt_status', '=', 'conflict'),
        ], order='id')
        rows = self.env['muchiri.mpesa.ledger'].search([
            ('provider_id', '=', provider.id), ('state', '=', 'awaiting'), ('conflict', '=', True),
        ], order='id')
        if not (txs or rows):
            return []
        lines = [
            self.env._("- %(reference)s, receipt %(receipt)s: %(proof)s", reference=tx.reference,
                       receipt=tx.mpesa_receipt_number or '-', proof=tx.mpesa_receipt_proof or '-')
            for tx in txs
        ] + [
            self.env._("- paybill payment %(receipt)s of %(amount)s: %(proof)s", receipt=row.name,
                       amount=row._mpesa_format(row.amount), proof=row.confirmation_note or row.note or '-')
            for row in rows
        ]
        return [self._condition(
            'receipt_conflict', provider, key=f'receipt_proof_conflict:{provider.id}',
            name=self.env._("%(provider)s: %(count)s M-Pesa receipts contradicted by M-Pesa",
                            provider=provider.name, count=len(txs) + len(rows)),
            message=self.env._(
                "M-Pesa's Transaction Status contradicts these receipts, recorded after the payment"
                " was settled.  Nothing was changed: check each on the M-Pesa statement and correct"
                " the payment.\n%(lines)s", lines=_listed(self.env, lines),
            ),
            transactions=txs,
        )]

    def _watch_order_failures(self, provider, now):
        """Orders with several failed payments in the look-back: one alert per order.

        Cancellations count here: a customer who cancels prompt after prompt on one order needs
        help to pay as much as one whose payments fail."""
        groups = self.env['muchiri.mpesa.report']._read_group(
            [
                ('provider_id', '=', provider.id),
                ('outcome', 'in', ('failure', 'cancelled')),
                ('sale_order_id', '!=', False),
                ('final_at', '>=', now - timedelta(hours=provider.mpesa_alert_order_window)),
            ],
            groupby=['sale_order_id'],
            aggregates=['transaction_id:recordset'],
            having=[('__count', '>=', provider.mpesa_alert_order_failures)],
        )
        conditions = []
        for order, txs in groups:
            txs = txs.sorted('id')
            lines = [
                self.env._("- %(reference)s: %(result)s", reference=tx.reference,
                           result=tx._mpesa_result_text())
                for tx in txs
            ]
            conditions.append(self._condition(
                'order_failures', provider, key=f'order_failures:{provider.id}:{order.id}',
                name=self.env._("%(order)s: %(count)s failed or cancelled M-Pesa payments",
                                order=order.name, count=len(txs)),
                message=self.env._(
                    "Order %(order)s of %(partner)s has %(count)s failed or cancelled M-Pesa payments"
                    " in the last %(hours)s hours.  The customer may need help to pay.\n%(lines)s",
                    order=order.name, partner=order.partner_id.display_name, count=len(txs),
                    hours=provider.mpesa_alert_order_window, lines=_listed(self.env, lines),
                ),
                transactions=txs,
                orders=order,
            ))
        return conditions

    # === BUSINESS METHODS - LEDGER CONDITIONS === #

    def _watch_ledger(self, provider, now):
        """The ledger's conditions: the alerts stay open while their condition holds, and close
        with the others when it clears."""
        return [
            *self._watch_pull_cut_short(provider),
            *self._watch_ledger_gaps(provider, now),
            *self._watch_ledger_unmatched(provider, now),
        ]

    def _watch_pull_cut_short(self, provider):
        """The last Pull run did not read its whole window: what it did not read is neither in the
        ledger nor compared by the gap report yet.  One alert, until a run reads its whole window."""
        reason = provider.sudo().mpesa_pull_cut_short
        if not reason:
            return []
        return [self._condition(
            'pull_cut_short', provider,
            name=self.env._("%(provider)s: Pull Transactions did not read every payment", provider=provider.name),
            message=self.env._(
                "%(reason)s\nUntil a run reads its whole window, payments after that time are missing"
                " from the ledger if their confirmation was lost, and the ledger per day does not compare"
                " those days.  If this persists, Daraja keeps 48 hours only: check the M-Pesa statement"
                " and tell Safaricom (apisupport@safaricom.co.ke).", reason=reason,
            ),
        )]

    def _watch_ledger_gaps(self, provider, now):
        """The days a running source disagrees with the ledger: one alert.

        A day is judged only against a source that runs (muchiri.mpesa.ledger.day): Pull where it
        is registered, for the days it has read past within what Daraja keeps; an imported
        statement for the days it covers, within STATEMENT_GAP_DAYS.  A statement gap is always
        an alert (the statement is Safaricom's own record); a Pull gap only where Pull runs.
        """
        Day = self.env['muchiri.mpesa.ledger.day']
        self.env['muchiri.mpesa.ledger'].flush_model()  # The view reads the table.
        days = Day.search([
            ('provider_id', '=', provider.id), ('statement_differs', '=', True),
            ('day', '>=', utils.kenya_time(now).date() - timedelta(days=STATEMENT_GAP_DAYS)),
        ])
        synced = provider.sudo().mpesa_pull_synced_until
        if synced and provider.sudo().mpesa_pull_registered_at:
            # The last day Pull read to its end, in Kenya time as M-Pesa statements are.
            last_day = utils.kenya_time(synced - DAY_SETTLED_AFTER).date() - timedelta(days=1)
            first_day = utils.kenya_time(now - daraja.PULL_WINDOW).date()
            days |= Day.search([
                ('provider_id', '=', provider.id), ('pull_differs', '=', True),
                ('day', '>=', first_day), ('day', '<=', last_day),
            ])
        if not days:
            return []
        lines = []
        for day in days.sorted('day', reverse=True):
            if day.pull_differs:
                lines.append(self.env._(
                    "- %(day)s: ledger %(ledger_count)s payments, %(ledger_amount)s; Pull %(pull_count)s,"
                    " %(pull_amount)s; %(unlisted)s not listed by Pull",
                    day=day.day, ledger_count=day.ledger_count, ledger_amount=day.ledger_amount,
                    pull_count=day.pull_count, pull_amount=day.pull_amount, unlisted=day.unlisted_count,
                ))
            if day.statement_differs:
                lines.append(self.env._(
                    "- %(day)s: %(unstated)s ledger payments are not on the imported M-Pesa statement",
                    day=day.day, unstated=day.unstated_count,
                ))
        return [self._condition(
            'ledger_gap', provider,
            name=self.env._("%(provider)s: the M-Pesa ledger differs from Safaricom on %(count)s days",
                            provider=provider.name, count=len(days)),
            message=self.env._(
                "Safaricom's Pull Transactions or M-Pesa statement does not list what the ledger holds."
                "  Open M-Pesa > Ledger per Day, then the day's receipts to check, and check them on the"
                " M-Pesa statement.\n%(lines)s", lines=_listed(self.env, lines),
            ),
        )]

    def _watch_ledger_unmatched(self, provider, now):
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
        return [self._condition(
            'ledger_unmatched', provider,
            name=self.env._("%(provider)s: %(count)s M-Pesa payments to match",
                            provider=provider.name, count=len(rows)),
            message=self.env._(
                "These payments reached the shortcode and match no order or invoice.  Match them,"
                " mark them as not ours, or flag them for refund (M-Pesa > Ledger > Exceptions).\n%(lines)s",
                lines=_listed(self.env, lines),
            ),
        )]

    # === BUSINESS METHODS - RAISING, NOTIFYING, CLOSING === #

    def _raise_condition(self, provider, condition, now):
        """Open or update the alert of `condition`; notify only what is new, at most once per
        quiet period."""
        alert = self.search([('key', '=', condition.key)], order='id desc', limit=1)
        quiet_since = now - timedelta(minutes=provider.mpesa_alert_quiet_period)
        recently_notified = bool(alert.notified_at and alert.notified_at > quiet_since)
        values = {
            'name': condition.name,
            'message': condition.message,
            'last_seen_at': now,
            'transaction_ids': [Command.set(condition.transactions.ids)],
            'sale_order_ids': [Command.set(condition.orders.ids)],
        }
        if alert.state == 'open' or (alert and recently_notified):
            if alert.state == 'closed':
                # The condition came back soon after it cleared: the users know it already.
                values.update(state='open', closed_at=False)
                alert.message_post(body=self.env._("The condition is back; reopened without notifying."))
            alert.write(values)
            if not recently_notified and condition.transactions - alert.reported_transaction_ids:
                alert._notify(condition.transactions, now)
            return alert
        alert = self.create({
            **values, 'kind': condition.kind, 'key': condition.key, 'provider_id': provider.id,
        })
        alert._notify(condition.transactions, now)
        return alert

    def _notify(self, transactions, now):
        """One activity for each recipient: created, or updated if the last one is still open.

        The details stay on the alert: the activity says what it is about and points to it, the
        chatter says who was told."""
        self.ensure_one()
        new = transactions - self.reported_transaction_ids
        note = Markup("<p>%s</p>") % (
            self.env._("New transactions: %s.  The details are on the alert.", len(new)) if new
            else self.env._("The details are on the alert.")
        )
        recipients = self._get_recipients()
        if not recipients:
            _logger.warning(
                "M-Pesa alert %s (%s): nobody to notify; set the alert recipients of provider %s.",
                self.id, self.name, self.provider_id.id,
            )
        open_activities = self.activity_ids
        for user in recipients:
            activity = open_activities.filtered(lambda act, user=user: act.user_id == user)[:1]
            if activity:
                activity.write({
                    'summary': self.name, 'note': note, 'date_deadline': fields.Date.context_today(self),
                })
            else:  # Its mail queued: the job never waits on the mail server.
                self.with_context(mail_notify_force_send=False).activity_schedule(
                    'mail.mail_activity_data_todo', summary=self.name, note=note, user_id=user.id,
                )
        if recipients:
            self.message_post(
                body=self.env._("Notified %s.", ', '.join(recipients.mapped('name'))),
                subtype_xmlid='mail.mt_note',
            )
        self.write({
            'notified_at': now,
            'notification_count': self.notification_count + 1,
            'reported_transaction_ids': [Command.link(tx_id) for tx_id in transactions.ids],
        })

    def _get_recipients(self):
        """The provider's alert recipients who can open this alert."""
        self.ensure_one()
        return utils.alert_recipients(self.provider_id).filtered(
            lambda user: self.with_user(user).with_context(allowed_company_ids=user.company_ids.ids).has_access('read')
        )

    def _close(self, reason):
        if not self:
            return
        for alert in self:
            alert.message_post(body=reason)
        # Their to-do lists no longer hold a condition that is gone; the chatter keeps the story.
        self.activity_ids.unlink()
        self.write({'state': 'closed', 'closed_at': fields.Datetime.now()})
