# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""The guards of `_process_notification_data`, fed a notification dict directly, as Odoo's own
providers test theirs (no HTTP, no settlement job): what a prompt's answer does to its transaction.
"""
from odoo.exceptions import ValidationError
from odoo.tests import tagged
from odoo.tools import mute_logger

from .common import TX_LOGGER, MpesaCommon


@tagged('post_install', '-at_install')
class TestNotificationData(MpesaCommon):
    """`payment.transaction._handle_notification_data('mpesa', data)` on a pending prompt."""

    def _payments(self, tx):
        return self.env['account.payment'].search([('payment_transaction_id', '=', tx.id)])

    def test_the_transaction_is_found_by_its_provider_and_checkout_request(self):
        tx = self._prompt_on_phone()
        other = self._prompt_on_phone()
        found = self.env['payment.transaction']._get_tx_from_notification_data('mpesa', self._notification_data(tx))
        self.assertEqual(found, tx)
        self.assertNotEqual(found, other)

    def test_success_is_done_with_its_receipt(self):
        tx = self._prompt_on_phone()
        self.assertEqual(self._handle_notification(self._notification_data(tx, receipt='NTF0000010')), tx)
        self.assertEqual(tx.state, 'done')
        self.assertEqual((tx.mpesa_receipt_number, tx.mpesa_paid_amount), ('NTF0000010', 4500))
        self.assertEqual((tx.mpesa_receipt_status, tx.mpesa_settled_by), ('confirmed', 'callback'))
        self.assertEqual(tx.mpesa_result_code, '0')
        self.assertIn('NTF0000010', tx.state_message)
        self.assertEqual(tx.mpesa_ledger_id.name, 'NTF0000010', "the receipt lands in the ledger")

    def test_a_short_amount_is_never_done(self):
        tx = self._prompt_on_phone()
        for amount in (4499, 4499.99, 1, 0):
            with self.subTest(amount=amount), self.assertRaisesRegex(ValidationError, 'was asked'):
                self._handle_notification(self._notification_data(tx, amount=amount))
            self.assertEqual(tx.state, 'pending', "never confirmed on a short amount")
            self.assertFalse(tx.mpesa_receipt_number)
        with self.assertRaisesRegex(ValidationError, 'was asked'):
            self._handle_notification(dict(self._notification_data(tx), amount=None))
        self.assertEqual(tx.state, 'pending', "nor on no amount at all")
        self.assertFalse(self._payments(tx))

    def test_cancelled_is_canceled(self):
        tx = self._prompt_on_phone()
        self._handle_notification(self._notification_data(tx, code=1032))
        self.assertEqual(tx.state, 'cancel')
        self.assertEqual(tx.mpesa_result_code, '1032')
        self.assertFalse(tx.mpesa_receipt_number)

    def test_insufficient_funds_is_not_paid(self):
        tx = self._prompt_on_phone()
        self._handle_notification(self._notification_data(tx, code=1))
        self.assertEqual(tx.state, 'error', "a failure, not the customer's choice")
        self.assertEqual(tx.mpesa_result_code, '1')
        self.assertIn("balance is too low", tx.state_message)
        self.assertFalse(tx.mpesa_receipt_number)

    def test_an_unknown_checkout_request_is_refused(self):
        tx = self._prompt_on_phone()
        for data in (
            self._notification_data(tx, checkout_request_id='ws_CO_nobody_sent_this'),
            self._notification_data(tx, checkout_request_id=None),
            # The right CheckoutRequestID on another provider's path.
            self._notification_data(tx, provider_id=self._second_provider().id),
        ):
            with self.subTest(data=data), self.assertRaisesRegex(ValidationError, 'no transaction matches'):
                self._handle_notification(data)
        self.assertEqual(tx.state, 'pending')

    def test_the_same_answer_twice_pays_once(self):
        tx = self._prompt_on_phone()
        data = self._notification_data(tx, receipt='NTF0000020')
        self._handle_notification(data)
        settled_at = tx.mpesa_settled_at
        self._handle_notification(dict(data))
        self.assertEqual(tx.state, 'done')
        self.assertEqual(tx.mpesa_settled_at, settled_at, "the second one changed nothing")
        tx._mpesa_post_process()
        self._handle_notification(dict(data))
        tx._mpesa_post_process()
        self.assertEqual(len(self._payments(tx)), 1, "one payment")
        self.assertEqual(self.env['muchiri.mpesa.ledger'].search_count([('name', '=', 'NTF0000020')]), 1)
        self.assertEqual(self.env['payment.transaction'].search_count([('mpesa_receipt_number', '=', 'NTF0000020')]), 1)

    @mute_logger(TX_LOGGER)
    def test_the_receipt_of_another_payment_is_refused(self):
        paid = self._prompt_on_phone()
        self._handle_notification(self._notification_data(paid, receipt='NTF0000030'))
        tx = self._prompt_on_phone(order=self.quotation.copy())
        with self.assertRaisesRegex(ValidationError, 'already recorded'):
            self._handle_notification(self._notification_data(tx, receipt='NTF0000030'))
        self.assertEqual(tx.state, 'pending')

    def test_a_done_transaction_stays_done_on_a_failure(self):
        tx = self._prompt_on_phone()
        self._handle_notification(self._notification_data(tx, receipt='NTF0000040'))
        for code in (1032, 1, 2001, 1037):
            with self.subTest(code=code):
                self._handle_notification(self._notification_data(tx, code=code))
                self.assertEqual(tx.state, 'done')
                self.assertEqual((tx.mpesa_receipt_number, tx.mpesa_result_code), ('NTF0000040', '0'))
        self._handle_notification(tx._mpesa_notification(1032, "Request cancelled by user", 'query'))
        self.assertEqual(tx.state, 'done', "nor by a query")
