# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""What the ledger's tests share: KES invoices of the distributor, and C2B bodies posted to this
Odoo's real routes as Daraja posts them."""
import itertools
import json

from odoo.fields import Command
from odoo.tests import new_test_user

from odoo.addons.muchiri_mpesa import const, daraja

from .common import PHONE_SUCCESS, SIM_SHORTCODE, MpesaCommon

_receipts = itertools.count(1)

# The distributor's own M-Pesa number in the tests that find the payer by it: no other contact has
# it (demo data gives its contacts the simulator's success number, which the distributor has too).
PAYER_PHONE = '254711222333'


class MpesaLedgerCommon(MpesaCommon):

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

    def _c2b_body(self, amount, bill_ref, receipt=None, phone=PHONE_SUCCESS, hashed=True, shortcode=SIM_SHORTCODE):
        """A C2B validation or confirmation body, in Daraja's documented shape (docs/design.md, 3. Daraja facts)."""
        return {
            'TransactionType': "Pay Bill",
            'TransID': receipt or self._receipt(),
            'TransTime': "20260115093012",
            'TransAmount': f"{amount:.2f}" if isinstance(amount, (int, float)) else amount,
            'BusinessShortCode': shortcode,
            'BillRefNumber': bill_ref,
            'InvoiceNumber': "",
            'OrgAccountBalance': "",
            'ThirdPartyTransID': "",
            'MSISDN': daraja.hash_msisdn(phone) if hashed else phone,
            'FirstName': "Wanjiku",
            'MiddleName': "",
            'LastName': "",
        }

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
