# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""Monitoring: the analysis report and the alerts, on transactions set up directly with the ORM
(the alert rules read what the payment flow writes; no simulator is needed), and what the
exchange log records of a callback posted through the real route.
"""
import json
from datetime import timedelta
from itertools import count
from unittest.mock import patch

from lxml import etree

from odoo import fields
from odoo.fields import Command
from odoo.tests import new_test_user, tagged
from odoo.tools import mute_logger
from odoo.tools.misc import formatLang
from odoo.tools.safe_eval import safe_eval

from odoo.addons.account_payment.tests.common import AccountPaymentCommon
from odoo.addons.muchiri_mpesa import daraja
from odoo.addons.sale.tests.common import SaleCommon

from .common import MpesaCommon

_sequence = count(1)


@tagged('post_install', '-at_install')
class TestMonitoring(AccountPaymentCommon, SaleCommon):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.currency_kes = cls.setup_other_currency('KES', rates=[('1900-01-01', 100.0)])
        # Credentials only satisfy the provider's required fields: nothing here calls Daraja.
        cls.provider = cls._prepare_provider('mpesa', update_values={
            'mpesa_consumer_key': 'key',
            'mpesa_consumer_secret': 'secret',
            'mpesa_shortcode': '174379',
            'mpesa_passkey': 'passkey',
            'mpesa_api_url': 'http://127.0.0.1:9',
        })
        cls.payment_method = cls.env.ref('payment.payment_method_mpesa')
        cls.payment_method.active = True
        cls.payment_method_id = cls.payment_method.id
        cls.watchers = cls.env['res.groups'].create({
            'name': "M-Pesa watchers",
            'implied_ids': [Command.link(cls.env.ref('account.group_account_invoice').id)],
        })
        cls.watcher_1 = new_test_user(cls.env, 'mpesa_watcher_1', groups='base.group_user')
        cls.watcher_2 = new_test_user(cls.env, 'mpesa_watcher_2', groups='base.group_user')
        cls.watchers.users = [Command.link(cls.watcher_1.id), Command.link(cls.watcher_2.id)]
        cls.provider.write({
            'mpesa_alert_group_id': cls.watchers.id,
            'mpesa_alert_min_sample': 5,
            'mpesa_alert_window': 60,
            'mpesa_alert_min_rate': 90.0,
            'mpesa_alert_pending_delay': 60,
            'mpesa_alert_order_failures': 3,
            'mpesa_alert_order_window': 24,
            'mpesa_alert_quiet_period': 60,
        })
        cls.currency = cls.currency_kes
        cls.order_a = cls._order()
        cls.order_b = cls._order()

    @classmethod
    def _order(cls):
        return cls.env['sale.order'].create({
            'partner_id': cls.partner.id,
            'order_line': [Command.create({'product_id': cls.product.id, 'product_uom_qty': 1})],
        })

    def setUp(self):
        super().setUp()
        self.now = fields.Datetime.now()
        self.alerts = self.env['muchiri.mpesa.alert']

    # === HELPERS === #

    def _ago(self, seconds):
        return self.now - timedelta(seconds=seconds)

    def _tx(self, state, pushed=None, callback=None, settled=None, settled_by=None, code=None,
            desc=None, order=None, phone='254708374149', **values):
        """An M-Pesa transaction as the payment flow leaves it; times are seconds ago."""
        settled_at = self._ago(settled) if settled is not None else False
        return self._create_transaction(
            'direct',
            reference=f'MON-{next(_sequence)}',
            state=state,
            mpesa_phone=phone,
            mpesa_requested_amount=int(self.amount),
            mpesa_push_sent_at=self._ago(pushed) if pushed is not None else False,
            mpesa_callback_at=self._ago(callback) if callback is not None else False,
            mpesa_settled_at=settled_at,
            mpesa_settled_by=settled_by or False,
            mpesa_result_code=code or False,
            mpesa_result_desc=desc or False,
            last_state_change=settled_at or self._ago(pushed or 0),
            sale_order_ids=[Command.set(order.ids)] if order else [],
            **values,
        )

    def _paid(self, ago=100, **kwargs):
        return self._tx('done', pushed=ago + 10, callback=ago, settled=ago, settled_by='callback',
                        code='0', **kwargs)

    def _failed(self, ago=100, code='1032', desc="Request cancelled by user", **kwargs):
        state = 'cancel' if code == '1032' else 'error'
        return self._tx(state, pushed=ago + 10, callback=ago, settled=ago, settled_by='callback',
                        code=code, desc=desc, **kwargs)

    def _check(self):
        self.alerts._cron_check_alerts()
        return self.alerts.search([('provider_id', '=', self.provider.id)])

    def _activities(self, alerts):
        return self.env['mail.activity'].search([
            ('res_model', '=', 'muchiri.mpesa.alert'), ('res_id', 'in', alerts.ids),
        ])

    def _report(self, groupby, fields_, domain=()):
        return self.env['muchiri.mpesa.report'].read_group(
            [('provider_id', '=', self.provider.id), *domain], fields_, groupby, lazy=False,
        )

    # === REPORT === #

    def test_report_figures(self):
        paid_callback = self._tx('done', pushed=100, callback=90, settled=90, settled_by='callback',
                                 code='0')
        paid_query = self._tx('done', pushed=200, settled=150, settled_by='query', code='0')
        self._tx('cancel', pushed=300, callback=270, settled=270, settled_by='callback',
                 code='1032', desc="Request cancelled by user")
        self._tx('error', pushed=400, callback=380, settled=380, settled_by='callback', code='1',
                 desc="Insufficient funds")
        # Daraja refused the push: a failure with no prompt, no code, and no durations.
        self._tx('error', settled=60)
        pending = self._tx('pending', pushed=30)
        self._create_transaction('direct', reference='MON-DRAFT', state='draft')  # Never sent.

        [totals] = self._report([], [
            'success_rate:avg', 'settle_seconds:avg', 'callback_delay_seconds:avg',
            'query_settled_rate:avg', 'success_count:sum', 'failure_count:sum',
            'cancelled_count:sum', 'pending_count:sum', 'amount:sum', 'paid_amount:sum',
        ])
        self.assertEqual(totals['__count'], 6, "one row per attempt; the draft is not one")
        self.assertAlmostEqual(totals['success_rate'], 50.0,
                               msg="2 paid of 4 paid or failed: the cancellation is not counted")
        self.assertAlmostEqual(totals['settle_seconds'], (10 + 50 + 30 + 20) / 4)
        self.assertAlmostEqual(totals['callback_delay_seconds'], (10 + 30 + 20) / 3)
        self.assertAlmostEqual(totals['query_settled_rate'], 25.0, msg="1 of 4 answered by query")
        self.assertEqual(
            (totals['success_count'], totals['failure_count'], totals['cancelled_count'],
             totals['pending_count']),
            (2, 2, 1, 1), "the customer's cancellation is counted apart from the failures",
        )
        self.assertAlmostEqual(totals['paid_amount'], 2 * self.amount, msg="the paid ones only")
        self.assertAlmostEqual(totals['amount'], 6 * self.amount, msg="every prompt's amount")

        by_code = {
            group['result_code']: group['__count']
            for group in self._report(['result_code'], ['failure_count:sum'],
                                      [('outcome', '=', 'failure')])
        }
        self.assertEqual(by_code, {'1': 1, False: 1})
        by_outcome = {
            group['outcome']: group['__count'] for group in self._report(['outcome'], [])
        }
        self.assertEqual(by_outcome, {'success': 2, 'failure': 2, 'cancelled': 1, 'pending': 1})

        by_source = {
            group['settled_by']: group['__count']
            for group in self._report(['settled_by'], [], [('outcome', '!=', 'pending')])
        }
        self.assertEqual(by_source, {'callback': 3, 'query': 1, 'none': 1})

        rows = self.env['muchiri.mpesa.report'].search([('provider_id', '=', self.provider.id)])
        self.assertEqual(rows.filtered(lambda r: r.outcome == 'pending').transaction_id, pending)
        self.assertEqual(rows.filtered(lambda r: r.transaction_id == paid_query).settled_by, 'query')
        paid_row = rows.filtered(lambda r: r.transaction_id == paid_callback)
        self.assertEqual((paid_row.settle_seconds, paid_row.callback_delay_seconds), (10.0, 10.0))

    def test_report_is_live_and_for_accountants(self):
        tx = self._tx('pending', pushed=30)
        # A write not yet flushed is seen: the report declares what it reads (_depends).
        tx.write({'state': 'done', 'mpesa_settled_at': self.now, 'mpesa_settled_by': 'query'})
        accountant = new_test_user(self.env, 'mpesa_accountant',
                                   groups='base.group_user,account.group_account_invoice')
        [group] = self.env['muchiri.mpesa.report'].with_user(accountant).read_group(
            [('provider_id', '=', self.provider.id)], ['success_rate:avg', 'settle_seconds:avg'], [],
        )
        self.assertEqual(group['success_rate'], 100.0)
        self.assertAlmostEqual(group['settle_seconds'], 30.0)
        self.assertTrue(self.env.ref('muchiri_mpesa.menu_mpesa_report').action)

    def test_report_averages_leave_out_rows_without_a_value(self):
        self._paid(ago=100)  # Callback 10 s after the push.
        self._tx('done', pushed=200, callback=170, settled=170, settled_by='callback', code='0')
        self._tx('done', pushed=300, settled=250, settled_by='query', code='0')  # No callback.
        self._tx('pending', pushed=30)  # Neither a callback nor a final state.
        [totals] = self._report([], ['callback_delay_seconds:avg', 'settle_seconds:avg'])
        self.assertAlmostEqual(totals['callback_delay_seconds'], (10 + 30) / 2,
                               msg="the rows without a callback are not 0 s")
        self.assertAlmostEqual(totals['settle_seconds'], (10 + 30 + 50) / 3)

        # The list shows no average that disagrees with the pivot: Odoo's list averages in the
        # browser over the loaded rows and reads an empty figure as 0 (10, 30, 0, 0: 10 s).
        Report = self.env['muchiri.mpesa.report']
        arch = etree.fromstring(Report.get_view(view_type='list')['arch'])
        listed = [node.get('name') for node in arch.iter('field')]
        rows = Report.search_read([('provider_id', '=', self.provider.id)], listed)
        for name, pivot_average in (('callback_delay_seconds', totals['callback_delay_seconds']),
                                    ('settle_seconds', totals['settle_seconds'])):
            [node] = arch.xpath(f"//field[@name='{name}']")
            if node.get('avg'):
                values = [row[name] for row in rows]
                self.assertAlmostEqual(sum(values) / len(values), pivot_average,
                                       msg=f"the list's average of {name} is the pivot's")
            # A row without the figure shows an empty cell, not 0.0.
            shown = [row[name] for row in rows if not safe_eval(node.get('invisible', 'False'), row)]
            self.assertEqual(len(shown), 2 if name == 'callback_delay_seconds' else 3)
            self.assertNotIn(0.0, shown)

    def test_report_default_views_show_the_overall_figures(self):
        Report = self.env['muchiri.mpesa.report']
        pivot = etree.fromstring(Report.get_view(view_type='pivot')['arch'])
        self.assertFalse(pivot.xpath("//field[@type='col']"), "no split by outcome by default")
        measures = pivot.xpath("//field[@type='measure']/@name")
        self.assertEqual(measures[0], 'success_rate')
        for measure in ('success_count', 'failure_count', 'cancelled_count', 'paid_amount'):
            self.assertIn(measure, measures)
        self.assertNotIn('amount', measures, "what was asked is not what was paid")
        graph = etree.fromstring(Report.get_view(view_type='graph')['arch'])
        self.assertEqual(graph.xpath("//field[@type='measure']/@name"), ['paid_amount'])
        self.assertIn("cancellations", Report._fields['success_rate'].help,
                      "the help says what the rate is over")

    # === SUCCESS RATE === #

    def test_success_rate_alert_fires(self):
        for _i in range(3):
            self._paid()
        self._failed(code='2001', desc="The initiator information is invalid.")
        self._failed(code='1', desc="The balance is insufficient for the transaction.")
        cancelled = self._failed(code='1032')
        alerts = self._check()
        self.assertEqual(alerts.kind, 'success_rate', "3 of 5 paid or failed is 60%")
        self.assertEqual(alerts.state, 'open')
        self.assertIn('60.0%', alerts.message)
        self.assertIn("The M-Pesa PIN entered was wrong (2001): 1", alerts.message)
        self.assertIn("The M-Pesa balance is too low for this payment (1): 1", alerts.message)
        self.assertNotIn("initiator", alerts.message, "Daraja's wording stays in the transaction")
        self.assertIn("Prompts cancelled by the customer, not counted: 1.", alerts.message)
        self.assertEqual(len(alerts.transaction_ids), 2, "the failures are linked")
        self.assertNotIn(cancelled, alerts.transaction_ids)
        activities = self._activities(alerts)
        self.assertEqual(activities.user_id, self.watcher_1 | self.watcher_2,
                         "one activity for each user of the alert group")
        self.assertEqual(len(activities), 2)

    def test_success_rate_leaves_customers_cancellations_out(self):
        for _i in range(9):
            self._paid()
        for _i in range(5):
            self._failed(code='1032')
        self.assertFalse(self._check(), "9 paid of 9 paid or failed: customers who say no are no alert")
        self._failed(code='1037', desc="DS timeout user cannot be reached")
        self._failed(code='1037', desc="DS timeout user cannot be reached")
        alert = self._check()
        self.assertEqual(alert.kind, 'success_rate', "9 of 11 is 82%")
        self.assertIn('81.8%', alert.message)
        self.assertIn("The phone did not answer the M-Pesa prompt (1037): 2", alert.message)
        self.assertNotIn("DS timeout", alert.message)

    def test_success_rate_quiet_on_a_small_sample(self):
        self._failed()
        self.assertFalse(self._check(), "1 failure out of 1 is below the minimum sample")

    def test_success_rate_quiet_at_the_threshold_and_outside_the_window(self):
        self.provider.mpesa_alert_min_sample = 10
        for _i in range(9):
            self._paid()
        self._failed()
        for _i in range(5):
            self._failed(ago=2 * 3600)  # Settled two hours ago: outside the 60 minutes.
        self._tx('pending', pushed=20)
        self.assertFalse(self._check(), "9 of 10 is 90%: not under the threshold")

    # === PENDING WITHOUT CALLBACK === #

    def test_pending_without_callback_one_aggregated_alert(self):
        late = self._tx('pending', pushed=120, order=self.order_a)
        later = self._tx('pending', pushed=300, order=self.order_b)
        latest = self._tx('pending', pushed=61)
        self._tx('pending', pushed=20)  # Too young.
        self._tx('pending', pushed=300, callback=200)  # A callback came (not confirmed yet).
        self._paid()

        alerts = self._check()
        self.assertEqual(len(alerts), 1, "one alert for all the late transactions")
        self.assertEqual(alerts.kind, 'pending_callback')
        self.assertEqual(alerts.transaction_ids, late | later | latest)
        self.assertEqual(alerts.sale_order_ids, self.order_a | self.order_b)
        for tx in late | later | latest:
            self.assertIn(tx.reference, alerts.message)
        self.assertIn('254708374149', alerts.message, "accountants read the full number")
        self.assertIn(formatLang(self.env, late.amount, currency_obj=late.currency_id), alerts.message,
                      "amounts in the currency's format")
        self.assertEqual(len(self._activities(alerts)), 2, "one activity per user, not per transaction")

    def test_pending_quiet_when_young_or_with_a_callback(self):
        self._tx('pending', pushed=30)
        self._tx('pending', pushed=600, callback=590)
        self._tx('draft')
        self.assertFalse(self._check())

    # === PAYMENTS MATCHING NO TRANSACTION === #

    def _kept_callback(self, result_code, minutes_ago, transaction=None, checkout='ws_CO_lost'):
        body = daraja.stk_callback_body(
            '1-2-3', checkout, int(result_code), "Result", amount=100 if result_code == '0' else None,
            receipt='UNMATCHED1' if result_code == '0' else None, phone='254708374149',
        )
        event = self.env['muchiri.mpesa.event'].sudo()._mpesa_keep(
            self.provider, 'stk_callback', json.dumps(body).encode(), '196.201.214.200',
        )
        event._mpesa_parse()
        if transaction:
            event.transaction_id = transaction
        event._mark('unmatched', "No transaction has this CheckoutRequestID yet.")
        self.env.flush_all()
        self.env.cr.execute(
            "UPDATE muchiri_mpesa_event SET create_date = %s WHERE id = %s",
            [fields.Datetime.now() - timedelta(minutes=minutes_ago), event.id],
        )
        event.invalidate_recordset()
        return event

    def test_success_callback_matching_no_transaction_alerts(self):
        self.provider.mpesa_alert_min_sample = 100  # Only this rule is under test.
        self._kept_callback('0', minutes_ago=2)  # Young: the cron may still match it.
        self._kept_callback('1032', minutes_ago=30, checkout='ws_CO_failed')  # No money taken.
        self.assertFalse(self._check())
        lost = self._kept_callback('0', minutes_ago=10)
        alerts = self._check()
        self.assertEqual(alerts.kind, 'unmatched_callback')
        self.assertIn(lost.checkout_request_id, alerts.message)
        self.assertIn('254708374149', alerts.message, "accountants read the full number")
        self.assertEqual(len(self._activities(alerts)), 2)
        lost._mark('processed', "Matched by hand.")
        self.assertFalse(self._check().filtered(lambda alert: alert.state == 'open'))

    # === FAILURES ON AN ORDER === #

    def test_several_failures_on_an_order(self):
        self.provider.mpesa_alert_min_sample = 100  # Only the order rule is under test.
        failures = self._failed(order=self.order_a, code='2001', desc="The initiator information is invalid.")
        failures |= self._failed(ago=2000, order=self.order_a, code='1032')
        failures |= self._failed(ago=5000, order=self.order_a, code='1037',
                                 desc="DS timeout user cannot be reached")
        self._paid(order=self.order_a)
        # Order B: two recent failures and one outside the 24-hour look-back.
        self._failed(order=self.order_b)
        self._failed(order=self.order_b)
        self._failed(ago=25 * 3600, order=self.order_b)

        alerts = self._check()
        self.assertEqual(len(alerts), 1)
        self.assertEqual(alerts.kind, 'order_failures')
        self.assertEqual(alerts.sale_order_ids, self.order_a)
        self.assertEqual(alerts.transaction_ids, failures)
        self.assertIn(self.order_a.name, alerts.name)
        for tx, result in zip(failures, ("The M-Pesa PIN entered was wrong (2001)",
                                         "Cancelled by the customer (1032)",
                                         "The phone did not answer the M-Pesa prompt (1037)"), strict=True):
            self.assertIn(f"- {tx.reference}: {result}", alerts.message)
        for raw in ("initiator", "DS timeout", "Request cancelled by user"):
            self.assertNotIn(raw, alerts.message, "Daraja's wording stays in the transaction")
        self.assertEqual(len(self._activities(alerts)), 2)

    # === NO REPEAT, QUIET PERIOD, CLOSING === #

    def test_same_condition_does_not_repeat(self):
        first = self._tx('pending', pushed=120)
        alert = self._check()
        self.assertEqual(alert.notification_count, 1)

        self.assertEqual(self._check(), alert, "a second run keeps the same alert")
        self.assertEqual(alert.notification_count, 1, "and does not notify again")
        self.assertEqual(len(self._activities(alert)), 2)
        messages = len(alert.message_ids)

        # A new late transaction within the quiet period: listed, not notified.
        second = self._tx('pending', pushed=90)
        self.assertEqual(self._check(), alert)
        self.assertEqual(alert.transaction_ids, first | second)
        self.assertIn(second.reference, alert.message)
        self.assertEqual(alert.notification_count, 1)
        self.assertEqual(len(alert.message_ids), messages, "nothing posted either")

        # Once the quiet period is over, what is new is notified, once.
        alert.notified_at = self._ago(61 * 60)
        self.assertEqual(self._check(), alert)
        self.assertEqual(alert.notification_count, 2)
        self.assertEqual(alert.reported_transaction_ids, first | second)
        activities = self._activities(alert)
        self.assertEqual(len(activities), 2, "the open activities are updated, not doubled")
        self.assertIn("New transactions: 1.", str(activities[0].note))
        self.assertNotIn(second.reference, str(activities[0].note), "the details are on the alert")

        # The quiet period over again, but nothing new: nobody is bothered.
        alert.notified_at = self._ago(61 * 60)
        self._check()
        self.assertEqual(alert.notification_count, 2)

    def test_alert_text_written_once(self):
        tx = self._tx('pending', pushed=120)
        alert = self._check()
        self.assertIn(tx.reference, alert.message, "the details are on the alert")
        for activity in self._activities(alert):
            self.assertEqual(activity.summary, alert.name)
            self.assertNotIn(tx.reference, str(activity.note), "the activity points to the alert")
            self.assertIn("The details are on the alert.", str(activity.note))
        posted = alert.message_ids.filtered(lambda message: message.body)
        self.assertFalse(posted.filtered(lambda message: tx.reference in str(message.body)),
                         "the chatter does not repeat the details")
        self.assertIn(f"Notified {self.watcher_1.name}, {self.watcher_2.name}.",
                      posted.mapped(lambda message: message.body.striptags()), "who was told")

    def test_alert_closes_when_the_condition_clears_and_comes_back_quietly(self):
        tx = self._tx('pending', pushed=120)
        alert = self._check()
        self.assertEqual(len(self._activities(alert)), 2)

        tx.write({'state': 'done', 'mpesa_settled_by': 'query', 'mpesa_settled_at': self.now})
        self.assertEqual(self._check(), alert)
        self.assertEqual(alert.state, 'closed')
        self.assertFalse(self._activities(alert), "the to-dos go with the condition")

        # Back within the quiet period: the same alert reopens, nobody is notified again.
        again = self._tx('pending', pushed=100)
        self.assertEqual(self._check(), alert)
        self.assertEqual(alert.state, 'open')
        self.assertEqual(alert.transaction_ids, again)
        self.assertEqual(alert.notification_count, 1)
        self.assertFalse(self._activities(alert))

        # Closed again, then back after the quiet period: a new alert, notified.
        again.state = 'cancel'
        self._check()
        alert.notified_at = self._ago(2 * 3600)
        self._tx('pending', pushed=100)
        alerts = self._check()
        new_alert = alerts - alert
        self.assertEqual(len(new_alert), 1)
        self.assertEqual(new_alert.state, 'open')
        self.assertEqual(alert.state, 'closed')
        self.assertEqual(len(self._activities(new_alert)), 2)

    def test_closed_by_a_user_reopens_quietly(self):
        self._tx('pending', pushed=120)
        alert = self._check()
        alert.with_user(self.watcher_1).action_close()
        self.assertEqual(alert.state, 'closed')
        self.assertFalse(self._activities(alert))
        self._check()
        self.assertEqual(alert.state, 'open', "the condition is still there")
        self.assertEqual(alert.notification_count, 1)

    # === RECIPIENTS, SETTINGS, CRON === #

    def test_recipients(self):
        self.assertEqual(
            self.env['payment.provider'].default_get(['mpesa_alert_group_id'])['mpesa_alert_group_id'],
            self.env.ref('account.group_account_manager').id,
        )
        # A member who cannot open the alerts, and an archived one, get no activity.
        outsider = new_test_user(self.env, 'mpesa_outsider', groups='base.group_user')
        archived = new_test_user(self.env, 'mpesa_archived',
                                 groups='base.group_user,account.group_account_invoice')
        group = self.env['res.groups'].create({
            'name': "Mixed", 'users': [Command.set((self.watcher_1 | outsider | archived).ids)],
        })
        archived.active = False
        self.provider.mpesa_alert_group_id = group
        self._tx('pending', pushed=120)
        alert = self._check()
        self.assertEqual(self._activities(alert).user_id, self.watcher_1)

        # Without recipients, the alert is still raised and listed.
        self.provider.mpesa_alert_group_id = False
        self._failed(order=self.order_a)
        self._failed(order=self.order_a)
        self._failed(order=self.order_a)
        with self.assertLogs('odoo.addons.muchiri_mpesa.models.mpesa_alert', 'WARNING') as logs:
            order_alert = self._check().filtered(lambda a: a.kind == 'order_failures')
        self.assertIn('nobody to notify', logs.output[0])
        self.assertEqual(order_alert.state, 'open')
        self.assertFalse(self._activities(order_alert))

    def test_cron(self):
        cron = self.env.ref('muchiri_mpesa.cron_mpesa_alerts')
        self.assertTrue(cron.active)
        self.assertEqual((cron.interval_number, cron.interval_type), (5, 'minutes'))
        self._tx('pending', pushed=120)
        cron.method_direct_trigger()
        self.assertEqual(self.alerts.search([('provider_id', '=', self.provider.id)]).kind,
                         'pending_callback')

    def test_disabled_provider_alerts_close(self):
        self._tx('pending', pushed=120)
        alert = self._check()
        self.provider.state = 'disabled'
        self._check()
        self.assertEqual(alert.state, 'closed')

    def test_one_failing_provider_does_not_block_the_others(self):
        other = self.provider.copy({
            'name': "M-Pesa (second shortcode)", 'mpesa_consumer_key': 'key',
            'mpesa_consumer_secret': 'secret', 'mpesa_passkey': 'passkey',
        })
        other.write({'state': 'test', 'mpesa_alert_group_id': self.watchers.id})
        self._tx('pending', pushed=120)
        alert = self._check()
        self.assertEqual(alert.state, 'open')

        alert_model = self.registry['muchiri.mpesa.alert']
        check_pending = alert_model._watch_pending_callbacks

        def broken(alerts, provider, now):
            if provider == self.provider:
                raise ValueError("Simulated failure")
            return check_pending(alerts, provider, now)

        self._tx('pending', pushed=120, provider_id=other.id)
        with patch.object(alert_model, '_watch_pending_callbacks', broken), \
                mute_logger('odoo.addons.muchiri_mpesa.models.mpesa_alert'):
            self.alerts._cron_check_alerts()
        other_alert = self.alerts.search([('provider_id', '=', other.id)])
        self.assertEqual(other_alert.kind, 'pending_callback', "the other provider was checked")
        self.assertEqual(alert.state, 'open', "a check that failed closes nothing")


@tagged('post_install', '-at_install')
class TestMonitoringCallback(MpesaCommon):
    """What the exchange log keeps of a callback posted to Odoo's real route."""

    def _callback_event(self, checkout_request_id):
        [event] = self._events(kind='stk_callback', checkout_request_id=checkout_request_id)
        return event

    def test_callback_event_records_our_answer(self):
        body = daraja.stk_callback_body(
            '29115-34620561-1', 'ws_CO_monitoring_1', 1032, "Request cancelled by user",
        )
        response = self._post_callback(body, settle=False)
        self.assertEqual(response.status_code, 200)
        event = self._callback_event('ws_CO_monitoring_1')
        self.assertEqual(event.http_status, 200, "the status our route answered")
        self.assertGreater(event.duration_ms, 0.0, "how long the intake took")
        self.assertLess(event.duration_ms, 20000.0)

        # A body that is no stkCallback: answered 400, and so recorded.
        before = self._events(kind='stk_callback')
        self.assertEqual(self._post_callback(None, raw='{"Body": {}}', settle=False).status_code, 400)
        rejected = self._events(kind='stk_callback') - before
        self.assertEqual((rejected.state, rejected.http_status), ('rejected', 400))
        self.assertGreater(rejected.duration_ms, 0.0)

    def test_callback_body_shown_indented_kept_exact(self):
        body = daraja.stk_callback_body(
            '29115-34620561-1', 'ws_CO_monitoring_2', 0, "The service request is processed successfully.",
            amount=4500, receipt='NLJ7RT61SV', phone='254708374149',
        )
        raw = json.dumps(body, separators=(',', ':'))
        self._post_callback(None, raw=raw, settle=False)
        event = self._callback_event('ws_CO_monitoring_2')
        self.assertEqual(event.request_body, raw, "the body is kept exactly")
        self.assertEqual(event._mpesa_raw_body(), raw.encode())
        pretty = event.request_body_pretty
        self.assertEqual(json.loads(pretty), body)
        self.assertIn('\n      "CheckoutRequestID": "ws_CO_monitoring_2",\n', pretty)
        self.assertIn('"Value": 4500.0', pretty, "numbers as they came")
        self.assertEqual(event.amount, 4500.0)

        # What is not JSON is shown as it came.
        self._post_callback(None, raw='not json {', settle=False)
        garbage = self._events(kind='stk_callback', request_body='not json {')
        self.assertEqual(garbage.request_body_pretty, 'not json {')
        arch = self.env['muchiri.mpesa.event'].get_view(view_type='list')['arch']
        self.assertIn('name="amount"', arch, "the exchanges list shows the amount")

    def test_a_forged_callback_does_not_mute_the_missing_callback_alert(self):
        tx = self._pending_tx()
        self._answered(tx)  # The customer paid; Daraja's callback is lost.
        self._post_callback(self._body(tx, code=1032))  # Forged: the query answers success.
        self.assertEqual(self._events(kind='stk_callback', transaction_id=tx.id).state, 'rejected')
        self.assertFalse(tx.mpesa_callback_at, "the forged callback is not counted as a callback")
