# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
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
import base64
import json
import threading
from datetime import datetime

from odoo.fields import Date
from odoo.tests import tagged
from odoo.tools import mute_logger

from odoo.addons.muchiri_mpesa import const, daraja

from .common import PHONE_CALLBACK_LOST, PHONE_SUCCESS, SIM_SHORTCODE
from .test_c2b_confirmation import PaybillConfirmationCommon

JSON = {'Content-Type': 'application/json'}
MUTED = ('odoo.addons.muchiri_mpesa.models.mpesa_event', 'odoo.addons.muchiri_mpesa.models.mpesa_event',
         'odoo.addons.muchiri_mpesa.models.mpesa_event',
         'odoo.addons.muchiri_mpesa.models.payment_transaction')


@tagged('post_install', '-at_install')
class TestInboundForgery(PaybillConfirmationCommon):

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
        return {'Result': {
            'ResultType': 0, 'ResultCode': 0, 'ResultDesc': "The service request is processed successfully.",
            'OriginatorConversationID': originator_id, 'ConversationID': conversation_id,
            'TransactionID': 'SIM0000000',
            'ResultParameters': {'ResultParameter': [
                {'Key': 'DebitPartyName', 'Value': f"{PHONE_SUCCESS} - Wanjiku"},
                {'Key': 'CreditPartyName', 'Value': f"{shortcode} - Muchiri Shop"},
                {'Key': 'TransactionStatus', 'Value': "Completed"},
                {'Key': 'Amount', 'Value': amount},
                {'Key': 'ReceiptNo', 'Value': receipt},
            ]},
        }}

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
            return {'Result': {
                'ResultType': 0, 'ResultCode': 0, 'ResultDesc': "The service request is processed successfully.",
                'OriginatorConversationID': originator_id, 'ConversationID': conversation_id,
                'TransactionID': 'SIMREV0F01',
                'ResultParameters': {'ResultParameter': [
                    {'Key': 'OriginalTransactionID', 'Value': tx.mpesa_receipt_number},
                ]},
            }}

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
        body = self._c2b_body(4500, order.name, receipt=row.name)
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
