# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""What an M-Pesa payment pays: a sale order or a customer invoice (models/sale_order.py,
models/account_move.py), through one set of methods whatever its kind.

The reference a payer types as the paybill's account number is looked up by an index on the
normalised number of the documents it may name: matching a payment (and answering Daraja's
validation within its ~8 s) is one indexed lookup per kind of document, however many are open.
An expression index, not a stored computed field: invoice numbers are given by the sequence mixin
inside the computation of `name` (account/models/sequence_mixin.py: _set_next_sequence), after the
fields depending on `name` may already have been computed with the draft's empty number; an index
on the column itself is never stale.  The SQL expression (`utils.KEY_SQL`) and `utils.reference_key`
normalise alike.
"""
import logging
from decimal import Decimal

from odoo import api, fields, models
from odoo.exceptions import UserError
from odoo.tools import SQL
from odoo.tools.misc import format_amount, formatLang

from .. import daraja, utils

_logger = logging.getLogger(__name__)


class MpesaPayable(models.AbstractModel):
    """What an M-Pesa prompt pays: a sale order, or an invoice (portal invoices, payment links).

    The money guards of a push (one prompt at a time, nothing for a paid document, extra money
    flagged for refund) read and change documents through these methods only, whatever their kind.
    A document flagged for refund (an overpayment, a second payment of a paid order) is refunded
    in one click: the extra M-Pesa payment is reversed through Odoo's own refund flow.
    """

    _name = 'muchiri.mpesa.payable'
    _description = "Document paid by M-Pesa"

    mpesa_needs_refund = fields.Boolean(
        string="M-Pesa Refund To Check", copy=False, tracking=True,
        help="M-Pesa took more money for this document than it needed; see the chatter.",
    )
    mpesa_last_prompt_at = fields.Datetime(
        string="Last M-Pesa Prompt", copy=False, readonly=True,
        help="When the last M-Pesa prompt for this document was sent.",
    )
    mpesa_receipt_unverified = fields.Selection(
        selection=[('unverified', "Unverified"), ('conflict', "Conflict")],
        string="M-Pesa Receipt Proof", compute='_compute_mpesa_receipt_unverified',
        help="A receipt that came after the payment, not (or not yet) confirmed by M-Pesa's"
             " Transaction Status, or one that M-Pesa contradicts.",
    )
    mpesa_receipt_unverified_note = fields.Char(compute='_compute_mpesa_receipt_unverified')
    # Daraja's Dynamic QR of the document, kept while what it asks is unchanged (`mpesa_qr_for`).
    mpesa_qr_code = fields.Binary(string="M-Pesa QR Code", attachment=True, copy=False, readonly=True)
    mpesa_qr_for = fields.Char(
        string="M-Pesa QR Code For", copy=False, readonly=True,
        help="What the QR code asks: type, business number, account number and amount.",
    )

    # === COMPUTE METHODS === #

    def _compute_mpesa_receipt_unverified(self):
        # Not stored, no dependencies: read afresh each time (an abstract model names no
        # transaction_ids of its own).
        for document in self:
            txs = document.sudo().transaction_ids.filtered(
                lambda tx: tx.provider_code == 'mpesa' and tx.mpesa_receipt_status in ('unverified', 'conflict'))
            conflicts = txs.filtered(lambda tx: tx.mpesa_receipt_status == 'conflict')
            document.mpesa_receipt_unverified = 'conflict' if conflicts else 'unverified' if txs else False
            document.mpesa_receipt_unverified_note = '  '.join(
                f"{tx.mpesa_receipt_number}: {tx.mpesa_receipt_proof_note}" for tx in (conflicts or txs)
            ) or False

    # === BUSINESS METHODS - REFERENCES === #

    def _mpesa_create_reference_index(self, where=''):
        """The index of the documents' normalised numbers (see the module docstring).

        :param str where: the documents it covers (SQL of this module, never input)
        """
        self.env.cr.execute(SQL(
            "CREATE INDEX IF NOT EXISTS %s ON %s (company_id, (%s)) %s",
            SQL.identifier(f'{self._table}_mpesa_reference_idx'), SQL.identifier(self._table),
            SQL(utils.KEY_SQL.format(column='name')), SQL(where and 'WHERE ' + where),
        ))

    @api.model
    def _mpesa_search_key(self, company, key, where, fields, limit):
        """The documents (sudo) of `company` whose number normalises to `key`: one indexed lookup.

        :param str where: the documents it may find (SQL of this module, never input)
        """
        if not key:
            return self.sudo().browse()
        self.flush_model(fields)  # The lookup reads the table itself.
        self.env.cr.execute(SQL(
            "SELECT id FROM %s WHERE company_id = %s AND %s = %s %s ORDER BY id LIMIT %s",
            SQL.identifier(self._table), company.id, SQL(utils.KEY_SQL.format(column='name')), key,
            SQL(where and 'AND ' + where), limit,
        ))
        return self.sudo().browse([row[0] for row in self.env.cr.fetchall()])

    # === BUSINESS METHODS - PROVIDER AND PAYBILL === #

    def _mpesa_provider(self):
        """The M-Pesa provider (sudo) that takes this document's payments: an enabled one before one
        in test mode; empty when there is none."""
        self.ensure_one()
        Provider = self.env['payment.provider'].sudo()
        return Provider.search([
            ('code', '=', 'mpesa'), ('state', 'in', ('enabled', 'test')),
            *Provider._check_company_domain(self.company_id),
        ], order='state, sequence, id', limit=1)

    def _mpesa_paybill_details(self):
        """How to pay this document from the phone's M-Pesa menu or by scanning its QR code, or an
        empty dict when M-Pesa does not take it (no provider, not KES, not offered to its partner,
        nothing due).

        :return: {'provider', 'bank_account' (the company's res.partner.bank of the paybill or till),
                  'trx_code' ('PB' or 'BG'), 'business_number', 'account' (the document's number,
                  which the matcher reads first; none for a till), 'amount_due', 'amount' (what to
                  enter on the phone: the amount due up to a whole shilling, since a phone pays no
                  cents), 'qr_amount' (the same, at most one M-Pesa payment), 'limit_note' (the
                  sentence saying so when the amount due is more, else False)}
        """
        self.ensure_one()
        provider = self._mpesa_provider()
        if not provider or self.state == 'cancel' or provider._mpesa_unavailability_reason(
                self.partner_id.commercial_partner_id, self.currency_id):
            return {}
        due = self._mpesa_amount_due()
        bank_account = provider._mpesa_bank_account()
        if not utils.is_material(due) or not bank_account:
            return {}
        till = provider.mpesa_shortcode_type == 'till'
        amount = daraja.to_whole_shillings(Decimal(str(due)))
        qr_amount = min(amount, daraja.DARAJA_MAX_AMOUNT)
        return {
            'provider': provider,
            'bank_account': bank_account,
            'trx_code': 'BG' if till else 'PB',
            'business_number': bank_account.acc_number,
            'account': False if till else self.name,
            'amount_due': due,
            'amount': amount,
            'qr_amount': qr_amount,
            # More than one M-Pesa payment takes: the sentence saying so, in the reader's language.
            'limit_note': self.currency_id.compare_amounts(due, qr_amount) > 0 and self.env._(
                "One M-Pesa payment takes at most %(amount)s: pay the rest in further payments to the"
                " same account.", amount=format_amount(self.env, qr_amount, self.currency_id),
            ),
        }

    def _mpesa_qr_data_uri(self):
        """The document's M-Pesa QR code as a data URI for an <img>, or None when there is none:
        made by Odoo's QR mechanism (the 'mpesa' method of the company's paybill account, which asks
        Daraja's Dynamic QR API) and kept on the document while what it asks is unchanged."""
        self.ensure_one()
        details = self._mpesa_paybill_details()
        if not details:
            return None
        bank_account = details['bank_account'].with_context(mpesa_qr_document=(self._name, self.id))
        reference = details['account'] or self.name
        return bank_account.build_qr_code_base64(
            details['qr_amount'], reference, reference, self.currency_id, self.partner_id, qr_method='mpesa',
        )

    def _mpesa_kept_qr_code(self, key, make):
        """The document's QR image (base64) for `key`: the kept one, else `make()`'s, kept."""
        self.ensure_one()
        document = self.sudo()
        if document.mpesa_qr_for == key and document.mpesa_qr_code:
            return document.mpesa_qr_code
        image = make()
        if image:
            # A page or a PDF may be rendered by anyone who may read the document.
            document.with_context(tracking_disable=True).write({'mpesa_qr_code': image, 'mpesa_qr_for': key})
        return image

    # === BUSINESS METHODS - PROMPTS === #

    def _mpesa_touch(self):
        """Record the prompt on its documents.  The write also makes a concurrent push that waits on
        their row locks fail with a serialization error, so that Odoo replays it on a snapshot that
        sees this prompt."""
        self.sudo().write({'mpesa_last_prompt_at': fields.Datetime.now()})

    # === BUSINESS METHODS - STILL DUE: THE ONE ANSWER === #

    def _mpesa_amount_due(self):
        """What is still to pay on this document, whatever paid the rest (M-Pesa, a card, a bank
        transfer, a hand match, a payment of its invoices): the one answer that matching, the
        overpayment and refund flags, the portal and the payment request ask."""
        self.ensure_one()
        return self.currency_id.round(max(self.amount_total - self._mpesa_paid_amount(), 0.0))

    def _mpesa_is_due(self):
        """Whether something is still to pay on this document (`_mpesa_amount_due`)."""
        self.ensure_one()
        return self.currency_id.compare_amounts(self._mpesa_amount_due(), 0) > 0

    def _mpesa_extra_amount(self):
        """What the document's payments, less their refunds, exceed its total by."""
        self.ensure_one()
        return self.currency_id.round(self._mpesa_paid_amount() - self.amount_total)

    def _mpesa_paid_amount(self):
        """What was paid of this document so far, by every method, less what went back: the one
        figure that the amount due, the extra and the refund flag read.

        An invoice: what is reconciled with it, and its done transactions not turned into payments
        yet.  An order: what paid its posted invoices (whatever the method: a payment to the invoice
        number is the order's money too), and its own transactions that did not pay those invoices
        (a quotation's payment, not invoiced yet).
        """
        self.ensure_one()
        document = self.sudo()
        if self._name == 'account.move':
            txs = document.transaction_ids
            unposted = txs.filtered(lambda tx: tx.state in ('done', 'authorized') and not tx.payment_id)
            # A done refund of money still counted here (unposted, or its payment still reconciled
            # with this invoice: the refund's reconciliation reopens it): the money went back already.
            reconciled = document._get_reconciled_payments()
            unposted |= txs.child_transaction_ids.filtered(
                lambda tx: tx.operation == 'refund' and tx.state == 'done' and (
                    tx.source_transaction_id in unposted or tx.source_transaction_id.payment_id & reconciled)
            )
            return document.amount_total - document.amount_residual + sum(unposted.mapped('amount'))
        invoices = document.invoice_ids.filtered(
            lambda move: move.state == 'posted' and move.move_type == 'out_invoice')
        reconciled = invoices._get_reconciled_payments()
        own = document.transaction_ids.filtered(
            lambda tx: not (tx.invoice_ids & invoices) and not (tx.payment_id & reconciled))
        return sum(invoice._mpesa_paid_amount() for invoice in invoices) + self._mpesa_net_paid(own)

    @api.model
    def _mpesa_net_paid(self, transactions):
        """What `transactions` paid (done or authorized), less their done refunds (a reversed
        payment pays nothing: the customer has the money back), as read now: Odoo's own figures do
        not follow the transactions' states within a request."""
        txs = transactions.filtered(lambda tx: tx.state in ('done', 'authorized') and tx.operation != 'refund')
        # Refund children are not linked to the documents; their amounts are negative.
        refunds = txs.child_transaction_ids.filtered(lambda tx: tx.operation == 'refund' and tx.state == 'done')
        return sum(txs.mapped('amount')) + sum(refunds.mapped('amount'))

    def _mpesa_format_amount(self, amount):
        return formatLang(self.env, amount, currency_obj=self.currency_id)

    # === BUSINESS METHODS - THE REFUND FLAG === #

    def _mpesa_extra_to_refund(self):
        """What M-Pesa took for this document beyond what it needed and is still to give back: its
        own figure less what was paid back by hand, or what the ledger flagged when one payment
        overpaid it (an invoice counts only what it needed)."""
        self.ensure_one()
        payments = self._mpesa_refundable_payments()
        rows = payments.mpesa_ledger_id.filtered(lambda row: row.state == 'over')
        by_hand = sum(self.sudo().transaction_ids.mapped('mpesa_paid_back_by_hand'))
        return self.currency_id.round(max(self._mpesa_extra_amount() - by_hand, sum(rows.mapped('refund_amount'))))

    def _mpesa_update_refund_flag(self, why, provider=None, feedback=None, author=None):
        """The one rule of the refund flag: it is set while what M-Pesa took beyond what the
        document needed is still to give back (`_mpesa_extra_to_refund`; less than a shilling is
        rounding), and cleared once it is not.  Money coming in (through `provider`) can only raise
        it, money going back only clear it.

        Raised: the accountants are asked to refund (the users of the provider's alert group, else
        the salesperson).  The flag always holds; a problem with the chatter or the activities never
        undoes the payment that raised it.

        :param why: the message (or a function giving it) posted when the flag is raised or cleared
        :param provider: the provider money just came in through; none when money went back
        :param str feedback: what closes the refund activity when cleared (default: `why`)
        :param author: the res.partner the line is written as, when cleared
        :return: whether the document still asks for a refund
        """
        self.ensure_one()
        document = self.sudo()
        due_back = utils.is_material(self._mpesa_extra_to_refund())
        if due_back and provider:
            message = why() if callable(why) else why
            document.mpesa_needs_refund = True
            try:
                with self.env.cr.savepoint():
                    document.message_post(body=message)
                    for user in utils.alert_recipients(provider) or self.user_id:
                        document.with_context(mail_notify_force_send=False).activity_schedule(
                            'mail.mail_activity_data_todo',
                            summary=self.env._("M-Pesa: check and refund an extra payment"),
                            note=message,
                            user_id=user.id,
                        )
            except Exception:
                _logger.warning("The refund request of %s could not be posted.", self.display_name, exc_info=True)
        elif not due_back and not provider and document.mpesa_needs_refund:
            message = why() if callable(why) else why
            document.mpesa_needs_refund = False
            if message:
                document.message_post(body=message, author_id=author.id if author else None)
            document.activity_ids.filtered(
                lambda activity: activity.summary == self.env._("M-Pesa: check and refund an extra payment")
            ).action_feedback(feedback=feedback or message)
        return document.mpesa_needs_refund

    # === ACTION METHODS === #

    def action_mpesa_refund_extra_payment(self):
        """Refund the extra M-Pesa payment of this document through Odoo's refund flow (the
        payment's own Refund button does the same): its refund transaction and, once M-Pesa's
        result comes, its refund payment, reconciled.  When the extra is part of one payment,
        M-Pesa cannot give back only that part: the accountant chooses between reversing the whole
        payment and paying the difference back by hand (a wizard with a button for each)."""
        self.ensure_one()
        self.env['payment.provider']._mpesa_check_group('account.group_account_invoice')
        try:
            tx = self._mpesa_extra_payment()
        except UserError:
            overpaying = self._mpesa_refundable_payments().sorted('id')[-1:]
            if not overpaying or self.currency_id.compare_amounts(self._mpesa_extra_to_refund(), 0) <= 0:
                raise
            return self.env['muchiri.mpesa.refund.extra']._mpesa_open(self, overpaying)
        return self._mpesa_reverse_payment(tx)

    def _mpesa_reverse_payment(self, tx):
        """Reverse the whole M-Pesa payment `tx` of this document, as the accountant (Odoo's own
        checks); the notification says what happens next."""
        self.ensure_one()
        tx.sudo(False).action_refund()
        # The refund just made (a refused one no longer holds the reversal): its state says how it went.
        refund = tx.sudo()._mpesa_receipt_shares()[:1].child_transaction_ids.filtered(
            lambda child: child.operation == 'refund').sorted('id')[-1:]
        failed = refund.state == 'error'
        return {
            'type': 'ir.actions.client',
            'tag': 'display_notification',
            'params': {
                'type': 'danger' if failed else 'success',
                'message': refund.state_message if failed else self.env._(
                    "M-Pesa is reversing %(receipt)s (%(ref)s); its result settles the refund.",
                    receipt=refund.source_transaction_id.mpesa_receipt_number, ref=refund.reference,
                ),
                'next': {'type': 'ir.actions.client', 'tag': 'soft_reload'},
            },
        }

    def _mpesa_refund_extra_by_hand(self, tx, journal, amount):
        """The accountant paid the extra of M-Pesa payment `tx` back by hand (from the M-Pesa
        account to the customer's phone, in cash, by bank): recorded as the customer's outbound
        payment from `journal`, reconciled with the credit the extra left; the flag, its activity
        and the ledger row say it is settled, in the name of the accountant.

        :return: the posted payment
        :rtype: account.payment
        """
        self.ensure_one()
        self.env['payment.provider']._mpesa_check_group('account.group_account_invoice')
        if tx not in self._mpesa_refundable_payments():
            raise UserError(self.env._("%s is not an M-Pesa payment of this document.", tx.display_name))
        # One accountant at a time: the document's row is the one both would write, so a second
        # click waits here and then fails to serialize (Odoo retries it: it finds nothing left).
        utils.lock_rows(self)
        if not self.mpesa_needs_refund:
            raise UserError(self.env._("%s has no extra M-Pesa payment to refund.", self.display_name))
        if journal.type not in ('bank', 'cash') or journal.company_id != self.company_id:
            raise UserError(self.env._("Pay it back from a bank or cash journal of %s.", self.company_id.name))
        currency = self.currency_id
        extra = self._mpesa_extra_to_refund()
        if currency.compare_amounts(amount, 0) <= 0 or currency.compare_amounts(amount, extra) > 0:
            raise UserError(self.env._(
                "The amount paid back must be above zero and at most the extra %s.",
                self._mpesa_format_amount(extra),
            ))
        receipt = tx.mpesa_receipt_number or tx.mpesa_ledger_id.name or tx.reference
        payment = self.env['account.payment'].create({
            'payment_type': 'outbound',
            'partner_type': 'customer',
            'partner_id': tx.partner_id.commercial_partner_id.id,
            'amount': amount,
            'currency_id': currency.id,
            'journal_id': journal.id,
            'company_id': journal.company_id.id,
            'memo': self.env._("Extra of M-Pesa payment %(receipt)s - %(document)s, paid back by hand",
                               receipt=receipt, document=self.display_name),
        })
        payment.action_post()
        source = tx.sudo().payment_id
        account = payment.destination_account_id
        lines = (payment.move_id.line_ids + source.move_id.line_ids).filtered(
            lambda line: line.account_id == account and not line.reconciled)
        if source and len(lines) > 1:
            lines.sudo().reconcile()
        rest = currency.round(extra - amount)
        note = self.env._(
            "%(amount)s of the extra of M-Pesa payment %(receipt)s was paid back by hand by %(user)s"
            " (%(payment)s); still to pay back: %(rest)s.",
            amount=self._mpesa_format_amount(amount), receipt=receipt, user=self.env.user.name,
            payment=payment.name, rest=self._mpesa_format_amount(rest),
        )
        tx.sudo().mpesa_paid_back_by_hand += amount
        tx.sudo().mpesa_ledger_id._mpesa_extra_paid_back(amount, note)
        self.sudo().message_post(body=note, author_id=self.env.user.partner_id.id)
        self._mpesa_update_refund_flag(None, feedback=note)
        return payment

    def _mpesa_refundable_payments(self):
        """The document's done M-Pesa payments that no reversal holds yet."""
        self.ensure_one()
        return self.sudo().transaction_ids.filtered(
            lambda tx: tx.provider_code == 'mpesa' and tx.state == 'done' and tx.operation != 'refund'
            and not tx.child_transaction_ids.filtered(
                lambda child: child.mpesa_reversal_claim or (child.operation == 'refund' and child.state == 'done'))
        )

    def _mpesa_extra_payment(self):
        """The M-Pesa payment the document did not need: the latest one without which it is still
        paid.  M-Pesa reverses whole payments: an extra that is part of one payment is no
        one-click refund.

        :raise UserError: when no single payment is extra, saying why
        """
        self.ensure_one()
        extra = self._mpesa_extra_amount()
        for tx in self._mpesa_refundable_payments().sorted('id', reverse=True):
            # Less than a shilling short is M-Pesa's whole-shilling rounding.
            if not utils.is_material(tx.amount - extra):
                return tx
        raise UserError(self.env._(
            "No single M-Pesa payment of %(document)s is extra (%(extra)s paid beyond its total):"
            " M-Pesa reverses whole payments only.  Refund the difference by hand, or refund a whole"
            " payment from the payment itself.",
            document=self.display_name, extra=self._mpesa_format_amount(max(extra, 0)),
        ))
