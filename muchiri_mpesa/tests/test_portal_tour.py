# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from unittest.mock import Mock

from odoo import http
from odoo.modules import module
from odoo.tests import TEST_CURSOR_COOKIE_NAME, tagged

from odoo.addons.muchiri_mpesa import const

from .common import PHONE_CANCELLED, PHONE_SUCCESS, MpesaCommon


@tagged('post_install', '-at_install')
class TestPortalTour(MpesaCommon):
    """The distributor pays a quotation on the portal, in a real browser: the tours are in
    static/tests/tours/portal_payment_tour.js."""

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
        """Let Daraja's callbacks in while the browser runs.

        Once a tour starts, Odoo's test server refuses (400) every request without the browser's
        test cookie; the simulator, like Daraja, sends none.  The callback is just another request
        of this test: it is served under the same lock, on the same cursor.
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

    def _order_txs(self):
        self.env.invalidate_all()
        return self.quotation.transaction_ids.sudo()

    def test_portal_payment_success(self):
        with self._settling_in_background():
            self.start_tour('/web/login', 'muchiri_mpesa_portal_pay_success', timeout=90)

        txs = self._order_txs()
        self.assertEqual(len(txs), 1, "the refused phone number made no transaction")
        self.assertEqual(len(self.simulator.pushes), 1, "only one prompt reached Daraja")
        self.assertEqual(txs.state, 'done')
        self.assertEqual(txs.mpesa_phone, PHONE_SUCCESS)
        self.assertTrue(txs.mpesa_receipt_number)
        self.assertTrue(txs.is_post_processed, "the status page post-processed the transaction")
        order = self.quotation
        self.assertEqual(order.state, 'sale')
        self.assertEqual(order.mpesa_payment_status, 'paid')
        self.assertEqual(order.mpesa_receipt_number, txs.mpesa_receipt_number)
        self.assertEqual(txs.payment_id.amount, 4500)

    def test_portal_payment_cancelled(self):
        with self._settling_in_background():
            self.start_tour('/web/login', 'muchiri_mpesa_portal_pay_cancelled', timeout=90)

        txs = self._order_txs()
        self.assertEqual(len(txs), 1)
        self.assertEqual(txs.state, 'cancel')
        self.assertEqual(txs.mpesa_phone, PHONE_CANCELLED)
        self.assertEqual(txs.mpesa_result_code, '1032')
        self.assertFalse(txs.mpesa_receipt_number)
        order = self.quotation
        self.assertEqual(order.state, 'sent', "the order is still a quotation")
        self.assertEqual(order.mpesa_payment_status, 'cancelled', "a customer's cancellation, no failure")
        self.assertFalse(order.mpesa_receipt_number)

    def test_portal_form_tells_the_whole_shillings(self):
        self.quotation.order_line.price_unit = 1500.40  # 3 units: KES 4,501.20, the phone asks 4,502.
        self.start_tour('/web/login', 'muchiri_mpesa_portal_whole_shillings', timeout=90)
        self.assertFalse(self.quotation.transaction_ids, "only looked at: nothing was sent")
