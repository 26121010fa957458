# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""Monitoring: the analysis report and the alerts, on transactions set up directly with the ORM
(the alert rules read what the payment flow writes; no simulator is needed)."""
import json
from datetime import timedelta
from itertools import count
from unittest.mock import patch

from odoo import fields
from odoo.fields import Command
from odoo.tests import new_test_user, tagged
from odoo.tools import mute_logger

from odoo.addons.account_payment.tests.common import AccountPaymentCommon
from odoo.addons.muchiri_mpesa import daraja
from odoo.addons.sale.tests.common import SaleCommon

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
            'query_settled_rate:avg', 'success_count:sum', 'failure_count:sum', 'pending_count:sum',
        ])
        self.assertEqual(totals['__count'], 6, "one row per attempt; the draft is not one")
        self.assertAlmostEqual(totals['success_rate'], 40.0, msg="2 paid of 5 settled")
        self.assertAlmostEqual(totals['settle_seconds'], (10 + 50 + 30 + 20) / 4)
        self.assertAlmostEqual(totals['callback_delay_seconds'], (10 + 30 + 20) / 3)
        self.assertAlmostEqual(totals['query_settled_rate'], 25.0, msg="1 of 4 answered by query")
        self.assertEqual(
            (totals['success_count'], totals['failure_count'], totals['pending_count']), (2, 3, 1),
        )

        by_code = {
            group['result_code']: group['__count']
            for group in self._report(['result_code'], ['failure_count:sum'],
                                      [('outcome', '=', 'failure')])
        }
        self.assertEqual(by_code, {'1032': 1, '1': 1, False: 1})

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

    # === SUCCESS RATE === #

    def test_success_rate_alert_fires(self):
        for _i in range(3):
            self._paid()
        self._failed(code='1032')
        self._failed(code='1', desc="Insufficient funds")
        alerts = self._check()
        self.assertEqual(alerts.kind, 'success_rate', "3 of 5 is 60%")
        self.assertEqual(alerts.state, 'open')
        self.assertIn('60.0%', alerts.message)
        self.assertIn('1032', alerts.message)
        self.assertIn('Insufficient funds', alerts.message)
        self.assertEqual(len(alerts.transaction_ids), 2, "the failures are linked")
        activities = self._activities(alerts)
        self.assertEqual(activities.user_id, self.watcher_1 | self.watcher_2,
                         "one activity for each user of the alert group")
        self.assertEqual(len(activities), 2)

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
        self.assertIn('2547******49', alerts.message, "phones are masked")
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
        event = self.env['muchiri.mpesa.event'].sudo()._mpesa_keep_callback(
            self.provider, json.dumps(body).encode(), '196.201.214.200',
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
        self.assertIn('2547******49', alerts.message, "phones are masked")
        self.assertEqual(len(self._activities(alerts)), 2)
        lost._mark('processed', "Matched by hand.")
        self.assertFalse(self._check().filtered(lambda alert: alert.state == 'open'))

    # === FAILURES ON AN ORDER === #

    def test_several_failures_on_an_order(self):
        self.provider.mpesa_alert_min_sample = 100  # Only the order rule is under test.
        failures = self._failed(order=self.order_a, code='2001', desc="Wrong PIN")
        failures |= self._failed(ago=2000, order=self.order_a, code='1032')
        failures |= self._failed(ago=5000, order=self.order_a, code='1', desc="Insufficient funds")
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
        self.assertIn('Wrong PIN', alerts.message)
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
        self.assertIn(second.reference, str(activities[0].note))

        # The quiet period over again, but nothing new: nobody is bothered.
        alert.notified_at = self._ago(61 * 60)
        self._check()
        self.assertEqual(alert.notification_count, 2)

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
        check_pending = alert_model._check_pending_callbacks

        def broken(alerts, provider, now):
            if provider == self.provider:
                raise ValueError("Simulated failure")
            return check_pending(alerts, provider, now)

        self._tx('pending', pushed=120, provider_id=other.id)
        with patch.object(alert_model, '_check_pending_callbacks', broken), \
                mute_logger('odoo.addons.muchiri_mpesa.models.mpesa_alert'):
            self.alerts._cron_check_alerts()
        other_alert = self.alerts.search([('provider_id', '=', other.id)])
        self.assertEqual(other_alert.kind, 'pending_callback', "the other provider was checked")
        self.assertEqual(alert.state, 'open', "a check that failed closes nothing")
