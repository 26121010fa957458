# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""The M-Pesa statement import: a day of paybill money, as the org portal's statement lists it, makes
the M-Pesa journal's balance M-Pesa's balance and takes every payment of the day out of *In Process*.
"""
import base64
import csv
import io
from datetime import timedelta

import psycopg2
import requests

from odoo import fields
from odoo.exceptions import AccessError, UserError
from odoo.tests import new_test_user, tagged
from odoo.tools import mute_logger

from odoo.addons.muchiri_mpesa import daraja, utils

from .common import PHONE_NO_FUNDS, PHONE_SUCCESS, MpesaPaybillCommon

HEADER = ["Receipt No.", "Completion Time", "Initiation Time", "Details", "Transaction Status", "Paid In",
          "Withdrawn", "Balance", "Balance Confirmed", "Reason Type", "Other Party Info", "Linked Transaction ID",
          "A/C No."]
OPENING = 10_000


@tagged('post_install', '-at_install')
class TestStatementImport(MpesaPaybillCommon):

    def setUp(self):
        super().setUp()
        self._with_initiator()
        self.Line = self.env['account.bank.statement.line'].sudo()

    # === THE DAY === #

    def _day(self):
        """A day of the paybill: two payments Odoo booked, one whose confirmation was lost, one
        refunded by M-Pesa's reversal; and the statement rows of that day (newest last)."""
        self.invoices = [self._invoice(amount) for amount in (4500, 2300, 1200, 800)]
        known = [self._pay(4500, self.invoices[0].name), self._pay(2300, self.invoices[1].name)]
        self._confirm_by_status(2)
        refunded = self._pay(800, self.invoices[3].name)
        self._confirm_by_status(3)
        tx = self._row(refunded).transaction_ids
        with self.registry.test_lock:
            tx.with_user(self.accountant).action_refund()
            self.env.invalidate_all()
        self.simulator.wait_for_deliveries('initiator_result', count=4, timeout=15)
        self._run_initiator_job()
        refund = tx.child_transaction_ids.filtered(lambda child: child.operation == 'refund' and child.state == 'done')
        self.assertTrue(refund.mpesa_reversal_receipt, "M-Pesa reversed it")
        self.lost = self._lost_payment(1200, self.invoices[2].name)
        self.assertFalse(self._row(self.lost), "Odoo never heard of it")
        self.payments = self._row(known[0]).payment_ids | self._row(known[1]).payment_ids | tx.payment_id
        self.refund_payment = refund.payment_id
        self.assertEqual(len(self.payments), 3)
        self.assertIn('in_process', (self.payments | self.refund_payment).mapped('state'), "waiting for the bank")

        start = fields.Datetime.now() - timedelta(hours=2)
        rows = []
        balance = OPENING

        def add(receipt, details, paid_in=0, withdrawn=0, status="Completed", reason="", party="", linked="",
                account=""):
            nonlocal balance
            if status == "Completed":
                balance += paid_in - withdrawn
            when = utils.kenya_text(start + timedelta(minutes=len(rows)))
            rows.append([receipt, when, when, details, status, f"{paid_in:,.2f}" if paid_in else "",
                         f"-{withdrawn:,.2f}" if withdrawn else "", f"{balance:,.2f}", "true", reason, party, linked,
                         account])

        for receipt, amount, invoice in ((known[0], 4500, 0), (known[1], 2300, 1), (refunded, 800, 3),
                                         (self.lost, 1200, 2)):
            add(receipt, f"Pay Bill from 2547****4149 - JOHN DOE Acc. {self.invoices[invoice].name}", paid_in=amount,
                reason="Pay Bill Online", party="2547****4149 - JOHN DOE", account=self.invoices[invoice].name)
            add(receipt, "Business Pay Bill Charge", withdrawn=round(amount * 0.0055, 2),
                reason="Business Pay Bill Charge")
        add("SLF0000001", "Pay Bill from 2547****0001 - JANE", paid_in=999, status="Failed",
            reason="Pay Bill Online", party="2547****0001 - JANE", account="NOWHERE")
        add(refund.mpesa_reversal_receipt, f"Reversal for customer {PHONE_SUCCESS[:4]}****", withdrawn=800,
            reason="Pay Bill Reversal", linked=refunded)
        add("SLS0000001", "Organization Settlement Account to Organization Bank Account", withdrawn=5000,
            reason="Organization Settlement", party="Equity Bank")
        self.last_balance = balance
        return rows

    @staticmethod
    def _csv(rows):
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerows([["Organisation Name:", "Muchiri Distributors"], ["Time Period:", "today"], [], HEADER])
        writer.writerows(reversed(rows))  # The org portal lists the newest row first.
        return out.getvalue().encode('utf-8-sig')

    @staticmethod
    def _xlsx(rows):
        import openpyxl  # noqa: PLC0415 - one of Odoo's requirements, for the test of XLSX only

        workbook = openpyxl.Workbook()
        sheet = workbook.active
        sheet.append(["Organisation Name:", "Muchiri Distributors"])
        sheet.append(HEADER)
        for row in rows:
            sheet.append(row)
        out = io.BytesIO()
        workbook.save(out)
        return out.getvalue()

    def _import(self, data, filename, user=None):
        with self.registry.test_lock:
            wizard = self.env['muchiri.mpesa.statement.import'].with_user(user or self.manager).create({
                'provider_id': self.provider.id, 'statement_file': base64.b64encode(data), 'filename': filename,
            })
            wizard.action_import()
            self.env.invalidate_all()
        return wizard

    def _journal_balance(self):
        return sum(self.Line.search([('journal_id', '=', self.provider.journal_id.id)]).mapped('amount'))

    def assertDayReconciled(self, wizard):
        statement = wizard.statement_id
        self.assertTrue(statement, wizard.result)
        lines = statement.line_ids
        self.assertEqual(len(lines), 11, "8 paid-in and charge rows, the reversal, the sweep, the opening balance;"
                                         f" not the failed row: {wizard.result} {lines.mapped('mpesa_kind')}")
        self.assertIn("1 rows not completed", wizard.result)
        for payment in self.payments | self.refund_payment:
            self.assertEqual(payment.state, 'paid', f"{payment.memo} is reconciled with the statement")
            self.assertTrue(payment.is_matched, payment.memo)
        lost = self._row(self.lost)
        self.assertTrue(lost.source_statement)
        self.assertEqual((lost.confirmation, lost.state), ('statement', 'matched'), lost.note)
        self.assertEqual(self.invoices[2].payment_state, 'paid', "the lost payment paid its invoice")
        self.assertTrue(lost.payment_ids.is_matched, "and its payment is on the statement")
        by_kind = {kind: lines.filtered(lambda line, kind=kind: line.mpesa_kind == kind)
                   for kind in ('payment', 'charge', 'sweep', 'reversal', 'opening')}
        self.assertEqual([len(by_kind[kind]) for kind in by_kind], [4, 4, 1, 1, 1])
        self.assertTrue(all(by_kind['payment'].mapped('is_reconciled')))
        self.assertTrue(by_kind['reversal'].is_reconciled, "matched to the refund it belongs to")
        fees = self.provider._mpesa_bank_fees_account()
        self.assertTrue(fees)
        for line in by_kind['charge']:
            self.assertIn(fees, line.move_id.line_ids.account_id)
        self.assertIn(self.provider.company_id.transfer_account_id, by_kind['sweep'].move_id.line_ids.account_id)
        self.assertEqual(by_kind['opening'].amount, OPENING)
        self.assertAlmostEqual(self._journal_balance(), self.last_balance, places=2)
        self.assertAlmostEqual(statement.balance_end_real, self.last_balance, places=2)
        self.assertAlmostEqual(self.provider.mpesa_statement_difference, 0.0, places=2)
        self.assertAlmostEqual(self.provider.mpesa_statement_balance, self.last_balance, places=2)
        self.assertIn("is M-Pesa's", wizard.result)

    # === TESTS === #

    def test_a_day_of_csv_reconciles_every_payment_and_the_balance(self):
        rows = self._day()
        data = self._csv(rows)
        wizard = self._import(data, 'statement.csv')
        self.assertDayReconciled(wizard)
        ledger_count = self.env['muchiri.mpesa.ledger'].sudo().search_count([])
        line_count = self.Line.search_count([])

        again = self._import(data, 'statement.csv')
        self.assertFalse(again.statement_id, "nothing new")
        self.assertIn("10 rows were imported before", again.result)
        self.assertEqual(self.Line.search_count([]), line_count)
        self.assertEqual(self.env['muchiri.mpesa.ledger'].sudo().search_count([]), ledger_count)
        self.assertAlmostEqual(self._journal_balance(), self.last_balance, places=2)
        self.assertAlmostEqual(self.provider.mpesa_statement_difference, 0.0, places=2)

    def test_a_day_of_xlsx_reconciles_every_payment_and_the_balance(self):
        rows = self._day()
        self.assertDayReconciled(self._import(self._xlsx(rows), 'statement.xlsx'))

    def test_the_simulators_own_statement_reconciles_the_day(self):
        """The same day, as the simulator's paybill statement lists it (GET /__sim__/statement, the
        org portal's CSV over HTTP): its wordings, its charge rows (the payment's receipt), a failed
        prompt, a sweep to the bank.  Imported as downloaded, every payment of the day leaves
        *In Process*, the lost one is matched, and the journal's balance is M-Pesa's."""
        since = utils.kenya_text(fields.Datetime.now() - timedelta(minutes=1))[:10]
        self._day()
        failed, _result = self._pay_from_portal(PHONE_NO_FUNDS, order=self.quotation.copy())
        self._wait(lambda: self._result_known(failed), message="the customer's answer")
        sweep = requests.post(f"{self.simulator.base_url}/__sim__/sweep", json={"amount": 1000}, timeout=10)
        self.assertEqual(sweep.status_code, 200, sweep.text)
        answer = requests.get(f"{self.simulator.base_url}/__sim__/statement", params={"from": since}, timeout=10)
        self.assertEqual(answer.status_code, 200, answer.text)
        statement_rows = daraja.parse_statement(answer.content, 'statement.csv')
        last = max(statement_rows, key=lambda row: (row.completed_at, -row.line))

        wizard = self._import(answer.content, 'statement.csv')
        self.assertTrue(wizard.statement_id, wizard.result)
        for payment in self.payments | self.refund_payment:
            self.assertEqual(payment.state, 'paid', f"{payment.memo}: {wizard.result}")
        lost = self._row(self.lost)
        self.assertEqual((lost.source_statement, lost.confirmation), (True, 'statement'))
        self.assertEqual(lost.state, 'matched', lost.note)
        self.assertEqual(self.invoices[2].payment_state, 'paid')
        kinds = wizard.statement_id.line_ids.mapped('mpesa_kind')
        for kind in ('payment', 'charge', 'sweep', 'reversal'):
            self.assertIn(kind, kinds, f"the simulator's {kind} wording is read: {wizard.result}")
        self.assertTrue(any(row.status == "Failed" for row in statement_rows), "a failed row, left out")
        self.assertAlmostEqual(self._journal_balance(), float(last.balance), places=2)
        self.assertAlmostEqual(self.provider.mpesa_statement_difference, 0.0, places=2, msg=wizard.result)
        line_count = self.Line.search_count([])
        again = self._import(answer.content, 'statement.csv')
        self.assertFalse(again.statement_id, again.result)
        self.assertEqual(self.Line.search_count([]), line_count)

    def test_a_part_payment_the_statement_reconciled_still_pays_the_order_s_invoice(self):
        """The statement takes a part-payment out of *In Process* before its order is invoiced; the
        invoice made when the rest is paid still counts it, and asks nothing more."""
        self.env['ir.config_parameter'].sudo().set_param('sale.automatic_invoice', True)
        order = self.quotation.copy()
        part = self._pay(1000, order.name)
        self._confirm_by_status(1)
        self.assertEqual(self._row(part).state, 'partial')
        when = utils.kenya_text(fields.Datetime.now())
        rows = [[part, when, when, "Pay Bill", "Completed", "1,000.00", "", "11,000.00", "", "Pay Bill Online",
                 "2547****4149 - JOHN", "", order.name]]
        self._import(self._csv(rows), 'statement.csv')
        self.assertEqual(self._row(part).payment_ids.state, 'paid', "reconciled with the statement")

        self._pay(order.amount_total - 1000, order.name)
        self._confirm_by_status(2)
        order.invalidate_recordset()
        self.assertEqual(order.state, 'sale')
        invoice = order.invoice_ids
        self.assertEqual(len(invoice), 1)
        self.assertEqual(invoice.amount_residual, 0.0, "the part-payment counts on the invoice")
        self.assertIn(invoice.payment_state, ('paid', 'in_payment'))
        self.assertFalse(invoice._mpesa_paybill_details(), "nothing is asked again")

    def test_only_the_m_pesa_journal_imports_its_provider_s_statement(self):
        journal = self.provider.journal_id
        bank = self.env['account.journal'].create({
            'name': "Equity Bank", 'type': 'bank', 'code': 'EQBNK', 'company_id': self.provider.company_id.id,
        })
        self.assertEqual((journal | bank).mapped('mpesa_statement_journal'), [True, False])
        action = journal.with_user(self.manager).action_mpesa_import_statement()
        self.assertEqual(action['context']['default_provider_id'], self.provider.id)
        with self.assertRaisesRegex(UserError, "no M-Pesa provider's journal"):
            bank.with_user(self.manager).action_mpesa_import_statement()

    def test_a_row_that_does_not_read_imports_nothing(self):
        invoice = self._invoice(700)
        lost = self._lost_payment(700, invoice.name)
        when = utils.kenya_text(fields.Datetime.now())
        rows = [[lost, when, when, "Pay Bill", "Completed", "700.00", "", "10,700.00", "", "Pay Bill Online",
                 "2547****4149 - JOHN", "", invoice.name],
                ["SLX0000002", "yesterday", when, "Pay Bill", "Completed", "50.00", "", "10,750.00", "",
                 "Pay Bill Online", "", "", ""]]
        with self.assertRaisesRegex(UserError, "Line 5.*not a date"):
            self._import(self._csv(rows), 'statement.csv')
        self.assertFalse(self._row(lost), "nothing was recorded")
        self.assertFalse(self.Line.search_count([('mpesa_receipt', '!=', False)]))
        self.assertEqual(invoice.payment_state, 'not_paid')

    def test_an_unknown_row_without_a_document_waits_in_the_queue(self):
        when = utils.kenya_text(fields.Datetime.now())
        lost = self._lost_payment(600, "NO-SUCH-INVOICE")
        rows = [[lost, when, when, "Pay Bill", "Completed", "600.00", "", "600.00", "", "Pay Bill Online",
                 "2547****4149 - JOHN", "", "NO-SUCH-INVOICE"]]
        wizard = self._import(self._csv(rows), 'statement.csv')
        row = self._row(lost)
        self.assertEqual((row.state, row.confirmation), ('unmatched', 'statement'), "in the exceptions queue")
        line = wizard.statement_id.line_ids.filtered(lambda line: line.mpesa_receipt == lost)
        self.assertFalse(line.is_reconciled, "open until its payment is made")
        self.assertIn("stay open", wizard.result)

        # The accountant places it; the next import (any period) reconciles the line with its payment.
        invoice = self._invoice(600)
        with self.registry.test_lock:
            row.with_user(self.accountant)._mpesa_match_by_hand([invoice])
            self.env.invalidate_all()
        again = self._import(self._csv(rows), 'statement.csv')
        self.assertIn("1 lines of earlier imports reconciled now", again.result)
        self.assertTrue(line.is_reconciled)
        self.assertTrue(row.payment_ids.is_matched)

    def test_a_difference_says_how_much_and_which_row(self):
        when = utils.kenya_text(fields.Datetime.now())
        later = utils.kenya_text(fields.Datetime.now() + timedelta(minutes=1))
        rows = [["SLC0000001", when, when, "Business Pay Bill Charge", "Completed", "", "10.00", "990.00", "",
                 "Business Pay Bill Charge", "", "", ""],
                ["SLC0000002", later, later, "Business Pay Bill Charge", "Completed", "", "10.00", "900.00", "",
                 "Business Pay Bill Charge", "", "", ""]]
        wizard = self._import(self._csv(list(rows)), 'statement.csv')
        self.assertAlmostEqual(self.provider.mpesa_statement_difference, -80.0, places=2)
        self.assertIn("apart", wizard.result)
        self.assertIn("SLC0000002", wizard.result, "the row where the statement's balance jumps")

    def test_the_day_of_a_balance_check_shows_its_difference(self):
        invoice = self._invoice(700)
        lost = self._lost_payment(700, invoice.name)
        paid = utils.kenya_text(fields.Datetime.now() - timedelta(minutes=2))
        charged = utils.kenya_text(fields.Datetime.now() - timedelta(minutes=1))
        rows = [[lost, paid, paid, "Pay Bill", "Completed", "700.00", "", "10,700.00", "", "Pay Bill Online",
                 "2547****4149 - JOHN", "", invoice.name],
                # Its balance jumps: 10,690.00 after a charge of 10 on 10,700.00.
                ["SLC0000003", charged, charged, "Business Pay Bill Charge", "Completed", "", "10.00", "10,600.00",
                 "", "Business Pay Bill Charge", "", "", ""]]
        self._import(self._csv(rows), 'statement.csv')
        self.assertAlmostEqual(self.provider.mpesa_statement_difference, -90.0, places=2)
        accountant = new_test_user(self.env, login='balance_day_accountant',
                                   groups='base.group_user,account.group_account_invoice')
        days = self.env['muchiri.mpesa.ledger.day'].with_user(accountant).search([
            ('provider_id', '=', self.provider.id),
        ])
        checked = days.filtered('balance_checked')
        self.assertEqual(checked.day, utils.kenya_time(self.provider.mpesa_statement_checked_at).date())
        self.assertAlmostEqual(checked.balance_difference, -90.0, places=2, msg="the daily report shows it")
        self.assertFalse(any((days - checked).mapped('balance_difference')))

    def test_only_accounting_managers_import(self):
        data = self._csv([])
        with self.assertRaises(AccessError):  # An invoicing accountant, not an accounting manager.
            self._import(data, 'statement.csv', user=self.accountant)
        with self.registry.test_lock, self.assertRaises(AccessError):
            self.env['muchiri.mpesa.statement'].with_user(self.accountant)._mpesa_import(
                self.provider, data, 'statement.csv')

    @mute_logger('odoo.sql_db')
    def test_the_database_holds_one_line_per_receipt(self):
        """Two imports at once that both passed the lock: the second fails whole, in the database."""
        journal = self.provider.journal_id
        values = {'journal_id': journal.id, 'payment_ref': "Pay Bill", 'amount': 100.0, 'mpesa_receipt': 'SLD0000001',
                  'mpesa_statement_key': 'SLD0000001', 'mpesa_kind': 'payment'}
        self.Line.create(values)
        with self.assertRaises(psycopg2.errors.UniqueViolation), self.env.cr.savepoint():
            self.Line.create(dict(values, amount=200.0))
            self.env.flush_all()
        # Its charge: a key of its own.
        self.Line.create(dict(values, mpesa_statement_key='SLD0000001/charge', amount=-1.0))

    def test_a_claim_naming_another_account_is_not_confirmed_by_the_statement(self):
        """A forged confirmation took a real receipt, naming another invoice: the statement's A/C No.
        disagrees, so nothing is paid with it."""
        wanted, other = self._invoice(700), self._invoice(700)
        receipt = self._lost_payment(700, wanted.name)
        row = self._confirm(700, other.name, receipt=receipt)
        self.assertEqual(row.state, 'awaiting', row.note)
        when = utils.kenya_text(fields.Datetime.now())
        rows = [[receipt, when, when, "Pay Bill", "Completed", "700.00", "", "700.00", "", "Pay Bill Online",
                 "2547****4149 - JOHN", "", wanted.name]]
        self._import(self._csv(rows), 'statement.csv')
        row.invalidate_recordset()
        self.assertTrue(row.conflict)
        self.assertFalse(row.transaction_ids, "nothing paid")
        self.assertEqual((wanted.payment_state, other.payment_state), ('not_paid', 'not_paid'))
