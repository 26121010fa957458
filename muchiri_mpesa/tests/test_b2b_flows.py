# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""Pay from the distributor's till (B2B Express Checkout), end to end against the simulator on loopback: the
portal's route starts the prompt, the simulator posts the till's result to the provider's secret path, and only
M-Pesa's Transaction Status (asked by the RequestRefID) pays (docs/design.md, 15. Pay from the till)."""
import json
import uuid
from unittest.mock import patch

from odoo import fields
from odoo.exceptions import ValidationError
from odoo.tests import Form, JsonRpcException, new_test_user, tagged
from odoo.tools import mute_logger

from odoo.addons.muchiri_mpesa import const
from odoo.addons.muchiri_mpesa.daraja.client import DarajaClient
from odoo.addons.muchiri_mpesa.daraja.simulator import B2B_RESULT

from .common import DarajaDuringToursMixin, MpesaPaybillCommon

TILL_PAYS = '600100'
TILL_CANCELS = '600101'
TILL_NEVER_ANSWERS = '600102'
TILL_RESULT_LOST = '600103'
TILL_REFUSED = '600104'


class WorkerKilled(Exception):
    """The Odoo worker dies here: nothing after this point runs."""


@tagged('post_install', '-at_install')
class TestB2BTillPayments(MpesaPaybillCommon):

    def setUp(self):
        super().setUp()
        self._with_initiator()
        self.distributor.mpesa_till_number = TILL_PAYS

    # === HELPERS === #

    def _start_invoice_payment(self, invoice):
        """Odoo's own transaction route of an invoice's portal page."""
        with self.registry.test_lock:
            self.authenticate('distributor', 'distributor')
            params = {
                'provider_id': self.provider.id,
                'payment_method_id': self.payment_method_id,
                'token_id': None,
                'amount': invoice.amount_residual,
                'flow': 'direct',
                'tokenization_requested': False,
                'landing_route': invoice.get_portal_url(),
                'access_token': invoice._portal_ensure_token(),
            }
        return self.make_jsonrpc_request(self._build_url(f'/invoice/transaction/{invoice.id}'), params)

    def _till_push(self, processing_values, till, access_token=None):
        """Our route, as the M-Pesa inline form calls it when the distributor pays from the till."""
        return self.make_jsonrpc_request(self._build_url('/payment/mpesa/till_push'), {
            'reference': processing_values['reference'],
            'till': till,
            'access_token': access_token or processing_values['mpesa_access_token'],
        })

    def _pay_from_till(self, till=TILL_PAYS, order=None, invoice=None):
        with self.registry.test_lock:
            self.distributor.mpesa_till_number = till
            self.env.flush_all()
        values = self._start_invoice_payment(invoice) if invoice else self._start_portal_payment(order)
        answer = self._till_push(values, till)
        return self._get_tx(values['reference']), answer

    def _wait_b2b_result(self, tx):
        self.simulator.wait_for_deliveries(B2B_RESULT, count=1, reference=tx.provider_reference, timeout=15)
        self._settle_callbacks()

    def _post_b2b(self, body):
        self.env.flush_all()
        response = self._post_callback(body, route=const.LNM_ROUTES['b2b_result'])
        self.assertEqual(response.status_code, 200, response.text)
        return response

    def _success_body(self, tx, receipt='SIMFORGED01', amount=None):
        return {
            'resultCode': '0', 'resultDesc': "The service request is processed successfully.",
            'amount': f"{amount if amount is not None else tx.mpesa_requested_amount}.0",
            'requestId': tx.provider_reference, 'resultType': '0', 'conversationID': 'AG_20261207_000000000001',
            'transactionId': receipt, 'status': 'SUCCESS',
        }

    def _unlisted(self):
        """The ledger's payments that Pull has not listed, per the gap report (muchiri.mpesa.ledger.day)."""
        with self.registry.test_lock:
            self.env.flush_all()
            self.env.invalidate_all()
            days = self.env['muchiri.mpesa.ledger.day'].search([('provider_id', '=', self.provider.id)])
            return sum(days.mapped('unlisted_count'))

    def _b2b_events(self, tx):
        return self._events(kind='b2b_result', transaction_id=tx.id)

    def assertPaidFromTill(self, tx, till=TILL_PAYS):
        tx.invalidate_recordset()
        self.assertEqual(tx.state, 'done', tx.state_message)
        self.assertEqual((tx.mpesa_receipt_status, tx.mpesa_settled_by, tx.mpesa_b2b_till),
                         ('confirmed', 'status', till))
        checkout = self.simulator.b2b_checkout(tx.provider_reference)
        self.assertEqual(tx.mpesa_receipt_number, checkout['transactionId'], "Daraja's own receipt")
        row = self._row(tx.mpesa_receipt_number)
        self.assertEqual(len(row), 1)
        self.assertTrue(row.source_b2b)
        self.assertEqual((row.confirmation, row.state, row.amount), ('status', 'matched', tx.amount))
        self.assertEqual(row.transaction_ids, tx)
        self.assertTrue(tx.payment_id, "Odoo's post-processing made the payment")
        return row

    def _kill_till_prompt(self, till, sent):
        """A till prompt whose worker dies right after the request (`sent`) or just before it: its
        committed attempt is all that is left (a test commits nothing, so nothing is rolled back)."""
        with self.registry.test_lock:
            self.distributor.mpesa_till_number = till
            self.env.flush_all()
        values = self._start_portal_payment()
        tx = self._get_tx(values['reference'])
        send = DarajaClient.b2b_checkout

        def dies(client, **kwargs):
            if sent:
                send(client, **kwargs)
            raise WorkerKilled()

        killed = False
        with self.registry.test_lock, patch.object(DarajaClient, 'b2b_checkout', dies):
            try:  # Not assertRaises: it would roll back what the worker committed.
                tx._mpesa_send_b2b_checkout(till)
            except WorkerKilled:
                killed = True
            self.env.flush_all()
            self.env.invalidate_all()
        self.assertTrue(killed)
        self.assertEqual((tx.state, tx.mpesa_b2b_till), ('draft', till))
        self.assertTrue(tx.provider_reference and tx.mpesa_push_sent_at)
        self.assertTrue(tx.mpesa_status_next_at, "Transaction Status was scheduled before the request left")
        self.assertEqual(len(self.simulator.b2b_checkouts), int(sent))
        return tx

    def _status_due_now(self, tx, **values):
        with self.registry.test_lock:
            tx.write({'mpesa_status_next_at': tx.mpesa_push_sent_at, **values})  # B2B_RESULT_WAIT has passed.
            self.env.flush_all()

    def _done_till_payments(self):
        self.quotation.invalidate_recordset()
        return self.quotation.transaction_ids.filtered(lambda tx: tx.state == 'done')

    # === TESTS === #

    def test_till_pays_an_order(self):
        unlisted = self._unlisted()
        tx, answer = self._pay_from_till()
        self.assertEqual(answer, {})
        self.assertEqual((tx.state, tx.mpesa_b2b_till), ('pending', TILL_PAYS))
        checkout = self.simulator.b2b_checkout(tx.provider_reference)
        self.assertEqual((checkout['primaryShortCode'], int(float(checkout['amount']))), (TILL_PAYS, 4500))
        self.assertTrue(self._events(kind='b2b_checkout', transaction_id=tx.id), "the request is in the log")
        self._wait_b2b_result(tx)
        tx.invalidate_recordset()
        self.assertEqual(tx.state, 'pending', "a result alone pays nothing")
        self.assertEqual(tx.mpesa_receipt_status, 'unverified')
        self.assertFalse(self._row(tx.mpesa_receipt_number), "nothing is in the ledger yet")
        self.assertEqual(self._b2b_events(tx).state, 'processed')
        self.assertTrue(tx.mpesa_status_next_at, "Transaction Status is asked at once")
        self._confirm_by_status()
        self.assertFalse(self._status_requests()[-1].get('TransactionID'), "asked by the RequestRefID")
        self.assertPaidFromTill(tx)
        self.quotation.invalidate_recordset()
        self.assertEqual(self.quotation.state, 'sale', "the order is confirmed")
        self.assertEqual(self._unlisted(), unlisted, "a till's payment, not in Pull, is no gap with Safaricom")

    def test_a_swahili_distributor_reads_the_till_prompt_in_swahili(self):
        tx, _answer = self._pay_from_till()
        self.env['res.lang']._activate_lang('sw')
        self.env['ir.module.module']._load_module_terms(['muchiri_mpesa'], ['sw'], overwrite=True)
        self.assertEqual(
            tx.with_context(lang='sw')._mpesa_till_pending_message(),
            f"Tumetuma ombi la M-Pesa kwa till yako {TILL_PAYS}: mhudumu wake aweke kitambulisho cha mhudumu"
            " (operator ID) na PIN ili kukamilisha malipo.")
        self.assertEqual(str(self.distributor.with_context(lang='sw')._mpesa_pay_from_till_label()),
                         f"Lipa kutoka till yako <strong>{TILL_PAYS}</strong>")
        self._wait_b2b_result(tx)
        self._confirm_by_status()

    def test_till_pays_an_invoice(self):
        invoice = self._invoice(3000.0)
        tx, answer = self._pay_from_till(invoice=invoice)
        self.assertEqual(answer, {})
        self.assertEqual(tx.invoice_ids, invoice)
        self._wait_b2b_result(tx)
        self._confirm_by_status()
        self.assertPaidFromTill(tx)
        invoice.invalidate_recordset()
        self.assertIn(invoice.payment_state, ('paid', 'in_payment'))

    def test_cancelled_prompt_leaves_the_order_payable(self):
        tx, answer = self._pay_from_till(TILL_CANCELS)
        self.assertEqual(answer, {})
        self._wait_b2b_result(tx)
        tx.invalidate_recordset()
        self.assertEqual(tx.state, 'error')
        self.assertIn("cancelled", tx.state_message)
        self.assertEqual(tx.mpesa_result_code, '4001')
        self.assertFalse(tx.mpesa_receipt_number)
        self.assertFalse(tx.mpesa_status_next_at)
        self.quotation.invalidate_recordset()
        self.assertIn(self.quotation.state, ('draft', 'sent'))
        self.assertTrue(self.quotation._mpesa_is_due(), "the order may be paid again")
        again, answer = self._pay_from_till(TILL_PAYS)
        self.assertEqual((answer, again.state), ({}, 'pending'), "a new prompt may go")

    def test_refused_prompt_is_an_error_with_darajas_words(self):
        tx, answer = self._pay_from_till(TILL_REFUSED)
        self.assertIn("nominated", answer['error'].lower())
        tx.invalidate_recordset()
        self.assertEqual((tx.state, tx.mpesa_result_code), ('error', '4104'))
        self.assertFalse(tx.mpesa_status_next_at)

    def test_one_prompt_at_a_time_per_order(self):
        tx, answer = self._pay_from_till(TILL_NEVER_ANSWERS)
        self.assertEqual((answer, tx.state), ({}, 'pending'))
        again, answer = self._pay_from_till(TILL_NEVER_ANSWERS)
        self.assertIn("already sent", answer['error'])
        self.assertEqual(again.state, 'cancel')
        with self.registry.test_lock:  # Past the cooldown: still refused while the till may answer.
            tx.mpesa_push_sent_at = tx.mpesa_push_sent_at.replace(year=2025)
            self.env.flush_all()
        values = self._start_portal_payment()
        message = self._stk_push_refusal(values, '254708374149')
        self.assertIn("till prompt", message)
        self.assertEqual(len(self.simulator.b2b_checkouts), 1)
        self.assertFalse(self.simulator.pushes, "no phone prompt either")

    def test_lost_result_is_recovered_by_transaction_status(self):
        tx, answer = self._pay_from_till(TILL_RESULT_LOST)
        self.assertEqual(answer, {})
        receipt = self.simulator.b2b_checkout(tx.provider_reference)['transactionId']
        self._wait(lambda: receipt in {payment.receipt for payment in self.simulator.payments}, settle=False,
                   message="the till paid")
        self._run_initiator_job()
        self.assertFalse(self._status_requests(), "Transaction Status waits for the result first")
        self.assertEqual(tx.state, 'pending')
        with self.registry.test_lock:
            tx.mpesa_status_next_at = tx.mpesa_push_sent_at  # B2B_RESULT_WAIT has passed.
            self.env.flush_all()
        self._confirm_by_status()
        request = self._status_requests()[-1]
        self.assertEqual(request.get('TransactionID') or '', '', "asked by the RequestRefID, not by a receipt")
        self.assertPaidFromTill(tx, TILL_RESULT_LOST)

    def test_killed_prompt_whose_result_is_lost_is_booked_once_by_transaction_status(self):
        tx = self._kill_till_prompt(TILL_RESULT_LOST, sent=True)
        receipt = self.simulator.b2b_checkout(tx.provider_reference)['transactionId']
        self._wait(lambda: receipt in {payment.receipt for payment in self.simulator.payments}, settle=False,
                   message="the till paid")
        with self.registry.test_lock:  # Past the cooldown: the till may still pay, no second prompt goes.
            tx.mpesa_push_sent_at = tx.mpesa_push_sent_at.replace(year=2025)
            self.env.flush_all()
        again, answer = self._pay_from_till(TILL_RESULT_LOST)
        self.assertIn("till prompt", answer['error'])
        self.assertEqual(again.state, 'cancel')
        self.assertEqual(len(self.simulator.b2b_checkouts), 1)
        self._status_due_now(tx)
        self._confirm_by_status()
        self.assertEqual(self._status_requests()[-1].get('TransactionID') or '', '', "asked by the RequestRefID")
        self.assertPaidFromTill(tx, TILL_RESULT_LOST)
        self._run_initiator_job()
        self.assertEqual(len(self._status_requests()), 1, "asked once")
        self.assertEqual(self._done_till_payments(), tx, "booked once")
        self.assertEqual(len(tx.payment_id), 1)

    def test_killed_prompt_whose_result_comes_is_booked_once(self):
        tx = self._kill_till_prompt(TILL_PAYS, sent=True)
        self._wait_b2b_result(tx)
        tx.invalidate_recordset()
        self.assertEqual((tx.state, tx.mpesa_receipt_status), ('pending', 'unverified'), "the result finds it")
        self.assertEqual(self._b2b_events(tx).state, 'processed')
        self._confirm_by_status()
        self.assertPaidFromTill(tx)
        delivered = self.simulator.deliveries(B2B_RESULT, reference=tx.provider_reference)[0].body
        self._post_b2b(json.loads(delivered) if isinstance(delivered, (str, bytes)) else delivered)
        self._settle_callbacks()
        self._run_initiator_job()
        self.assertEqual(sorted(self._b2b_events(tx).mapped('state')), ['ignored', 'processed'])
        self.assertEqual(len(self._status_requests()), 1)
        self.assertEqual(self._done_till_payments(), tx, "booked once")

    def test_check_status_asks_about_a_killed_prompt(self):
        """The order's *Check M-Pesa status* button sees the till prompt whose worker died, and
        asks Transaction Status now instead of saying nothing waits."""
        tx = self._kill_till_prompt(TILL_RESULT_LOST, sent=True)
        receipt = self.simulator.b2b_checkout(tx.provider_reference)['transactionId']
        self._wait(lambda: receipt in {payment.receipt for payment in self.simulator.payments}, settle=False,
                   message="the till's operator paid")
        self.quotation.invalidate_recordset()
        self.assertTrue(self.quotation.mpesa_has_pending_payment)
        salesman = new_test_user(self.env, login='mpesa_killed_salesman', groups='sales_team.group_sale_salesman')
        with self.registry.test_lock:
            self.quotation.user_id = salesman  # A salesman sees his own orders.
            action = self.quotation.with_user(salesman).action_mpesa_check_status()
            self.env.flush_all()
        self.assertIn("Transaction Status is asked now", action['params']['message'])
        tx.invalidate_recordset()
        self.assertEqual(tx.state, 'pending')
        self.assertLessEqual(tx.mpesa_status_next_at, fields.Datetime.now(), "asked now")
        self._confirm_by_status()
        self.assertPaidFromTill(tx, TILL_RESULT_LOST)
        self.assertEqual(self._done_till_payments(), tx, "booked once")

    def test_killed_prompt_that_never_left_ends_and_frees_the_order(self):
        tx = self._kill_till_prompt(TILL_PAYS, sent=False)
        self._status_due_now(tx)
        self._confirm_by_status()
        tx.invalidate_recordset()
        self.assertEqual(tx.state, 'pending', "Daraja knows no payment yet: the till may still answer")
        self.assertIn("knows no payment", tx.mpesa_receipt_proof)
        self.assertGreater(tx.mpesa_status_next_at, tx.mpesa_push_sent_at, "asked again later")
        self._status_due_now(tx, mpesa_status_count=const.INITIATOR_MAX_CHECKS - 1)
        self._confirm_by_status(results=2)
        tx.invalidate_recordset()
        self.assertEqual(tx.state, 'error')
        self.assertIn(f"knows no payment from till {TILL_PAYS}", tx.state_message)
        self.assertFalse(tx.mpesa_status_next_at)
        self.assertFalse(tx.payment_id)
        self.assertFalse(self.simulator.b2b_checkouts, "no prompt ever left")
        self.quotation.invalidate_recordset()
        self.assertTrue(self.quotation._mpesa_is_due())
        again, answer = self._pay_from_till(TILL_PAYS)
        self.assertEqual((answer, again.state), ({}, 'pending'), "the order may be paid again")

    def test_odoos_refund_reverses_the_till_payment_once(self):
        tx, _answer = self._pay_from_till()
        self._wait_b2b_result(tx)
        self._confirm_by_status()
        row = self.assertPaidFromTill(tx)
        with self.registry.test_lock:  # Odoo's Refund button of the payment, then its wizard's, as the accountant.
            payment = tx.payment_id.with_user(self.accountant)
            self.assertGreater(payment.amount_available_for_refund, 0, "Odoo offers the refund")
            action = payment.action_refund_wizard()
            wizard = self.env[action['res_model']].with_user(self.accountant).with_context(
                active_id=payment.id, active_model='account.payment').create({})
            wizard.action_refund()
            self.env.invalidate_all()
        refund = tx.child_transaction_ids.filtered(lambda child: child.operation == 'refund')
        self.assertEqual(len(refund), 1)
        self.assertEqual((refund.state, refund.amount), ('pending', -tx.amount))
        [reversal] = [request for request in self.simulator.initiator_requests if request['api'] == 'reversal']
        self.assertEqual(reversal['TransactionID'], tx.mpesa_receipt_number, "the till payment's own receipt")
        self.assertEqual(reversal['ResultCode'], '0', "M-Pesa reverses a till's payment")
        self.simulator.wait_for_deliveries('initiator_result', count=2, timeout=15)  # Its status, then the reversal.
        self._run_initiator_job()
        refund.invalidate_recordset()
        self.assertEqual(refund.state, 'done', refund.state_message)
        reversed_by = self.simulator.payment(tx.mpesa_receipt_number).reversed_by
        self.assertTrue(reversed_by)
        self.assertEqual(refund.mpesa_reversal_receipt, reversed_by)
        self.assertEqual((refund.payment_id.payment_type, refund.payment_id.amount), ('outbound', tx.amount))
        row.invalidate_recordset()
        self.assertEqual((row.state, row.reversal_receipt), ('refunded', reversed_by))
        body = self.simulator.deliveries('initiator_result')[-1].body
        self._post_callback(json.loads(body) if isinstance(body, (str, bytes)) else body,
                            route=const.LNM_ROUTES['reversal_result'], settle=False)
        self._run_initiator_job()
        tx.invalidate_recordset()
        refunds = tx.child_transaction_ids.filtered(lambda child: child.operation == 'refund')
        self.assertEqual(refunds, refund, "one refund")
        self.assertEqual(len(refund.payment_id), 1, "refunded once")
        self.assertEqual(len([r for r in self.simulator.initiator_requests if r['api'] == 'reversal']), 1)
        self.quotation.invalidate_recordset()
        self.assertEqual(self.quotation.mpesa_payment_status, 'refunded')

    def test_forged_success_on_the_secret_path_pays_nothing(self):
        tx, _answer = self._pay_from_till(TILL_NEVER_ANSWERS)
        self._post_b2b(self._success_body(tx, receipt='SIMFORGED01'))
        tx.invalidate_recordset()
        self.assertEqual((tx.state, tx.mpesa_receipt_status), ('pending', 'unverified'))
        self._confirm_by_status()
        tx.invalidate_recordset()
        self.assertNotEqual(tx.state, 'done')
        self.assertEqual(tx.mpesa_receipt_status, 'conflict', tx.mpesa_receipt_proof)
        self.assertFalse(self._row('SIMFORGED01'), "nothing in the ledger")
        self.assertFalse(tx.payment_id)
        self.quotation.invalidate_recordset()
        self.assertIn(self.quotation.state, ('draft', 'sent'))

    def test_forged_amount_pays_nothing_and_is_flagged(self):
        tx, _answer = self._pay_from_till(TILL_NEVER_ANSWERS)
        self._post_b2b(self._success_body(tx, receipt='SIMFORGED02', amount=1))
        event = self._b2b_events(tx)
        self.assertEqual(event.state, 'conflict', event.message)
        tx.invalidate_recordset()
        self.assertEqual(tx.state, 'pending')
        self.assertFalse(tx.mpesa_receipt_number)
        self.assertFalse(self._row('SIMFORGED02'))

    def test_result_of_an_unknown_request_is_kept_and_pays_nothing(self):
        tx, _answer = self._pay_from_till(TILL_NEVER_ANSWERS)
        body = dict(self._success_body(tx, receipt='SIMFORGED03'), requestId=str(uuid.uuid4()))
        self._post_b2b(body)
        event = self._events(kind='b2b_result', checkout_request_id=body['requestId'])
        self.assertEqual(len(event), 1, "the body is kept")
        self.assertEqual(event.state, 'unmatched')
        self.assertFalse(event.transaction_id)
        self.assertEqual(json.loads(event.request_body)['requestId'], body['requestId'])
        tx.invalidate_recordset()
        self.assertEqual((tx.state, tx.mpesa_receipt_number), ('pending', False))
        self.assertFalse(self._row('SIMFORGED03'))

    def test_duplicate_results_pay_once(self):
        tx, _answer = self._pay_from_till()
        self._wait_b2b_result(tx)
        delivered = self.simulator.deliveries(B2B_RESULT, reference=tx.provider_reference)[0].body
        body = json.loads(delivered) if isinstance(delivered, (str, bytes)) else delivered
        self._post_b2b(body)  # Before Transaction Status answered.
        self._confirm_by_status()
        self.assertPaidFromTill(tx)
        self._post_b2b(body)  # After it.
        states = self._b2b_events(tx).mapped('state')
        self.assertEqual(sorted(states), ['ignored', 'ignored', 'processed'])
        self.quotation.invalidate_recordset()
        self.assertEqual(len(self.quotation.transaction_ids.filtered(lambda t: t.state == 'done')), 1)
        self.assertEqual(len(self._status_requests()), 1, "Transaction Status was asked once")

    @mute_logger('odoo.http')
    def test_route_refuses_a_bad_access_token(self):
        values = self._start_portal_payment()
        with self.assertRaises(JsonRpcException):
            self._till_push(values, TILL_PAYS, access_token='x' * 64)
        self.assertFalse(self.simulator.b2b_checkouts, "no prompt was started")
        tx = self._get_tx(values['reference'])
        self.assertEqual(tx.state, 'draft')

    def test_route_prompts_the_contacts_own_till_only(self):
        values = self._start_portal_payment()
        answer = self._till_push(values, '600199')
        self.assertIn("not the till", answer['error'])
        self.assertFalse(self.simulator.b2b_checkouts, "no prompt was started")

    def test_till_needs_the_initiator(self):
        self.provider.write({'mpesa_initiator_name': False})
        self.assertFalse(self.provider._mpesa_takes_till_payments())
        tx, answer = self._pay_from_till()
        self.assertIn("initiator", answer['error'])
        self.assertEqual(tx.state, 'cancel')
        self.assertFalse(self.simulator.b2b_checkouts)

    def test_back_office_wizard_prompts_the_till(self):
        salesman = new_test_user(self.env, login='mpesa_till_salesman', groups='sales_team.group_sale_salesman')
        with self.registry.test_lock:
            self.distributor.mpesa_till_number = TILL_PAYS
            self.quotation.user_id = salesman  # A salesman sees his own orders.
            order = self.quotation.with_user(salesman)
            action = order.action_mpesa_request_payment()
            with Form(self.env[action['res_model']].with_user(salesman).with_context(**action['context'])) as form:
                self.assertTrue(form.can_pay_from_till)
                self.assertEqual(form.till, TILL_PAYS)
                form.pay_from = 'till'
            result = form.record.action_send()
            self.assertEqual(result['params']['type'], 'success', result['params']['message'])
            self.env.invalidate_all()
        tx = self.quotation.transaction_ids.sudo()
        self.assertEqual((tx.state, tx.mpesa_b2b_till), ('pending', TILL_PAYS))
        with self.registry.test_lock:  # "Check status": no STK Query of a till prompt, Transaction Status soon.
            result = self.quotation.with_user(salesman).action_mpesa_check_status()
            self.assertEqual(result['params']['type'], 'info', result['params']['message'])
            self.assertFalse(self.simulator.requests_for('stk_query'))
            self.env.invalidate_all()
        self._wait_b2b_result(tx)
        self._confirm_by_status()
        self.assertPaidFromTill(tx)

    def test_back_office_till_request_asks_one_instalment_at_a_time(self):
        salesman = new_test_user(self.env, login='mpesa_till_instalments', groups='sales_team.group_sale_salesman')
        with self.registry.test_lock:
            self.provider.maximum_amount = 0  # Odoo's own limit hides the provider: not M-Pesa's.
            self.quotation.order_line[1:].unlink()
            self.quotation.order_line.write({'product_uom_qty': 1, 'price_unit': 600000, 'tax_id': False})
            self.quotation.user_id = salesman
            self.env.flush_all()
        self.assertEqual(self.quotation.amount_total, 600000)
        kes = self.quotation._mpesa_format_amount
        for due in (600000, 350000):
            with self.registry.test_lock:
                action = self.quotation.with_user(salesman).action_mpesa_request_payment()
                with Form(self.env[action['res_model']].with_user(salesman).with_context(**action['context'])) as form:
                    form.pay_from = 'till'
                    self.assertEqual(form.amount, due)
                result = form.record.action_send()
                self.env.invalidate_all()
            message = result['params']['message']
            self.assertEqual(result['params']['type'], 'success', message)
            self.assertIn(f"{kes(due)} is above one prompt's {kes(250000)}: this request asks {kes(250000)};"
                          " request again for the rest.", message)
            tx = self.quotation.transaction_ids.sudo().filtered(lambda t: t.state == 'pending')
            self.assertEqual((tx.amount, tx.mpesa_b2b_till), (250000, TILL_PAYS))
            self.assertEqual(int(float(self.simulator.b2b_checkout(tx.provider_reference)['amount'])), 250000)
            self._wait_b2b_result(tx)
            self._confirm_by_status(results=len(self._status_requests()) + 1)
            self.assertPaidFromTill(tx)
        self.quotation.invalidate_recordset()
        self.assertEqual(self.quotation._mpesa_amount_due(), 100000, "the last request asks the rest")

    def test_portal_form_offers_the_till_beside_the_phone(self):
        self.distributor.mpesa_till_number = TILL_PAYS
        self.authenticate('distributor', 'distributor')
        page = self.url_open(self.quotation.get_portal_url()).text
        self.assertIn('o_mpesa_phone', page)
        self.assertIn('id="o_mpesa_pay_from_till"', page)
        self.assertIn(f'data-till="{TILL_PAYS}"', page)
        self.provider.mpesa_initiator_name = False  # Nothing could prove a till's payment.
        page = self.url_open(self.quotation.get_portal_url()).text
        self.assertIn('o_mpesa_phone', page)
        self.assertNotIn('o_mpesa_pay_from_till', page)
        self.provider.mpesa_initiator_name = self.simulator.initiator_name
        self.distributor.mpesa_till_number = False
        page = self.url_open(self.quotation.get_portal_url()).text
        self.assertNotIn('o_mpesa_pay_from_till', page, "no till on the contact, no till offered")

    def test_till_number_validation(self):
        partner = self.env['res.partner'].create({'name': "Kamau Wholesalers"})
        for bad in ('1234', '12345678', '60010A', '600 100'):
            with self.subTest(till=bad), self.assertRaises(ValidationError):
                partner.mpesa_till_number = bad
                partner.flush_recordset()
        partner.mpesa_till_number = '600100'
        self.assertEqual(partner._mpesa_payment_till(), '600100')
        contact = self.env['res.partner'].create({'name': "Kamau", 'parent_id': partner.id})
        self.assertEqual(contact._mpesa_payment_till(), '600100', "a contact pays from its company's till")
        self.assertEqual(self.env['res.partner']._mpesa_clean_till(' 600 101 '), '600101')


@tagged('post_install', '-at_install')
class TestTillTour(DarajaDuringToursMixin, MpesaPaybillCommon):
    """The distributor chooses the till in the portal's payment form, in a real browser: the tour
    is in static/tests/tours/portal_payment_tour.js."""

    def setUp(self):
        super().setUp()
        self._with_initiator()
        self.distributor.mpesa_till_number = TILL_PAYS

    def test_portal_pays_from_the_till(self):
        with self._settling_in_background(initiator=True):
            self.start_tour('/web/login', 'muchiri_mpesa_portal_pay_from_till', timeout=120)
        self.env.invalidate_all()
        tx = self.quotation.transaction_ids.sudo()
        self.assertEqual(len(tx), 1)
        self.assertEqual((tx.state, tx.mpesa_b2b_till, tx.mpesa_settled_by), ('done', TILL_PAYS, 'status'))
        self.assertFalse(self.simulator.pushes, "no prompt went to a phone")
        self.assertEqual(self.simulator.b2b_checkout(tx.provider_reference)['primaryShortCode'], TILL_PAYS)
        self.assertEqual(self.quotation.state, 'sale')
        self.assertEqual(tx.payment_id.amount, 4500)
