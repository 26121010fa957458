# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""The M-Pesa organisation statement, imported into the provider's M-Pesa journal (docs/design.md,
16. The M-Pesa statement): the third source of truth beside Daraja's callbacks and Pull, and what
makes the M-Pesa journal's balance M-Pesa's balance.

One statement line per completed row, keyed by its receipt under a unique index: importing a file
twice, or overlapping periods, adds nothing twice.  A paid-in row is a ledger row of the source
'statement' (the accountant's own record from Safaricom confirms the receipt, its amount and the
shortcode), and its line is reconciled with the receipt's payments, which leave *In Process*.
Charges go to the bank fees account, sweeps to the bank to the liquidity transfer account,
reversals to the refund they belong to; anything else stays open for the accountant.

The whole file in one database transaction: a row that does not parse, or fails, imports nothing.
"""
import logging
from collections import defaultdict
from datetime import timedelta

import psycopg2

from odoo import api, models
from odoo.exceptions import UserError
from odoo.fields import Command
from odoo.tools.misc import formatLang

from .. import const, daraja, utils

_logger = logging.getLogger(__name__)

# The advisory lock of a journal's statement imports (its first key; the journal's id is the second).
IMPORT_LOCK = 0x4D504553  # 'MPES'
OPENING_KEY = 'OPENING:%s'
# How many differences of the balance check the message names; the rest are counted.
EXPLAIN_LIMIT = 10


class MpesaStatement(models.AbstractModel):
    _name = 'muchiri.mpesa.statement'
    _description = "M-Pesa statement import"

    # === BUSINESS METHODS - IMPORT === #

    @api.model
    def _mpesa_import(self, provider, data, filename=None):
        """Import the M-Pesa statement file `data` of `provider` into its M-Pesa journal.

        :return: the statement made (empty when every row was imported already) and the result
                 message for the accountant
        :rtype: tuple[account.bank.statement, str]
        :raises UserError: the file is not a statement, a row does not read or cannot be booked
                           (nothing is written), or another import of the journal is running
        """
        self.env['payment.provider']._mpesa_check_group('account.group_account_manager')
        provider = provider.sudo()
        journal = provider.journal_id
        if provider.code != const.PROVIDER_CODE or not journal:
            raise UserError(self.env._("%s has no M-Pesa journal: set up its accounting first.", provider.name))
        try:
            rows = daraja.parse_statement(data, filename)
        except daraja.StatementError as error:
            raise UserError(self.env._("This file cannot be imported, nothing was: %s", error.message)) from None
        self.env.cr.execute("SELECT pg_try_advisory_xact_lock(%s, %s)", [IMPORT_LOCK, journal.id])
        if not self.env.cr.fetchone()[0]:
            raise UserError(self.env._("Another M-Pesa statement is being imported into %s: try again in a moment.",
                                       journal.name))
        counts = defaultdict(int)
        # What an earlier import left open, now that the matching may have paid it.
        counts['reconciled_before'] = len(self._mpesa_reconcile_lines(provider, self._mpesa_open_lines(journal)))
        completed = [row for row in rows if row.completed]
        counts['not_completed'] = len(rows) - len(completed)
        new_rows = self._mpesa_new_rows(journal, completed, counts)
        statement = self.env['account.bank.statement']
        if new_rows:
            statement = self._mpesa_book_rows(provider, journal, new_rows, counts)
            counts['reconciled'] = len(self._mpesa_reconcile_lines(provider, statement.line_ids))
            counts['open'] = len(statement.line_ids.filtered(lambda line: not line.is_reconciled))
        check = self._mpesa_check_balance(provider, journal, completed)
        return statement, self._mpesa_result_message(counts, check)

    @api.model
    def _mpesa_kind(self, row):
        """What a completed row is: 'payment' (customer money in), 'charge', 'sweep', 'reversal', 'other'."""
        text = f"{row.details} {row.reason_type}".lower()

        def says(wordings):
            return any(wording in text for wording in wordings)

        if row.paid_in:
            # What the payer typed (the account in Details) says nothing of what the row is.
            details = row.details[:-len(daraja_account_of(row.details)) or None] if daraja_account_of(row.details) \
                else row.details
            text = f"{details} {row.reason_type}".lower()
            # Money in that is no customer's payment (a reversal of money out, a transfer between the
            # shortcode's own accounts) never becomes a ledger row: the accountant places it.
            if says(const.STATEMENT_REVERSAL_WORDINGS) or says(const.STATEMENT_SWEEP_WORDINGS):
                return 'other'
            return 'payment'
        if says(const.STATEMENT_REVERSAL_WORDINGS):
            return 'reversal'
        if says(const.STATEMENT_CHARGE_WORDINGS):
            return 'charge'
        if says(const.STATEMENT_SWEEP_WORDINGS):
            return 'sweep'
        return 'other'

    @api.model
    def _mpesa_key(self, row, kind):
        # A charge may carry the receipt of the payment it is charged on: a key of its own.
        return f"{row.receipt}/charge" if kind == 'charge' else row.receipt

    @api.model
    def _mpesa_new_rows(self, journal, rows, counts):
        """The rows whose key the company's M-Pesa statement lines do not have yet, with their kind
        and key; the others are counted.  Two rows of one key refuse the file."""
        keyed, lines_of = [], {}
        for row in rows:
            if not row.amount:
                counts['zero'] += 1
                continue
            kind = self._mpesa_kind(row)
            key = self._mpesa_key(row, kind)
            if key in lines_of:
                raise UserError(self.env._(
                    "Line %(line)s: receipt %(receipt)s is also on line %(other)s as another movement: nothing was"
                    " imported.", line=row.line, receipt=row.receipt, other=lines_of[key]))
            lines_of[key] = row.line
            keyed.append((row, kind, key))
        known = set()
        keys = [key for _row, _kind, key in keyed]
        for start in range(0, len(keys), 5000):
            self.env.cr.execute(
                "SELECT mpesa_statement_key FROM account_bank_statement_line"
                " WHERE company_id = %s AND mpesa_statement_key IN %s",
                [journal.company_id.id, tuple(keys[start:start + 5000])],
            )
            known.update(key for (key,) in self.env.cr.fetchall())
        counts['known'] = len(known)
        return [entry for entry in keyed if entry[2] not in known]

    @api.model
    def _mpesa_book_rows(self, provider, journal, entries, counts):
        """A statement of `entries` (row, kind, key) in `journal`, oldest row first; the paid-in
        rows recorded in the ledger first."""
        entries = sorted(entries, key=lambda entry: (entry[0].completed_at, self._mpesa_file_order(entry[0], entries)))
        Ledger = self.env['muchiri.mpesa.ledger'].sudo()
        fees = provider._mpesa_bank_fees_account()
        transfer = journal.company_id.transfer_account_id
        vals_list = []
        first = entries[0][0]
        if first.balance is not None and not self.env['account.bank.statement.line'].sudo().search_count(
                [('journal_id', '=', journal.id)], limit=1):
            opening = first.balance - first.amount
            if opening:
                # The shortcode's money before the first statement: an open line, for the accountant.
                vals_list.append({
                    'journal_id': journal.id,
                    'date': utils.kenya_time(utils.naive_utc(first.completed_at)).date(),
                    'payment_ref': self.env._("M-Pesa balance before the first imported statement"),
                    'amount': float(opening),
                    'mpesa_statement_key': OPENING_KEY % journal.id,
                    'mpesa_kind': 'opening',
                    'mpesa_completed_at': utils.naive_utc(first.completed_at) - timedelta(seconds=1),
                    'mpesa_balance': float(opening),
                })
        for row, kind, key in entries:
            moment = utils.naive_utc(row.completed_at)
            values = {
                'journal_id': journal.id,
                'date': utils.kenya_time(moment).date(),
                'payment_ref': row.details or row.receipt,
                'amount': float(row.amount),
                'partner_name': row.payer_name or False,
                'transaction_type': row.reason_type or False,
                'mpesa_receipt': row.receipt,
                'mpesa_linked_receipt': row.linked_id or False,
                'mpesa_statement_key': key,
                'mpesa_kind': kind,
                'mpesa_completed_at': moment,
                'mpesa_balance': float(row.balance) if row.balance is not None else 0.0,
            }
            counts[kind] += 1
            if kind == 'payment':
                ledger = self._mpesa_record_row(provider, Ledger, row)
                values['partner_id'] = ledger.partner_id.id or False
            elif kind == 'charge' and fees:
                values['counterpart_account_id'] = fees.id
            elif kind == 'sweep' and transfer:
                values['counterpart_account_id'] = transfer.id
            vals_list.append(values)
        last = entries[-1][0]
        try:
            with self.env.cr.savepoint():
                statement = self.env['account.bank.statement'].sudo().create({
                    'name': self.env._(
                        "M-Pesa statement %(start)s - %(end)s",
                        start=utils.kenya_text(utils.naive_utc(first.completed_at))[:10],
                        end=utils.kenya_text(utils.naive_utc(last.completed_at))[:10]),
                    'journal_id': journal.id,
                    'line_ids': [Command.create(values) for values in vals_list],
                })
                if last.balance is not None:
                    statement.balance_end_real = float(last.balance)
                self.env.flush_all()
        except psycopg2.errors.UniqueViolation:
            raise UserError(self.env._(
                "Another import booked some of these rows meanwhile: nothing was imported, import the file again."
            )) from None
        return statement

    @api.model
    def _mpesa_file_order(self, row, entries):
        """Within one second, the order of the file: most statements list the newest row first."""
        newest_first = entries[0][0].completed_at > entries[-1][0].completed_at
        return -row.line if newest_first else row.line

    @api.model
    def _mpesa_record_row(self, provider, Ledger, row):
        """A paid-in row in the ledger, from the source 'statement', matched like a C2B payment."""
        account = row.account_no or daraja_account_of(row.details)
        values = {
            'amount': float(row.paid_in),
            'trans_time': utils.naive_utc(row.completed_at),
            'transaction_type': (row.reason_type or '')[:100] or False,
            'bill_ref': account or False,
            'msisdn': row.payer_msisdn or False,
            'payer_name': row.payer_name or False,
            # The accountant's own record from Safaricom: its receipt, amount and shortcode.
            'confirmation': 'statement',
        }
        try:
            with self.env.cr.savepoint():
                ledger, _created = Ledger._mpesa_record_and_match(provider, row.receipt, 'statement', values)
                ledger.transaction_ids._mpesa_post_process()  # Their payments, reconciled with the line below.
        except UserError as error:
            raise UserError(self.env._("Line %(line)s (receipt %(receipt)s): %(error)s  Nothing was imported.",
                                       line=row.line, receipt=row.receipt, error=error.args[0])) from None
        return ledger

    # === BUSINESS METHODS - RECONCILIATION === #

    @api.model
    def _mpesa_open_lines(self, journal):
        """The open paid-in lines of `journal` whose receipt has a payment now, and its open
        reversal lines: what an earlier import could not reconcile and this one may.  Not every
        open line: money waiting in the queue for weeks is not read again at each import."""
        self.env.flush_all()
        self.env.cr.execute(
            """SELECT line.id FROM account_bank_statement_line line
                WHERE line.journal_id = %(journal)s AND line.is_reconciled IS NOT TRUE
                  AND (line.mpesa_kind = 'reversal' OR (line.mpesa_kind = 'payment' AND EXISTS (
                       SELECT 1 FROM muchiri_mpesa_ledger row
                         JOIN payment_transaction tx ON tx.mpesa_ledger_id = row.id
                        WHERE row.company_id = line.company_id AND row.name = line.mpesa_receipt
                          AND tx.state = 'done' AND tx.payment_id IS NOT NULL)))""",
            {'journal': journal.id},
        )
        return self.env['account.bank.statement.line'].sudo().browse([line_id for (line_id,) in self.env.cr.fetchall()])

    @api.model
    def _mpesa_reconcile_lines(self, provider, lines):
        """Reconcile the paid-in and reversal lines of `lines` that are still open with the
        payments of their receipts, when those payments are posted, open, and add up to the line.

        :return: the lines reconciled
        """
        done = lines.browse()
        for line in lines.filtered(lambda line: line.mpesa_kind in ('payment', 'reversal') and not line.is_reconciled):
            payments = self._mpesa_line_payments(provider, line)
            outstanding = self.env['account.move.line']
            # 'paid' too: Odoo calls a payment paid once its invoices are, its money still not on a statement.
            for payment in payments.filtered(lambda payment: payment.state in ('in_process', 'paid')):
                outstanding |= payment._seek_for_lines()[0]
            outstanding = outstanding.filtered(lambda move_line: not move_line.reconciled
                                               and move_line.account_id.reconcile)
            if not outstanding or len(outstanding.account_id) != 1 or line.currency_id.compare_amounts(
                    sum(outstanding.mapped('amount_residual_currency')), line.amount):
                continue
            _liquidity, suspense, _other = line._seek_for_lines()
            if len(suspense) != 1:
                continue
            partner = line.partner_id or outstanding.partner_id[:1]
            # As Odoo's bank reconciliation does: the line's counterpart moves from the suspense
            # account to the payments' outstanding account, and is reconciled with their lines.
            line.move_id.with_context(skip_readonly_check=True).write({'line_ids': [Command.update(suspense.id, {
                'account_id': outstanding.account_id.id, 'partner_id': partner.id,
            })]})
            (suspense + outstanding).reconcile()
            done |= line
        return done

    @api.model
    def _mpesa_line_payments(self, provider, line):
        """The posted payments of a statement line's receipt: the receipt's own payments for money
        in, the refunds M-Pesa's reversal completed for a reversal."""
        Tx = self.env['payment.transaction'].sudo()
        receipt = line.mpesa_receipt
        if line.mpesa_kind == 'payment':
            row = self.env['muchiri.mpesa.ledger'].sudo().search(
                [('company_id', '=', line.company_id.id), ('name', '=', receipt)], limit=1)
            txs = row.transaction_ids | Tx.search([
                ('provider_id', '=', provider.id), ('mpesa_receipt_number', '=', receipt),
                ('operation', '!=', 'refund'),
            ])
            return txs.filtered(lambda tx: tx.state == 'done' and tx.operation != 'refund').payment_id
        refunds = Tx.search([
            ('provider_id', '=', provider.id), ('operation', '=', 'refund'), ('state', '=', 'done'),
            '|', ('mpesa_reversal_receipt', '=', receipt), ('mpesa_receipt_number', '=', receipt),
        ])
        if not refunds and line.mpesa_linked_receipt:
            # The reversal's row names the receipt it reversed (Linked Transaction ID).
            sources = Tx.search([
                ('provider_id', '=', provider.id), ('mpesa_receipt_number', '=', line.mpesa_linked_receipt),
                ('operation', '!=', 'refund'),
            ])
            refunds = sources.child_transaction_ids.filtered(
                lambda tx: tx.operation == 'refund' and tx.state == 'done')
            refunds |= refunds.source_transaction_id.filtered('id').mapped(
                lambda tx: tx._mpesa_receipt_shares()).child_transaction_ids.filtered(
                lambda tx: tx.operation == 'refund' and tx.state == 'done')
        return refunds.payment_id

    # === BUSINESS METHODS - BALANCE CHECK === #

    @api.model
    def _mpesa_check_balance(self, provider, journal, rows):
        """The journal's balance at the last completed row's time against that row's Balance,
        stored on the provider (the gap report reads `mpesa_statement_difference`).

        :return: the check's message, or None when no row has a balance
        """
        rows = [row for row in rows if row.balance is not None]
        if not rows:
            return None
        newest_first = rows[0].completed_at > rows[-1].completed_at
        rows = sorted(rows, key=lambda row: (row.completed_at, -row.line if newest_first else row.line))
        last = rows[-1]
        moment = utils.naive_utc(last.completed_at)
        self.env.flush_all()
        self.env.cr.execute(
            """SELECT COALESCE(SUM(line.amount), 0) FROM account_bank_statement_line line
                 JOIN account_move move ON move.id = line.move_id
                WHERE line.journal_id = %s AND move.state = 'posted'
                  AND (line.mpesa_completed_at <= %s OR (line.mpesa_completed_at IS NULL AND move.date <= %s))""",
            [journal.id, moment, utils.kenya_time(moment).date()],
        )
        booked = self.env.cr.fetchone()[0]
        currency = journal.currency_id or journal.company_id.currency_id
        difference = currency.round(float(last.balance) - booked)
        fmt = lambda amount: formatLang(self.env, amount, currency_obj=currency)  # noqa: E731
        if currency.is_zero(difference):
            note = self.env._("The M-Pesa journal's balance on %(when)s is M-Pesa's: %(balance)s.",
                              when=utils.kenya_text(moment), balance=fmt(booked))
        else:
            note = self.env._(
                "The M-Pesa journal's balance on %(when)s is %(booked)s, M-Pesa's %(balance)s: %(difference)s"
                " apart.", when=utils.kenya_text(moment), booked=fmt(booked), balance=fmt(float(last.balance)),
                difference=fmt(difference))
            reasons = self._mpesa_explain_difference(journal, rows, moment, fmt)
            if reasons:
                note += '\n' + '\n'.join(f"- {reason}" for reason in reasons)
        provider.write({
            'mpesa_statement_checked_at': moment,
            'mpesa_statement_balance': float(last.balance),
            'mpesa_statement_journal_balance': booked,
            'mpesa_statement_difference': difference,
            'mpesa_statement_check_note': note,
        })
        return note

    @api.model
    def _mpesa_explain_difference(self, journal, rows, moment, fmt):
        """What may explain a difference: where the statement's own balance jumps (a period or an
        account not imported), rows booked with another amount, lines entered by hand, payments
        no statement line took."""
        reasons = []
        previous = None
        for row in rows:
            if previous is not None and previous.balance + row.amount != row.balance:
                reasons.append(self.env._(
                    "line %(line)s (%(receipt)s): the statement's balance goes from %(before)s to %(after)s, its"
                    " amount is %(amount)s (rows of another period or account are missing)", line=row.line,
                    receipt=row.receipt, before=fmt(float(previous.balance)), after=fmt(float(row.balance)),
                    amount=fmt(float(row.amount))))
            previous = row
        amounts = {self._mpesa_key(row, self._mpesa_kind(row)): row for row in rows}
        Line = self.env['account.bank.statement.line'].sudo()
        for line in Line.search([('journal_id', '=', journal.id), ('mpesa_statement_key', 'in', list(amounts))]):
            row = amounts[line.mpesa_statement_key]
            if line.currency_id.compare_amounts(line.amount, float(row.amount)):
                reasons.append(self.env._(
                    "line %(line)s (%(receipt)s) is in the journal for %(booked)s, the statement says %(amount)s",
                    line=row.line, receipt=row.receipt, booked=fmt(line.amount), amount=fmt(float(row.amount))))
        by_hand = Line.search([
            ('journal_id', '=', journal.id), ('mpesa_statement_key', '=', False),
            ('date', '<=', utils.kenya_time(moment).date()),
        ])
        if by_hand:
            reasons.append(self.env._(
                "%(count)s statement lines not from the M-Pesa statement (%(total)s), e.g. %(refs)s",
                count=len(by_hand), total=fmt(sum(by_hand.mapped('amount'))),
                refs=', '.join(by_hand[:3].mapped(lambda line: line.payment_ref or str(line.id)))))
        more = len(reasons) - EXPLAIN_LIMIT
        reasons = reasons[:EXPLAIN_LIMIT]
        if more > 0:
            reasons.append(self.env._("and %s more", more))
        return reasons

    @api.model
    def _mpesa_result_message(self, counts, check):
        lines = [self.env._(
            "%(new)s rows imported: %(payment)s paid in, %(charge)s charges, %(sweep)s sweeps to the bank,"
            " %(reversal)s reversals, %(other)s other; %(reconciled)s reconciled with Odoo's payments and refunds.",
            new=sum(counts[kind] for kind in ('payment', 'charge', 'sweep', 'reversal', 'other')),
            payment=counts['payment'], reconciled=counts['reconciled'], charge=counts['charge'],
            sweep=counts['sweep'], reversal=counts['reversal'], other=counts['other'])]
        if counts['open']:
            lines.append(self.env._(
                "%s lines stay open in the M-Pesa journal: their payment is not made yet (the M-Pesa ledger's"
                " queue) or no rule places them.", counts['open']))
        if counts['known']:
            lines.append(self.env._("%s rows were imported before: left as they are.", counts['known']))
        if counts['not_completed']:
            lines.append(self.env._("%s rows not completed (failed, cancelled): skipped.", counts['not_completed']))
        if counts['zero']:
            lines.append(self.env._("%s rows without an amount: skipped.", counts['zero']))
        if counts['reconciled_before']:
            lines.append(self.env._("%s lines of earlier imports reconciled now.", counts['reconciled_before']))
        if check:
            lines.append(check)
        return '\n'.join(lines)


def daraja_account_of(details):
    """The account number a paybill row's Details carry ("Pay Bill from 2547****0111 - NAME Acc. INV001")."""
    marker = ' acc. '
    text = f" {details or ''}"
    place = text.lower().rfind(marker)
    return text[place + len(marker):].strip() if place >= 0 else ''
