# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""The M-Pesa ledger: one row per M-Pesa receipt (TransID) that reached the provider's shortcode,
whichever source told us first (an STK callback, a C2B confirmation, a Pull Transactions row), and
where its money went (docs/design.md, 7. The ledger and C2B).

A row is created once per (company, receipt), under a unique index; every source that reports the
receipt later only adds itself to the row, under the row's lock, so that two sources arriving on two
workers at once never count the money twice.  Matching (models/mpesa_matching.py) turns matched
money into posted, reconciled account.payment records through payment transactions of the
provider; money it cannot place waits in the exceptions queue (state 'unmatched') for an accountant.

CONFIRMATION.  Daraja signs nothing it posts: a C2B confirmation is only a claim, which anyone who
learns the provider's secret path can make.  So a row's money is booked on a document only once
Daraja itself confirmed the receipt, its amount and the shortcode: the STK Query that settled our
prompt, a Transaction Status result, or a Pull Transactions row (a list we asked Daraja for).  Until
then the row is 'awaiting' confirmation: visible, matched to nothing, moving no goods.  A provider
with no way to ask (no initiator, no Pull) books C2B money on its source check alone when that check
refuses unknown addresses; otherwise an accountant confirms it against M-Pesa's statement.

A claim never rewrites what Daraja said: on a row another source recorded, it fills only what no
matching rule reads (DISPLAY_FIELDS).  A Pull row that names another account than the claim that
created the row is a conflict, which Transaction Status (it carries no account) does not settle.
A Transaction Status result counts only when it names both conversation IDs of our query.
"""
import logging
from datetime import timedelta
from decimal import Decimal

from markupsafe import Markup

from odoo import api, fields, models
from odoo.exceptions import UserError
from odoo.fields import Command
from odoo.tools.misc import formatLang

from .. import const, daraja, utils

_logger = logging.getLogger(__name__)

LEDGER_STATES = [
    ('awaiting', "Awaiting confirmation"),
    ('unmatched', "To match"),
    ('matched', "Matched"),
    ('partial', "Part-payment"),
    ('over', "Overpaid"),
    ('not_ours', "Not ours"),
    ('refund', "To refund"),
    ('refunded', "Refunded"),
]
# Who confirmed that a row's money reached the shortcode (see CONFIRMATION in the module docstring):
# Daraja itself (its STK Query, Transaction Status or Pull list), or, where the provider
# has no way to ask, the source check or an accountant holding M-Pesa's statement.
CONFIRMATIONS = [
    ('stk', "STK Query"),
    ('status', "Transaction Status"),
    ('pull', "Pull Transactions"),
    ('statement', "The imported M-Pesa statement"),
    ('source', "Source check only"),
    ('hand', "An accountant, against the statement"),
]
# Confirmations by Daraja itself: the receipts they confirm are verified receipts.
# The statement is the accountant's own record from Safaricom: as good as Daraja's word on the
# receipt, its amount and the shortcode (docs/design.md, Money safety on every door).
DARAJA_CONFIRMATIONS = ('stk', 'status', 'pull', 'statement')
# What a source Daraja does not stand behind may add to a row another source recorded: shown to
# accountants, read by no matching rule (see _mpesa_add_source).
DISPLAY_FIELDS = ('payer_name', 'org_balance', 'third_party_id', 'msisdn')


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
    source_statement = fields.Boolean(
        string="Statement", readonly=True, help="An imported M-Pesa statement lists it.",
    )
    source_b2b = fields.Boolean(
        string="B2B", readonly=True,
        help="A till paid it after our B2B Express Checkout prompt (Transaction Status proved it).",
    )
    sources = fields.Char(compute='_compute_sources')
    pull_amount = fields.Monetary(
        string="Amount per Safaricom", readonly=True,
        help="The amount Pull Transactions reported for this receipt.",
    )
    conflict = fields.Boolean(
        readonly=True, tracking=True,
        help="Two sources disagree on this receipt (amount), or its money was counted twice.",
    )
    confirmation = fields.Selection(
        selection=CONFIRMATIONS, string="Confirmed By", readonly=True, tracking=True,
        help="Who confirmed that this money reached the shortcode.  Until then nothing is paid with it.",
    )
    confirmation_note = fields.Char(string="Confirmation", readonly=True)
    status_conversation_id = fields.Char(
        string="Status Check ConversationID", readonly=True, copy=False, index='btree_not_null',
    )
    status_originator_id = fields.Char(
        string="Status Check OriginatorConversationID", readonly=True, copy=False, index='btree_not_null',
    )
    status_next_at = fields.Datetime(
        string="Next Transaction Status Check", readonly=True, copy=False, index='btree_not_null',
        help="When M-Pesa's Transaction Status is asked to confirm this receipt.",
    )
    status_count = fields.Integer(string="Transaction Status Checks", readonly=True, copy=False)

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
    reversal_receipt = fields.Char(
        string="Reversal", readonly=True, help="The receipt of the M-Pesa reversal that gave this money back.",
    )
    reversed_at = fields.Datetime(string="Refunded On", readonly=True)
    not_ours_reason = fields.Text(string="Why Not Ours", readonly=True)
    event_ids = fields.One2many('muchiri.mpesa.event', 'ledger_id', string="Exchanges", readonly=True)

    def init(self):
        """One row per receipt and company, in the database itself: the sources' race ends there."""
        self.env.cr.execute(
            "CREATE UNIQUE INDEX IF NOT EXISTS muchiri_mpesa_ledger_receipt_uniq"
            " ON muchiri_mpesa_ledger (company_id, name)"
        )

    # === COMPUTE METHODS === #

    @api.depends('source_stk', 'source_c2b', 'source_pull', 'source_b2b', 'source_statement')
    def _compute_sources(self):
        for row in self:
            row.sources = ', '.join(label for flag, label in (
                (row.source_stk, "STK"), (row.source_c2b, "C2B"), (row.source_pull, "Pull"), (row.source_b2b, "B2B"),
                (row.source_statement, "Statement"),
            ) if flag)

    @api.depends('transaction_ids.payment_id')
    def _compute_payment_ids(self):
        for row in self:
            row.payment_ids = row.transaction_ids.payment_id

    @api.depends('name', 'amount')
    def _compute_display_name(self):
        for row in self:
            row.display_name = f"{row.name} ({formatLang(self.env, row.amount, currency_obj=row.currency_id)})"

    # === BUSINESS METHODS - RECORDING: ONE ROW PER RECEIPT === #

    @api.model
    def _mpesa_record(self, provider, receipt, source, values, notes=None):
        """The row of `receipt` for `provider`'s company, created by this source or found, locked
        until the end of the database transaction, with `source` added to it.

        A concurrent worker inserting the same receipt makes this one wait for it, then find its
        row; when that row is invisible to this transaction's snapshot, PostgreSQL raises a
        serialization failure: the caller starts a fresh transaction and tries again.

        :param str source: 'stk', 'c2b', 'pull', 'b2b' or 'statement'
        :param dict values: what the source says of the payment (fields of this model)
        :param list notes: where a row this call creates gathers its chatter notes, for the caller
                           to post as one message (`_mpesa_post_notes`); posted at once without
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
            [receipt, company.id, provider.id, self.env['ir.model.data']._xmlid_to_res_id('base.KES'),
             self.env.uid, self.env.uid],
            log_exceptions=False,
        )
        inserted = cr.fetchone()
        # Locked by its receipt, not by id (`utils.lock_rows`): a row the other worker just inserted
        # may be invisible to this snapshot, and only a locking read then fails to serialize.
        cr.execute(
            "SELECT id FROM muchiri_mpesa_ledger WHERE company_id = %s AND name = %s FOR NO KEY UPDATE",
            [company.id, receipt], log_exceptions=False,
        )
        row = self.sudo().browse(cr.fetchone()[0])
        row.invalidate_recordset()
        created = bool(inserted)
        row._mpesa_add_source(source, values, created, notes if created else None)
        return row, created

    def _mpesa_add_source(self, source, values, created, notes=None):
        """Add what `source` says of this (locked) row: its flag, the fields still empty, and a
        conflict when it disagrees with what is recorded.  Its chatter notes go to `notes` when
        given (see `_mpesa_note`)."""
        self.ensure_one()
        values = dict(values)
        confirms = values.pop('confirmation', False)
        amount = values.get('amount')
        already = self[f'source_{source}']
        update = {f'source_{source}': True}
        if created:
            update.update(values)
        else:
            # What a first source left empty (a Pull row has no payer name, an STK callback no
            # account), never what it said.  A source Daraja does not stand behind (a C2B
            # confirmation, anyone's claim) fills only what matching never reads: an account
            # number or a payer it filled in would place money Daraja confirmed on the claimant's
            # document.
            fillable = values if confirms else {key: values[key] for key in DISPLAY_FIELDS if key in values}
            update.update({key: value for key, value in fillable.items()
                           if value not in (None, False, '') and not self[key]})
            if amount is not None and self.currency_id.compare_amounts(amount, self.amount):
                update['conflict'] = True
                confirms = False  # Daraja's word disagrees with what was claimed first.
                self._mpesa_ask_accountants(self.env._(
                    "%(origin)s reports %(new)s for receipt %(receipt)s, recorded as %(old)s: check it"
                    " on the M-Pesa statement.", origin=source.upper(), receipt=self.name,
                    new=self._mpesa_format(amount), old=self._mpesa_format(self.amount),
                ))
            account = values.get('bill_ref')
            if source == 'pull' and account and self.bill_ref \
                    and utils.reference_key(account) != utils.reference_key(self.bill_ref):
                # Pull lists what the payer typed; a claim naming another account is not this money's.
                update['conflict'] = True
                confirms = False
                self._mpesa_ask_accountants(self.env._(
                    "Pull Transactions says receipt %(receipt)s was paid to account %(new)s, recorded as %(old)s:"
                    " check it on the M-Pesa statement.", receipt=self.name, new=account, old=self.bill_ref,
                ))
            elif source == 'statement' and account and self.bill_ref and not self.confirmation \
                    and utils.reference_key(account) != utils.reference_key(self.bill_ref):
                # The same for the imported statement (its A/C No.), against a claim nobody confirmed.
                update['conflict'] = True
                confirms = False
                self._mpesa_ask_accountants(self.env._(
                    "The M-Pesa statement says receipt %(receipt)s was paid to account %(new)s, recorded as"
                    " %(old)s: check it.", receipt=self.name, new=account, old=self.bill_ref,
                ))
        if source == 'pull' and amount is not None:
            update['pull_amount'] = amount
        if 'bill_ref' in update:
            update['bill_ref_key'] = utils.reference_key(update['bill_ref'])
        # Daraja's own word (its STK Query, its Pull list) confirms the row, or makes a weaker
        # confirmation (the source check, a hand) a verified one.
        if confirms and self.confirmation not in DARAJA_CONFIRMATIONS:
            update.update(confirmation=confirms, confirmation_note=self.env._(
                "Reported by Daraja's %s.", source.upper()), status_next_at=False)
        else:
            confirms = False
        self.write(update)
        if created:
            self._mpesa_note(self.env._("Reported by %(origin)s.", origin=source.upper()), notes)
        elif not already:
            self._mpesa_note(self.env._("Also reported by %(origin)s.", origin=source.upper()), notes)
        if confirms:
            self._mpesa_confirmed(self.confirmation_note, notes)

    @api.model
    def _mpesa_record_c2b(self, provider, payment):
        """Record a C2B confirmation (a daraja.C2BPayment) in the ledger and match it if new."""
        return self._mpesa_record_and_match(provider, payment.trans_id, 'c2b', {
            'amount': float(payment.amount),
            'trans_time': utils.naive_utc(payment.trans_time),
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

    @api.model
    def _mpesa_record_pull(self, provider, pulled):
        """Record a Pull Transactions row (a daraja.PullTransaction) and match it if new."""
        try:
            phone = daraja.normalize_msisdn(pulled.msisdn) if pulled.msisdn else False
        except daraja.DarajaValidationError:
            phone = False  # Masked, or not a Safaricom mobile.
        return self._mpesa_record_and_match(provider, pulled.transaction_id, 'pull', {
            'amount': float(pulled.amount),
            'trans_time': utils.naive_utc(pulled.trx_date),
            'transaction_type': pulled.transaction_type or False,
            'bill_ref': pulled.bill_reference or False,
            'msisdn': pulled.msisdn or False,
            'phone': phone,
            # Daraja listed it to us, for our shortcode: the receipt and its amount are Daraja's word.
            'confirmation': 'pull',
        })

    @api.model
    def _mpesa_record_and_match(self, provider, receipt, source, values):
        """`_mpesa_record`, then the row is matched if it still waits."""
        row, created = self._mpesa_record(provider, receipt, source, values)
        if row.state in ('awaiting', 'unmatched'):
            row._mpesa_match()
        return row, created

    # === BUSINESS METHODS - MATCHING === #

    def _mpesa_match(self):
        """Match this (locked) row if it still waits, through the matching service.  Money nobody
        confirmed yet is matched to nothing: the row waits for its confirmation, which is asked.

        :return: the row's state
        """
        self.ensure_one()
        if self.state not in ('awaiting', 'unmatched'):
            return self.state
        Matching = self.env['muchiri.mpesa.matching']
        if not self.confirmation:
            # Our own prompt's receipt, reported again: linked to the prompt, nothing paid twice.
            if not Matching._mpesa_match_holder(self):
                self._mpesa_await_confirmation()
            return self.state
        if self.state == 'awaiting':
            self.state = 'unmatched'
        return Matching._mpesa_match(self)

    def _mpesa_link_prompt(self, tx, notes=None):
        """Prompt `tx` holds this row's receipt: the row's money is the prompt's, and pays what it
        paid.  Its chatter note goes to `notes` when given (see `_mpesa_note`)."""
        self.ensure_one()
        documents = tx._mpesa_documents()
        values = {
            'state': 'matched',
            'note': self.env._("Paid by M-Pesa prompt %s.", tx.reference),
            'partner_id': self.partner_id.id or tx.partner_id.commercial_partner_id.id,
        }
        # Only what there is to link: writing no link still reads the row's documents.
        if tx.sale_order_ids:
            values['sale_order_ids'] = [Command.link(order.id) for order in tx.sale_order_ids]
        if tx.invoice_ids:
            values['invoice_ids'] = [Command.link(move.id) for move in tx.invoice_ids]
        self.write(values)
        self._mpesa_note(self.env._(
            "Paid by M-Pesa prompt %(reference)s%(documents)s.", reference=tx.reference,
            # No f-string inside _(): Odoo's term extraction cannot read one.
            documents=' (' + ', '.join(documents.mapped('name')) + ')' if documents else '',
        ), notes)

    def _mpesa_placed(self, state, note, documents, refund_amount):
        """The matching placed this row's money on `documents` (orders and invoices, in one list).

        :param str state: 'matched', 'partial' or 'over'
        :param float refund_amount: what is left over, to refund ('over')
        """
        self.ensure_one()
        self.write({
            'state': state,
            'note': note,
            'refund_amount': refund_amount,
            'sale_order_ids': [Command.set([doc.id for doc in documents if doc._name == 'sale.order'])],
            'invoice_ids': [Command.set([doc.id for doc in documents if doc._name == 'account.move'])],
            'partner_id': self.partner_id.id or documents[0].partner_id.commercial_partner_id.id,
        })

    # === BUSINESS METHODS - CONFIRMATION BY DARAJA (see the module docstring) === #

    def _mpesa_await_confirmation(self):
        """Hold this unconfirmed row and ask for its confirmation the fastest way the provider has:
        Transaction Status at once, else the next Pull; with neither, the source check decides when
        it refuses unknown addresses, else an accountant does."""
        self.ensure_one()
        provider = self.provider_id.sudo()
        first = self.state != 'awaiting'
        values = {'state': 'awaiting'}
        if self.conflict:
            values['note'] = self.env._("M-Pesa's own records disagree with this payment: check it on the statement.")
        elif provider._mpesa_has_initiator():
            values.update(status_next_at=self.status_next_at or fields.Datetime.now(), note=self.env._(
                "Awaiting M-Pesa's confirmation: its Transaction Status is asked."))
        elif provider.mpesa_pull_registered_at and not provider._mpesa_pull_refusal():
            values['note'] = self.env._("Awaiting M-Pesa's confirmation: the next Pull Transactions query lists it.")
        elif provider.mpesa_ip_check == 'enforce':
            self.write(values)
            self._mpesa_confirm('source', self.env._(
                "Booked on the source check alone: the provider can neither ask M-Pesa's Transaction Status"
                " nor Pull Transactions, and it refuses unknown addresses."))
            return
        else:
            values['note'] = self.env._(
                "Awaiting an accountant: the provider can ask M-Pesa neither by Transaction Status nor by"
                " Pull, and its source check does not refuse unknown addresses.  Confirm it against the"
                " M-Pesa statement.")
        self.write(values)
        if values.get('status_next_at'):
            self.env['payment.transaction']._mpesa_trigger_initiator_job()
        elif first and not self.conflict and not provider.mpesa_pull_registered_at:
            self._mpesa_ask_accountants(values['note'], summary=self.env._("M-Pesa: confirm a payment"))

    def _mpesa_confirm(self, how, note):
        """Record who confirmed this (locked) row's money, then place it."""
        self.ensure_one()
        self.write({'confirmation': how, 'confirmation_note': note[:250], 'status_next_at': False})
        self._mpesa_confirmed(note)

    def _mpesa_confirmed(self, note, notes=None):
        """The row's money is confirmed: its receipts are verified ones, and it is placed now.
        Its chatter note goes to `notes` when given (see `_mpesa_note`)."""
        self._mpesa_note(self.env._("Confirmed: %s", note), notes)
        if self.confirmation in DARAJA_CONFIRMATIONS:
            self.env['payment.transaction'].sudo().search([
                ('provider_id', '=', self.provider_id.id), ('mpesa_receipt_number', '=', self.name),
                ('mpesa_receipt_status', '=', 'unverified'),
            ])._mpesa_receipt_confirmed_by_ledger(self, note)
        if self.state == 'awaiting':
            self.state = 'unmatched'
            self._mpesa_match()
            self.transaction_ids._mpesa_post_process()

    def _mpesa_status_party(self):
        return self.provider_id._mpesa_initiator_party()

    def _mpesa_send_status_query(self, session=None):
        """Ask M-Pesa's Transaction Status about this row's receipt; the result comes to our ResultURL."""
        self.ensure_one()
        provider = self.provider_id
        initiator, credential = provider._mpesa_initiator()
        party, identifier = self._mpesa_status_party()
        self.status_count += 1
        ack = provider._mpesa_client(session=session).transaction_status(
            initiator=initiator, security_credential=credential, transaction_id=self.name,
            party_a=party, identifier_type=identifier,
            result_url=provider._mpesa_daraja_url('status_result'),
            timeout_url=provider._mpesa_daraja_url('status_timeout'),
            remarks=self.env._("Check %s", self.name)[:100],
        )
        self.write({
            'status_conversation_id': ack.conversation_id,
            'status_originator_id': ack.originator_conversation_id,
            'status_next_at': fields.Datetime.now() + timedelta(seconds=const.INITIATOR_RESULT_WAIT),
        })
        self.env['muchiri.mpesa.event']._mpesa_wake_unmatched_results(
            provider, [ack.conversation_id, ack.originator_conversation_id])
        return ack

    def _mpesa_apply_status_result(self, result):
        """A Transaction Status result of this (locked) row's receipt: completed, for its amount, to
        our shortcode, it confirms the row; anything else is a conflict for accountants.

        :return: the result event's new state and the message saying why
        """
        self.ensure_one()
        if self.confirmation:
            return 'ignored', self.env._("Receipt %s is confirmed already.", self.name)
        unknown = result.result_code in daraja.UNKNOWN_TRANSACTION_CODES
        if result.is_timeout or (not result.is_success and not unknown):
            said = self.env._("Daraja's queue timed out") if result.is_timeout else self.env._(
                "%(meaning)s (%(code)s)", code=result.result_code,
                meaning=daraja.describe_initiator_result(result.result_code))
            if result.is_timeout or result.result_code not in daraja.INITIATOR_INVALID_CODES:
                self._mpesa_schedule_status_check()
            else:
                self.status_next_at = False
            self.confirmation_note = self.env._("Transaction Status did not answer: %s", said)[:250]
            return 'processed', self.confirmation_note
        problems = self._mpesa_status_disagreements(result, self.name, self.amount, self._mpesa_status_party()[0])
        if not problems and self.source_pull:
            # Pull listed this receipt and did not confirm the row: Daraja's list disagrees with what
            # was claimed (an account Transaction Status does not carry).  Not for this answer to settle.
            self.status_next_at = False
            return 'conflict', self.env._(
                "Receipt %s: Pull Transactions disagrees with what was claimed; an accountant decides.", self.name)
        if problems:
            message = self.env._("M-Pesa's Transaction Status disagrees with receipt %(receipt)s: %(problems)s.",
                                 receipt=self.name, problems='; '.join(problems))
            self.write({'conflict': True, 'status_next_at': False, 'confirmation_note': message[:250],
                        'note': self.env._("M-Pesa's own records disagree with this payment.")})
            self._mpesa_ask_accountants(message)
            self.env['muchiri.mpesa.alert'].sudo()._mpesa_raise_receipt_proof_alert(self.provider_id)
            return 'conflict', message
        self._mpesa_confirm('status', self.env._(
            "Confirmed by M-Pesa's Transaction Status on %s.", fields.Date.today()))
        return 'processed', self.env._("Receipt %s confirmed.", self.name)

    @api.model
    def _mpesa_status_disagreements(self, result, receipt, amount, party):
        """What a Transaction Status result says that our record of a receipt does not: an unknown
        receipt, another receipt, a status other than completed, another amount, another shortcode.
        The one rule for transactions and ledger rows alike."""
        if result.result_code in daraja.UNKNOWN_TRANSACTION_CODES:
            return [self.env._("M-Pesa does not know receipt %(receipt)s: %(meaning)s (%(code)s)",
                               receipt=receipt, code=result.result_code,
                               meaning=daraja.describe_initiator_result(result.result_code))]
        problems = []
        if result.receipt_no != receipt:
            problems.append(self.env._("it describes receipt %s", result.receipt_no or '-'))
        if (result.transaction_status or '').lower() != 'completed':
            problems.append(self.env._("its status is %s, not completed", result.transaction_status or '-'))
        if result.amount is None or result.amount != Decimal(str(amount)):
            problems.append(self.env._(
                "its amount is %(said)s, the payment recorded %(paid)s",
                said=result.parameters.get('Amount') or '-', paid=self._mpesa_format(amount),
            ))
        if result.credit_party_shortcode != party:
            problems.append(self.env._(
                "the money went to %(credit)s, not to %(party)s",
                credit=result.parameters.get('CreditPartyName') or '-', party=party,
            ))
        return problems

    def _mpesa_schedule_status_check(self):
        if self.status_count >= const.INITIATOR_MAX_CHECKS:
            self.status_next_at = False
            self._mpesa_ask_accountants(self.env._(
                "M-Pesa's Transaction Status gave no answer about receipt %(receipt)s after %(count)s checks:"
                " confirm it against the M-Pesa statement.", receipt=self.name, count=self.status_count,
            ), summary=self.env._("M-Pesa: confirm a payment"))
            return
        self.status_next_at = fields.Datetime.now() + timedelta(seconds=const.INITIATOR_RESULT_WAIT)

    @api.model
    def _mpesa_send_due_status_queries(self, session, batch_size=const.RECONCILE_BATCH_SIZE):
        """Send the Transaction Status queries of the rows whose confirmation is due; each row
        under its own lock (skipped when another worker has it), committed on its own.

        :return: how many were sent, and whether Daraja asked us to stop (unreachable, throttling)
        """
        rows = self.sudo().search([
            ('status_next_at', '<=', fields.Datetime.now()), ('confirmation', '=', False),
        ], order='status_next_at, id', limit=batch_size)
        sent = 0
        for row in rows:
            outcome = 'sent'
            try:
                with self.env.cr.savepoint():
                    if not row._mpesa_lock(skip=True) or row.confirmation or not row.status_next_at \
                            or row.status_next_at > fields.Datetime.now():
                        outcome = 'skipped'
                    else:
                        row._mpesa_send_status_query(session)
            except (daraja.DarajaConnectionError, daraja.DarajaProtocolError):
                outcome = 'stop'
            except (daraja.DarajaError, UserError) as error:
                _logger.warning("M-Pesa Transaction Status query of receipt %s failed: %s", row.name, error)
                outcome = 'stop' if getattr(error, 'error_code', None) in const.THROTTLE_ERROR_CODES else 'failed'
                if outcome == 'failed':
                    with self.env.cr.savepoint():
                        row.invalidate_recordset()
                        row.status_count += 1
                        row.confirmation_note = self.env._("Transaction Status could not be asked: %s", error)[:250]
                        row._mpesa_schedule_status_check()
            if outcome == 'stop':
                with self.env.cr.savepoint():
                    row.invalidate_recordset()
                    row.status_next_at = fields.Datetime.now() + timedelta(seconds=const.RECONCILE_THROTTLE_DELAY)
            utils.commit(self.env)
            sent += outcome == 'sent'
            if outcome == 'stop':
                return sent, True
        return sent, False

    def action_mpesa_confirm_by_hand(self):
        """An accounting manager found this payment on M-Pesa's statement: its money may be placed.
        For providers that cannot ask M-Pesa, or whose question got no answer."""
        self.ensure_one()
        self.env['payment.provider']._mpesa_check_group('account.group_account_manager')
        self._mpesa_lock()
        if self.state != 'awaiting' or self.confirmation:
            raise UserError(self.env._("M-Pesa payment %s is not awaiting confirmation.", self.name))
        if self.conflict:
            raise UserError(self.env._(
                "M-Pesa's own records disagree with payment %(receipt)s (%(why)s): it cannot be confirmed by"
                " hand.  Mark it as not ours, or flag it for refund.", receipt=self.name,
                why=self.confirmation_note or self.note or '-'))
        row = self.sudo()
        row._mpesa_close_activities()
        row._mpesa_confirm('hand', self.env._("Confirmed against the M-Pesa statement by %s.", self.env.user.name))
        return True

    @api.model
    def _cron_mpesa_rematch(self, limit=const.RECONCILE_BATCH_SIZE):
        """Match again what waits in the exceptions queue: the document may exist now; and ask
        again how to confirm the rows awaiting confirmation that no question is out for (the
        provider may have an initiator now).  Each row under its own lock, skipped when another
        worker has it; committed one by one."""
        rows = self.sudo().search([
            '|', ('state', '=', 'unmatched'), '&', ('state', '=', 'awaiting'), ('status_next_at', '=', False),
            # Matched again while the addon keeps working on what is not settled (an invoice posted
            # after its payment, an STK prompt settled after its Pull row): later, an accountant.
            ('create_date', '>=', fields.Datetime.now() - timedelta(days=const.KEEP_WORKING_DAYS)),
        ], order='id', limit=limit)
        matched = 0
        for row in rows:
            try:
                with self.env.cr.savepoint():
                    if row._mpesa_lock(skip=True) and row._mpesa_match() not in ('awaiting', 'unmatched'):
                        matched += 1
            except Exception:
                _logger.warning("M-Pesa ledger row %s could not be matched again.", row.id, exc_info=True)
            utils.commit(self.env)
        return matched

    def _mpesa_lock(self, skip=False):
        """Hold this row's lock until the end of the database transaction (`utils.lock_rows`): the
        sources, the matching and the accountants handle it one after the other.

        :return: whether it is held (False with `skip` when another worker has it)
        """
        self.ensure_one()
        return bool(utils.lock_rows(self, 'skip' if skip else 'wait'))

    # === BUSINESS METHODS - ACCOUNTANTS' ACTIONS (the wizards call these) === #

    def _mpesa_check_can_act(self, states=('unmatched',)):
        self.ensure_one()
        self.env['payment.provider']._mpesa_check_group('account.group_account_invoice')
        self._mpesa_lock()
        if self.state == 'awaiting' and 'awaiting' not in states:
            raise UserError(self.env._(
                "M-Pesa payment %(receipt)s is awaiting M-Pesa's confirmation: nothing is paid with it before"
                " (%(note)s).", receipt=self.name, note=self.note or '-',
            ))
        if self.state not in states:
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
        txs = row.transaction_ids.filtered(lambda tx: not tx.is_post_processed)
        # An invoice's payment is posted now: the accountant sees it at once.  Confirming an order
        # renders and mails its PDF, seconds the accountant would watch a frozen dialog for: Odoo's
        # post-processing job does it at once, in the background.
        on_orders = txs.filtered('sale_order_ids')
        (txs - on_orders)._mpesa_post_process()
        if on_orders:
            self.env.ref('payment.cron_post_process_payment_tx')._trigger()
        self._mpesa_close_activities()
        return state

    def _mpesa_mark_not_ours(self, reason):
        """Money of another business (a wrong shortcode typed, a test, a forged report): kept,
        placed nowhere."""
        self._mpesa_check_can_act(states=('unmatched', 'awaiting'))
        reason = (reason or '').strip()
        if not reason:
            raise UserError(self.env._("Say why this payment is not ours."))
        row = self.sudo()
        row.write({'state': 'not_ours', 'not_ours_reason': reason, 'note': self.env._("Not ours."),
                   'status_next_at': False})
        row.message_post(body=self.env._("Marked as not ours by %(user)s: %(reason)s",
                                         user=self.env.user.name, reason=reason),
                         author_id=self.env.user.partner_id.id)
        self._mpesa_close_activities()

    def _mpesa_mark_for_refund(self, reason):
        """Money to give back whole: the accountants get an activity."""
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

    # === BUSINESS METHODS - REFUNDS === #

    def _mpesa_refunded(self, refund):
        """M-Pesa reversed this row's receipt (`refund`, done): the whole money went back to the
        payer, whatever the row paid."""
        self.ensure_one()
        when = refund.mpesa_paid_at or fields.Datetime.now()
        user = refund.mpesa_refunded_by_id or self.env.user
        note = self.env._(
            "Refunded by M-Pesa reversal %(reversal)s on %(when)s, asked by %(user)s (%(ref)s).",
            reversal=refund.mpesa_reversal_receipt or '-', when=fields.Datetime.to_string(when),
            user=user.name, ref=refund.reference,
        )
        self.write({
            'state': 'refunded', 'refund_amount': 0.0, 'status_next_at': False, 'note': note[:250],
            'reversal_receipt': refund.mpesa_reversal_receipt or False, 'reversed_at': when,
        })
        self.message_post(body=note, author_id=user.partner_id.id)
        self.activity_ids.filtered(
            lambda activity: activity.summary == self.env._("M-Pesa: refund a payment")
        ).action_feedback(feedback=note)

    def _mpesa_extra_paid_back(self, amount, note):
        """The accountant paid `amount` of this row's extra back by hand: once nothing is left to
        refund, the row is matched."""
        for row in self.filtered(lambda row: row.state == 'over'):
            rest = row.currency_id.round(max(row.refund_amount - amount, 0.0))
            values = {'refund_amount': rest, 'note': note[:250]}
            if row.currency_id.is_zero(rest):
                values['state'] = 'matched'
            row.write(values)
            row.message_post(body=note, author_id=self.env.user.partner_id.id)

    # === TOOLING === #

    def _message_compute_author(self, author_id=None, email_from=None, raise_on_email=True):
        """What Safaricom posts is handled as the public user: its notes are the system's, signed
        OdooBot, not "Public user"."""
        if author_id is None and not email_from and self.env.user._is_public():
            author_id = self.env['ir.model.data']._xmlid_to_res_id('base.partner_root')
        return super()._message_compute_author(author_id, email_from, raise_on_email)

    def _mpesa_format(self, amount):
        return formatLang(self.env, amount, currency_obj=self.currency_id)

    def _mpesa_note(self, body, notes=None):
        """Post `body` on the row's chatter, or add it to `notes`, which the caller posts with
        the row's other notes as one message (`_mpesa_post_notes`)."""
        self.ensure_one()
        if notes is None:
            self.message_post(body=body)
        else:
            notes.append(body)

    def _mpesa_post_notes(self, notes):
        """Post the notes gathered on this row as one message, and empty `notes`.

        When the row's state changed in this database transaction, its tracking message (logged
        at commit, with every tracked value that moved) carries them: one message says the whole
        story of a receipt an STK prompt reported, confirmed and paid (three posts and a tracking
        message cost a settled callback about half its time).  Otherwise they are posted now.
        """
        self.ensure_one()
        if not notes:
            return
        body = Markup().join(Markup("<p>%s</p>") % note for note in notes)
        notes.clear()
        # `_track_prepare` keeps the values the row had before its first tracked write; a state
        # that moved since is a change the tracking message is sure to log.
        tracked = self.env.cr.precommit.data.get(f'mail.tracking.{self._name}', {}).get(self.id)
        if tracked and tracked.get('state', self.state) != self.state:
            self._track_set_log_message(body)
        else:
            self.message_post(body=body)

    def _mpesa_ask_accountants(self, message, summary=None):
        """Post `message` on the row and give the provider's alert recipients an activity."""
        self.ensure_one()
        self.message_post(body=message)
        # The activities' mails are queued: a Daraja request or a job never waits on the mail server.
        for user in utils.alert_recipients(self.provider_id):
            self.with_context(mail_notify_force_send=False).activity_schedule(
                'mail.mail_activity_data_todo', summary=summary or self.env._("M-Pesa: check a payment"),
                note=Markup("<p>%s</p>") % message, user_id=user.id,
            )

    def _mpesa_close_activities(self):
        self.sudo().activity_ids.action_feedback(feedback=self.env._("Done by %s.", self.env.user.name))

