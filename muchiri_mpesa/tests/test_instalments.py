# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""Orders and invoices above what one M-Pesa prompt may ask, paid in instalments from the portal:
real HTTP on loopback against the Daraja simulator (docs/design.md, 5. Money rules)."""
import re
from html import unescape

from odoo.exceptions import ValidationError
from odoo.fields import Command
from odoo.tests import Form, tagged
from odoo.tools import mute_logger
from odoo.tools.misc import file_open, format_amount, formatLang

from odoo.addons.muchiri_mpesa import daraja

from .common import PHONE_CALLBACK_LOST, PHONE_CANCELLED, PHONE_SUCCESS, DarajaDuringToursMixin, MpesaCommon

BIG = 600000.0  # Three prompts of at most 250,000: 250,000, 250,000 and 100,000.


class InstalmentsCommon(MpesaCommon):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # Odoo's own Maximum Amount hides a provider for larger payments: not a limit of M-Pesa's.
        cls.provider.maximum_amount = 0
        cls.quotation.order_line.price_unit = BIG / 3

    def _kes(self, amount):
        return formatLang(self.env, amount, currency_obj=self.currency_kes).replace('\xa0', ' ')

    def _pay_instalment(self, order=None, phone=PHONE_SUCCESS):
        tx, result = self._pay_from_portal(phone, order=order)
        self.assertEqual(result, {}, "the prompt was sent")
        self._wait_final(tx)
        return tx

    def _portal_page(self, order=None):
        """The text of the order's portal page, as the distributor's browser gets it (tags
        dropped, spaces collapsed)."""
        order = order or self.quotation
        self.authenticate('distributor', 'distributor')
        with self.registry.test_lock:
            url = order.get_portal_url()
            self.env.flush_all()  # The request reads the database.
        response = self.url_open(url)
        self.assertEqual(response.status_code, 200)
        html = re.sub(r'<(script|style)\b.*?</\1>', ' ', response.text, flags=re.S)
        # The addon's elements stay as their class in brackets: [o_mpesa_instalments_note] ...
        html = re.sub(r'<[^>]+\bclass="[^"]*\b(o_mpesa_\w+)[^"]*"[^>]*>', r' [\1] ', html)
        return re.sub(r'\s+', ' ', unescape(re.sub(r'<[^>]+>', '', html)).replace('\xa0', ' '))


@tagged('post_install', '-at_install')
class TestInstalments(InstalmentsCommon):

    def test_a_large_quotation_is_paid_in_three_prompts(self):
        self.env['ir.config_parameter'].sudo().set_param('sale.automatic_invoice', True)
        self.confirmed = []
        SaleOrder = type(self.env['sale.order'])
        action_confirm = SaleOrder.action_confirm

        def counting_action_confirm(orders, *args, **kwargs):
            self.confirmed.append(orders.ids)
            return action_confirm(orders, *args, **kwargs)

        self.patch(SaleOrder, 'action_confirm', counting_action_confirm)
        order = self.quotation
        self.assertEqual(order.amount_total, BIG)
        txs = self.env['payment.transaction']
        for number, expected in enumerate((250000, 250000, 100000), start=1):
            tx = self._pay_instalment()
            txs |= tx
            self.assertEqual(tx.amount, expected, f"prompt {number} asks its instalment")
            self.assertEqual(self.simulator.pushes[-1].amount, expected)
            self.assertEqual(tx.state, 'done')
            self.assertTrue(tx.payment_id, "each prompt is its own payment")
            self.assertEqual(tx.payment_id.journal_id, self.provider.journal_id)
            if number < 3:
                self.assertIn(order.state, ('draft', 'sent'), "not confirmed before it is paid")
                self.assertFalse(order.invoice_ids)
                self.assertEqual(order._mpesa_amount_due(), BIG - 250000 * number)
        self.assertEqual(len(self.simulator.pushes), 3)
        self.assertEqual(len(set(txs.mapped('mpesa_receipt_number'))), 3, "one receipt per prompt")
        self.assertEqual(order.state, 'sale', "confirmed once it is paid")
        self.assertEqual(self.confirmed, [order.ids], "confirmed once")
        invoice = order.invoice_ids
        self.assertEqual(len(invoice), 1, "invoiced once")
        self.assertEqual(invoice.state, 'posted')
        self.assertEqual(invoice.amount_total, BIG)
        self.assertTrue(invoice.currency_id.is_zero(invoice.amount_residual), "every instalment paid it")
        self.assertIn(invoice.payment_state, ('paid', 'in_payment'))
        self.assertEqual(invoice._get_reconciled_payments(), txs.payment_id, "reconciled with the 3 payments")
        self.assertEqual(order._mpesa_paid_amount(), BIG, "each payment counted once")
        self.assertEqual(order._mpesa_amount_due(), 0)
        self.assertFalse(order.mpesa_needs_refund)
        self.assertEqual(order.mpesa_payment_status, 'paid')

    def test_the_server_decides_the_instalment_not_the_browser(self):
        self.authenticate('distributor', 'distributor')
        order = self.quotation
        for asked in (BIG, 10 * BIG, 250000.01):
            values = self.make_jsonrpc_request(self._build_url(f'/my/orders/{order.id}/transaction'), {
                'provider_id': self.provider.id, 'payment_method_id': self.payment_method_id,
                'token_id': None, 'amount': asked, 'flow': 'direct', 'tokenization_requested': False,
                'landing_route': '/my', 'access_token': order._portal_ensure_token(),
            })
            self.assertEqual(values['amount'], 250000, asked)
            self.assertEqual(self._get_tx(values['reference']).amount, 250000)
        values = self._start_portal_payment()
        tx = self._get_tx(values['reference'])
        self._stk_push(values, PHONE_SUCCESS)
        self.assertEqual(self.simulator.pushes[-1].amount, 250000, "what the signed values say is asked")
        self.assertEqual(tx.state, 'pending')

    def test_an_amount_one_prompt_takes_is_left_as_it_is(self):
        order = self.quotation.copy()
        order.order_line.price_unit = 1500.0
        self.env.flush_all()
        values = self._start_portal_payment(order)
        self.assertEqual(self._get_tx(values['reference']).amount, 4500)

    def test_a_cancelled_instalment_leaves_the_paid_one_and_the_rest_payable(self):
        first = self._pay_instalment()
        self.assertEqual((first.state, first.amount), ('done', 250000))
        second = self._pay_instalment(phone=PHONE_CANCELLED)
        self.assertEqual(second.state, 'cancel')
        self.assertEqual(second.amount, 250000)
        order = self.quotation
        self.assertIn(order.state, ('draft', 'sent'))
        self.assertEqual(order._mpesa_paid_amount(), 250000, "the first instalment stays paid")
        self.assertEqual(order._mpesa_amount_due(), 350000)
        self.assertEqual(order.mpesa_payment_status, 'partial')
        self.assertTrue(order._has_to_be_paid(), "Odoo's page offers the rest")

        page = self._portal_page()
        self.assertIn(
            f"[o_mpesa_instalments] [o_mpesa_instalment] {order.name}: paid {self._kes(250000)} of"
            f" {self._kes(BIG)}; still to pay: {self._kes(350000)}.", page,
            "the banner says what is paid and what is left")
        self.assertIn(f"[o_mpesa_next_prompt] Pay the next prompt of {self._kes(250000)}", page)
        self.assertIn(f"[o_mpesa_instalments_note] {self._kes(350000)} will be asked in 2 prompts of at most"
                      f" {self._kes(250000)}", page, "the form offers the rest")

        third = self._pay_instalment()
        self.assertEqual((third.state, third.amount), ('done', 250000))
        fourth = self._pay_instalment()
        self.assertEqual((fourth.state, fourth.amount), ('done', 100000))
        self.assertEqual(order.state, 'sale')
        self.assertEqual(order._mpesa_amount_due(), 0)
        self.assertFalse(order.mpesa_needs_refund)

    @mute_logger('odoo.http')
    def test_one_prompt_at_a_time_and_nothing_once_paid(self):
        pending = self._pending_tx(PHONE_CALLBACK_LOST)
        self.assertEqual(pending.amount, 250000)
        values = self._start_portal_payment()
        self.assertIn('already sent', self._stk_push_refusal(values, PHONE_SUCCESS))
        self.assertEqual(len(self.simulator.pushes), 1, "no second prompt while one is on the phone")

    def test_the_form_says_the_prompts_before_pay(self):
        page = self._portal_page()
        self.assertIn(
            f"[o_mpesa_instalments_note] {self._kes(BIG)} will be asked in 3 prompts of at most"
            f" {self._kes(250000)}: approve each one as it comes. This payment asks the first,"
            f" {self._kes(250000)}; then come back here for the next one.", page)
        self.assertFalse(self.quotation.transaction_ids, "only looked at")

        self.provider.mpesa_prompt_max_amount = 100000
        self.assertIn(f"will be asked in 6 prompts of at most {self._kes(100000)}", self._portal_page(),
                      "the administrator's lower maximum")

    def test_the_form_says_nothing_of_prompts_for_one_prompt(self):
        self.quotation.order_line.price_unit = 1500.0
        page = self._portal_page()
        self.assertIn("You will get a prompt on this phone", page, "the M-Pesa form is there")
        self.assertNotIn('o_mpesa_instalments_note', page)

    def test_the_limits_are_said_for_any_amount(self):
        limits = self.provider._mpesa_amount_limits(0.4, self.currency_kes)
        self.assertEqual((limits['below_minimum'], limits['prompts'], limits['first']), (False, 1, 1))
        limits = self.provider._mpesa_amount_limits(0, self.currency_kes)
        self.assertTrue(limits['below_minimum'])
        limits = self.provider._mpesa_amount_limits(500000.2, self.currency_kes)
        self.assertEqual((limits['prompts'], limits['maximum'], limits['first']), (3, 250000, 250000))

    def test_a_swahili_distributor_reads_the_instalments_in_swahili(self):
        """The form's note, the status after a prompt and the till choice are whole Swahili
        sentences with the amounts inside, as a translator wrote them (sw.po)."""
        with self.registry.test_lock:
            swahili = self.env['res.lang']._activate_lang('sw')
            self.env['ir.module.module']._load_module_terms(['muchiri_mpesa'], ['sw'], overwrite=True)
            if 'website' in self.env:  # With website, the portal speaks the languages of its websites.
                self.env['website'].search([]).language_ids |= swahili
            self.distributor.write({'lang': 'sw', 'mpesa_till_number': '600100'})
            self.provider.write({
                'mpesa_initiator_name': self.simulator.initiator_name,
                'mpesa_initiator_password': self.simulator.initiator_password,
                'mpesa_initiator_certificate': self.simulator.certificate_pem,
            })
        order = self.quotation
        first = self._pay_instalment()
        self.assertEqual((first.state, first.amount), ('done', 250000))

        def kes(amount):
            return format_amount(self.env(context={'lang': 'sw'}), amount, self.currency_kes).replace('\xa0', ' ')

        page = self._portal_page()
        for sentence in (
            f"{order.name}: umelipa {kes(250000)} kati ya {kes(BIG)}; kiasi kilichobaki: {kes(350000)}.",
            f"[o_mpesa_next_prompt] Lipa awamu inayofuata ya {kes(250000)}",
            f"[o_mpesa_instalments_note] Kiasi cha {kes(350000)} kitaombwa kwa maombi 2 ya M-Pesa, kila moja"
            f" hadi {kes(250000)}: idhinisha kila ombi linapofika. Malipo haya ni ya awamu ya kwanza,"
            f" {kes(250000)}; kisha rudi hapa kulipa awamu inayofuata.",
            "Lipa kutoka till yako 600100",
            "Lipa kwa simu",
            "Nambari ya simu ya M-Pesa",
            "Utapokea ombi la M-Pesa kwenye simu hii",
        ):
            self.assertIn(sentence, page)
        for english in ("still to pay", "will be asked in", "Pay the next prompt", "Pay from your till"):
            self.assertNotIn(english, page)

    def test_an_invoice_is_paid_in_instalments_too(self):
        invoice = self.env['account.move'].create({
            'move_type': 'out_invoice', 'partner_id': self.distributor.id,
            'currency_id': self.currency_kes.id,
            'invoice_line_ids': [Command.create({
                'name': "Maize flour", 'quantity': 1, 'price_unit': 300000, 'tax_ids': [Command.clear()],
            })],
        })
        invoice.action_post()
        self.authenticate('distributor', 'distributor')
        values = self.make_jsonrpc_request(self._build_url(f'/invoice/transaction/{invoice.id}'), {
            'provider_id': self.provider.id, 'payment_method_id': self.payment_method_id,
            'token_id': None, 'amount': invoice.amount_residual, 'flow': 'direct',
            'tokenization_requested': False, 'landing_route': invoice.get_portal_url(),
            'access_token': invoice._portal_ensure_token(),
        })
        tx = self._get_tx(values['reference'])
        self.assertEqual(tx.amount, 250000)
        self.assertEqual(self._stk_push(values, PHONE_SUCCESS), {})
        self._wait_final(tx)
        self.assertEqual(tx.state, 'done')
        self.assertEqual(invoice.amount_residual, 50000, "the invoice's page offers the rest")
        self.assertEqual(invoice._mpesa_amount_due(), 50000)
        self.assertIn(tx.payment_id, invoice._get_reconciled_payments())
        self.assertTrue(invoice._has_to_be_paid())


@tagged('post_install', '-at_install')
class TestPromptMaximum(InstalmentsCommon):

    def test_the_default_is_darajas_maximum(self):
        self.assertEqual(daraja.DEFAULT_MAX_AMOUNT, daraja.DARAJA_MAX_AMOUNT)
        provider = self.env['payment.provider'].new({'name': "M-Pesa 2", 'code': 'mpesa'})
        self.assertEqual(provider.mpesa_prompt_max_amount, 250000)
        self.assertEqual(provider._mpesa_max_amount(), 250000)
        with file_open('muchiri_mpesa/data/payment_provider_data.xml') as data:
            self.assertNotIn('maximum_amount', data.read(),
                             "Odoo's Maximum Amount would hide M-Pesa from the orders it pays in instalments")

    def test_the_maximum_is_within_darajas_limits(self):
        for value in (0, -5, 250001, 1000000):
            with self.subTest(value=value), self.assertRaises(ValidationError) as caught:
                self.provider.mpesa_prompt_max_amount = value
            self.assertIn("must be from", str(caught.exception))
        for value in (1, 100000, 250000):
            self.provider.mpesa_prompt_max_amount = value
            self.assertEqual(self.provider._mpesa_max_amount(), value)

    def test_the_help_says_why_to_lower_it(self):
        field = self.env['payment.provider']._fields['mpesa_prompt_max_amount']
        self.assertIn("250,000", field.help)
        self.assertIn("daily or balance", field.help)
        self.assertIn("approved on the phone", field.help)
        arch = self.env['payment.provider'].get_view(view_type='form')['arch']
        self.assertIn('name="mpesa_prompt_max_amount"', arch)

    def test_the_maximum_limits_one_prompt(self):
        self.provider.mpesa_prompt_max_amount = 100000
        self.env.flush_all()
        with self.assertRaisesRegex(ValidationError, "above the .* limit for one M-Pesa payment"):
            self.provider._mpesa_check_amount(100001, self.currency_kes)
        self.assertEqual(self.provider._mpesa_check_amount(100000, self.currency_kes), 100000)
        values = self._start_portal_payment()
        self.assertEqual(self._get_tx(values['reference']).amount, 100000)

    def test_odoos_maximum_amount_keeps_its_meaning(self):
        compatible = self.env['payment.provider']._get_compatible_providers
        company = self.env.company.id
        usd_big = self.currency_kes._convert(BIG, self.env.company.currency_id, self.env.company)
        self.assertIn(self.provider, compatible(company, self.distributor.id, BIG, currency_id=self.currency_kes.id))
        self.provider.maximum_amount = usd_big / 2
        self.assertNotIn(self.provider, compatible(company, self.distributor.id, BIG, currency_id=self.currency_kes.id),
                         "Odoo hides the provider above its Maximum Amount")


@tagged('post_install', '-at_install')
class TestBackOfficeInstalments(InstalmentsCommon):
    """The order's "Request M-Pesa payment" above what one prompt may ask: each request asks the
    next instalment, and says so."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.quotation.user_id = cls.sale_user  # A salesman sees his own orders.

    def _request(self, **values):
        """The wizard as the order's button opens it (filled with `values`), then its Send button."""
        with self.registry.test_lock:
            action = self.quotation.with_user(self.sale_user).action_mpesa_request_payment()
            with Form(self.env[action['res_model']].with_user(self.sale_user).with_context(**action['context'])) \
                    as form:
                for name, value in values.items():
                    setattr(form, name, value)
            wizard = form.record
            result = wizard.action_send()
            self.env.flush_all()
        return wizard, result['params']

    def test_each_request_asks_the_next_instalment(self):
        txs = self.env['payment.transaction']
        for number, (due, expected) in enumerate(((BIG, 250000), (350000, 250000), (100000, 100000)), start=1):
            wizard, notification = self._request(phone=PHONE_SUCCESS)
            self.assertEqual((wizard.amount_due, wizard.amount), (due, due), "it offers all that is due")
            self.assertEqual(notification['type'], 'success', notification['message'])
            tx = self.quotation.sudo().transaction_ids - txs
            txs |= tx
            self.assertEqual((tx.amount, tx.mpesa_requested_amount), (expected, expected), f"request {number}")
            self.assertEqual(self.simulator.pushes[-1].amount, expected)
            if number < 3:
                note = (f"{self._kes(due)} is above one prompt's {self._kes(250000)}: this request asks"
                        f" {self._kes(expected)}; request again for the rest.")
                self.assertEqual(wizard.instalment_note.replace('\xa0', ' '), note, "the wizard says it first")
                self.assertIn(note, notification['message'].replace('\xa0', ' '))
            else:
                self.assertFalse(wizard.instalment_note)
                self.assertNotIn("request again", notification['message'])
            self._wait_final(tx)
            self.assertEqual(tx.state, 'done')
        self.assertEqual(len(self.simulator.pushes), 3)
        self.assertEqual(self.quotation._mpesa_amount_due(), 0)
        self.assertEqual(self.quotation.mpesa_payment_status, 'paid')

    def test_a_typed_amount_above_one_prompt_asks_the_first_instalment(self):
        _wizard, notification = self._request(phone=PHONE_SUCCESS, amount=300000)
        self.assertIn(f"{self._kes(300000)} is above one prompt's", notification['message'].replace('\xa0', ' '))
        tx = self.quotation.sudo().transaction_ids
        self.assertEqual(tx.amount, 250000)
        self._wait_final(tx)
        self.assertEqual(self.quotation._mpesa_amount_due(), 350000)
        with self.assertRaisesRegex(ValidationError, "more than the"):
            self._request(phone=PHONE_SUCCESS, amount=350001)


@tagged('post_install', '-at_install')
class TestLimitResultCodes(InstalmentsCommon):

    def test_the_daily_and_balance_limits_are_said_in_plain_words(self):
        self.provider.mpesa_confirm_by_query = False
        for code, limit in (('4', "daily limit (KES 500,000 a day)"), ('8', "balance limit (KES 500,000)")):
            with self.subTest(code=code):
                order = self.quotation.copy()
                tx = self._pending_tx(PHONE_CALLBACK_LOST, order=order)
                self._answered(tx)
                self._post_callback(self._body(tx, code=int(code)))
                self.assertEqual(tx.state, 'error')
                self.assertEqual(tx.mpesa_result_code, code)
                self.assertIn(limit, tx.state_message)
                self.assertIn("pay the rest tomorrow", tx.state_message)
                self.assertIn("paybill", tx.state_message)
                self.assertIn(limit.split(' (')[0], tx._mpesa_result_text(), "the order's M-Pesa tab")
                page = self._portal_page(order)
                self.assertIn(limit, page)
                self.assertIn(f"[o_mpesa_limit_advice] You can also pay from your phone's M-Pesa menu: Lipa na"
                              f" M-Pesa, Pay Bill, business number 174379, account number {order.name}.", page)

    def test_other_failures_give_no_limit_advice(self):
        tx = self._pay_instalment(phone=PHONE_CANCELLED)
        self.assertEqual(tx.state, 'cancel')
        self.assertIsNone(tx._mpesa_limit_advice())
        self.assertNotIn('o_mpesa_limit_advice', self._portal_page())


@tagged('post_install', '-at_install')
class TestInstalmentTour(DarajaDuringToursMixin, InstalmentsCommon):
    """The distributor reads the prompts before Pay and pays one instalment, in a real browser:
    the tour is in static/tests/tours/instalment_tour.js."""

    def test_portal_pays_one_instalment(self):
        with self._settling_in_background():
            self.start_tour('/web/login', 'muchiri_mpesa_portal_instalment', timeout=120)
        self.env.invalidate_all()
        txs = self.quotation.transaction_ids.sudo()
        self.assertEqual(len(txs), 1)
        self.assertEqual((txs.state, txs.amount), ('done', 250000))
        self.assertEqual(self.simulator.pushes[-1].amount, 250000)
        self.assertEqual(self.quotation.state, 'sent', "still a quotation: 350,000 is left")
        self.assertEqual(self.quotation._mpesa_amount_due(), 350000)
