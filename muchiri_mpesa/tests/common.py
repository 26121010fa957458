# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""What the tests share: a KES quotation of a distributor, an M-Pesa provider that talks to a real Daraja
simulator on loopback, the simulator's callbacks reaching this Odoo's real HTTP server, and Daraja's
bodies built as Daraja sends them.

- MpesaCommon: the STK Push flow (a prompt, its callback, its query, the settlement job).
- MpesaInitiatorCommon: the provider's initiator is the simulator's (Reversal, Transaction Status).
- MpesaLedgerCommon: KES invoices, and C2B bodies posted to the real paybill routes.
- MpesaPaybillCommon: paybill money confirmed by Transaction Status or Pull.
"""
import contextlib
import copy
import itertools
import json
import threading
import time
from datetime import datetime
from unittest.mock import Mock
from urllib.parse import urlsplit

from odoo import fields, http
from odoo.fields import Command
from odoo.modules import module
from odoo.tests import TEST_CURSOR_COOKIE_NAME, new_test_user
from odoo.tests import common as odoo_test_common

from odoo.addons.account_payment.tests.common import AccountPaymentCommon
from odoo.addons.muchiri_mpesa import const, daraja
from odoo.addons.muchiri_mpesa.daraja.simulator import C2B_CONFIRMATION, DarajaSimulator
from odoo.addons.muchiri_mpesa.daraja.simulator.c2b import LOST_CONFIRMATION
from odoo.addons.payment.tests.http_common import PaymentHttpCommon
from odoo.addons.sale.tests.common import SaleCommon

SIM_KEY = 'test-consumer-key'
SIM_SECRET = 'test-consumer-secret'
SIM_SHORTCODE = '174379'
SIM_PASSKEY = 'bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919'

# The simulator's outcomes, chosen by phone number (see the README).
# Seconds before the simulated customer answers: the test reads the pending state well before.
CALLBACK_DELAY = 1.0

PHONE_SUCCESS = '254708374149'
PHONE_CANCELLED = '254700000001'
PHONE_NO_ANSWER = '254700000002'
PHONE_NO_FUNDS = '254700000003'
PHONE_WRONG_PIN = '254700000004'
PHONE_CALLBACK_LOST = '254700000005'
PHONE_CALLBACK_TWICE = '254700000006'
PHONE_CALLBACK_LATE = '254700000007'
PHONE_CALLBACK_EARLY = '254700000008'
PHONE_LOCKED = '254700000009'

# The distributor's own M-Pesa number in the tests that find the payer by it: no other contact has
# it (demo data gives its contacts the simulator's success number, which the distributor has too).
PAYER_PHONE = '254711222333'

_receipts = itertools.count(1)
_prompts = itertools.count(1)

TX_LOGGER = 'odoo.addons.muchiri_mpesa.models.payment_transaction'
EVENT_LOGGER = 'odoo.addons.muchiri_mpesa.models.mpesa_event'


class MpesaCommon(AccountPaymentCommon, SaleCommon, PaymentHttpCommon):
    """A KES quotation of a distributor, an M-Pesa provider that talks to a real Daraja simulator
    on loopback, and the simulator's callbacks reaching this Odoo's real HTTP server."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.simulator = DarajaSimulator(
            host='127.0.0.1', port=0, consumer_key=SIM_KEY, consumer_secret=SIM_SECRET,
            shortcode=SIM_SHORTCODE, passkey=SIM_PASSKEY, callback_delay=CALLBACK_DELAY, prompt_timeout=0.5,
            late_callback_delay=4.0, callback_timeout=3.0,
            # As Daraja does: every URL we hand it must avoid the words it refuses.
            reject_mpesa_in_callback_url=True,
        )
        cls.simulator.start()
        cls.addClassCleanup(cls.simulator.stop)

        cls.currency_kes = cls.setup_other_currency('KES', rates=[('1900-01-01', 100.0)])
        cls.provider = cls._prepare_provider('mpesa', update_values={
            'mpesa_consumer_key': SIM_KEY,
            'mpesa_consumer_secret': SIM_SECRET,
            'mpesa_shortcode': SIM_SHORTCODE,
            'mpesa_passkey': SIM_PASSKEY,
            'mpesa_api_url': cls.simulator.base_url,
            'mpesa_callback_base_url': cls.base_url(),
            'mpesa_ip_check': 'log',
            'mpesa_push_cooldown': 120,
            'maximum_amount': 150000,
            'is_published': True,
            'available_country_ids': [Command.clear()],
        })
        cls.payment_method = cls.env.ref('payment.payment_method_mpesa')
        cls.payment_method.active = True
        cls.payment_method_id = cls.payment_method.id

        cls.distributor_user = cls._create_new_portal_user(login='distributor', name='Wanjiku Distributors')
        cls.distributor = cls.distributor_user.partner_id
        cls.distributor.write({
            'is_distributor': True, 'email': 'wanjiku@example.com', 'mobile': '0708 374 149',
        })
        pricelist = cls.env['product.pricelist'].create({
            'name': "KES", 'currency_id': cls.currency_kes.id,
        })
        cls.quotation = cls.env['sale.order'].create({
            'partner_id': cls.distributor.id,
            'pricelist_id': pricelist.id,
            'require_payment': True,
            'require_signature': False,
            'prepayment_percent': 1.0,
            'order_line': [Command.create({
                'product_id': cls.product.id, 'product_uom_qty': 3, 'price_unit': 1500.0,
                'tax_id': [Command.clear()],
            })],
        })
        cls.currency = cls.currency_kes
        cls.partner = cls.distributor
        cls.amount = cls.quotation.amount_total

    @classmethod
    def _request_handler(cls, s, r, /, **kw):
        """Odoo's guard against external requests compares the timeout with a number; the Daraja
        client sends a (connect, read) pair.  Loopback requests go out unchanged."""
        timeout = kw.get('timeout')
        if isinstance(timeout, tuple) and urlsplit(r.url).hostname in ('127.0.0.1', 'localhost'):
            return odoo_test_common._super_send(s, r, **kw)
        return super()._request_handler(s, r, **kw)

    def setUp(self):
        super().setUp()
        self.simulator.reset()  # Pending prompts of a previous test would lock its phones.

    # === DARAJA'S BODIES === #
    # As Daraja posts them (docs/design.md, 3. Daraja facts).  The helpers below deep-copy one and set
    # the few fields that vary: the ids of the request answered, the amount, the receipt.

    # STK callbacks, to the CallBackURL of a prompt: paid, cancelled by the customer, too low a balance.
    stk_success_data = {'Body': {'stkCallback': {
        'MerchantRequestID': "29115-34620561-1",
        'CheckoutRequestID': "ws_CO_191220191020363925",
        'ResultCode': 0,
        'ResultDesc': "The service request is processed successfully.",
        'CallbackMetadata': {'Item': [
            {'Name': 'Amount', 'Value': 4500.0},
            {'Name': 'MpesaReceiptNumber', 'Value': "SIM1234567"},
            {'Name': 'Balance'},
            {'Name': 'TransactionDate', 'Value': 20261126150000},  # Kenya time.
            {'Name': 'PhoneNumber', 'Value': 254708374149},
        ]},
    }}}
    stk_cancelled_data = {'Body': {'stkCallback': {
        'MerchantRequestID': "29115-34620561-1",
        'CheckoutRequestID': "ws_CO_191220191020363925",
        'ResultCode': 1032,
        'ResultDesc': "Request cancelled by user",
    }}}
    stk_no_funds_data = {'Body': {'stkCallback': {
        'MerchantRequestID': "29115-34620561-1",
        'CheckoutRequestID': "ws_CO_191220191020363925",
        'ResultCode': 1,
        'ResultDesc': "The balance is insufficient for the transaction.",
    }}}

    # C2B, to the shortcode's ValidationURL (asked before the payment: no balance yet) and its
    # ConfirmationURL (after it).  The MSISDN is hashed.
    c2b_validation_data = {
        'TransactionType': "Pay Bill",
        'TransID': "TST0000000",
        'TransTime': "20260115093012",
        'TransAmount': "4500.00",
        'BusinessShortCode': SIM_SHORTCODE,
        'BillRefNumber': "",
        'InvoiceNumber': "",
        'OrgAccountBalance': "",
        'ThirdPartyTransID': "",
        'MSISDN': "",
        'FirstName': "Wanjiku",
        'MiddleName': "",
        'LastName': "",
    }
    c2b_confirmation_data = dict(c2b_validation_data, OrgAccountBalance="49197.00")

    # Initiator results, to the ResultURL of a Reversal and of a Transaction Status query.
    reversal_result_data = {'Result': {
        'ResultType': 0,
        'ResultCode': 0,
        'ResultDesc': "The service request is processed successfully.",
        'OriginatorConversationID': "29115-34620561-9",
        'ConversationID': "AG_20261126_00004e48cf7e3533f581",
        'TransactionID': "SIMREV0001",
        'ResultParameters': {'ResultParameter': [
            {'Key': 'DebitAccountBalance', 'Value': "Utility Account|KES|45500.00|45500.00|0.00|0.00"},
            {'Key': 'Amount', 'Value': 4500.0},
            {'Key': 'TransCompletedTime', 'Value': 20261126150500},
            {'Key': 'OriginalTransactionID', 'Value': "SIM1234567"},
            {'Key': 'Charge', 'Value': 0.0},
            {'Key': 'CreditPartyPublicName', 'Value': f"{PHONE_SUCCESS} - Wanjiku"},
            {'Key': 'DebitPartyPublicName', 'Value': f"{SIM_SHORTCODE} - Muchiri Shop"},
        ]},
        'ReferenceData': {'ReferenceItem': {
            'Key': 'QueueTimeoutURL',
            'Value': "https://internalsandbox.safaricom.co.ke/mpesa/reversalresults/v1/submit",
        }},
    }}
    status_result_data = {'Result': {
        'ResultType': 0,
        'ResultCode': 0,
        'ResultDesc': "The service request is processed successfully.",
        'OriginatorConversationID': "29115-34620561-10",
        'ConversationID': "AG_20261126_00004e48cf7e3533f582",
        'TransactionID': "SIM0000000",
        'ResultParameters': {'ResultParameter': [
            {'Key': 'DebitPartyName', 'Value': f"{PHONE_SUCCESS} - Wanjiku"},
            {'Key': 'CreditPartyName', 'Value': f"{SIM_SHORTCODE} - Muchiri Shop"},
            {'Key': 'TransactionStatus', 'Value': "Completed"},
            {'Key': 'Amount', 'Value': 4500.0},
            {'Key': 'ReceiptNo', 'Value': "SIM1234567"},
        ]},
        'ReferenceData': {'ReferenceItem': {
            'Key': 'QueueTimeoutURL',
            'Value': "https://internalsandbox.safaricom.co.ke/mpesa/transactionstatusresults/v1/submit",
        }},
    }}

    # === HELPERS === #

    def _result_known(self, tx):
        """Whether the simulated customer has answered (the query then gives the final result)."""
        return self.simulator.transaction(tx.provider_reference).is_final()

    def _start_portal_payment(self, order=None, login='distributor'):
        """Odoo's own transaction route, as the portal's payment form calls it.

        :return: the processing values given to the browser
        """
        order = order or self.quotation
        with self.registry.test_lock:  # See _get_tx.
            self.authenticate(login, login)
            params = {
                'provider_id': self.provider.id,
                'payment_method_id': self.payment_method_id,
                'token_id': None,
                'amount': order.amount_total,
                'flow': 'direct',
                'tokenization_requested': False,
                'landing_route': order.get_portal_url(),
                'access_token': order._portal_ensure_token(),
            }
        return self.make_jsonrpc_request(self._build_url(f'/my/orders/{order.id}/transaction'), params)

    def _stk_push(self, processing_values, phone):
        """Our route, as the M-Pesa inline form calls it after the transaction route."""
        return self.make_jsonrpc_request(self._build_url('/payment/mpesa/stk_push'), {
            'reference': processing_values['reference'],
            'phone': phone,
            'access_token': processing_values['mpesa_access_token'],
        })

    def _stk_push_refusal(self, processing_values, phone):
        """The message the payment form shows when our route refuses the push."""
        response = self.url_open(self._build_url('/payment/mpesa/stk_push'), data=json.dumps({
            'jsonrpc': '2.0', 'method': 'call', 'id': 0, 'params': {
                'reference': processing_values['reference'],
                'phone': phone,
                'access_token': processing_values['mpesa_access_token'],
            },
        }), headers={'Content-Type': 'application/json'})
        answer = response.json()
        self.assertNotIn('error', answer, "a refusal is an answer of the route, not a server error")
        message = answer['result'].get('error')
        self.assertTrue(message, "the push was refused")
        return message

    def _get_tx(self, reference):
        # Under the server's lock: a callback may be running on the shared connection right now.
        with self.registry.test_lock:
            return super()._get_tx(reference).sudo()

    def _pay_from_portal(self, phone, order=None):
        values = self._start_portal_payment(order)
        result = self._stk_push(values, phone)
        return self._get_tx(values['reference']), result

    def _settle_callbacks(self):
        """Run the settlement job, as the cron Odoo wakes after each callback would (no cron runs
        in Odoo's tests).  Under the lock the test server holds while it serves a request."""
        with self.registry.test_lock:
            self.env['muchiri.mpesa.event'].sudo()._cron_mpesa_settle_callbacks()
            # Then Odoo's post-processing job, which the settlement wakes (less its commits).
            self.env.invalidate_all()
            Transaction = self.env['payment.transaction'].sudo()
            for tx in Transaction.search([('provider_code', '=', 'mpesa'), ('is_post_processed', '=', False),
                                          ('state', 'in', ('done', 'cancel', 'error'))]):
                tx._mpesa_post_process()
            self.env.invalidate_all()

    @contextlib.contextmanager
    def _settling_in_background(self, interval=0.3, initiator=False):
        """While a browser runs a tour, settle received callbacks as Odoo's cron worker would;
        with `initiator`, run the initiator job too (Transaction Status, which proves a till's payment)."""
        stop = threading.Event()

        def run():
            while not stop.wait(interval):
                self._settle_callbacks()
                if initiator:
                    with self.registry.test_lock:
                        self.env['payment.transaction'].sudo()._cron_mpesa_initiator()
                        self.env.invalidate_all()

        thread = threading.Thread(target=run, name='mpesa-settlement', daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=30)

    def _wait(self, predicate, timeout=10.0, message="condition", settle=True):
        """Wait for something Odoo's HTTP server does in its own thread, running the settlement
        job meanwhile (unless `settle` is False).

        The server's requests share this test's database connection: read it only under the lock
        the server holds while it handles a request.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if settle:
                self._settle_callbacks()
            with self.registry.test_lock:
                self.env.invalidate_all()
                if predicate():
                    return
            time.sleep(0.05)
        self.fail(f"Timed out waiting for {message}")

    def _wait_callbacks(self, tx, count=1, timeout=10.0):
        """Wait until the simulator's callbacks for `tx` were answered by Odoo, and settled."""
        self.simulator.wait_for_callback(tx.provider_reference, count=count, timeout=timeout)
        self._wait(lambda: True)

    def _wait_final(self, tx, callbacks=1):
        self._wait_callbacks(tx, callbacks)
        self.assertNotIn(tx.state, ('draft', 'pending'), f"{tx.reference} is settled")

    def _post_callback(self, body, secret=None, raw=None, settle=True, route=const.LNM_ROUTES['stk']):
        """POST a callback to Odoo as Daraja does (plain JSON, no JSON-RPC envelope), then run the
        settlement job that the callback wakes (unless `settle` is False)."""
        secret = secret or self.provider.mpesa_callback_secret
        url = self._build_url(route.replace('<string:secret>', secret))
        data = raw if raw is not None else json.dumps(body)
        response = self.opener.post(url, data=data, headers={'Content-Type': 'application/json'},
                                    timeout=20)
        if settle:
            self._settle_callbacks()
        return response

    def _events(self, **domain):
        with self.registry.test_lock:  # See _get_tx.
            return self.env['muchiri.mpesa.event'].search(
                [(key, '=', value) for key, value in domain.items()]
            )

    def _pending_tx(self, phone=PHONE_CALLBACK_LOST, order=None):
        values = self._start_portal_payment(order)
        self._stk_push(values, phone)
        tx = self._get_tx(values['reference'])
        self.assertEqual(tx.state, 'pending')
        return tx

    def _answered(self, tx):
        self._wait(lambda: self._result_known(tx), message="the customer's answer", settle=False)

    def _body(self, tx, code=0, amount=4500, receipt='SIM1234567', checkout_request_id=None, phone=None):
        """Daraja's callback for the prompt of `tx`: `stk_success_data` when `code` is 0, else a failure
        with that ResultCode (`stk_no_funds_data` for 1, `stk_cancelled_data` for any other)."""
        if code == 0:
            return self._stk_body(self.stk_success_data, tx, checkout_request_id, Amount=amount,
                                  MpesaReceiptNumber=receipt, PhoneNumber=phone or tx.mpesa_phone)
        return self._stk_body(self.stk_no_funds_data if code == 1 else self.stk_cancelled_data, tx,
                              checkout_request_id, ResultCode=code)

    @staticmethod
    def _stk_body(sample, tx, checkout_request_id=None, ResultCode=None, **items):
        """A deep copy of `sample` for the prompt of `tx`; `items` set the CallbackMetadata items of
        those names (None leaves one out, as Daraja leaves out what it does not know)."""
        body = copy.deepcopy(sample)
        callback = body['Body']['stkCallback']
        callback['MerchantRequestID'] = tx.mpesa_merchant_request_id or '1-2-3'
        callback['CheckoutRequestID'] = checkout_request_id or tx.provider_reference
        if ResultCode is not None:
            callback['ResultCode'] = ResultCode
        if 'CallbackMetadata' in callback:
            metadata = callback['CallbackMetadata']
            for item in metadata['Item']:
                if item['Name'] in items:
                    item['Value'] = items[item['Name']]
            metadata['Item'] = [item for item in metadata['Item'] if 'Value' not in item or item['Value'] is not None]
            for item in metadata['Item']:  # Numbers, as Daraja writes them.
                if item['Name'] == 'Amount':
                    item['Value'] = float(item['Value'])
                elif item['Name'] == 'PhoneNumber' and str(item['Value']).isdigit():
                    item['Value'] = int(item['Value'])
        return body

    @staticmethod
    def _initiator_result(sample, conversation_id, originator_id, transaction_id=None, code=None, **parameters):
        """A deep copy of `sample` (`reversal_result_data`, `status_result_data`) answering the
        request Daraja accepted with these ids; `parameters` set the ResultParameters of those Keys."""
        body = copy.deepcopy(sample)
        result = body['Result']
        result.update(OriginatorConversationID=originator_id, ConversationID=conversation_id)
        if transaction_id is not None:
            result['TransactionID'] = transaction_id
        if code is not None:
            result['ResultCode'] = code
        for parameter in result['ResultParameters']['ResultParameter']:
            if parameter['Key'] in parameters:
                parameter['Value'] = parameters[parameter['Key']]
        return body

    def _prompt_on_phone(self, amount=4500, order=None):
        """A pending transaction of `order` (the quotation) as its push leaves it, without HTTP:
        the prompt is on the phone, its answer is to come."""
        number = next(_prompts)
        tx = self._create_transaction(
            'direct', reference=f'PROMPT-{number}', amount=amount,
            sale_order_ids=[Command.set((order or self.quotation).ids)],
        )
        tx.write({
            'provider_reference': f'ws_CO_prompt_{number}',
            'mpesa_merchant_request_id': f'29115-34620561-{number}',
            'mpesa_phone': PHONE_SUCCESS,
            'mpesa_requested_amount': int(amount),
            'mpesa_push_sent_at': fields.Datetime.now(),
        })
        tx._set_pending()
        return tx

    def _notification_data(self, tx, code=0, amount=None, receipt='NTF0000001', **values):
        """The notification dict of a confirmed callback for `tx` (`_mpesa_callback_notification`):
        a success pays what the prompt asked unless `amount` says otherwise."""
        success = code == 0
        return tx._mpesa_notification(
            code, "The service request is processed successfully." if success else "Request cancelled by user",
            'callback',
            amount=(tx.mpesa_requested_amount if amount is None else amount) if success else None,
            receipt_number=receipt if success else None,
            paid_at=datetime(2026, 11, 26, 12, 0, 0) if success else None,
            confirmed=True,
            **values,
        )

    def _handle_notification(self, data):
        """M-Pesa's answer, handled as the settlement job hands a trusted callback to Odoo."""
        return self.env['payment.transaction'].sudo()._handle_notification_data('mpesa', data)

    def _queries(self):
        return len(self.simulator.requests_for('stk_query'))

    def _kept_unmatched(self, tx, **body):
        """A success callback kept before its transaction held the CheckoutRequestID."""
        checkout_id = tx.provider_reference
        tx.provider_reference = f'{checkout_id}-not-yet'
        self._post_callback(self._body(tx, checkout_request_id=checkout_id, **body))
        tx.provider_reference = checkout_id
        event = self._events(kind='stk_callback', checkout_request_id=checkout_id)
        self.assertEqual(event.state, 'unmatched')
        return event

    def _second_provider(self, **values):
        return self.provider.copy({
            'name': "M-Pesa (second shortcode)",
            'mpesa_consumer_key': SIM_KEY, 'mpesa_consumer_secret': SIM_SECRET,
            'mpesa_shortcode': SIM_SHORTCODE, 'mpesa_passkey': SIM_PASSKEY,
            'mpesa_api_url': self.simulator.base_url, 'mpesa_callback_base_url': self.base_url(),
            **values,
        })


class MpesaInitiatorCommon(MpesaCommon):
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
            self.assertEqual(wizard.provider_code, 'mpesa', "the form says M-Pesa reverses the whole payment")
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


class MpesaLedgerCommon(MpesaCommon):
    """KES invoices of the distributor, and C2B bodies posted to this Odoo's real routes as Daraja posts them."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.provider.mpesa_invoice_on_payment = True  # A paid order is invoiced.
        # No initiator and no Pull: paybill money is booked on the source check, which refuses any
        # address but the test server's (the tests of the matching rules).  The confirmation by
        # Transaction Status and Pull has tests of its own.
        cls.provider.write({
            'mpesa_ip_check': 'enforce',
            'mpesa_allowed_ips': '\n'.join(['127.0.0.1', *const.SAFARICOM_CALLBACK_IPS]),
        })
        # A login of its own: demo data has an 'accountant' already.
        cls.accountant = cls.env['res.users'].create({
            'name': "Akinyi Accountant", 'login': 'mpesa_ledger_accountant', 'password': 'mpesa_ledger_accountant',
            'email': 'akinyi@example.com',
            'groups_id': [Command.set([cls.env.ref('account.group_account_invoice').id,
                                       cls.env.ref('base.group_user').id])],
        })

    # === DOCUMENTS === #

    def _invoice(self, amount=4500.0, partner=None, company=None):
        """A posted KES customer invoice."""
        env = self.env(context=dict(self.env.context, allowed_company_ids=(company or self.env.company).ids))
        invoice = env['account.move'].create({
            'move_type': 'out_invoice',
            'partner_id': (partner or self.distributor).id,
            'currency_id': self.currency_kes.id,
            'company_id': (company or self.env.company).id,
            'invoice_line_ids': [Command.create({
                'name': "Maize flour", 'quantity': 1, 'price_unit': amount, 'tax_ids': [Command.clear()],
            })],
        })
        invoice.action_post()
        return invoice

    def _own_number(self):
        """Give the distributor a number no other contact has; the payer's MSISDN to pay from."""
        self.distributor.mobile = '0711 222 333'
        return PAYER_PHONE

    # === DARAJA'S BODIES === #

    @staticmethod
    def _receipt():
        return f"TST{next(_receipts):07d}"

    def _c2b_body(self, amount, bill_ref, receipt=None, phone=PHONE_SUCCESS, hashed=True, shortcode=SIM_SHORTCODE,
                  sample=None):
        """`c2b_confirmation_data` (or `sample`) for a payment of `amount` to the account `bill_ref`."""
        return dict(
            sample or self.c2b_confirmation_data,
            TransID=receipt or self._receipt(),
            TransAmount=f"{amount:.2f}" if isinstance(amount, (int, float)) else amount,
            BusinessShortCode=shortcode,
            BillRefNumber=bill_ref,
            MSISDN=daraja.hash_msisdn(phone) if hashed else phone,
        )

    def _post_c2b(self, body, kind='c2b_confirmation', secret=None, raw=None):
        """POST to one of the provider's C2B routes, then run the jobs the request wakes."""
        self.env.flush_all()  # The request reads the database on a cursor of its own.
        return self._post_callback(body, secret=secret, raw=raw, route=const.LNM_ROUTES[kind])

    def _confirm(self, amount, bill_ref, **kwargs):
        """A confirmation posted to Odoo; the ledger row it made."""
        body = self._c2b_body(amount, bill_ref, **kwargs)
        response = self._post_c2b(body)
        self.assertEqual(response.status_code, 200, response.text)
        self.assertEqual(response.json(), {'ResultCode': 0, 'ResultDesc': "Accepted"})
        return self._row(body['TransID'])

    def _confirm_by_hand(self, row):
        """An accounting manager confirms a row awaiting confirmation against the statement."""
        manager = new_test_user(self.env, login=f'mpesa_manager_{row.id}',
                                groups='base.group_user,account.group_account_manager')
        with self.registry.test_lock:
            row.with_user(manager).action_mpesa_confirm_by_hand()
            self.env.invalidate_all()

    def _row(self, receipt):
        with self.registry.test_lock:
            self.env.invalidate_all()
            return self.env['muchiri.mpesa.ledger'].sudo().search([('name', '=', receipt)])

    def _raw(self, body):
        return json.dumps(body)


class MpesaPaybillCommon(MpesaLedgerCommon):
    """Paybill money that Transaction Status or a Pull row confirms: the source check only logs."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # The default of a provider: the source check only logs unknown addresses.
        cls.provider.write({'mpesa_ip_check': 'log'})
        cls.manager = new_test_user(
            cls.env, login='mpesa_confirm_manager', groups='base.group_user,account.group_account_manager',
        )

    def setUp(self):
        super().setUp()
        self.provider.action_mpesa_c2b_register()

    def _with_initiator(self):
        self.provider.write({
            'mpesa_initiator_name': self.simulator.initiator_name,
            'mpesa_initiator_password': self.simulator.initiator_password,
            'mpesa_initiator_certificate': self.simulator.certificate_pem,
        })

    def _run_initiator_job(self):
        """The initiator job, as the cron the confirmation wakes would run it (no cron runs in tests)."""
        with self.registry.test_lock:
            self.env['payment.transaction'].sudo()._cron_mpesa_initiator()
            self.env.invalidate_all()
        self._settle_callbacks()  # Odoo's post-processing, which the confirmation runs or wakes.

    def _status_requests(self):
        return [request for request in self.simulator.initiator_requests if request['api'] == 'transaction_status']

    def _confirm_by_status(self, results=1):
        """The job asks Transaction Status; Daraja's result reaches Odoo; the job settles it."""
        self._run_initiator_job()
        self.simulator.wait_for_deliveries('initiator_result', count=results, timeout=15)
        self._run_initiator_job()

    def _lost_payment(self, amount, bill_ref):
        """A real payment to the paybill whose confirmation the simulator never sends: its receipt
        is real, so a body forged with it can be told apart only by what Daraja says of it."""
        self.env.flush_all()
        trans_id = self.simulator.c2b_pay(amount, LOST_CONFIRMATION, bill_ref)
        self.assertEqual(self.simulator.wait_for_c2b(trans_id)['state'], 'completed')
        return trans_id

    def _pay(self, amount, bill_ref):
        """A phone pays the paybill; the simulator's confirmation reaches Odoo."""
        self.env.flush_all()
        trans_id = self.simulator.c2b_pay(amount, PHONE_SUCCESS, bill_ref)
        self.assertEqual(self.simulator.wait_for_c2b(trans_id)['state'], 'completed')
        self.simulator.wait_for_deliveries(C2B_CONFIRMATION, count=1, reference=trans_id, timeout=10)
        self._settle_callbacks()
        return trans_id

    def assertPaysNothing(self, row, order=None, invoice=None):
        row.invalidate_recordset()
        self.assertEqual(row.state, 'awaiting', row.note)
        self.assertFalse(row.confirmation)
        self.assertFalse(row.transaction_ids, "no transaction, so no payment")
        if order:
            order.invalidate_recordset()
            self.assertIn(order.state, ('draft', 'sent'), "the order is not confirmed")
            self.assertFalse(order.transaction_ids)
        if invoice:
            invoice.invalidate_recordset()
            self.assertEqual(invoice.payment_state, 'not_paid')


class DarajaDuringToursMixin:
    """For the tour classes: the quotation is sent, Daraja answers slowly enough for the status
    page to show the wait, and its posts reach Odoo while the browser runs."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # As the salesperson does: the distributor then follows it and finds it in /my/quotes.
        cls.quotation.action_quotation_sent()

    def setUp(self):
        super().setUp()
        # Long enough for the status page to show the pending state before the callback comes,
        # even when the first render of the page compiles its templates (about 1.5 s here).
        self.patch(self.simulator.settings, 'callback_delay', 3.0)

    def check_test_cursor(self, operation):
        """Let Daraja's callbacks and results in while the browser runs.

        Once a tour starts, Odoo's test server refuses (400) every request without the browser's
        test cookie; the simulator, like Daraja, sends none.  The post is just another request of
        this test: it is served under the same lock, on the same cursor.
        """
        request = http.request
        if (
            request and not isinstance(request, Mock)
            and request.httprequest.path.startswith(('/payment/mpesa/callback/', const.LNM_PREFIX + '/'))
            and not request.httprequest.cookies.get(TEST_CURSOR_COOKIE_NAME)
            and self.http_request_key  # Not between two tests.
            and module.current_test is self
        ):
            return
        super().check_test_cursor(operation)
