# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""The M-Pesa ledger: one row per M-Pesa receipt (TransID) that reached the provider's shortcode,
whichever source told us first (an STK callback, a C2B confirmation, a Pull Transactions row), and
where its money went (DESIGN.md section 7).

A row is created once per (company, receipt), under a unique index; every source that reports the
receipt later only adds itself to the row, under the row's lock, so that two sources arriving on two
workers at once never count the money twice.  Matching (models/mpesa_matching.py) turns matched
money into posted, reconciled account.payment records through payment transactions of the
provider; money it cannot place waits in the exceptions queue (state 'unmatched') for an accountant.
"""
import logging
from datetime import timedelta, timezone

from markupsafe import Markup

from odoo import api, fields, models
from odoo.exceptions import UserError
from odoo.tools.misc import formatLang

from .. import const, daraja
from .mpesa_payable_reference import reference_key

_logger = logging.getLogger(__name__)

LEDGER_STATES = [
    ('unmatched', "To match"),
    ('matched', "Matched"),
    ('partial', "Part-payment"),
    ('over', "Overpaid"),
    ('not_ours', "Not ours"),
    ('refund', "To refund"),
]
# Unmatched rows are matched again by the hourly cron for so long (an invoice posted after its
# payment, an STK prompt settled after its Pull row): later, they wait for an accountant only.
AUTO_REMATCH_FOR = timedelta(days=7)


class MpesaLedger(models.Model):
    _name = 'muchiri.mpesa.ledger'
    _description = "M-Pesa Ledger"
    _inherit = ['mail.thread', 'mail.activity.mixin']
    _order = 'trans_time desc, id desc'
    # Accountants read the rows and comment on them; the state moves only through the methods below.
    _mail_post_access = 'read'

    name = fields.Char(string="Receipt", required=True, readonly=True, help="M-Pesa's TransID.")
    provider_id = fields.Many2one('payment.provider', required=True, readonly=True, ondelete='restrict', index=True)
    company_id = fields.Many2one('res.company', required=True, readonly=True, index=True)
    currency_id = fields.Many2one(
        'res.currency', required=True, readonly=True, default=lambda self: self.env.ref('base.KES'),
    )
    amount = fields.Monetary(readonly=True, tracking=True)
    trans_time = fields.Datetime(string="Paid On", readonly=True, index=True)
    transaction_type = fields.Char(readonly=True)
    shortcode = fields.Char(readonly=True)
    bill_ref = fields.Char(string="Account", readonly=True, help="The account number the payer typed.")
    bill_ref_key = fields.Char(string="Account Key", readonly=True)
    invoice_number = fields.Char(readonly=True)
    third_party_id = fields.Char(string="Third-Party ID", readonly=True)
    org_balance = fields.Char(string="Shortcode Balance", readonly=True)
    msisdn = fields.Char(string="MSISDN (as sent)", readonly=True)
    msisdn_hash = fields.Char(string="MSISDN Hash", readonly=True)
    phone = fields.Char(readonly=True)
    payer_name = fields.Char(readonly=True)

    source_stk = fields.Boolean(string="STK", readonly=True, help="An STK callback reported it.")
    source_c2b = fields.Boolean(string="C2B", readonly=True, help="A C2B confirmation reported it.")
    source_pull = fields.Boolean(string="Pull", readonly=True, help="Pull Transactions reported it.")
    sources = fields.Char(compute='_compute_sources')
    pull_amount = fields.Monetary(
        string="Amount per Safaricom", readonly=True,
        help="The amount Pull Transactions reported for this receipt.",
    )
    conflict = fields.Boolean(
        readonly=True, tracking=True,
        help="Two sources disagree on this receipt (amount), or its money was counted twice.",
    )

    state = fields.Selection(
        selection=LEDGER_STATES, default='unmatched', required=True, readonly=True, index=True, tracking=True,
    )
    note = fields.Char(string="Match", readonly=True, help="How the payment was matched, or why not.")
    partner_id = fields.Many2one('res.partner', string="Payer", readonly=True, tracking=True)
    sale_order_ids = fields.Many2many(
        'sale.order', 'muchiri_mpesa_ledger_sale_order_rel', 'ledger_id', 'order_id',
        string="Orders", readonly=True,
    )
    invoice_ids = fields.Many2many(
        'account.move', 'muchiri_mpesa_ledger_invoice_rel', 'ledger_id', 'move_id',
        string="Invoices", readonly=True,
    )
    transaction_ids = fields.One2many('payment.transaction', 'mpesa_ledger_id', string="Transactions", readonly=True)
    payment_ids = fields.Many2many('account.payment', compute='_compute_payment_ids', string="Payments")
    refund_amount = fields.Monetary(string="To Refund", readonly=True, tracking=True)
    not_ours_reason = fields.Text(string="Why Not Ours", readonly=True)
    event_ids = fields.One2many('muchiri.mpesa.event', 'ledger_id', string="Exchanges", readonly=True)

    def init(self):
        """One row per receipt and company, in the database itself: the sources' race ends there."""
        self.env.cr.execute(
            "CREATE UNIQUE INDEX IF NOT EXISTS muchiri_mpesa_ledger_receipt_uniq"
            " ON muchiri_mpesa_ledger (company_id, name)"
        )

    # === COMPUTE METHODS === #

    @api.depends('source_stk', 'source_c2b', 'source_pull')
    def _compute_sources(self):
        for row in self:
            row.sources = ', '.join(label for flag, label in (
                (row.source_stk, "STK"), (row.source_c2b, "C2B"), (row.source_pull, "Pull"),
            ) if flag)

    @api.depends('transaction_ids.payment_id')
    def _compute_payment_ids(self):
        for row in self:
            row.payment_ids = row.transaction_ids.payment_id

    @api.depends('name', 'amount')
    def _compute_display_name(self):
        for row in self:
            row.display_name = f"{row.name} ({formatLang(self.env, row.amount, currency_obj=row.currency_id)})"

    # === RECORDING: ONE ROW PER RECEIPT === #

    @api.model
    def _mpesa_record(self, provider, receipt, source, values):
        """The row of `receipt` for `provider`'s company, created by this source or found, locked
        until the end of the database transaction, with `source` added to it.

        A concurrent worker inserting the same receipt makes this one wait for it, then find its
        row; when that row is invisible to this transaction's snapshot, PostgreSQL raises a
        serialization failure: the caller starts a fresh transaction and tries again.

        :param str source: 'stk', 'c2b' or 'pull'
        :param dict values: what the source says of the payment (fields of this model)
        :return: the row (sudo), and whether this call created it
        :rtype: tuple[muchiri.mpesa.ledger, bool]
        """
        # M-Pesa receipts are upper case: a lower-case copy of one is the same money, not more.
        receipt = (receipt or '').strip().upper()
        if not receipt:
            raise UserError(self.env._("An M-Pesa payment without a receipt cannot be recorded."))
        company = provider.company_id
        cr = self.env.cr
        self.flush_model()
        # INSERT .. ON CONFLICT, not create(): the loser of the race must neither fail its
        # transaction nor log a unique violation.  The other fields are written through the ORM.
        cr.execute(
            """INSERT INTO muchiri_mpesa_ledger (name, company_id, provider_id, currency_id, state,
                                                   create_uid, write_uid, create_date, write_date)
               VALUES (%s, %s, %s, %s, 'unmatched', %s, %s, now() AT TIME ZONE 'UTC', now() AT TIME ZONE 'UTC')
               ON CONFLICT (company_id, name) DO NOTHING RETURNING id""",
            [receipt, company.id, provider.id, self.env.ref('base.KES').id, self.env.uid, self.env.uid],
            log_exceptions=False,
        )
        inserted = cr.fetchone()
        cr.execute(
            "SELECT id FROM muchiri_mpesa_ledger WHERE company_id = %s AND name = %s FOR NO KEY UPDATE",
            [company.id, receipt], log_exceptions=False,
        )
        row = self.sudo().browse(cr.fetchone()[0])
        row.invalidate_recordset()
        created = bool(inserted)
        row._mpesa_add_source(source, values, created)
        return row, created

    def _mpesa_add_source(self, source, values, created):
        """Add what `source` says of this (locked) row: its flag, the fields still empty, and a
        conflict when it disagrees with what is recorded."""
        self.ensure_one()
        amount = values.get('amount')
        already = self[f'source_{source}']
        update = {f'source_{source}': True}
        if created:
            update.update(values)
        else:
            # What a first source left empty (a Pull row has no payer name, an STK callback no
            # account), never what it said.
            update.update({key: value for key, value in values.items()
                           if value not in (None, False, '') and not self[key]})
            if amount is not None and self.currency_id.compare_amounts(amount, self.amount):
                update['conflict'] = True
                self._mpesa_ask_accountants(self.env._(
                    "%(origin)s reports %(new)s for receipt %(receipt)s, recorded as %(old)s: check it"
                    " on the M-Pesa statement.", origin=source.upper(), receipt=self.name,
                    new=self._mpesa_format(amount), old=self._mpesa_format(self.amount),
                ))
        if source == 'pull' and amount is not None:
            update['pull_amount'] = amount
        if 'bill_ref' in update:
            update['bill_ref_key'] = reference_key(update['bill_ref'])
        self.write(update)
        if created:
            self.message_post(body=self.env._("Reported by %(origin)s.", origin=source.upper()))
        elif not already:
            self.message_post(body=self.env._("Also reported by %(origin)s.", origin=source.upper()))

    @api.model
    def _mpesa_record_c2b(self, provider, payment):
        """Record a C2B confirmation (a daraja.C2BPayment) in the ledger and match it if new."""
        row, created = self._mpesa_record(provider, payment.trans_id, 'c2b', {
            'amount': float(payment.amount),
            'trans_time': _naive_utc(payment.trans_time),
            'transaction_type': payment.transaction_type or False,
            'shortcode': payment.shortcode or False,
            'bill_ref': payment.bill_ref or False,
            'invoice_number': payment.invoice_number or False,
            'third_party_id': payment.third_party_id or False,
            'org_balance': payment.org_balance or False,
            'msisdn': payment.msisdn or False,
            'msisdn_hash': payment.msisdn_hash or False,
            'phone': payment.phone or False,
            'payer_name': payment.payer_name or False,
        })
        if row.state == 'unmatched':
            row._mpesa_match()
        return row, created

    @api.model
    def _mpesa_record_pull(self, provider, pulled):
        """Record a Pull Transactions row (a daraja.PullTransaction) and match it if new."""
        try:
            phone = daraja.normalize_msisdn(pulled.msisdn) if pulled.msisdn else False
        except daraja.DarajaValidationError:
            phone = False  # Masked, or not a Safaricom mobile.
        row, created = self._mpesa_record(provider, pulled.transaction_id, 'pull', {
            'amount': float(pulled.amount),
            'trans_time': _naive_utc(pulled.trx_date),
            'transaction_type': pulled.transaction_type or False,
            'bill_ref': pulled.bill_reference or False,
            'msisdn': pulled.msisdn or False,
            'phone': phone,
        })
        if row.state == 'unmatched':
            row._mpesa_match()
        return row, created

    # === MATCHING === #

    def _mpesa_match(self):
        """Match this (locked) row if it still waits, through the matching service.

        :return: the row's state
        """
        self.ensure_one()
        if self.state != 'unmatched':
            return self.state
        return self.env['muchiri.mpesa.matching']._mpesa_match(self)

    @api.model
    def _cron_mpesa_rematch(self, limit=const.RECONCILE_BATCH_SIZE):
        """Match again what waits in the exceptions queue: the document may exist now.  Each row
        under its own lock, skipped when another worker has it; committed one by one."""
        rows = self.sudo().search([
            ('state', '=', 'unmatched'), ('create_date', '>=', fields.Datetime.now() - AUTO_REMATCH_FOR),
        ], order='id', limit=limit)
        Transaction = self.env['payment.transaction']
        matched = 0
        for row in rows:
            try:
                with self.env.cr.savepoint():
                    if row._mpesa_lock(skip=True) and row._mpesa_match() != 'unmatched':
                        matched += 1
            except Exception:
                _logger.warning("M-Pesa ledger row %s could not be matched again.", row.id, exc_info=True)
            Transaction._mpesa_commit()
        return matched

    def _mpesa_lock(self, skip=False):
        """Hold this row's lock until the end of the database transaction.

        :return: whether it is held (False with `skip` when another worker has it)
        """
        self.ensure_one()
        self.env.cr.execute(
            f"SELECT id FROM muchiri_mpesa_ledger WHERE id = %s FOR NO KEY UPDATE{' SKIP LOCKED' if skip else ''}",
            [self.id], log_exceptions=False,
        )
        held = bool(self.env.cr.fetchone())
        self.invalidate_recordset()
        return held

    # === ACCOUNTANTS' ACTIONS (the wizards call these) === #

    def _mpesa_check_can_act(self):
        self.ensure_one()
        self.env['payment.provider']._mpesa_check_group('account.group_account_invoice')
        self._mpesa_lock()
        if self.state != 'unmatched':
            raise UserError(self.env._(
                "M-Pesa payment %(receipt)s is no longer waiting to be matched (it is %(state)s).",
                receipt=self.name, state=dict(LEDGER_STATES)[self.state],
            ))

    def _mpesa_match_by_hand(self, documents):
        """An accountant places this payment on `documents` (orders and invoices, in that order):
        each is paid up to what it owes, the rest goes to the last one, flagged for refund.

        :param list documents: sale orders and invoices
        :return: the row's new state
        """
        self._mpesa_check_can_act()
        if not documents:
            raise UserError(self.env._("Choose the orders or invoices this payment pays."))
        for document in documents:
            if document.company_id != self.company_id:
                raise UserError(self.env._("%s belongs to another company.", document.display_name))
            if document.currency_id != self.currency_id:
                raise UserError(self.env._("%(document)s is in %(currency)s: M-Pesa money is in %(kes)s.",
                                           document=document.display_name, currency=document.currency_id.name,
                                           kes=self.currency_id.name))
            # The wizard's domain is the browser's: customer money pays open orders and posted
            # customer invoices only (a draft cannot be reconciled, a bill is a supplier's).
            if document._name == 'account.move':
                if document.move_type != 'out_invoice' or document.state != 'posted':
                    raise UserError(self.env._("%s is not a posted customer invoice.", document.display_name))
            elif document._name != 'sale.order' or document.state not in ('draft', 'sent', 'sale'):
                raise UserError(self.env._("%s is cancelled.", document.display_name))
        row = self.sudo()
        row.note = self.env._("Matched by %s.", self.env.user.name)
        state = self.env['muchiri.mpesa.matching']._mpesa_pay_documents(
            row, [document.sudo() for document in documents], row.note,
        )
        row.transaction_ids._mpesa_post_process()  # The accountant sees the payments at once.
        self._mpesa_close_activities()
        return state

    def _mpesa_mark_not_ours(self, reason):
        """Money of another business (a wrong shortcode typed, a test): kept, placed nowhere."""
        self._mpesa_check_can_act()
        reason = (reason or '').strip()
        if not reason:
            raise UserError(self.env._("Say why this payment is not ours."))
        row = self.sudo()
        row.write({'state': 'not_ours', 'not_ours_reason': reason, 'note': self.env._("Not ours.")})
        row.message_post(body=self.env._("Marked as not ours by %(user)s: %(reason)s",
                                         user=self.env.user.name, reason=reason),
                         author_id=self.env.user.partner_id.id)
        self._mpesa_close_activities()

    def _mpesa_mark_for_refund(self, reason):
        """Money to give back whole (issue 11 refunds it): the accountants get an activity."""
        self._mpesa_check_can_act()
        reason = (reason or '').strip()
        if not reason:
            raise UserError(self.env._("Say why this payment is to be refunded."))
        row = self.sudo()
        row.write({'state': 'refund', 'refund_amount': self.amount, 'note': self.env._("To refund.")})
        row.message_post(body=self.env._("Flagged for refund by %(user)s: %(reason)s",
                                         user=self.env.user.name, reason=reason),
                         author_id=self.env.user.partner_id.id)
        self._mpesa_close_activities()
        row._mpesa_ask_accountants(self.env._(
            "Refund %(amount)s of M-Pesa payment %(receipt)s to the payer: %(reason)s",
            amount=self._mpesa_format(self.amount), receipt=self.name, reason=reason,
        ), summary=self.env._("M-Pesa: refund a payment"))

    # === HELPERS === #

    def _mpesa_format(self, amount):
        return formatLang(self.env, amount, currency_obj=self.currency_id)

    def _mpesa_recipients(self):
        provider = self.provider_id.sudo()
        return provider.mpesa_alert_group_id.users.filtered(lambda user: user.active and not user.share)

    def _mpesa_ask_accountants(self, message, summary=None):
        """Post `message` on the row and give the provider's alert recipients an activity."""
        self.ensure_one()
        self.message_post(body=message)
        for user in self._mpesa_recipients():
            self.activity_schedule(
                'mail.mail_activity_data_todo', summary=summary or self.env._("M-Pesa: check a payment"),
                note=Markup("<p>%s</p>") % message, user_id=user.id,
            )

    def _mpesa_close_activities(self):
        self.sudo().activity_ids.action_feedback(feedback=self.env._("Done by %s.", self.env.user.name))


def _naive_utc(value):
    """An aware datetime of the Daraja layer as Odoo stores it (naive UTC); False for none."""
    return value.astimezone(timezone.utc).replace(tzinfo=None) if value else False
