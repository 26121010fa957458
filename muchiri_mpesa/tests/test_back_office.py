# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from unittest.mock import patch

from odoo.exceptions import UserError, ValidationError
from odoo.tests import Form, tagged

from .common import PHONE_CALLBACK_LOST, PHONE_LOCKED, PHONE_NO_ANSWER, PHONE_SUCCESS, MpesaCommon


@tagged('post_install', '-at_install')
class TestBackOffice(MpesaCommon):
    """A salesman requests M-Pesa payments from the order form and checks their status."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.quotation.user_id = cls.sale_user  # A salesman sees his own orders.

    # === HELPERS === #

    def _order(self):
        return self.quotation.with_user(self.sale_user)

    def _wizard(self, **values):
        """The wizard as the order's "Request M-Pesa payment" button opens it, filled with `values`."""
        action = self._order().action_mpesa_request_payment()
        wizard_model = self.env[action['res_model']].with_user(self.sale_user).with_context(**action['context'])
        with Form(wizard_model) as form:
            for name, value in values.items():
                setattr(form, name, value)
        return form.record

    def _send(self, wizard):
        """Confirm the wizard.  The simulator's callback waits for the test lock; the flush is what
        the request's commit would do before the callback reads the transaction."""
        with self.registry.test_lock:
            action = wizard.action_send()
            self.env.flush_all()
        return action

    def _assert_refused(self, wizard, message):
        """Confirming `wizard` raises a ValidationError saying `message` (Odoo's assertRaises rolls
        back to a savepoint, as the request's rollback would; assertRaisesRegex does not)."""
        with self.assertRaises(ValidationError) as caught:
            self._send(wizard)
        self.assertIn(message, str(caught.exception))

    def _check_status(self):
        with self.registry.test_lock:
            action = self._order().action_mpesa_check_status()
            self.env.flush_all()
        return action

    def _tx(self):
        return self.quotation.sudo().transaction_ids

    @staticmethod
    def _in_html(text):
        """`text` as the chatter's HTML body holds it (Odoo's amounts have a no-break space)."""
        return text.replace('\xa0', '&nbsp;')

    def _notes(self):
        self.quotation.invalidate_recordset(['message_ids'])
        return '\n'.join(self.quotation.message_ids.mapped('body'))

    # === REQUEST === #

    def test_buttons_only_where_a_prompt_can_be_sent(self):
        arch = self._order().get_views([(False, 'form')])['views']['form']['arch']
        self.assertIn('action_mpesa_request_payment', arch, "the salesman sees the buttons")
        self.assertIn('action_mpesa_check_status', arch)
        self.assertTrue(self._order().mpesa_can_request_payment)

        other = self.quotation.copy({
            'partner_id': self.partner_a.id, 'partner_invoice_id': self.partner_a.id,
            'user_id': self.sale_user.id,
        })
        other = other.with_user(self.sale_user)
        self.assertFalse(other.mpesa_can_request_payment, "not a distributor")
        with self.assertRaises(UserError) as caught:
            other.action_mpesa_request_payment()
        self.assertIn("distributors only", str(caught.exception))

        self.quotation._action_cancel()
        self.assertFalse(self._order().mpesa_can_request_payment, "a cancelled order")
        self.assertEqual(self.simulator.pushes, [])

    def test_request_completed_by_the_customer_confirms_the_order(self):
        self.assertTrue(self._order().mpesa_can_request_payment)
        self.assertFalse(self._order().mpesa_has_pending_payment)
        wizard = self._wizard()
        self.assertEqual(wizard.phone, '0708 374 149', "the distributor's mobile")
        self.assertEqual(wizard.amount, 4500)

        action = self._send(wizard)
        self.assertEqual(action['tag'], 'display_notification')
        self.assertEqual(action['params']['type'], 'success')
        tx = self._tx()
        self.assertEqual(len(tx), 1)
        self.assertRecordValues(tx, [{
            'state': 'pending',
            'provider_id': self.provider.id,
            'payment_method_id': self.payment_method.id,
            'amount': 4500,
            'currency_id': self.currency_kes.id,
            'partner_id': self.distributor.id,
            'operation': 'online_direct',
            'mpesa_phone': PHONE_SUCCESS,
            'mpesa_requested_amount': 4500,
        }])
        self.assertTrue(tx.reference.startswith(self.quotation.name))
        self.assertEqual([push.amount for push in self.simulator.pushes], [4500])
        self.assertTrue(self._order().mpesa_has_pending_payment)
        note = self.quotation.message_ids.filtered(lambda m: 'M-Pesa prompt of' in m.body)
        self.assertIn(
            f"M-Pesa prompt of {self._in_html(tx._mpesa_format_amount(4500))} sent to 254708374149"
            f" (CheckoutRequestID {tx.provider_reference}).",
            note.body,
        )
        self.assertEqual(note.author_id, self.sale_user.partner_id)
        self.assertEqual(note.subtype_id, self.env.ref('mail.mt_note'), "an internal note")

        self._wait_final(tx)
        self.assertEqual(tx.state, 'done')
        tx._post_process()
        self.assertEqual(self.quotation.state, 'sale', "the paid quotation is confirmed")
        self.assertEqual(self.quotation.mpesa_payment_status, 'paid')
        self.assertEqual(tx.payment_id.amount, 4500)
        self.assertFalse(self._order().mpesa_can_request_payment, "nothing is left to pay")
        self.assertFalse(self._order().mpesa_has_pending_payment)
        with self.assertRaises(UserError):
            self._order().action_mpesa_request_payment()

    def test_defaults_phone_then_amount_due_after_a_partial_payment(self):
        contact = self.env['res.partner'].create({
            'name': "Wanjiku Accounts", 'parent_id': self.distributor.id, 'type': 'invoice',
            'phone': '0722 000 111',
        })
        self.quotation.partner_invoice_id = contact
        wizard = self._wizard()
        self.assertEqual(wizard.partner_id, contact)
        self.assertEqual(wizard.phone, '0722 000 111', "the invoice address's phone without a mobile")
        contact.mobile = '0711 000 222'
        self.assertEqual(self._wizard().phone, '0711 000 222', "its mobile first")
        self.quotation.mpesa_phone = PHONE_SUCCESS
        self.assertEqual(self._wizard().phone, PHONE_SUCCESS, "the order's M-Pesa phone first")

        self._send(self._wizard(amount=1000))
        tx = self._tx()
        self.assertEqual((tx.amount, tx.mpesa_requested_amount, tx.partner_id), (1000, 1000, contact))
        self.assertEqual(self.simulator.pushes[0].amount, 1000)
        self._wait_final(tx)
        tx._post_process()
        self.assertEqual(tx.state, 'done')
        self.assertEqual(self.quotation.state, 'draft', "a partial payment does not confirm it")
        self.assertTrue(self._order().mpesa_can_request_payment)
        wizard = self._wizard()
        self.assertEqual(wizard.amount_due, 3500)
        self.assertEqual(wizard.amount, 3500)

    def test_invalid_requests_change_nothing_and_send_nothing(self):
        messages = self.quotation.message_ids
        cases = [
            ({'phone': '0812 345 678'}, "not a Kenyan mobile number"),
            ({'phone': '+255 712 345 678'}, "not a Kenyan number"),
            ({'phone': '12345'}, "too few digits"),
            ({'amount': 0}, "above zero"),
            ({'amount': -100}, "above zero"),
            ({'amount': 4500.01}, "more than"),
        ]
        for values, message in cases:
            with self.subTest(**values):
                self._assert_refused(self._wizard(**values), message)
        self.provider.mpesa_prompt_max_amount = 2000
        self.provider.flush_recordset()
        self._assert_refused(self._wizard(amount=5000), "more than")  # Above one prompt and above what is due.
        self.quotation.invalidate_recordset()
        self.assertFalse(self._tx())
        self.assertEqual(self.quotation.message_ids, messages)
        self.assertEqual(self.simulator.pushes, [])

    def test_daraja_refusal_is_noted_and_shown(self):
        action = self._send(self._wizard(phone=PHONE_LOCKED))
        self.assertEqual(action['params']['type'], 'danger')
        self.assertIn("already waiting", action['params']['message'])
        tx = self._tx()
        self.assertEqual(tx.state, 'error', "a real, audited attempt")
        self.assertFalse(tx.provider_reference)
        amount = self._in_html(self._order()._mpesa_format_amount(4500))
        self.assertIn(f"M-Pesa prompt of {amount} to 254700000009 was refused",
                      self._notes(), "staff read the full number and Odoo's amount format")
        self.assertEqual(self.quotation.state, 'draft')
        self.assertFalse(self._order().mpesa_has_pending_payment)
        self.assertTrue(self._order().mpesa_can_request_payment, "another request may follow")

    def test_one_pending_prompt_per_order(self):
        self._send(self._wizard(phone=PHONE_CALLBACK_LOST))
        first = self._tx()
        self.assertEqual(first.state, 'pending')
        messages = self.quotation.message_ids
        self._assert_refused(self._wizard(phone=PHONE_SUCCESS), "already sent to 2547******05")
        self.quotation.invalidate_recordset()
        self.assertEqual(self._tx(), first)
        self.assertEqual(self.quotation.message_ids, messages)
        self.assertEqual(len(self.simulator.pushes), 1, "no second prompt reached Daraja")

    # === STATUS === #

    def test_check_status_settles_a_lost_callback(self):
        self._send(self._wizard(phone=PHONE_CALLBACK_LOST))
        tx = self._tx()
        self._wait(lambda: self._result_known(tx), message="the simulator to know the result")
        self.assertEqual(tx.state, 'pending', "no callback came")
        self.assertTrue(self._order().mpesa_has_pending_payment)

        action = self._check_status()
        self.assertEqual(action['params']['type'], 'success')
        self.assertEqual(tx.state, 'done')
        self.assertEqual(tx.mpesa_settled_by, 'query')
        self.assertIn(
            f"M-Pesa confirms the payment of {self._in_html(tx._mpesa_format_amount(4500))} from 254700000005"
            " (CheckoutRequestID"
            f" {tx.provider_reference}).", self._notes(),
        )
        self.assertTrue(tx.is_post_processed, "post-processed at once, as the status page does")
        self.assertEqual(self.quotation.state, 'sale')
        self.assertEqual(tx.payment_id.amount, 4500)
        self.assertFalse(self._order().mpesa_has_pending_payment)
        with self.assertRaises(UserError):
            self._order().action_mpesa_check_status()

    def test_check_status_leaves_a_prompt_being_processed_pending(self):
        with patch.object(self.simulator.settings, 'prompt_timeout', 60.0):  # The customer is slow.
            self._send(self._wizard(phone=PHONE_NO_ANSWER))
        tx = self._tx()
        action = self._check_status()
        self.assertEqual(action['params']['type'], 'info')
        self.assertEqual(tx.state, 'pending')
        self.assertEqual(self.simulator.transaction(tx.provider_reference).queries, 1)
        amount = self._in_html(tx._mpesa_format_amount(4500))
        self.assertIn(f"M-Pesa has no final answer yet for the prompt of {amount} sent to 254700000002",
                      self._notes())
        self.assertTrue(self._order().mpesa_has_pending_payment)
        self.assertEqual(self.quotation.state, 'draft')

    def test_check_status_shows_daraja_errors_and_loses_nothing(self):
        self._send(self._wizard(phone=PHONE_CALLBACK_LOST))
        tx = self._tx()
        self._wait(lambda: self._result_known(tx), message="the simulator to know the result")
        notes = self._notes()
        self.simulator.fail_next(1, 'spike_arrest', operations=('stk_query',))
        action = self._check_status()
        self.assertEqual(action['params']['type'], 'danger')
        self.assertTrue(action['params']['sticky'])
        self.assertIn(tx.reference, action['params']['message'])
        self.assertEqual(tx.state, 'pending')
        self.assertEqual(self._notes(), notes)
        self.assertTrue(self._events(kind='stk_query', transaction_id=tx.id), "the refused query is logged")

        self._check_status()  # Daraja answers again.
        self.assertEqual(tx.state, 'done')
