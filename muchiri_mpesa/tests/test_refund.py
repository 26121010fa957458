# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""Refunds through the Reversal API, end to end: Odoo's refund button, the simulator's Reversal, its
Result posted to Odoo's real HTTP server, the refund payment posted and reconciled."""
import json

import psycopg2

from odoo.exceptions import AccessError, ValidationError
from odoo.fields import Command
from odoo.tests import JsonRpcException, new_test_user, tagged
from odoo.tools import is_html_empty, mute_logger

from odoo.addons.muchiri_mpesa import const, daraja

from .common import PHONE_SUCCESS, MpesaCommon


class InitiatorCommon(MpesaCommon):
    """An M-Pesa provider whose initiator is the simulator's, and an accountant."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.provider.write({
            'mpesa_initiator_name': cls.simulator.initiator_name,
            'mpesa_initiator_password': cls.simulator.initiator_password,
            'mpesa_initiator_certificate': cls.simulator.certificate_pem,
            'mpesa_invoice_on_payment': True,  # The payment is reconciled with an invoice.
        })
        cls.accountant = new_test_user(
            cls.env, login='mpesa_refund_accountant', groups='base.group_user,account.group_account_invoice',
        )

    def _paid(self, order=None):
        tx, result = self._pay_from_portal(PHONE_SUCCESS, order=order)
        self.assertEqual(result, {})
        self._wait_final(tx)
        self.assertEqual((tx.state, tx.mpesa_receipt_status), ('done', 'confirmed'))
        self.assertTrue(tx.payment_id, "post-processing made the payment")
        return tx

    def _order(self):
        return self.quotation.copy({'require_payment': True, 'prepayment_percent': 1.0})

    def _refund_with_odoos_button(self, tx, user=None):
        """The Refund button of the payment, then the refund wizard's button, as the accountant."""
        with self.registry.test_lock:  # A result may be posted to the test server meanwhile.
            payment = tx.payment_id.with_user(user or self.accountant)
            self.assertGreater(payment.amount_available_for_refund, 0, "Odoo offers the refund")
            action = payment.action_refund_wizard()
            wizard = self.env[action['res_model']].with_user(user or self.accountant).with_context(
                active_id=payment.id, active_model='account.payment').create({})
            self.assertEqual(wizard.support_refund, 'full_only')
            wizard.action_refund()
            self.env.invalidate_all()
        return self._refund_of(tx)

    def _refund_of(self, tx):
        with self.registry.test_lock:
            self.env.invalidate_all()
            return tx.child_transaction_ids.filtered(lambda child: child.operation == 'refund').sorted('id')[-1:]

    def _run_initiator_job(self):
        """The initiator job, as the cron Odoo wakes after each result would (no cron runs in tests)."""
        with self.registry.test_lock:
            self.env['payment.transaction'].sudo()._cron_mpesa_initiator()
            self.env.invalidate_all()

    def _wait_results(self, count=1, kind='initiator_result'):
        """Wait until the simulator posted `count` results to Odoo, then run the initiator job."""
        self.simulator.wait_for_deliveries(kind, count=count, timeout=15)
        self._run_initiator_job()

    def _initiator_requests(self, api):
        return [request for request in self.simulator.initiator_requests if request['api'] == api]

    def _post_result(self, body, route='reversal_result', secret=None):
        return self._post_callback(body, secret=secret, settle=False, route=const.LNM_ROUTES[route])


@tagged('post_install', '-at_install')
class TestRefund(InitiatorCommon):

    def test_refund_from_odoos_refund_button_end_to_end(self):
        tx = self._paid()
        source_payment = tx.payment_id
        invoice = self.quotation.invoice_ids
        self.assertEqual(invoice.payment_state, 'paid')

        refund = self._refund_with_odoos_button(tx)
        self.assertEqual(refund.state, 'pending', "accepted is not reversed")
        self.assertTrue(refund.provider_reference, "the ConversationID finds its result")
        self.assertEqual(refund.amount, -tx.amount)
        [reversal] = self._initiator_requests('reversal')
        self.assertEqual(reversal['TransactionID'], tx.mpesa_receipt_number)
        self.assertEqual(reversal['ConversationID'], refund.provider_reference)

        self._wait_results()
        self.assertEqual(refund.state, 'done')
        self.assertEqual(refund.mpesa_receipt_number, self.simulator.payment(tx.mpesa_receipt_number).reversed_by)
        refund_payment = refund.payment_id
        self.assertEqual((refund_payment.payment_type, refund_payment.amount), ('outbound', tx.amount))
        self.assertEqual(refund_payment.source_payment_id, source_payment)
        self.assertNotEqual(refund_payment.state, 'draft', "posted")
        self.assertIn(tx.mpesa_receipt_number, refund_payment.memo)
        account = refund_payment.destination_account_id
        for payment in (refund_payment, source_payment):
            line = payment.move_id.line_ids.filtered(lambda line: line.account_id == account)
            self.assertTrue(line.reconciled, f"{payment.name} is reconciled")
        self.assertEqual(invoice.payment_state, 'not_paid', "the customer has the money back: the invoice is due")
        self.assertEqual(source_payment.amount_available_for_refund, 0, "nothing left to refund")
        self.assertEqual(self.simulator.payment(tx.mpesa_receipt_number).reversed_by, refund.mpesa_receipt_number)

    @mute_logger('odoo.addons.muchiri_mpesa.models.payment_transaction_refund')
    def test_a_refunded_payment_says_refunded_everywhere(self):
        """After a full refund the distributor's banner, the order's M-Pesa tab and the ledger row
        say refunded, with the reversal's receipt and time; the distributor gets one mail; the
        refund's chatter lines are the accountant's, who clicked."""
        tx = self._paid()
        order, invoice, distributor = self.quotation, self.quotation.invoice_ids, self.distributor
        self.assertEqual(order.mpesa_payment_status, 'paid')
        last_message = self.env['mail.message'].search([], order='id desc', limit=1).id
        refund = self._refund_with_odoos_button(tx)
        self._wait_results()
        self.assertEqual(refund.state, 'done')
        # The order's M-Pesa tab.
        self.assertEqual(order.mpesa_payment_status, 'refunded')
        reversal = self.simulator.payment(tx.mpesa_receipt_number).reversed_by
        self.assertEqual(refund.mpesa_reversal_receipt, reversal)
        self.assertTrue(refund.mpesa_paid_at)
        self.assertEqual(order.mpesa_refund_receipt, reversal)
        self.assertEqual(order.mpesa_refunded_at, refund.mpesa_paid_at)
        # The ledger row.
        row = tx.mpesa_ledger_id
        self.assertEqual((row.state, row.reversal_receipt, row.reversed_at),
                         ('refunded', reversal, refund.mpesa_paid_at))
        self.assertIn(self.accountant.name, row.note)
        # One mail to the distributor, which says refunded and names the reversal.
        with self.registry.test_lock:
            mails = self.env['mail.message'].search([('id', '>', last_message), ('partner_ids', 'in', distributor.ids)])
            self.assertEqual(len(mails), 1, mails.mapped('subject'))
            self.assertIn('refunded', mails.body)
            self.assertIn(reversal, mails.body)
            # The refund's lines are written as the accountant who clicked, never as the distributor.
            lines = self.env['mail.message'].search([
                ('id', '>', last_message), ('model', 'in', ('sale.order', 'account.move', 'account.payment')),
                ('message_type', '!=', 'email'), ('partner_ids', 'not in', distributor.ids),
            ])
            refund_lines = lines.filtered(lambda m: refund.reference in (m.body or ''))
            self.assertTrue(refund_lines.filtered(lambda m: m.model == 'sale.order'))
            self.assertEqual(refund_lines.author_id, self.accountant.partner_id)
            self.assertNotIn(distributor, lines.author_id)
        # The distributor's status banner.
        self.authenticate('distributor', 'distributor')
        page = self.url_open(order.get_portal_url()).text
        self.assertIn('o_mpesa_refunded', page)
        self.assertIn(reversal, page)
        self.assertNotIn('Your M-Pesa payment has been received', page)
        self.assertNotIn('Thank you!', page)
        self.assertEqual(invoice.payment_state, 'not_paid')

    def test_a_swahili_distributor_reads_the_refund_in_swahili(self):
        """What distributors read (the mails, the status banner) is in Swahili for those whose
        language it is."""
        with self.registry.test_lock:
            self.env['res.lang']._activate_lang('sw')
            self.env['ir.module.module']._load_module_terms(['muchiri_mpesa'], ['sw'], overwrite=True)
            self.distributor.lang = 'sw'
        tx = self._paid()
        last_message = self.env['mail.message'].search([], order='id desc', limit=1).id
        refund = self._refund_with_odoos_button(tx)
        self._wait_results()
        self.assertEqual(refund.state, 'done')
        with self.registry.test_lock:
            mail = self.env['mail.message'].search([
                ('id', '>', last_message), ('partner_ids', 'in', self.distributor.ids)])
            self.assertEqual(len(mail), 1)
            self.assertTrue(mail.subject.startswith("Malipo yamerejeshwa"), mail.subject)
            self.assertIn("yamerejeshwa kwenye akaunti yako ya M-Pesa", mail.body)
            banner = self.env['ir.qweb'].with_context(lang='sw')._render('payment.state_header', {
                'tx': tx.sudo(), 'is_html_empty': is_html_empty,
            })
            self.assertIn("Malipo haya ya M-Pesa ya", banner)
            self.assertIn(refund.mpesa_reversal_receipt, banner)

    def test_each_failure_code_says_what_it_means(self):
        # 2001: the initiator password is wrong; nothing was reversed, the payment may be refunded again.
        tx = self._paid()
        self.provider.mpesa_initiator_password = 'not-the-password'
        refund = self._refund_with_odoos_button(tx)
        self._wait_results()
        self.assertEqual(refund.state, 'error')
        self.assertIn(daraja.describe_initiator_result('2001'), refund.state_message)
        self.assertIn('(2001)', refund.state_message)
        self.assertFalse(refund.mpesa_reversal_claim, "the reversal may be sent again")
        self.provider.mpesa_initiator_password = self.simulator.initiator_password

        # R000001: reversed outside Odoo already (customer care); no second attempt from Odoo.
        with self.registry.test_lock:  # Its exchange is logged on the shared connection.
            client = self.provider._mpesa_client()
            initiator, credential = self.provider._mpesa_initiator()
            client.reverse(
                initiator=initiator, security_credential=credential, transaction_id=tx.mpesa_receipt_number,
                amount=int(tx.amount), receiver_party=self.provider.mpesa_shortcode,
                result_url=self.provider._mpesa_daraja_url('reversal_result'),
                timeout_url=self.provider._mpesa_daraja_url('reversal_timeout'), remarks="By customer care",
            )
        self._wait_results(count=2)  # That result matches no refund of Odoo: it is kept, unmatched.
        refund = self._refund_with_odoos_button(tx)
        self._wait_results(count=3)
        self.assertEqual(refund.state, 'error')
        self.assertIn(daraja.describe_initiator_result('R000001'), refund.state_message)
        self.assertTrue(refund.mpesa_reversal_claim, "already reversed: never again")
        with self.assertRaisesRegex(ValidationError, 'already reversed'):
            self._refund_with_odoos_button(tx)

        # R000002: a receipt M-Pesa does not know.
        other = self._paid(self._order())
        other.mpesa_receipt_number = 'SIM0UNKNWN'
        refund = self._refund_with_odoos_button(other)
        self._wait_results(count=4)
        self.assertEqual(refund.state, 'error')
        self.assertIn(daraja.describe_initiator_result('R000002'), refund.state_message)
        self.assertEqual(len(self._initiator_requests('reversal')), 4)

    def test_a_lost_result_is_recovered_by_transaction_status(self):
        tx = self._paid()
        self.simulator.initiator_next('no_result')
        refund = self._refund_with_odoos_button(tx)
        self.assertEqual(refund.state, 'pending')
        self._run_initiator_job()
        self.assertFalse(self._initiator_requests('transaction_status'), "its result has time to come")
        refund.mpesa_status_next_at = refund.mpesa_status_next_at.replace(year=2000)  # N minutes later
        self._run_initiator_job()
        self.assertEqual(len(self._initiator_requests('transaction_status')), 1)
        self._wait_results()
        self.assertEqual(refund.state, 'done', "Transaction Status says the payment is reversed")
        self.assertTrue(refund.payment_id)
        self.assertEqual(len(self._initiator_requests('reversal')), 1, "never a second reversal")

    def test_a_reversed_payment_no_longer_pays_its_documents(self):
        """The customer has the money back: the order reads unpaid, and may be prompted again."""
        tx = self._paid()
        order, invoice = self.quotation, self.quotation.invoice_ids
        self.assertEqual(order._mpesa_amount_due(), 0)
        refund = self._refund_with_odoos_button(tx)
        self._wait_results()
        self.assertEqual(refund.state, 'done')
        with self.registry.test_lock:
            self.env.invalidate_all()
            self.assertEqual(order._mpesa_paid_amount(), 0, "a reversed payment pays nothing")
            self.assertEqual(order._mpesa_amount_due(), order.amount_total)
            self.assertEqual(invoice._mpesa_paid_amount(), 0)

    def test_a_late_reversal_result_wins_over_a_status_that_lagged(self):
        """Transaction Status said 'Completed' while the reversal was still in M-Pesa's queue: the
        refund ends in error, then the reversal's own result says done.  The money went back: the
        refund is done, its payment made, and no second reversal may be sent."""
        tx = self._paid()
        self.simulator.initiator_next('no_result', count=2)
        refund = self._refund_with_odoos_button(tx)
        with self.registry.test_lock:
            refund.mpesa_status_next_at = refund.mpesa_status_next_at.replace(year=2000)
        self._run_initiator_job()
        self.assertEqual(len(self._initiator_requests('transaction_status')), 1)
        self.assertTrue(refund.mpesa_status_conversation_id)
        status = {'Result': {
            'ResultType': 0, 'ResultCode': 0, 'ResultDesc': "The service request is processed successfully.",
            'OriginatorConversationID': refund.mpesa_status_originator_id,
            'ConversationID': refund.mpesa_status_conversation_id, 'TransactionID': 'SIM0000000',
            'ResultParameters': {'ResultParameter': [
                {'Key': 'ReceiptNo', 'Value': tx.mpesa_receipt_number},
                {'Key': 'TransactionStatus', 'Value': 'Completed'},
                {'Key': 'Amount', 'Value': tx.amount},
            ]},
        }}
        self._post_result(status, route='status_result')
        self._run_initiator_job()
        self.assertEqual(refund.state, 'error')
        self.assertFalse(refund.mpesa_reversal_claim)
        reversal_id = self.simulator.payment(tx.mpesa_receipt_number).reversed_by
        self.assertTrue(reversal_id, "M-Pesa did reverse it")
        late = {'Result': {
            'ResultType': 0, 'ResultCode': 0, 'ResultDesc': "The service request is processed successfully.",
            'OriginatorConversationID': refund.mpesa_originator_conversation_id,
            'ConversationID': refund.provider_reference, 'TransactionID': reversal_id,
            'ResultParameters': {'ResultParameter': [
                {'Key': 'OriginalTransactionID', 'Value': tx.mpesa_receipt_number},
            ]},
        }}
        self._post_result(late)
        self._run_initiator_job()
        self.assertEqual(refund.state, 'done', "a late success still wins")
        self.assertTrue(refund.mpesa_reversal_claim, "it holds the payment's reversal again")
        self.assertTrue(refund.payment_id, "the refund payment is made")
        with self.assertRaisesRegex(ValidationError, 'already refunded'), self.registry.test_lock:
            tx.with_user(self.accountant).action_refund()
        self.assertEqual(len(self._initiator_requests('reversal')), 1)

    def test_a_late_success_after_a_second_reversal_was_refused(self):
        """The refund ended in error by a lagging status; a person sent a second reversal, which
        M-Pesa refused as already reversed (R000001); then the first one's result came."""
        tx = self._paid()
        self.simulator.initiator_next('no_result')
        first = self._refund_with_odoos_button(tx)
        with self.registry.test_lock:  # As the lagging status of the test above would.
            first._mpesa_set_refund_failed(False, "M-Pesa's Transaction Status says the payment was not reversed.")
        second = self._refund_with_odoos_button(tx)
        self._wait_results()
        self.assertEqual((second.state, second.mpesa_result_code), ('error', 'R000001'))
        self.assertTrue(second.mpesa_reversal_claim)
        late = {'Result': {
            'ResultType': 0, 'ResultCode': 0, 'ResultDesc': "The service request is processed successfully.",
            'OriginatorConversationID': first.mpesa_originator_conversation_id,
            'ConversationID': first.provider_reference,
            'TransactionID': self.simulator.payment(tx.mpesa_receipt_number).reversed_by,
            'ResultParameters': {'ResultParameter': [
                {'Key': 'OriginalTransactionID', 'Value': tx.mpesa_receipt_number},
            ]},
        }}
        self._post_result(late)
        self._run_initiator_job()
        self.assertEqual(first.state, 'done')
        self.assertEqual((first.mpesa_reversal_claim, second.mpesa_reversal_claim), (True, False))
        self.assertEqual(len(tx.child_transaction_ids.filtered('payment_id')), 1, "one refund payment")

    def test_a_queue_timeout_is_asked_again_never_sent_twice(self):
        tx = self._paid()
        self.simulator.initiator_next('queue_timeout')
        refund = self._refund_with_odoos_button(tx)
        self._wait_results(kind='initiator_timeout')
        self.assertEqual(refund.state, 'pending')
        self.assertEqual(len(self._initiator_requests('transaction_status')), 1, "asked at once")
        self._wait_results()
        self.assertEqual(refund.state, 'error', "the timed-out reversal was never processed")
        self.assertIn('not reversed', refund.state_message)
        self.assertFalse(refund.mpesa_reversal_claim, "it may be refunded again, by a person")
        self.assertEqual(len(self._initiator_requests('reversal')), 1)

    def test_a_double_click_sends_one_reversal(self):
        tx = self._paid()
        self._refund_with_odoos_button(tx)
        with self.assertRaisesRegex(ValidationError, 'under way'):
            self._refund_with_odoos_button(tx)
        with self.assertRaisesRegex(ValidationError, 'under way'), self.registry.test_lock:
            tx.with_user(self.accountant).action_refund()
        self.assertEqual(len(self._initiator_requests('reversal')), 1)
        self._wait_results()
        with self.assertRaisesRegex(ValidationError, 'already refunded'), self.registry.test_lock:
            tx.with_user(self.accountant).action_refund()
        self.assertEqual(len(self._initiator_requests('reversal')), 1)

    @mute_logger('odoo.sql_db')
    def test_the_database_holds_one_reversal_per_payment(self):
        """A second worker that got past the row lock (it cannot: the first holds it until its
        commit) still meets the unique index.  Real concurrent workers need committed data, which
        Odoo's test cursor never has: tests/odoo_concurrency.py is where such runs live."""
        tx = self._paid()
        refund = self._refund_with_odoos_button(tx)
        with self.assertRaises(psycopg2.errors.UniqueViolation), self.env.cr.savepoint():
            refund.copy({'reference': 'R-SECOND', 'mpesa_reversal_claim': True,
                         'source_transaction_id': tx.id}).flush_recordset()

    def test_only_whole_and_proven_payments_are_reversed(self):
        tx = self._paid()
        with self.assertRaisesRegex(ValidationError, 'whole payments'), self.registry.test_lock:
            tx.with_user(self.accountant).action_refund(amount_to_refund=tx.amount / 2)
        tx.mpesa_receipt_status = 'unverified'
        with self.assertRaisesRegex(ValidationError, 'not verified'), self.registry.test_lock:
            tx.with_user(self.accountant).action_refund()
        self.assertFalse(self.simulator.initiator_requests, "nothing left for Daraja")

    def test_without_an_initiator_nothing_is_sent(self):
        tx = self._paid()
        self.provider.mpesa_initiator_password = False
        with self.assertRaisesRegex(Exception, 'initiator password'), self.registry.test_lock:
            tx.with_user(self.accountant).action_refund()
        self.assertFalse(tx.child_transaction_ids, "no refund left behind")
        self.assertFalse(self.simulator.initiator_requests)

    def test_a_flagged_payment_is_refunded_in_one_click(self):
        first = self._paid()
        order = self.quotation
        # A second payment of the paid order (it came through another order's prompt, then moved here).
        other_order = self._order()
        second = self._paid(other_order)
        with self.registry.test_lock:
            second.sale_order_ids = [Command.set(order.ids)]
            second._mpesa_flag_overpaid_documents()
            self.assertTrue(order.mpesa_needs_refund)
            order.with_user(self.accountant).action_mpesa_refund_extra_payment()
        self.assertEqual(first.child_transaction_ids, self.env['payment.transaction'], "the order's own stays")
        refund = self._refund_of(second)
        self._wait_results()
        self.assertEqual(refund.state, 'done')
        self.assertFalse(order.mpesa_needs_refund, "refunded: nothing left to check")
        self.assertEqual(order.mpesa_payment_status, 'paid', "its own payment still pays it")
        self.assertEqual(order.mpesa_refund_receipt, refund.mpesa_reversal_receipt)
        self.assertFalse(order.activity_ids.filtered(lambda a: 'refund' in (a.summary or '')))
        self.assertEqual(len(self._initiator_requests('reversal')), 1)


@tagged('post_install', '-at_install')
class TestRefundAttacks(InitiatorCommon):

    def _pending_refund(self):
        tx = self._paid()
        self.simulator.initiator_next('no_result')  # The real result never comes: we forge it.
        return tx, self._refund_with_odoos_button(tx)

    def _result_body(self, refund, code=0, conversation_id=None):
        return {'Result': {
            'ResultType': 0, 'ResultCode': code, 'ResultDesc': "The service request is processed successfully.",
            'OriginatorConversationID': refund.mpesa_originator_conversation_id,
            'ConversationID': conversation_id or refund.provider_reference,
            'TransactionID': 'SIMREV0001',
            'ResultParameters': {'ResultParameter': [
                {'Key': 'OriginalTransactionID', 'Value': refund.source_transaction_id.mpesa_receipt_number},
            ]},
        }}

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

    def test_hostile_bodies_get_a_4xx_and_are_kept(self):
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
class TestInitiatorSetup(InitiatorCommon):

    def test_the_certificate_is_checked_when_saved(self):
        with self.assertRaisesRegex(ValidationError, 'not a usable Safaricom certificate'), self.env.cr.savepoint():
            self.provider.mpesa_initiator_certificate = '-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----'
            self.provider.flush_recordset()
        self.provider.invalidate_recordset()
        self.assertIn('Daraja Simulator', self.provider.mpesa_initiator_certificate_info)
        self.assertEqual(self.provider.support_refund, 'full_only')

    def test_test_connection_says_whether_refunds_work(self):
        message = self.provider.action_mpesa_test_connection()['params']['message']
        self.assertIn('initiator testapi is set up', message)
        self.provider.mpesa_initiator_password = False
        message = self.provider.action_mpesa_test_connection()['params']['message']
        self.assertIn('Refunds and receipt checks are off', message)
        self.assertIn('initiator password', message)

    def test_the_credential_is_made_with_the_certificate(self):
        credential = self.provider._mpesa_security_credential()
        self.assertNotIn(self.simulator.initiator_password, credential)
        self.assertNotEqual(credential, self.provider._mpesa_security_credential(), "PKCS#1 v1.5 is randomised")
