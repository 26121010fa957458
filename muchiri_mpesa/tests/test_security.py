# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""What strangers cannot do: requests no Daraja would send on every inbound route, money forged by
one who learned the callback secret, thousands of malformed callbacks, forged reversal results,
and the access rights of portal and plain internal users.
"""
import base64
import copy
import dataclasses
import inspect
import json
import logging
import os
import random
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

import requests

from odoo import fields, models
from odoo.exceptions import AccessError
from odoo.fields import Command, Date
from odoo.tests import JsonRpcException, tagged
from odoo.tests.common import TEST_CURSOR_COOKIE_NAME, Opener
from odoo.tools import mute_logger

from odoo.addons.muchiri_mpesa import const, daraja

from .common import (
    PHONE_CALLBACK_LOST,
    PHONE_SUCCESS,
    SIM_SHORTCODE,
    MpesaCommon,
    MpesaInitiatorCommon,
    MpesaPaybillCommon,
)

_logger = logging.getLogger(__name__)

# The event kind each route keeps its body as.
ROUTE_KINDS = {
    'stk': 'stk_callback',
    'c2b_validation': 'c2b_validation',
    'c2b_confirmation': 'c2b_confirmation',
    'pull': 'pull_callback',
    'reversal_result': 'initiator_result',
    'reversal_timeout': 'initiator_timeout',
    'status_result': 'initiator_result',
    'status_timeout': 'initiator_timeout',
    'b2b_result': 'b2b_result',
}
JSON = {'Content-Type': 'application/json'}
FORM = {'Content-Type': 'application/x-www-form-urlencoded'}
# (name, body, headers): bodies that must be kept exactly on the right secret.
BODIES = [
    ('empty', b'', JSON),
    ('form', b'TransID=ATK0000001&TransAmount=100&BillRefNumber=INV%2F1&Result=1', FORM),
    ('form_as_json', b'TransID=ATK0000002&TransAmount=100', JSON),
    ('two_megabytes', b'{"TransID": "ATK0000003", "pad": "' + b'x' * (2 * 1024 * 1024) + b'"}', JSON),
    ('invalid_utf8', b'{"TransID": "\xff\xfe\xc3\x28", "TransAmount": "1\x00"}', JSON),
    ('json_array', json.dumps([{'TransID': 'ATK0000004', 'TransAmount': '100'}]).encode(), JSON),
    ('json_string', json.dumps('{"TransID": "ATK0000005"}').encode(), JSON),
    ('no_content_type', b'{"TransID": "ATK0000006", "TransAmount": "100"}', {}),
]
MUTED = ('odoo.addons.muchiri_mpesa.models.mpesa_event', 'odoo.addons.muchiri_mpesa.models.mpesa_event',
         'odoo.addons.muchiri_mpesa.models.mpesa_event',
         'odoo.addons.muchiri_mpesa.models.payment_transaction')

SECRET_FIELDS = ('mpesa_consumer_key', 'mpesa_consumer_secret', 'mpesa_passkey',
                 'mpesa_callback_secret')


@tagged('post_install', '-at_install')
class TestInboundRoutes(MpesaCommon):
    """Requests no Daraja would send, on every inbound route Daraja calls (const.LNM_ROUTES), over real HTTP.

    Each route gets the same catalogue: the wrong method, bodies no Daraja would send (empty, a form,
    2 MB, invalid UTF-8, a JSON array, a JSON string), wrong or mangled secrets, and one body posted
    twice at once.  Whatever comes: never a 5xx; on a wrong secret nothing is kept; on the right one
    the exact bytes are kept (muchiri.mpesa.event.raw_body) and no money moves.
    """

    def _url(self, route, secret):
        return self._build_url(const.LNM_ROUTES[route].replace('<string:secret>', secret))

    def _snapshot(self):
        """What money looks like: ledger rows, payments, and every transaction's state."""
        with self.registry.test_lock:
            self.env.invalidate_all()
            return (
                self.env['muchiri.mpesa.ledger'].sudo().search_count([]),
                self.env['account.payment'].sudo().search_count([]),
                {tx.id: (tx.state, tx.amount) for tx in self.env['payment.transaction'].sudo().search([])},
            )

    def _event_ids(self):
        with self.registry.test_lock:
            return set(self.env['muchiri.mpesa.event'].sudo().search([]).ids)

    def _new_events(self, before):
        with self.registry.test_lock:
            self.env.invalidate_all()
            Event = self.env['muchiri.mpesa.event'].sudo().with_context(bin_size=False)
            return Event.browse(sorted(set(Event.search([]).ids) - before))

    def _run_jobs(self):
        """Every job an inbound body wakes, as Odoo's crons would."""
        self._settle_callbacks()
        with self.registry.test_lock:
            self.env['payment.transaction'].sudo()._cron_mpesa_initiator()
            self.env['muchiri.mpesa.event'].sudo()._cron_mpesa_settle_callbacks()
            self.env.invalidate_all()

    def _post(self, route, body, headers, secret=None, method='post'):
        url = self._url(route, secret if secret is not None else self.provider.mpesa_callback_secret)
        return getattr(self.opener, method)(url, data=body, headers=headers, timeout=30, allow_redirects=False)

    def _assert_kept(self, events, route, bodies):
        self.assertEqual(len(events), len(bodies), f"{route}: one event per body")
        for event, body in zip(events, bodies, strict=True):
            self.assertEqual(event.kind, ROUTE_KINDS[route])
            self.assertEqual(event.provider_id, self.provider)
            self.assertEqual(base64.b64decode(event.raw_body or b''), body, f"{route}: kept exactly")

    @mute_logger('odoo.addons.muchiri_mpesa.controllers.main', 'odoo.addons.muchiri_mpesa.controllers.main',
                 'odoo.addons.muchiri_mpesa.controllers.main', 'odoo.addons.muchiri_mpesa.models.mpesa_event',
                 'odoo.addons.muchiri_mpesa.models.mpesa_event',
                 'odoo.addons.muchiri_mpesa.models.mpesa_event', 'odoo.http', 'werkzeug')
    def test_malformed_requests_on_every_inbound_route(self):
        self.env['payment.transaction'].sudo().create({
            'provider_id': self.provider.id, 'payment_method_id': self.payment_method_id,
            'reference': 'ATK-PENDING', 'amount': 100.0, 'currency_id': self.currency_kes.id,
            'partner_id': self.distributor.id, 'operation': 'online_direct', 'state': 'pending',
        })
        self.env.flush_all()
        secret = self.provider.mpesa_callback_secret
        money = self._snapshot()
        for route in const.LNM_ROUTES:
            # The right secret: every body kept exactly, whatever it is.
            for name, body, headers in BODIES:
                with self.subTest(route=route, attack=name):
                    before = self._event_ids()
                    response = self._post(route, body, headers)
                    self.assertLess(response.status_code, 500, response.text[:300])
                    self._assert_kept(self._new_events(before), route, [body])
            # Not a POST: refused before anything is read, nothing kept.
            for method in ('get', 'put', 'delete'):
                with self.subTest(route=route, attack=method):
                    before = self._event_ids()
                    response = self._post(route, b'{}', JSON, method=method)
                    self.assertLess(response.status_code, 500)
                    self.assertGreaterEqual(response.status_code, 400)
                    self.assertFalse(self._new_events(before), "nothing kept")
            # Wrong and mangled secrets: never the provider's, nothing kept.
            for name, wrong in (
                ('wrong', 'not-the-secret'), ('prefix', secret[:-1]), ('longer', secret + 'x'),
                ('trailing_slash', secret + '/'), ('encoded_slash', secret + '%2F'),
                ('encoded_slash_lower', secret + '%2f'), ('leading_slash', '%2F' + secret),
                ('invalid_utf8', '%FF%FE' + secret), ('nul', secret + '%00'), ('empty', ''),
                ('dotdot', '..%2F' + secret), ('upper', secret.upper() if secret.upper() != secret else secret + 'A'),
            ):
                with self.subTest(route=route, attack=f'secret_{name}'):
                    before = self._event_ids()
                    response = self._post(route, b'{"TransID": "ATK0000099"}', JSON, secret=wrong)
                    self.assertLess(response.status_code, 500, response.text[:300])
                    self.assertNotIn(response.status_code, (200, 201, 202), "not accepted")
                    self.assertFalse(self._new_events(before), "nothing kept on a wrong secret")
            # The same body twice at once: both kept, neither a 5xx.
            with self.subTest(route=route, attack='twice_at_once'):
                before = self._event_ids()
                body = json.dumps({'TransID': 'ATK0000100', 'TransAmount': 'abc', 'Result': 'x'}).encode()
                statuses, barrier = [], threading.Barrier(2)

                def post(body=body, route=route, statuses=statuses, barrier=barrier, secret=secret):
                    barrier.wait()
                    statuses.append(self._post(route, body, JSON, secret=secret).status_code)

                threads = [threading.Thread(target=post) for _i in range(2)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(timeout=60)
                self.assertEqual(len(statuses), 2)
                self.assertTrue(all(status < 500 for status in statuses), statuses)
                self._assert_kept(self._new_events(before), route, [body, body])
        self._run_jobs()
        self.assertEqual(self._snapshot(), money, "no money moved")


@tagged('post_install', '-at_install')
class TestForgedNotifications(MpesaPaybillCommon):
    """A stranger who learned the provider's callback secret, but not what Daraja answers us, forges
    money on every inbound route, over real HTTP.

    What the stranger may know: the secret path, our shortcode, the numbers of our orders, a real
    receipt (an SMS, a statement), the shape of Daraja's IDs (a ConversationID is AG_, the date, then
    hex).  What they cannot know: the conversation IDs Daraja gave our own requests, and what Daraja
    answers our queries.  After every attack: no order confirmed, no invoice paid, no payment posted,
    no ledger row moved by the claim, the body kept exactly, and the refusal or conflict it met said.
    The forged bodies of C2B confirmations alone are tried in test_c2b_confirmation.py; these are the
    routes and the tricks it does not reach.
    """

    def setUp(self):
        super().setUp()
        self._with_initiator()

    # === THE STRANGER'S TOOLS === #

    def _post(self, route, body, twice_at_once=False):
        """POST `body` on the provider's real secret path, once or twice at once; the statuses."""
        self.env.flush_all()
        path = const.LNM_ROUTES[route]
        url = self._build_url(path.replace('<string:secret>', self.provider.mpesa_callback_secret))
        data = json.dumps(body).encode()
        if not twice_at_once:
            return [self.opener.post(url, data=data, headers=JSON, timeout=30).status_code]
        # The test server's two requests share one cursor: one request alone first fills Odoo's
        # caches (routing, the public user), which two at once on a cold server both fill on it.
        warm_up = self.opener.post(self._build_url(path.replace('<string:secret>', 'warm-up')), data=b'{}',
                                   headers=JSON, timeout=30)
        self.assertEqual(warm_up.status_code, 404, "a wrong secret keeps nothing")
        statuses, barrier = [], threading.Barrier(2)

        def post():
            barrier.wait()
            statuses.append(self.opener.post(url, data=data, headers=JSON, timeout=30).status_code)

        threads = [threading.Thread(target=post) for _i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        self.assertEqual(len(statuses), 2, "both requests answered")
        return statuses

    def _run_jobs(self):
        """Every job an inbound body wakes, as Odoo's crons would (none runs in tests)."""
        self._run_initiator_job()
        with self.registry.test_lock:
            self.env['muchiri.mpesa.event'].sudo()._cron_mpesa_settle_callbacks()
            self.env.invalidate_all()
        self._settle_callbacks()

    def _last_event_id(self):
        with self.registry.test_lock:
            return self.env['muchiri.mpesa.event'].sudo().search([], order='id desc', limit=1).id or 0

    def _kept(self, since, body, count=1):
        """The events kept since `since`: `count` of them, each holding exactly `body`."""
        with self.registry.test_lock:
            self.env.invalidate_all()
            events = self.env['muchiri.mpesa.event'].sudo().with_context(bin_size=False).search(
                [('id', '>', since), ('raw_body', '!=', False)], order='id')
            self.assertEqual(len(events), count, "every forged body is kept")
            for event in events:
                self.assertEqual(base64.b64decode(event.raw_body), json.dumps(body).encode(), "kept exactly")
            return events

    def _money(self):
        """What money looks like: payments, transactions, orders, invoices, ledger rows."""
        with self.registry.test_lock:
            self.env.invalidate_all()
            env = self.env(su=True)
            return {
                'payments': env['account.payment'].search_count([('state', '!=', 'draft')]),
                'transactions': {tx.id: (tx.state, tx.mpesa_receipt_number, tx.mpesa_receipt_status)
                                 for tx in env['payment.transaction'].search([])},
                'orders': {order.id: order.state for order in env['sale.order'].search([])},
                'invoices': {move.id: move.payment_state for move in env['account.move'].search(
                    [('move_type', '=', 'out_invoice')])},
                'ledger': {row.name: (row.state, row.confirmation, row.amount, row.bill_ref, row.shortcode,
                                      row.phone, row.msisdn_hash, row.partner_id.id)
                           for row in env['muchiri.mpesa.ledger'].search([])},
            }

    def _awaiting(self, receipt, amount, bill_ref):
        """A forged confirmation whose row awaits Transaction Status; Daraja's answer is raced (it
        never comes: the stranger has all the time they want)."""
        self.simulator.initiator_next('no_result')
        row = self._confirm(amount, bill_ref, receipt=receipt)
        self._run_initiator_job()
        with self.registry.test_lock:
            row.invalidate_recordset()
            self.assertEqual(row.state, 'awaiting', row.note)
            self.assertTrue(row.status_conversation_id and row.status_originator_id, "its status is asked")
        return row

    def _status_result(self, conversation_id, originator_id, receipt, amount, shortcode=SIM_SHORTCODE):
        """A Transaction Status result as Daraja posts it, saying `receipt` paid `amount` to `shortcode`."""
        return self._initiator_result(
            self.status_result_data, conversation_id, originator_id,
            CreditPartyName=f"{shortcode} - Muchiri Shop", Amount=amount, ReceiptNo=receipt,
        )

    def _pull_confirmed_row(self, amount):
        """A real payment with no account number whose confirmation was lost: Pull Transactions
        lists it, so its row is confirmed by Daraja, and waits unmatched in the queue."""
        self.provider.mpesa_pull_nominated_number = '0708374149'
        self.provider.action_mpesa_pull_register()
        trans_id = self._lost_payment(amount, '')
        self.simulator.age_transaction(trans_id, 0.01)
        with self.registry.test_lock:
            self.env['payment.provider']._cron_mpesa_pull_transactions()
            self.env.invalidate_all()
        row = self._row(trans_id)
        self.assertEqual((row.state, row.confirmation, row.bill_ref), ('unmatched', 'pull', False), row.note)
        return row

    # === INITIATOR RESULTS: BOTH CONVERSATION IDS OF THE REQUEST, OR NOTHING === #

    @mute_logger(*MUTED)
    def test_a_status_result_naming_one_id_of_the_request_confirms_nothing(self):
        """The stranger races Daraja's answer to our Transaction Status query with a result that
        "confirms" their invented receipt, knowing one of the request's IDs (guessed, or read)."""
        order = self.quotation
        order.action_quotation_sent()
        row = self._awaiting('FORGEDF001', order.amount_total, order.name)
        other = self._awaiting('FORGEDF002', 4500, self._invoice(4500).name)
        guessed_conversation = f"AG_{Date.today():%Y%m%d}_{'0' * 20}"
        money = self._money()
        for name, conversation_id, originator_id, twice in (
            ("its ConversationID, an originator guessed", row.status_conversation_id, '29115-34620561-1', False),
            ("its OriginatorConversationID, a ConversationID guessed", guessed_conversation,
             row.status_originator_id, False),
            ("its ConversationID, another request's originator", row.status_conversation_id,
             other.status_originator_id, True),
            ("another request's ConversationID, its originator", other.status_conversation_id,
             row.status_originator_id, False),
        ):
            with self.subTest(attack=name):
                since = self._last_event_id()
                body = self._status_result(conversation_id, originator_id, row.name, order.amount_total)
                self.assertEqual(set(self._post('status_result', body, twice_at_once=twice)), {200})
                self._run_jobs()
                for event in self._kept(since, body, count=2 if twice else 1):
                    self.assertEqual(event.state, 'unmatched', event.message)
                    self.assertIn('conversation IDs', event.message)
                    self.assertFalse(event.ledger_id or event.transaction_id)
                self.assertEqual(self._money(), money, "nothing confirmed, nothing paid")
        self.assertPaysNothing(row, order=order)
        self.assertFalse(row.conflict)
        # A queue timeout naming one of them only makes us ask again.
        since = self._last_event_id()
        timeout = {'Result': {'ResultType': 1, 'ResultCode': 1, 'ResultDesc': "Timed out",
                              'OriginatorConversationID': '', 'ConversationID': row.status_conversation_id}}
        self.assertEqual(self._post('status_timeout', timeout), [200])
        self._run_jobs()
        self._kept(since, timeout)
        self.assertPaysNothing(row, order=order)
        # Both IDs are the lock: with them, the same body is read, and its lie found where it can
        # be (here another amount); an invented receipt with its claimed amount would pass (see
        # the module docstring of the ledger).
        since = self._last_event_id()
        body = self._status_result(other.status_conversation_id, other.status_originator_id, other.name, 4501)
        self.assertEqual(self._post('status_result', body), [200])
        self._run_jobs()
        [event] = self._kept(since, body)
        self.assertEqual((event.state, event.ledger_id), ('conflict', other))
        self.assertPaysNothing(other)
        self.assertTrue(other.conflict)

    @mute_logger(*MUTED, 'odoo.addons.muchiri_mpesa.models.payment_transaction_refund')
    def test_a_status_result_naming_one_id_never_verifies_a_forged_receipt(self):
        """A prompt settled by STK Query has no receipt; the stranger's forged callback gives it one,
        which waits unverified for Transaction Status; their forged result, naming one ID of our
        query, must not verify it (a verified receipt may be reversed)."""
        tx, _result = self._pay_from_portal(PHONE_CALLBACK_LOST)
        self._wait(lambda: self._result_known(tx), message="the customer's answer", settle=False)
        with self.registry.test_lock:
            tx._mpesa_settle_by_query()
        self.assertEqual((tx.state, tx.mpesa_receipt_status), ('done', 'pending'))
        forged = daraja.stk_callback_body(
            tx.mpesa_merchant_request_id, tx.provider_reference, 0, "The service request is processed successfully.",
            amount=tx.mpesa_requested_amount, receipt='FORGEDF006', transaction_date=datetime(2026, 12, 6, 9, 0, 0),
            phone=tx.mpesa_phone,
        )
        self.assertEqual(self._post('stk', forged), [200])
        self._run_jobs()
        self.assertEqual((tx.mpesa_receipt_number, tx.mpesa_receipt_status), ('FORGEDF006', 'unverified'))
        self.simulator.initiator_next('no_result')
        self._run_jobs()
        self.assertTrue(tx.mpesa_status_conversation_id and tx.mpesa_status_originator_id, "its status is asked")
        for conversation_id, originator_id in (
            (tx.mpesa_status_conversation_id, '29115-34620561-7'),
            (f"AG_{Date.today():%Y%m%d}_{'1' * 20}", tx.mpesa_status_originator_id),
        ):
            since = self._last_event_id()
            body = self._status_result(conversation_id, originator_id, 'FORGEDF006', tx.mpesa_requested_amount)
            self.assertEqual(self._post('status_result', body), [200])
            self._run_jobs()
            [event] = self._kept(since, body)
            self.assertEqual((event.state, event.transaction_id), ('unmatched', tx.browse()), event.message)
            self.assertEqual(tx.mpesa_receipt_status, 'unverified', "not verified on the stranger's word")

    @mute_logger(*MUTED, 'odoo.addons.muchiri_mpesa.models.payment_transaction_refund')
    def test_a_reversal_result_naming_one_id_of_the_request_refunds_nothing(self):
        """A forged "reversed" result for a refund Daraja has not done: the refund stays pending,
        no refund payment is posted, the invoice stays paid."""
        tx, _result = self._pay_from_portal(PHONE_SUCCESS)
        self._wait_final(tx)
        self.assertEqual(tx.state, 'done')
        self.simulator.initiator_next('no_result')  # Daraja's own result never comes.
        with self.registry.test_lock:
            payment = tx.payment_id.with_user(self.accountant)
            action = payment.action_refund_wizard()
            self.env[action['res_model']].with_user(self.accountant).with_context(
                active_id=payment.id, active_model='account.payment').create({}).action_refund()
            self.env.invalidate_all()
        refund = tx.child_transaction_ids.filtered(lambda child: child.operation == 'refund')
        self.assertEqual(refund.state, 'pending')
        self.assertTrue(refund.provider_reference and refund.mpesa_originator_conversation_id)
        money = self._money()

        def reversed_body(conversation_id, originator_id):
            return self._initiator_result(
                self.reversal_result_data, conversation_id, originator_id, transaction_id='SIMREV0F01',
                OriginalTransactionID=tx.mpesa_receipt_number,
            )

        for name, conversation_id, originator_id in (
            ("its ConversationID", refund.provider_reference, '29115-34620561-9'),
            ("its OriginatorConversationID", f"AG_{Date.today():%Y%m%d}_{'f' * 20}",
             refund.mpesa_originator_conversation_id),
        ):
            with self.subTest(attack=name):
                since = self._last_event_id()
                body = reversed_body(conversation_id, originator_id)
                self.assertEqual(set(self._post('reversal_result', body, twice_at_once=True)), {200})
                self._run_jobs()
                for event in self._kept(since, body, count=2):
                    self.assertEqual(event.state, 'unmatched', event.message)
                    self.assertFalse(event.transaction_id)
                self.assertEqual(self._money(), money, "no refund done, no refund payment")
        self.assertEqual(refund.state, 'pending')
        self.assertIn(self.quotation.invoice_ids.payment_state, ('paid', 'in_payment'))

    # === C2B ON A ROW DARAJA CONFIRMED: THE CLAIM ADDS NOTHING MATCHING READS === #

    @mute_logger(*MUTED)
    def test_a_claim_on_a_real_receipt_never_places_its_money(self):
        """A real payment that named no account waits in the queue, confirmed by Pull.  The
        stranger, who knows its receipt, posts C2B confirmations of it that name their order and
        their phone, another amount, another shortcode: the money stays where it was."""
        row = self._pull_confirmed_row(4500)
        order = self.quotation
        order.action_quotation_sent()
        self.assertEqual(order.amount_total, 4500)
        money = self._money()
        for name, body in (
            ("their order and phone", self._c2b_body(4500, order.name, receipt=row.name)),
            ("their order, another amount", self._c2b_body(45000, order.name, receipt=row.name)),
            ("their order, another shortcode", self._c2b_body(4500, order.name, receipt=row.name,
                                                              shortcode='600999')),
        ):
            with self.subTest(attack=name):
                since = self._last_event_id()
                self.assertEqual(set(self._post('c2b_confirmation', body, twice_at_once=True)), {200})
                self._run_jobs()
                for event in self._kept(since, body, count=2):
                    self.assertEqual((event.state, event.ledger_id), ('ignored', row), event.message)
                    self.assertIn('already in the ledger', event.message)
                after = self._money()
                self.assertEqual(after['ledger'], money['ledger'], "the row's matching fields are Daraja's")
                self.assertEqual(after['orders'], money['orders'], "no order confirmed")
                self.assertEqual(after['payments'], money['payments'], "no payment posted")
                self.assertEqual(after['transactions'], money['transactions'])
        row.invalidate_recordset()
        self.assertEqual(row.payer_name, "Wanjiku", "what only shows may be filled in")
        self.assertTrue(row.conflict, "another amount is a conflict for accountants")
        self.assertIn('45,000', ' '.join(row.message_ids.mapped('body')))
        # Nor does Daraja's validation route take anything from the claim.
        since = self._last_event_id()
        body = self._c2b_body(4500, order.name, receipt=row.name, sample=self.c2b_validation_data)
        self.assertEqual(self._post('c2b_validation', body), [200])
        self._run_jobs()
        [event] = self._kept(since, body)
        self.assertFalse(event.ledger_id)
        self.assertEqual(self._money()['ledger'], money['ledger'])

    @mute_logger(*MUTED)
    def test_a_claim_of_a_real_receipt_for_another_account_is_a_conflict(self):
        """The stranger claims a real payment whose confirmation was lost, naming their own order,
        with its real amount, to our shortcode.  Pull lists the account the payer typed, which the
        claim contradicts: neither Pull nor Transaction Status (which carries no account) then
        places the money, and the accountants are asked."""
        self.provider.mpesa_pull_nominated_number = '0708374149'
        self.provider.action_mpesa_pull_register()
        invoice = self._invoice(4500)
        trans_id = self._lost_payment(4500, invoice.name)
        order = self.quotation
        order.action_quotation_sent()
        row = self._confirm(4500, order.name, receipt=trans_id)
        self.assertPaysNothing(row, order=order)
        self.simulator.age_transaction(trans_id, 0.01)
        with self.registry.test_lock:
            self.env['payment.provider']._cron_mpesa_pull_transactions()
            self.env.invalidate_all()
        self.assertPaysNothing(row, order=order, invoice=invoice)
        self.assertTrue(row.conflict)
        self.assertIn(invoice.name, ' '.join(row.message_ids.mapped('body')), "the chatter says which account")
        self._confirm_by_status()
        self.assertPaysNothing(row, order=order, invoice=invoice)
        [event] = self._events(kind='initiator_result', ledger_id=row.id)
        self.assertEqual(event.state, 'conflict', event.message)

    @mute_logger(*MUTED)
    def test_one_forged_confirmation_twice_at_once_and_a_pull_notification(self):
        """An invented receipt twice at once is one awaiting row; a forged Pull notification is
        kept for the record and read by nothing."""
        invoice = self._invoice(4500)
        body = self._c2b_body(4500, invoice.name, receipt='FORGEDF003')
        since = self._last_event_id()
        self.assertEqual(self._post('c2b_confirmation', body, twice_at_once=True), [200, 200])
        self._run_jobs()
        events = self._kept(since, body, count=2)
        self.assertEqual(sorted(events.mapped('state')), ['ignored', 'processed'])
        row = self._row('FORGEDF003')
        self.assertEqual(events.ledger_id, row)
        self.assertPaysNothing(row, invoice=invoice)
        money = self._money()
        since = self._last_event_id()
        pull = {'ResponseRefID': 'forged', 'ResponseCode': '1000', 'ResponseMessage': "Success", 'Response': [[{
            'transactionId': 'FORGEDF004', 'trxDate': '2026-01-15T09:30:12', 'msisdn': 254708374149,
            'sender': 'MPESA', 'transactiontype': 'c2b-pay-bill-debit', 'billreference': invoice.name,
            'amount': '4500.00', 'organizationname': 'Muchiri Shop'}]]}
        self.assertEqual(self._post('pull', pull), [200])
        self._run_jobs()
        [event] = self._kept(since, pull)
        self.assertEqual(event.state, 'ignored')
        self.assertEqual(self._money(), money)
        self.assertFalse(self._row('FORGEDF004'))

    # === STK CALLBACKS: ONLY FOR PROMPTS WE SENT === #

    @mute_logger(*MUTED)
    def test_a_stk_callback_for_a_transaction_that_sent_no_prompt_is_matched_to_nothing(self):
        """The ledger's transactions carry their receipt as reference and never sent a prompt: a
        forged STK callback naming that receipt as its CheckoutRequestID, with another real
        receipt, must not give either of them to the transaction.  Nor does a CheckoutRequestID
        nobody sent find anything, twice at once."""
        row = self._pull_confirmed_row(9000)
        first, second = self._invoice(4500), self._invoice(4500)
        with self.registry.test_lock:
            row.with_user(self.accountant)._mpesa_match_by_hand([first, second])
            self.env.invalidate_all()
        ledger_txs = row.transaction_ids
        self.assertEqual(len(ledger_txs), 2)
        self.assertEqual(set(ledger_txs.mapped('provider_reference')), {row.name})
        self.assertFalse(any(ledger_txs.mapped('mpesa_push_sent_at')), "the ledger sends no prompt")
        victim = self._lost_payment(4500, 'X2')  # Another real payment, not in Odoo yet.
        money = self._money()
        for name, checkout_request_id in (
            ("the receipt of a ledger transaction", row.name),
            ("a prompt never sent", 'ws_CO_06122026000000000000000001'),
        ):
            with self.subTest(attack=name):
                body = daraja.stk_callback_body(
                    '29115-34620561-1', checkout_request_id, 0, "The service request is processed successfully.",
                    amount=4500, receipt=victim, transaction_date=datetime(2026, 12, 6, 9, 0, 0), phone=PHONE_SUCCESS,
                )
                since = self._last_event_id()
                self.assertEqual(self._post('stk', body, twice_at_once=True), [200, 200])
                self._run_jobs()
                for event in self._kept(since, body, count=2):
                    self.assertEqual(event.state, 'unmatched', event.message)
                    self.assertFalse(event.transaction_id)
                self.assertEqual(self._money(), money, "no receipt taken, nothing paid")
        with self.registry.test_lock:
            self.assertFalse(self.env['payment.transaction'].search([('mpesa_receipt_number', '=', victim)]))


# === MALFORMED STK CALLBACKS === #
# Failure mode 18: malformed bodies on the callback route, over real HTTP.
#
# A few thousand seeded bodies (MUCHIRI_HOSTILE_BODIES, default 2000) are posted to the real route:
# a systematic catalogue (every field with every wrong type, every odd number in every numeric field,
# every lone surrogate in every string field, every wrong path...) and then random mutations of real
# callbacks for real transactions.  Whatever comes, the route answers 2xx/4xx, logs no ERROR, keeps
# every body it received on its secret path exactly as sent, keeps nothing sent anywhere else, and
# changes no transaction while it answers (settlement is the cron's, which this test does not run).
DEFAULT_BODIES = 2000
SEED = 7
CALLBACK_PATH = '/payment/mpesa/callback/'
SUCCESS_DESC = "The service request is processed successfully."
ACCEPTABLE_STATUSES = {200, 400, 403, 404, 405}
# With website installed, a path that no route takes and that ends in '/' is answered by website's
# 301 to the same path without that slash (its _serve_page), before any code of ours runs.
WEBSITE_SLASH_REDIRECT = "website's 301 to the path without its trailing slash"
SNAPSHOT_FIELDS = ['state', 'provider_reference', 'mpesa_receipt_number', 'amount', 'mpesa_paid_amount']
FOREIGN_RECEIPT = 'HOSTILE001'  # Held by another (done) transaction.
DONE_CHECKOUT_ID = 'ws_CO_26112026120000000000000001'

# Paths into a success body built by daraja.stk_callback_body (items: Amount, MpesaReceiptNumber,
# Balance without Value, TransactionDate, PhoneNumber).
STK = ('Body', 'stkCallback')
META = (*STK, 'CallbackMetadata')
ITEMS = (*META, 'Item')
ITEM_INDEX = {'Amount': 0, 'MpesaReceiptNumber': 1, 'Balance': 2, 'TransactionDate': 3, 'PhoneNumber': 4}


def _value(name):
    return (*ITEMS, ITEM_INDEX[name], 'Value')


FIELD_PATHS = [
    ('Body',), STK, (*STK, 'MerchantRequestID'), (*STK, 'CheckoutRequestID'), (*STK, 'ResultCode'),
    (*STK, 'ResultDesc'), META, ITEMS,
    *((*ITEMS, index) for index in range(5)),
    *((*ITEMS, index, 'Name') for index in range(5)),
    *((*ITEMS, index, 'Value') for index in range(5)),
]
NUMERIC_SLOTS = [
    _value('Amount'), (*STK, 'ResultCode'), _value('TransactionDate'), _value('PhoneNumber'), _value('Balance'),
    _value('MpesaReceiptNumber'), (*STK, 'MerchantRequestID'), (*STK, 'CheckoutRequestID'),
]
STRING_SLOTS = [
    (*STK, 'MerchantRequestID'), (*STK, 'CheckoutRequestID'), (*STK, 'ResultDesc'), (*STK, 'ResultCode'),
    *((*ITEMS, index, 'Name') for index in range(5)),
    _value('MpesaReceiptNumber'), _value('PhoneNumber'), _value('TransactionDate'), _value('Balance'),
    _value('Amount'),
]
DELETE = object()
WRONG_TYPES = [
    None, True, False, 0, -1, 1.5, '', '   ', [], {}, ['x'], {'Name': 'Amount', 'Value': 4500}, 'x' * 5000,
    10 ** 30, '\x00', DELETE,
]
# JSON number literals, inserted as raw text (most cannot be produced by json.dumps).
NUMBER_LITERALS = [
    '1e28', '1E28', '-1e28', '1e308', '1e400', '-1e400', '-0', '-0.0', '0e0', '1' + '0' * 4000,
    '1' + '0' * 5000, '99999999999999999999999999999.5', 'NaN', 'Infinity', '-Infinity', '1e-400',
    '4500.000000000000000000000001', '4.5e3', '45e2', '123456789012345678901234567890e-26', '2e63', '-1',
]
SURROGATES = ['\\ud800', '\\udfff', 'x\\udc80y', '\\udc00\\ud800', '\\ud83d']
HUGE_RESULT_CODES = [
    '1' + '0' * 4000, '"' + '9' * 5000 + '"', str(2 ** 63), str(2 ** 64), '-1', '1e308', '0.0', '1e0', '-0',
    '"0 "', '" 0"', '"00"', '"\\u0660"', '"\\uff10"', '"SFC_IC0003"', '""',
]
DATE_GARBAGE = [
    '0', '-1', '99999999999999', '20261399256199', '20260229120000', '"20261126120000 "',
    '"\\uff12\\uff10\\uff12\\uff16\\uff11\\uff11\\uff12\\uff16\\uff11\\uff12\\uff10\\uff10\\uff10\\uff10"',
    '2.0261126120000e13', '"abc"', '[]', '{}', 'true', '20261126120000.5', '"2026-11-26T12:00:00"', '1e400',
    'NaN', '"\\u0000"', '202611261200000000000000000000',
]
ODD_AMOUNTS = [
    '"\\uff14\\uff15\\uff10\\uff10"', '"4500 "', '" 4500"', '"4,500"', '"KES 4500"', '"0x1194"', '"4_500"',
    '"4500.00"', '4500.00', '"\\u0664\\u0665\\u0660\\u0660"', '"+4500"', '"4.5E3"',
]
INVALID_UTF8 = [
    b'\xff', b'\xfe', b'\x80', b'\xc3\x28', b'\xc0\xaf', b'\xe0\x80\xaf', b'\xed\xa0\x80', b'\xf4\x90\x80\x80',
    b'\xe2\x82', b'\xf8\x88\x80\x80\x80',
]
ENCODINGS = ['utf-16', 'utf-16-le', 'utf-16-be', 'utf-32', 'utf-32-le', 'utf-32-be', 'utf-8-sig', 'latin-1',
             'cp1252']
ONE_MB = 1 << 20


def _placeholder(index):
    return f'@@HOSTILE{index}@@'


def _dumps(obj, literals=()):
    """JSON text of `obj` where each placeholder string (value or key) becomes raw literal text."""
    text = json.dumps(obj)
    for index, literal in enumerate(literals):
        text = text.replace(json.dumps(_placeholder(index)), literal)
    return text


def _set(obj, path, value):
    node = obj
    for key in path[:-1]:
        node = node[key]
    if value is DELETE:
        if isinstance(node, dict):
            node.pop(path[-1], None)
        else:
            del node[path[-1]]
    else:
        node[path[-1]] = copy.deepcopy(value)
    return obj


def _get(obj, path):
    for key in path:
        obj = obj[key]
    return obj


def _short(data, size=70):
    if isinstance(data, bytes) and len(data) > size:
        return f"{data[:size]!r}...(+{len(data) - size} B)"
    return repr(data)


def _path_name(path):
    names = [str(key) for key in path if key not in ('Body', 'stkCallback')]
    return '.'.join(names) or '/'.join(path)


@dataclass
class Target:
    name: str
    checkout_request_id: str
    merchant_request_id: str


@dataclass
class Case:
    family: str
    kind: str  # stable: what was done (failures are grouped by it)
    body: bytes
    target: str = '-'
    path: str | bytes | None = None  # None: the right secret; bytes: sent raw, over a socket
    method: str = 'POST'
    headers: dict = dataclasses.field(default_factory=lambda: {'Content-Type': 'application/json'})
    chunked: bool = False
    note: str = ''  # what a random mutation did
    same_route: bool = False  # an explicit path that Odoo routes to the right secret all the same

    @property
    def on_right_path(self):
        return (self.path is None or self.same_route) and self.method == 'POST'


class MalformedBodies:
    """Seeded generator of the malformed requests (catalogue first, then random mutations)."""

    def __init__(self, rng, secret, targets, amount):
        self.rng = rng
        self.secret = secret
        self.targets = targets  # name -> Target, including 'random' (a fresh id each time)
        self.amount = amount

    # === BUILDING BLOCKS === #

    def target(self, names=None):
        names = names or ['pending_paid', 'pending_processing', 'pending_paid', 'pending_processing', 'done',
                          'random']
        name = self.rng.choice(names)
        if name == 'random':
            digits = ''.join(self.rng.choices('0123456789', k=24))
            return Target('random', f'ws_CO_{digits}', f'{self.rng.randint(1000, 99999)}-{digits[:8]}-1')
        return self.targets[name]

    def receipt(self):
        return 'T' + ''.join(self.rng.choices('ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789', k=9))

    def success(self, target, amount=None, receipt=None):
        return daraja.stk_callback_body(
            target.merchant_request_id, target.checkout_request_id, 0, SUCCESS_DESC,
            amount=self.amount if amount is None else amount, receipt=receipt or self.receipt(),
            transaction_date=datetime(2026, 11, 26, 12, 0, 0), phone='254700000005',
        )

    def failure(self, target, code=None):
        code = code if code is not None else self.rng.choice([1032, 1037, 1, 2001, 17, 'SFC_IC0003'])
        return daraja.stk_callback_body(target.merchant_request_id, target.checkout_request_id, code, "Failed")

    def base(self, target):
        return self.success(target) if self.rng.random() < 0.7 else self.failure(target)

    def with_literal(self, body, path, literal, keep_prefix=False):
        """`body` as JSON text whose value at `path` is the raw JSON `literal`."""
        if keep_prefix:  # For the IDs: the real id with the oddity appended, to reach the matching.
            literal = '"' + json.dumps(str(_get(body, path[:-1]).get(path[-1], '')))[1:-1] + literal[1:]
        return _dumps(_set(body, path, _placeholder(0)), [literal]).encode()

    def case(self, family, kind, body, target, **kw):
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        elif isinstance(body, str):
            body = body.encode()
        return Case(family, kind, body, target.name if target else '-', **kw)

    # === CATALOGUE === #

    def catalogue(self):
        yield from self._catalogue_bytes()
        yield from self._catalogue_structure()
        yield from self._catalogue_values()
        yield from self._catalogue_forged()
        yield from self._catalogue_paths()
        yield from self._catalogue_headers()

    def _catalogue_bytes(self):
        t = self.target
        yield self.case('bytes', 'empty body', b'', None)
        # The three ~1 MB bodies.
        tx = t()
        body = self.success(tx)
        _set(body, (*STK, 'ResultDesc'), 'A' * ONE_MB)
        yield self.case('bytes', '1 MB ResultDesc', body, tx)
        yield self.case('bytes', '1 MB random bytes', self.rng.randbytes(ONE_MB), None)
        tx = t()
        yield self.case('bytes', 'valid callback + 1 MB of NUL', json.dumps(self.success(tx)).encode()
                        + b'\x00' * ONE_MB, tx)
        for raw in (b' \t\r\n', b'{', b'}', b'\x00', b'\xff', b'null', b'\x00' * 1000, b'\xef\xbb\xbf'):
            yield self.case('bytes', f'tiny body {raw[:8]!r}', raw, None)
        for encoding in ENCODINGS:
            tx = t()
            body = self.success(tx)
            _set(body, (*STK, 'ResultDesc'), "Imekamilika \u00e9")
            yield self.case('bytes', f'JSON encoded {encoding}', json.dumps(body, ensure_ascii=False)
                            .encode(encoding), tx)
        tx = t()
        yield self.case('bytes', 'UTF-16 BOM twice', b'\xff\xfe' + json.dumps(self.success(tx)).encode('utf-16'), tx)
        tx = t()
        body = self.success(tx)
        _set(body, (*STK, 'ResultDesc'), "Imekamilika \u2713 \U0001f4b8")
        yield self.case('bytes', 'valid UTF-8, non-ASCII', json.dumps(body, ensure_ascii=False).encode(), tx)
        # Raw NUL bytes.
        for where in ('start', 'end', 'middle', 'in CheckoutRequestID', 'instead of a quote', 'in a key'):
            tx = t()
            text = json.dumps(self.success(tx)).encode()
            if where == 'start':
                raw = b'\x00' + text
            elif where == 'end':
                raw = text + b'\x00'
            elif where == 'middle':
                raw = text[:len(text) // 2] + b'\x00' + text[len(text) // 2:]
            elif where == 'in CheckoutRequestID':
                raw = text.replace(b'"ws_CO_', b'"ws_CO_\x00', 1)
            elif where == 'instead of a quote':
                raw = text.replace(b'"', b'\x00', 1)
            else:
                raw = text.replace(b'"ResultCode"', b'"Result\x00Code"')
            yield self.case('bytes', f'raw NUL {where}', raw, tx)
        # The \u0000 escape in every string field.
        for path in STRING_SLOTS:
            for literal, keep in (('"\\u0000"', False), ('"\\u0000"', True), ('"a\\u0000b"', False)):
                tx = t()
                yield self.case('bytes', f'\\u0000 in {_path_name(path)}{" (appended)" if keep else ""}',
                                self.with_literal(self.success(tx), path, literal, keep_prefix=keep), tx)
        tx = t()
        yield self.case('bytes', '\\u0000 in a key', json.dumps(self.success(tx)).replace(
            '"CheckoutRequestID"', '"CheckoutRequestID\\u0000"'), tx)
        # Invalid UTF-8, inside and outside strings.
        for sequence in INVALID_UTF8:
            for where in ('in ResultDesc', 'in CheckoutRequestID', 'between tokens', 'start', 'end'):
                tx = t()
                text = json.dumps(self.success(tx)).encode()
                if where == 'in ResultDesc':
                    raw = text.replace(SUCCESS_DESC.encode(), SUCCESS_DESC.encode() + sequence)
                elif where == 'in CheckoutRequestID':
                    raw = text.replace(b'"ws_CO_', b'"ws_CO_' + sequence, 1)
                elif where == 'between tokens':
                    raw = text.replace(b'{', b'{' + sequence, 1)
                elif where == 'start':
                    raw = sequence + text
                else:
                    raw = text + sequence
                yield self.case('bytes', f'invalid UTF-8 {sequence!r} {where}', raw, tx)
        for length in (1, 10, 30, 60, 100):
            tx = t()
            yield self.case('bytes', f'truncated at {length} B', json.dumps(self.success(tx)).encode()[:length], tx)

    def _catalogue_structure(self):
        t = self.target
        deep = 100_000
        yield self.case('structure', 'deep nesting: 100000 [', '[' * deep, None)
        yield self.case('structure', 'deep nesting: 100000 [ closed', '[' * deep + ']' * deep, None)
        yield self.case('structure', 'deep nesting: 100000 {"a":', '{"a":' * deep, None)
        for path in ((*STK, 'ResultDesc'), _value('Amount'), (*STK, 'CallbackMetadata'), ('Body',)):
            tx = t()
            literal = '[' * deep + ']' * deep
            yield self.case('structure', f'deep nesting in {_path_name(path)}',
                            self.with_literal(self.success(tx), path, literal), tx)
        tx = t()
        body = self.success(tx)
        _set(body, (*STK, 'ResultDesc'), _placeholder(0))
        yield self.case('structure', 'deep nesting of objects in ResultDesc',
                        _dumps(body, ['{"a":' * deep + '1' + '}' * deep]), tx)
        # Duplicate keys.
        for key, other in (('CheckoutRequestID', '"ws_CO_0"'), ('ResultCode', '1032'), ('ResultCode', '0'),
                           ('MerchantRequestID', '"x"'), ('ResultDesc', '1'), ('CallbackMetadata', 'null')):
            tx = t()
            text = json.dumps(self.success(tx))
            for order in ('first', 'last'):
                start = text.index(f'"{key}": ')
                value_end = self._value_end(text, start + len(key) + 4)
                pair = text[start:value_end]
                extra = f'"{key}": {other}'
                new = text[:start] + (f'{extra}, {pair}' if order == 'first' else f'{pair}, {extra}') \
                    + text[value_end:]
                yield self.case('structure', f'duplicate {key} ({order} is {other})', new, tx)
        tx = t()
        body = json.dumps(self.success(tx))
        yield self.case('structure', 'duplicate Body', body[:-1] + ', "Body": {}}', tx)
        yield self.case('structure', 'duplicate stkCallback',
                        body.replace('{"stkCallback": ', '{"stkCallback": null, "stkCallback": ', 1), tx)
        item = '{"Name": "Amount", "Value": 1.0}'
        yield self.case('structure', 'duplicate Amount item',
                        body.replace('"Item": [', f'"Item": [{item}, ', 1), tx)
        yield self.case('structure', 'duplicate Amount item (last)', body.replace(']}', f', {item}]}}', 1), tx)
        # Non-object top levels.
        tx = t()
        valid = json.dumps(self.success(tx))
        for top in ('[]', f'[{valid}]', '"Body"', json.dumps(valid), '123', '-0', 'null', 'true', '1e400',
                    '"\\u0000"', '"\\ud800"', f'{valid} {valid}', f'{valid},', f'{valid}]', '{}', '{"Body": null}',
                    '{"Body": []}', '{"Body": "stkCallback"}', '{"Body": {"stkCallback": []}}'):
            yield self.case('structure', f'top level {top[:24]}', top, tx)
        # Wrong types at every field.
        for path in FIELD_PATHS:
            for wrong in WRONG_TYPES:
                tx = t()
                kind = 'deleted' if wrong is DELETE else f'= {_short(wrong, 12)}'
                yield self.case('structure', f'{_path_name(path)} {kind}', _set(self.success(tx), path, wrong), tx)
        for path in (META, ITEMS):
            tx = t()
            body = self.failure(tx)
            _set(body, (*STK, 'CallbackMetadata'), {'Item': []} if path == ITEMS else None)
            yield self.case('structure', f'failure with empty {_path_name(path)}', body, tx)
        tx = t()
        body = self.success(tx)
        _get(body, ITEMS).extend([{'Name': 'Amount', 'Value': 1}] * 3 + [{}] * 2)
        yield self.case('structure', 'extra items', body, tx)
        tx = t()
        body = self.success(tx)
        body['Body']['stkCallback']['Extra'] = {'deep': [{'x': None}] * 100}
        body['Extra'] = 'x'
        yield self.case('structure', 'unexpected fields', body, tx)

    @staticmethod
    def _value_end(text, start):
        """The end of the JSON value starting at `start` in `text` (json.dumps output)."""
        _obj, end = json.JSONDecoder().raw_decode(text, start)
        return end

    def _catalogue_values(self):
        t = self.target
        for path in NUMERIC_SLOTS:
            for literal in NUMBER_LITERALS:
                tx = t()
                yield self.case('values', f'{_path_name(path)} = {literal[:32]}',
                                self.with_literal(self.success(tx), path, literal), tx)
        for path in STRING_SLOTS:
            for surrogate in SURROGATES:
                for keep in (False, True) if path[-1] in ('CheckoutRequestID', 'MerchantRequestID') else (False,):
                    tx = t()
                    yield self.case(
                        'values', f'surrogate {surrogate} in {_path_name(path)}{" (appended)" if keep else ""}',
                        self.with_literal(self.success(tx), path, f'"{surrogate}"', keep_prefix=keep), tx)
        for key in ('Body', 'stkCallback', 'CheckoutRequestID', 'Name'):
            tx = t()
            yield self.case('values', f'surrogate in key {key}', json.dumps(self.success(tx)).replace(
                f'"{key}"', f'"{key}\\ud800"', 1), tx)
        for literal in HUGE_RESULT_CODES:
            tx = t()
            yield self.case('values', f'ResultCode = {literal[:24]}',
                            self.with_literal(self.success(tx), (*STK, 'ResultCode'), literal), tx)
        for literal in DATE_GARBAGE:
            tx = t()
            yield self.case('values', f'TransactionDate = {literal[:32]}',
                            self.with_literal(self.success(tx), _value('TransactionDate'), literal), tx)
        for literal in ODD_AMOUNTS:
            tx = t()
            yield self.case('values', f'Amount = {literal[:32]}',
                            self.with_literal(self.success(tx), _value('Amount'), literal), tx)
        for literal in ('1e28', '1e400', 'NaN', '"\\ud800"'):
            tx = t()
            yield self.case('values', f'failure code, Amount = {literal}',
                            self.with_literal(self.success(tx), _value('Amount'), literal).replace(
                                b'"ResultCode": 0', b'"ResultCode": 1032'), tx)

    def _catalogue_forged(self):
        for name in ('pending_paid', 'pending_processing'):
            tx = self.targets[name]
            for amount in (1, 4499, 4501, 45000, 4500.5, 0, -4500, 4500.01):
                yield self.case('forged', f'success, wrong amount {amount}', self.success(tx, amount=amount), tx)
            for receipt in (FOREIGN_RECEIPT, FOREIGN_RECEIPT.lower(), f' {FOREIGN_RECEIPT} '):
                yield self.case('forged', f'success, foreign receipt {receipt!r}', self.success(tx, receipt=receipt),
                                tx)
            yield self.case('forged', 'success, new receipt, right amount', self.success(tx), tx)
            for code in (1032, 1037, 1, 2001, 1019, 'SFC_IC0003', 42):
                yield self.case('forged', f'failure {code}', self.failure(tx, code), tx)
            other = self.targets['pending_processing' if name == 'pending_paid' else 'pending_paid']
            body = self.success(tx)
            _set(body, (*STK, 'MerchantRequestID'), other.merchant_request_id)
            yield self.case('forged', "success with the other prompt's MerchantRequestID", body, tx)
        done = self.targets['done']
        yield self.case('forged', 'done: success, new receipt', self.success(done), done)
        yield self.case('forged', 'done: success, its own receipt', self.success(done, receipt=FOREIGN_RECEIPT), done)
        yield self.case('forged', 'done: failure 1032', self.failure(done, 1032), done)
        tx = self.target(['random'])
        yield self.case('forged', 'unknown prompt: success', self.success(tx), tx)
        yield self.case('forged', 'unknown prompt: success, foreign receipt', self.success(tx, receipt=FOREIGN_RECEIPT),
                        tx)

    def wrong_paths(self):
        secret = self.secret
        changed = secret[:-1] + ('A' if secret[-1] != 'A' else 'B')
        return [
            ('guessed secret', 'guessed-secret'), ('secret minus its last character', secret[:-1]),
            ('secret plus a character', secret + 'x'), ('secret swapcase', secret.swapcase()),
            ('one character changed', changed), ('secret + %00', secret + '%00'), ('%00 + secret', '%00' + secret),
            ('secret + %20', secret + '%20'), ('%20 + secret', '%20' + secret),
            ('non-ASCII secret s%C3%A9cret', 's%C3%A9cret'), ('secret + %C3%A9', secret + '%C3%A9'),
            ('fullwidth secret', ''.join(f'%EF%BC%{0x81 + ord(c) - 0x21:02X}' if '!' <= c <= '_' else c
                                         for c in secret)),
            ('invalid UTF-8 %FF%FE', '%FF%FE'), ('encoded surrogate %ED%A0%80', '%ED%A0%80'),
            ('emoji %F0%9F%92%B8', '%F0%9F%92%B8'), ('overlong secret 10 kB', 'a' * 10240),
            ('overlong non-ASCII secret', '%C3%A9' * 1700), ('overlong secret, right prefix', secret + 'a' * 10240),
            ('empty secret', ''), ('no slash', None), ('right secret + /extra', secret + '/extra'),
            ('right secret + %2Fextra', secret + '%2Fextra'),
            ('right secret + /%C3%A9', secret + '/%C3%A9'),
        ]

    def _catalogue_paths(self):
        for kind, secret in self.wrong_paths():
            tx = self.target(['pending_paid', 'pending_processing'])
            path = CALLBACK_PATH.rstrip('/') if secret is None else CALLBACK_PATH + secret
            yield self.case('paths', kind, self.success(tx), tx, path=path)
        raw_paths = [
            ('raw UTF-8 secret s\u00e9cret', b's\xc3\xa9cret'),
            ('raw UTF-8 after the secret', self.secret.encode() + b'\xc3\xa9'),
            ('raw invalid UTF-8 secret', b'\xff\xfe'), ('raw latin-1 secret', b's\xe9cret'),
            ('raw UTF-8 overlong secret', '\u00e9'.encode() * 3000),
        ]
        for kind, secret in raw_paths:
            tx = self.target(['pending_paid', 'pending_processing'])
            yield self.case('paths', kind, self.success(tx), tx, path=CALLBACK_PATH.encode() + secret)
        # Odoo's routing map does not use strict slashes: this is the right secret's route, so kept exactly.
        tx = self.target(['pending_paid', 'pending_processing'])
        yield self.case('paths', 'right secret + / (same route)', self.success(tx), tx,
                        path=CALLBACK_PATH + self.secret + '/', same_route=True)
        for method in ('GET', 'PUT', 'DELETE', 'PATCH'):
            tx = self.target(['pending_paid', 'pending_processing'])
            yield self.case('paths', f'{method} on the right secret', self.success(tx), tx,
                            path=CALLBACK_PATH + self.secret, method=method)

    def _catalogue_headers(self):
        content_types = [
            'application/x-www-form-urlencoded', 'multipart/form-data; boundary=hostile', 'multipart/form-data',
            'text/plain', None, 'application/json; charset=utf-16', 'application/json; charset=nonsense',
        ]
        for content_type in content_types:
            tx = self.target()
            yield self.case('headers', f'Content-Type {content_type}', self.success(tx), tx,
                            headers={'Content-Type': content_type})
        yield self.case('headers', 'form body with NUL', b'a=1&b=%00&c=\x00', None,
                        headers={'Content-Type': 'application/x-www-form-urlencoded'})
        tx = self.target()
        yield self.case('headers', 'chunked transfer encoding', self.success(tx), tx, chunked=True)

    # === RANDOM MUTATIONS === #

    FAMILY_WEIGHTS = {'bytes': 25, 'structure': 25, 'values': 30, 'forged': 8, 'paths': 12}

    def random_case(self):
        family = self.rng.choices(list(self.FAMILY_WEIGHTS), weights=list(self.FAMILY_WEIGHTS.values()))[0]
        return getattr(self, f'_random_{family}')()

    def _random_bytes(self):
        rng = self.rng
        tx = self.target()
        text = json.dumps(self.base(tx)).encode()
        choice = rng.randrange(6)
        if choice == 0:
            raw = bytearray(text)
            positions = sorted(rng.randrange(len(raw) + 1) for _ in range(rng.randint(1, 3)))
            for position in reversed(positions):
                raw.insert(position, 0)
            return self.case('bytes', 'random: raw NUL bytes inserted', bytes(raw), tx, note=f"at {positions}")
        if choice == 1:
            raw, inserted = bytearray(text), []
            for _ in range(rng.randint(1, 3)):
                position, sequence = rng.randrange(len(raw) + 1), rng.choice(INVALID_UTF8)
                raw[position:position] = sequence
                inserted.append(f"{sequence!r}@{position}")
            return self.case('bytes', 'random: invalid UTF-8 inserted', bytes(raw), tx, note=' '.join(inserted))
        if choice == 2:
            body = self.success(tx)
            path = rng.choice(STRING_SLOTS)
            literal, keep = rng.choice(['"\\u0000"', '"x\\u0000"', '"\\u0000\\u0000"']), rng.random() < 0.5
            return self.case('bytes', 'random: \\u0000 in a string field',
                             self.with_literal(body, path, literal, keep_prefix=keep), tx,
                             note=f"{_path_name(path)} = {literal}{' appended' if keep else ''}")
        if choice == 3:
            encoding = rng.choice(ENCODINGS)
            return self.case('bytes', 'random: re-encoded JSON', json.dumps(self.base(tx)).encode(encoding), tx,
                             note=encoding)
        if choice == 4:
            length = rng.randrange(len(text))
            return self.case('bytes', 'random: truncated', text[:length], tx, note=f"at {length} B")
        return self.case('bytes', 'random: random bytes', rng.randbytes(rng.randint(1, 300)), None)

    def _random_structure(self):
        rng = self.rng
        tx = self.target()
        body, notes = self.success(tx), []
        for _ in range(rng.randint(1, 3)):
            path, wrong = rng.choice(FIELD_PATHS), rng.choice(WRONG_TYPES)
            try:
                _set(body, path, wrong)
            except (KeyError, IndexError, TypeError):
                break  # An earlier mutation removed the parent.
            notes.append(f"{_path_name(path)} {'deleted' if wrong is DELETE else '= ' + _short(wrong, 12)}")
        note = ', '.join(notes)
        if rng.random() < 0.1:
            depth = rng.choice([1000, 5000, 100_000])
            return self.case('structure', 'random: deep nesting',
                             json.dumps(body)[:-1] + f', "Deep": {"[" * depth}{"]" * depth}}}', tx,
                             note=f"{note}, depth {depth}")
        text = json.dumps(body)
        if rng.random() < 0.2 and '"ResultCode": ' in text:
            first = rng.choice(["0", "1032", "null"])
            return self.case('structure', 'random: duplicate key',
                             text.replace('"ResultCode": ', f'"ResultCode": {first}, "ResultCode": ', 1), tx,
                             note=f"{note}, ResultCode {first} first")
        return self.case('structure', 'random: wrong types', body, tx, note=note)

    def _random_values(self):
        rng = self.rng
        tx = self.target()
        body = self.success(tx)
        choice = rng.randrange(4)
        if choice == 0:
            path, literal = rng.choice(NUMERIC_SLOTS), rng.choice(NUMBER_LITERALS)
            kind = 'random: odd number'
        elif choice == 1:
            path, literal = rng.choice(STRING_SLOTS), f'"{rng.choice(SURROGATES)}"'
            kind = 'random: lone surrogate'
        elif choice == 2:
            path, literal = (*STK, 'ResultCode'), rng.choice(HUGE_RESULT_CODES + NUMBER_LITERALS)
            kind = 'random: odd ResultCode'
        else:
            path, literal = _value('TransactionDate'), rng.choice(DATE_GARBAGE)
            kind = 'random: TransactionDate garbage'
        keep = path[-1] in ('CheckoutRequestID', 'MerchantRequestID') and literal.startswith('"') and rng.random() < 0.5
        return self.case('values', kind, self.with_literal(body, path, literal, keep_prefix=keep), tx,
                         note=f"{_path_name(path)} = {literal[:40]}{' appended' if keep else ''}")

    def _random_forged(self):
        rng = self.rng
        tx = self.target(['pending_paid', 'pending_processing', 'done', 'random'])
        choice = rng.randrange(3)
        if choice == 0:
            amount = rng.choice([1, self.amount - 1, self.amount + 1, self.amount * 10, self.amount + 0.5])
            return self.case('forged', 'random: success, wrong amount', self.success(tx, amount=amount), tx,
                             note=f"Amount {amount}")
        if choice == 1:
            return self.case('forged', 'random: success, foreign receipt', self.success(tx, receipt=FOREIGN_RECEIPT),
                             tx)
        return self.case('forged', 'random: forged failure', self.failure(tx), tx)

    def _random_paths(self):
        kind, secret = self.rng.choice(self.wrong_paths())
        tx = self.target(['pending_paid', 'pending_processing'])
        body = self.base(tx) if self.rng.random() < 0.7 else self.rng.randbytes(50)
        path = CALLBACK_PATH.rstrip('/') if secret is None else CALLBACK_PATH + secret
        return self.case('paths', f'random: {kind}', body, tx, path=path)

    def cases(self, count):
        catalogue = list(self.catalogue())
        if count < len(catalogue):
            keep = sorted(self.rng.sample(range(len(catalogue)), count))
            return [catalogue[index] for index in keep]
        return catalogue + [self.random_case() for _ in range(count - len(catalogue))]


class _ErrorRecords(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@tagged('post_install', '-at_install')
class TestMalformedBodies(MpesaCommon):
    """Failure mode 18: any bytes at all get a 4xx, never a 5xx, are kept exactly, and change nothing."""

    def _push(self, order):
        values = self._start_portal_payment(order)
        self._stk_push(values, PHONE_CALLBACK_LOST)
        tx = self._get_tx(values['reference'])
        self.assertEqual(tx.state, 'pending')
        return tx

    def _prepare_transactions(self):
        """Two pending prompts (one Daraja already knows is paid, one still "being processed") and
        a done transaction holding a receipt; none of them ever gets the simulator's own callback."""
        paid = self._push(self.quotation)
        self._wait(lambda: self._result_known(paid), message="the simulator to know the first result")
        self.patch(self.simulator.settings, 'callback_delay', 3600)  # The second customer never answers.
        processing = self._push(self.quotation.copy())
        done = paid.copy({
            'reference': f'{paid.reference}-HOSTILE-DONE',
            'provider_reference': DONE_CHECKOUT_ID,
            'mpesa_push_sent_at': paid.mpesa_push_sent_at,  # A prompt, as the paid one: callbacks find it.
            'sale_order_ids': [Command.clear()],
        })
        done.write({
            'state': 'done', 'mpesa_receipt_number': FOREIGN_RECEIPT, 'mpesa_paid_amount': paid.mpesa_requested_amount,
            'mpesa_requested_amount': paid.mpesa_requested_amount, 'mpesa_merchant_request_id': '29115-34620561-1',
        })
        return paid, processing, done

    def _snapshot(self, transactions):
        with self.registry.test_lock:
            self.env.invalidate_all()
            return self._read_snapshot(transactions)

    @staticmethod
    def _read_snapshot(transactions):
        return {tx['reference']: {name: tx[name] for name in SNAPSHOT_FIELDS}
                for tx in transactions.read(['reference', *SNAPSHOT_FIELDS])}

    @staticmethod
    def _changes(old, new):
        return [f"{reference} {name}: {old[reference][name]!r} -> {new[reference][name]!r}"
                for reference in old for name in SNAPSHOT_FIELDS if old[reference][name] != new[reference][name]]

    def _send(self, client, case):
        """POST (or else) one case over real HTTP; return the status, or a description of the failure."""
        if isinstance(case.path, bytes):
            return self._send_raw(case)
        url = self.base_url() + (case.path or CALLBACK_PATH + self.provider.mpesa_callback_secret)
        data = case.body
        if case.chunked:
            data = iter([case.body[:10], case.body[10:]])
        try:
            response = client.request(case.method, url, data=data, headers=case.headers, timeout=60,
                                      allow_redirects=False)
        except requests.RequestException as error:
            return f"no answer: {error!r}"[:200]
        if response.status_code == 301 and self._is_website_slash_redirect(url, response):
            return WEBSITE_SLASH_REDIRECT
        return response.status_code

    def _is_website_slash_redirect(self, url, response):
        """Whether a 301 is website's redirect of a path ending in '/' to the path without it,
        and website is installed: any other 301 is as unexpected as before."""
        path = urlsplit(url).path
        location = urlsplit(response.headers.get('Location', ''))
        return self.website_installed and path.endswith('/') and len(path) > 1 \
            and location.path == path[:-1] and not location.query

    def _send_raw(self, case):
        """Over a socket: neither requests nor http.client send raw non-ASCII bytes in a path."""
        self.cr.flush()  # As the test Opener does before each request.
        self.cr.clear()
        head = (
            b'POST ' + case.path + b' HTTP/1.1\r\n'
            + f'Host: 127.0.0.1:{self.http_port()}\r\n'.encode()
            + b'Content-Type: application/json\r\n'
            + f'Content-Length: {len(case.body)}\r\n'.encode()
            + f'Cookie: {TEST_CURSOR_COOKIE_NAME}={self.http_request_key}\r\n'.encode()
            + b'Connection: close\r\n\r\n'
        )
        try:
            with socket.create_connection(('127.0.0.1', self.http_port()), timeout=60) as sock:
                sock.sendall(head + case.body)
                answer = b''
                while chunk := sock.recv(65536):
                    answer += chunk
        except OSError as error:
            return f"no answer: {error!r}"[:200]
        try:
            return int(answer.split(b' ', 2)[1])
        except (IndexError, ValueError):
            return f"no HTTP answer: {_short(answer, 40)}"

    def test_malformed_stk_callbacks(self):
        count = int(os.environ.get('MUCHIRI_HOSTILE_BODIES') or DEFAULT_BODIES)
        self.provider.write({'mpesa_ip_check': 'enforce', 'mpesa_allowed_ips': '127.0.0.0/8'})
        paid, processing, done = self._prepare_transactions()
        transactions = paid | processing | done
        targets = {
            name: Target(name, tx.provider_reference, tx.mpesa_merchant_request_id)
            for name, tx in (('pending_paid', paid), ('pending_processing', processing), ('done', done))
        }
        generator = MalformedBodies(random.Random(SEED), self.provider.mpesa_callback_secret, targets,
                                  paid.mpesa_requested_amount)
        cases = generator.cases(count)
        before = self._snapshot(transactions)
        Event = self.env['muchiri.mpesa.event']
        has_raw_body = hasattr(Event, '_mpesa_raw_body')
        self.website_installed = bool(self.env['ir.module.module'].search_count([
            ('name', '=', 'website'), ('state', '=', 'installed'),
        ]))
        with self.registry.test_lock:
            last_event_id = max(Event.search([], limit=1, order='id desc').ids or [0])
        first_event_id = last_event_id

        # Daraja has no session: a client of its own, with only the cookie that routes it to this test.
        client = Opener(self.cr)
        client.cookies[TEST_CURSOR_COOKIE_NAME] = self.http_request_key
        error_records = _ErrorRecords()
        root = logging.getLogger()
        root.addHandler(error_records)
        statuses, posted = Counter(), Counter()
        bad_statuses, logged_errors, not_kept, changed = [], [], [], []
        current = before
        started = time.monotonic()
        try:
            for case in cases:
                seen_errors = len(error_records.records)
                status = self._send(client, case)
                posted[case.family] += 1
                statuses[case.family, status if isinstance(status, int) or status == WEBSITE_SLASH_REDIRECT
                         else 'none'] += 1
                note = f" ({case.note})" if case.note else ''
                detail = f"{case.target}{note} {case.method} -> {status}: {_short(case.body)}"
                if status != WEBSITE_SLASH_REDIRECT and (
                    not isinstance(status, int) or status not in ACCEPTABLE_STATUSES
                ):
                    bad_statuses.append((case.family, case.kind, detail))
                with self.registry.test_lock:
                    self.env.invalidate_all()
                    events = Event.search([('id', '>', last_event_id)], order='id')
                    last_event_id = events.ids[-1] if events else last_event_id
                    callbacks = events.filtered(lambda event: event.kind == 'stk_callback')
                    if case.on_right_path:
                        if len(callbacks) != 1:
                            not_kept.append((case.family, case.kind, f"{len(callbacks)} callback events; {detail}"))
                        elif has_raw_body:
                            raw = callbacks._mpesa_raw_body()
                            if raw != case.body:
                                not_kept.append((case.family, case.kind,
                                                 f"kept {type(raw).__name__} {_short(raw, 40)} "
                                                 f"({len(raw) if raw else 0} B); {detail}"))
                    else:
                        if events:
                            not_kept.append((case.family, case.kind, f"{len(events)} events kept; {detail}"))
                        expected = {404, 405} if case.method != 'POST' else {404}
                        if status not in expected and status != WEBSITE_SLASH_REDIRECT:
                            not_kept.append((case.family, case.kind, f"expected {sorted(expected)}; {detail}"))
                    # Which request changed a transaction, if one did (the check itself is before/after).
                    snapshot = self._read_snapshot(transactions)
                    changed.extend((case.family, case.kind, f"{change}; {detail}")
                                   for change in self._changes(current, snapshot))
                    current = snapshot
                for record in error_records.records[seen_errors:]:
                    message = record.getMessage().splitlines()[0][:120] if record.getMessage() else ''
                    logged_errors.append((case.family, case.kind, f"{record.name}: {message}; {detail}"))
            elapsed = time.monotonic() - started
            after = self._snapshot(transactions)
            settlement = self._settle_what_was_kept(error_records, transactions, first_event_id)
        finally:
            root.removeHandler(error_records)

        _logger.info("Posted %s hostile requests in %.1f s: %s", len(cases), elapsed, dict(sorted(posted.items())))
        _logger.info("Status codes by family: %s", {
            family: dict(sorted((str(status), n) for (fam, status), n in statuses.items() if fam == family))
            for family in sorted(posted)
        })
        changed.extend(('transactions', 'before -> after', change) for change in self._changes(before, after))
        if not has_raw_body:
            not_kept.insert(0, ('events', 'muchiri.mpesa.event has no _mpesa_raw_body()', 'raw bytes not checked'))
        checks = [
            ("1. no 5xx (or unexpected status)", bad_statuses),
            ("2. no ERROR log record", logged_errors),
            ("3. right-path bodies kept exactly, others not kept and 404", not_kept),
            ("4. no transaction changed", changed),
            ("5. the settlement job takes every kept body without an ERROR, and no money moves but Daraja's",
             settlement),
        ]
        for check, failures in checks:
            with self.subTest(check=check):
                if failures:
                    self.fail(self._report(check, failures))

    def _settle_what_was_kept(self, error_records, transactions, since_event_id):
        """Then the settlement job, as the cron Daraja's callbacks wake, takes all of it: every kept
        body, even past the admission grace, ends final or backs off, with no ERROR line.  Only what
        Daraja's own query says may move money: the paid prompt may end done (for the amount asked,
        one receipt), the prompt still being processed and the done transaction stay as they were."""
        failures = []
        seen_errors = len(error_records.records)
        Event = self.env['muchiri.mpesa.event'].sudo()
        with self.registry.test_lock:
            kept = Event.search([('kind', '=', 'stk_callback'), ('id', '>', since_event_id)])
            kept.filtered(lambda event: event.state == 'received').write({
                'next_attempt_at': False,  # As if their requests died: the job admits them.
            })
            before = self._read_snapshot(transactions)
        for _run in range(40):  # Bounded: each run settles a batch; stop once nothing is due.
            self._settle_callbacks()
            with self.registry.test_lock:
                if not Event.search_count(Event._mpesa_due_callbacks_domain()):
                    break
        with self.registry.test_lock:
            self.env.invalidate_all()
            stuck = kept.filtered(lambda event: event.state == 'received')
            failures += [('settlement', 'left received', f"event {event.id}") for event in stuck[:5]]
            retrying = kept.filtered(lambda event: event.state in ('error', 'unmatched', 'queued')
                                     and not event.next_attempt_at)
            failures += [('settlement', 'retried without back-off', f"event {event.id} {event.state}")
                         for event in retrying[:5]]
            after = self._read_snapshot(transactions)
            paid, processing, done = transactions
            for tx in (processing, done):
                failures += [('settlement', 'moved money', change)
                             for change in self._changes({tx.reference: before[tx.reference]},
                                                         {tx.reference: after[tx.reference]})]
            if paid.state == 'done' and paid.mpesa_paid_amount != paid.mpesa_requested_amount:
                failures.append(('settlement', 'wrong amount', f"{paid.mpesa_paid_amount}"))
            if paid.mpesa_receipt_number == FOREIGN_RECEIPT:
                failures.append(('settlement', 'receipt reused', FOREIGN_RECEIPT))
        for record in error_records.records[seen_errors:]:
            failures.append(('settlement', 'ERROR line', f"{record.name}: {record.getMessage()[:120]}"))
        _logger.info("Settlement of the kept bodies: %s", dict(Counter(kept.mapped('state'))))
        return failures

    @staticmethod
    def _report(check, failures):
        groups = {}
        for family, kind, detail in failures:
            groups.setdefault((family, kind), []).append(detail)
        lines = [f"{check}: {len(failures)} failure(s) of {len(groups)} kind(s)"]
        for (family, kind), details in sorted(groups.items()):
            lines.append(f"  [{family}] {kind}: {len(details)}x, e.g. {details[0]}")
        return '\n'.join(lines)


@tagged('post_install', '-at_install')
class TestRefundSecurity(MpesaInitiatorCommon):
    """Forged, replayed and malformed reversal results, and who may see and press what."""

    def _pending_refund(self):
        tx = self._paid()
        self.simulator.initiator_next('no_result')  # The real result never comes: we forge it.
        return tx, self._refund_with_odoos_button(tx)

    def _result_body(self, refund, code=0, conversation_id=None):
        return self._initiator_result(
            self.reversal_result_data, conversation_id or refund.provider_reference,
            refund.mpesa_originator_conversation_id, transaction_id='SIMREV0001', code=code,
            OriginalTransactionID=refund.source_transaction_id.mpesa_receipt_number,
        )

    @mute_logger('odoo.addons.muchiri_mpesa.controllers.main')
    def test_a_result_on_a_wrong_secret_is_refused(self):
        _tx, refund = self._pending_refund()
        events = self._events(kind='initiator_result')
        response = self._post_result(self._result_body(refund), secret='not-the-secret')
        self.assertEqual(response.status_code, 404)
        self._run_initiator_job()
        self.assertEqual(refund.state, 'pending', "nothing changed")
        self.assertEqual(self._events(kind='initiator_result'), events)

    def test_a_replayed_result_settles_once(self):
        _tx, refund = self._pending_refund()
        body = self._result_body(refund)
        for _i in range(2):
            self.assertEqual(self._post_result(body).status_code, 200)
        self._run_initiator_job()
        self.assertEqual(refund.state, 'done')
        events = self._events(kind='initiator_result', transaction_id=refund.id)
        self.assertEqual(sorted(events.mapped('state')), ['ignored', 'processed'])
        self.assertEqual(len(self.env['account.payment'].search([('payment_transaction_id', '=', refund.id)])), 1)

    def test_a_result_for_an_unknown_conversation_is_kept_and_changes_nothing(self):
        _tx, refund = self._pending_refund()
        body = self._result_body(refund, conversation_id='AG_20991231_unknown')
        body['Result']['OriginatorConversationID'] = '99999-99999-1'
        response = self._post_result(body)
        self.assertEqual((response.status_code, response.json()['ResultCode']), (200, 0))
        self._run_initiator_job()
        event = self._events(kind='initiator_result', conversation_id='AG_20991231_unknown')
        self.assertEqual(event.state, 'unmatched')
        self.assertEqual(event.request_body, json.dumps(body), "kept exactly")
        self.assertEqual(refund.state, 'pending')

    def test_malformed_bodies_get_a_4xx_and_are_kept(self):
        self._pending_refund()
        for raw in (b'\x00\xff{', b'{"Result": 5}', json.dumps({'Result': {'ResultCode': [1]}}).encode()):
            with self.subTest(raw=raw):
                response = self._post_callback(None, raw=raw, settle=False, route=const.LNM_ROUTES['status_result'])
                self.assertEqual(response.status_code, 400)
        self.assertEqual(len(self._events(kind='initiator_result', state='rejected')), 3)

    def test_a_timeout_on_the_status_route_is_read_leniently(self):
        response = self._post_result({'Result': {'ResultCode': 1}}, route='status_timeout')
        self.assertEqual(response.status_code, 200)
        event = self._events(kind='initiator_timeout')
        self.assertEqual(event.state, 'unmatched')

    def test_secrets_stay_with_system_administrators(self):
        tx = self._paid()
        self._refund_with_odoos_button(tx)
        password = self.provider.mpesa_initiator_password
        # Over RPC, as Odoo's web client reads a record.
        for login in (self.accountant.login, 'internal_user', 'distributor'):
            with self.subTest(login=login):
                self.authenticate(login, login)
                with self.assertRaises(JsonRpcException) as caught, mute_logger('odoo.http'):
                    self.make_jsonrpc_request('/web/dataset/call_kw', {
                        'model': 'payment.provider', 'method': 'read', 'args': [self.provider.ids],
                        'kwargs': {'fields': ['mpesa_initiator_password']},
                    })
                self.assertEqual(caught.exception.args[0], 'odoo.exceptions.AccessError')
        for event in self._events(kind='reversal'):
            self.assertNotIn(password, event.request_body or '')
            self.assertIn('"SecurityCredential": "***"', event.request_body)
            self.assertNotIn(self.provider.mpesa_callback_secret, event.request_body)
        self.authenticate('distributor', 'distributor')
        self.assertNotIn(password, self.url_open(self.quotation.get_portal_url()).text)

    @mute_logger('odoo.http')
    def test_the_buttons_check_their_group_on_the_server(self):
        tx = self._paid()
        self.quotation.mpesa_needs_refund = True
        for login in ('distributor', 'internal_user'):
            for model, record, method in (('sale.order', self.quotation, 'action_mpesa_refund_extra_payment'),
                                          ('payment.transaction', tx, 'action_refund')):
                with self.subTest(login=login, method=method):
                    self.authenticate(login, login)
                    with self.assertRaises(JsonRpcException) as caught:
                        self.make_jsonrpc_request('/web/dataset/call_kw', {
                            'model': model, 'method': method, 'args': [record.ids], 'kwargs': {},
                        })
                    self.assertEqual(caught.exception.args[0], 'odoo.exceptions.AccessError')
        self.assertFalse(self.simulator.initiator_requests)
        with self.assertRaises(AccessError):
            tx.with_user(self.internal_user).sudo()._mpesa_check_refund_rights()


@tagged('post_install', '-at_install')
class TestAccessRights(MpesaCommon):

    @mute_logger('odoo.http')
    def test_non_distributor_cannot_push_through_the_routes(self):
        self.distributor.is_distributor = False
        values = self._start_portal_payment()
        self.assertIn('distributors only', self._stk_push_refusal(values, PHONE_SUCCESS))
        self.assertEqual(len(self.simulator.pushes), 0)

    def test_secrets_unreadable_without_admin_rights(self):
        for user in (self.internal_user, self.distributor_user):
            provider = self.provider.with_user(user)
            for field in SECRET_FIELDS:
                with self.assertRaises(AccessError, msg=f"{user.login} read {field}"):
                    provider.read([field])

    def test_portal_page_does_not_leak_secrets(self):
        self.authenticate('distributor', 'distributor')
        response = self.url_open(self.quotation.get_portal_url())
        self.assertEqual(response.status_code, 200)
        self.assertIn('o_mpesa_phone', response.text, "the M-Pesa inline form is offered")
        for field in SECRET_FIELDS:
            value = self.provider.sudo()[field]
            if value:
                self.assertNotIn(value, response.text, field)

    def test_audit_log_is_for_accountants_not_portal_users(self):
        self._pay_from_portal(PHONE_SUCCESS)
        events = self.env['muchiri.mpesa.event'].search([])
        self.assertTrue(events)
        with self.assertRaises(AccessError):
            events.with_user(self.distributor_user).read(['request_body'])
        for event in events:
            for field in ('mpesa_consumer_secret', 'mpesa_passkey'):
                secret = self.provider.sudo()[field]
                self.assertNotIn(secret, event.request_body or '')
                self.assertNotIn(secret, event.response_body or '')


@tagged('post_install', '-at_install')
class TestButtonsCheckTheirGroup(MpesaCommon):
    """A view's groups= hides a button; only the server protects it.  Every public method of the
    addon's models is called over RPC as a portal user and as a plain internal user."""

    def _addon_public_methods(self):
        base = set(dir(models.BaseModel))
        found = []
        for name in self.env.registry:
            model = self.env[name]
            if model._abstract and any(not self.env[child]._abstract for child in model._inherit_children):
                continue  # A mixin: its methods are called on the models that inherit it, listed too.
            for cls in type(self.env[name]).__mro__:
                if not cls.__module__.startswith('odoo.addons.muchiri_mpesa.'):
                    continue
                for attr, value in vars(cls).items():
                    if attr.startswith('_') or attr in base or not inspect.isfunction(value):
                        continue
                    found.append((name, attr))
        return sorted(set(found))

    def _records_to_call(self):
        """One record of each model with buttons (created as the administrator)."""
        tx = self._pending_tx()  # Something for the status check to ask Daraja about.
        event = self.env['muchiri.mpesa.event'].sudo().create({'kind': 'stk_callback', 'provider_id': self.provider.id})
        ledger_row = self.env['muchiri.mpesa.ledger'].sudo()._mpesa_record(
            self.provider, 'TSTSEC0001', 'c2b', {'amount': 100.0})[0]
        ledger_row.trans_time = fields.Datetime.now()
        self.env.flush_all()
        ledger_day = self.env['muchiri.mpesa.ledger.day'].search([('provider_id', '=', self.provider.id)], limit=1)
        return {
            'payment.provider': self.provider,
            'sale.order': self.quotation,
            'account.move': self.env['account.move'].create({
                'move_type': 'out_invoice', 'partner_id': self.distributor.id,
            }),
            'muchiri.mpesa.ledger': ledger_row,
            'muchiri.mpesa.ledger.day': ledger_day,
            'muchiri.mpesa.ledger.match': self.env['muchiri.mpesa.ledger.match'].create({'ledger_id': ledger_row.id}),
            'muchiri.mpesa.ledger.decide': self.env['muchiri.mpesa.ledger.decide'].create({
                'ledger_id': ledger_row.id, 'reason': "Not ours",
            }),
            'muchiri.mpesa.alert': self.env['muchiri.mpesa.alert'].create({
                'name': "Alert", 'kind': 'success_rate', 'key': 'test', 'provider_id': self.provider.id,
            }),
            'muchiri.mpesa.payment.request': self.env['muchiri.mpesa.payment.request'].create({
                'sale_order_id': self.quotation.id, 'phone': PHONE_SUCCESS, 'amount': 4500,
            }),
            'muchiri.mpesa.callback.match': self.env['muchiri.mpesa.callback.match'].create({
                'event_id': event.id, 'transaction_id': tx.id,
            }),
            'muchiri.mpesa.refund.extra': self.env['muchiri.mpesa.refund.extra'].create({
                'res_model': 'sale.order', 'res_id': self.quotation.id, 'transaction_id': tx.id,
                'company_id': self.quotation.company_id.id, 'currency_id': self.quotation.currency_id.id,
                'amount': 100, 'journal_id': self.provider.journal_id.id,
            }),
            'account.journal': self.provider.journal_id,
            'muchiri.mpesa.statement.import': self.env['muchiri.mpesa.statement.import'].create({
                'provider_id': self.provider.id,
            }),
        }

    @mute_logger('odoo.http')
    def test_every_button_refuses_portal_and_plain_internal_users(self):
        methods = self._addon_public_methods()
        self.assertIn(('payment.provider', 'action_mpesa_regenerate_callback_secret'), methods)
        self.assertIn(('sale.order', 'action_mpesa_check_status'), methods)
        records = self._records_to_call()
        secret = self.provider.mpesa_callback_secret
        requests_before = len(self.simulator.requests)
        for login in ('distributor', 'internal_user'):
            for model, method in methods:
                # A service (an abstract model inherited by none) has no records: called on none.
                record = self.env[model] if self.env[model]._abstract else records.get(model)
                self.assertIsNotNone(record, f"add a record of {model} to _records_to_call")
                with self.subTest(login=login, method=f'{model}.{method}'):
                    self.authenticate(login, login)
                    with self.assertRaises(JsonRpcException) as caught:
                        self.make_jsonrpc_request('/web/dataset/call_kw', {
                            'model': model, 'method': method, 'args': [record.ids], 'kwargs': {},
                        })
                    self.assertEqual(caught.exception.args[0], 'odoo.exceptions.AccessError')
        self.env.invalidate_all()
        self.assertEqual(self.provider.mpesa_callback_secret, secret, "the secret was not rotated")
        self.assertEqual(len(self.simulator.requests), requests_before, "no Daraja quota was spent")
