# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""Refunds by Reversal and proof of receipts by Transaction Status (docs/design.md, 8. Reversal and Transaction Status).

Both requests are answered at once with an acknowledgement (accepted, not done); Daraja posts the
result later to our ResultURL (or, when its queue timed out, to the QueueTimeOutURL).  The
transaction keeps the request's ConversationID so that the result finds it:

- a refund transaction (Odoo's R- child of the payment) holds its Reversal's ConversationID as
  `provider_reference`; its result settles it, done or error;
- any transaction holds the ConversationID of its last Transaction Status query: the proof of a
  receipt that came after the fact, or the outcome of a Reversal whose result did not come.

One reversal per payment, in the database: a partial unique index on the source transaction of
the refunds that hold the reversal (`mpesa_reversal_claim`), taken under the payment's row lock
and committed before the request leaves (Daraja has no idempotency key).
"""
import logging
from datetime import timedelta, timezone

import requests
from psycopg2 import OperationalError
from psycopg2.errors import LockNotAvailable

from odoo import api, fields, models
from odoo.exceptions import AccessError, UserError, ValidationError

from .. import const, daraja

_logger = logging.getLogger(__name__)



class PaymentTransaction(models.Model):
    _inherit = 'payment.transaction'

    mpesa_receipt_status = fields.Selection(
        selection_add=[('conflict', "Conflict")], ondelete={'conflict': 'set null'},
    )
    mpesa_originator_conversation_id = fields.Char(
        string="OriginatorConversationID", readonly=True, copy=False, index='btree_not_null',
        help="Of the Reversal request (refunds); the ConversationID is the provider reference.",
    )
    mpesa_reversal_claim = fields.Boolean(
        string="Holds the Reversal", readonly=True, copy=False,
        help="This refund holds its payment's only reversal: sent, done, or refused because the"
             " payment was already reversed.  A refund that M-Pesa refused for any other reason"
             " releases it.",
    )
    mpesa_status_conversation_id = fields.Char(
        string="Status Check ConversationID", readonly=True, copy=False, index='btree_not_null',
    )
    mpesa_status_originator_id = fields.Char(
        string="Status Check OriginatorConversationID", readonly=True, copy=False, index='btree_not_null',
    )
    mpesa_status_next_at = fields.Datetime(
        string="Next Transaction Status Check", readonly=True, copy=False, index='btree_not_null',
        help="When a Transaction Status query is sent for this transaction: to prove its receipt, or"
             " to learn what became of its reversal when the result did not come.",
    )
    mpesa_status_count = fields.Integer(string="Transaction Status Checks", readonly=True, copy=False)
    mpesa_receipt_proof = fields.Char(
        string="Receipt Check", readonly=True, copy=False,
        help="What M-Pesa's Transaction Status said of the receipt.",
    )
    mpesa_receipt_proof_note = fields.Char(
        string="Receipt Proof", compute='_compute_mpesa_receipt_proof_note',
    )
    mpesa_refunded_by_id = fields.Many2one(
        'res.users', string="Refund Asked By", readonly=True, copy=False,
        help="The person who asked for this refund: its chatter lines are theirs, whoever settles it.",
    )
    mpesa_paid_back_by_hand = fields.Monetary(
        string="Paid Back by Hand", readonly=True, copy=False, currency_field='currency_id',
        help="What the accountant paid back of this payment outside M-Pesa: M-Pesa would reverse the"
             " whole payment, and the customer would get that part twice, so it is no longer reversed.",
    )
    mpesa_reversal_receipt = fields.Char(
        string="M-Pesa Reversal", readonly=True, copy=False,
        help="The receipt of the M-Pesa transaction that gave the money back (also on the refunds of"
             " the other shares of one receipt, which carry no receipt of their own).",
    )

    def init(self):
        res = super().init()
        # One reversal per payment, whatever the workers: see the module docstring.
        self._mpesa_create_unique_index(
            'payment_transaction_mpesa_reversal_uniq',
            "SELECT array_agg(reference) FROM payment_transaction WHERE mpesa_reversal_claim"
            " GROUP BY source_transaction_id HAVING count(*) > 1 LIMIT 5",
            "CREATE UNIQUE INDEX IF NOT EXISTS payment_transaction_mpesa_reversal_uniq"
            " ON payment_transaction (source_transaction_id) WHERE mpesa_reversal_claim",
        )
        return res

    # === COMPUTE METHODS === #

    @api.depends('mpesa_receipt_status', 'mpesa_receipt_proof', 'mpesa_status_next_at', 'provider_id')
    def _compute_mpesa_receipt_proof_note(self):
        for tx in self:
            note = False
            if tx.provider_code == 'mpesa' and tx.mpesa_receipt_status == 'unverified':
                if not tx.provider_id._mpesa_has_initiator():
                    note = self.env._(
                        "Not verified, and it cannot be: the provider has no initiator set up for"
                        " M-Pesa's Transaction Status."
                    )
                elif tx.mpesa_status_next_at or (tx.mpesa_status_conversation_id and not tx.mpesa_receipt_proof):
                    note = self.env._("Not verified yet: M-Pesa's Transaction Status is being asked.")
                else:
                    note = tx.mpesa_receipt_proof or self.env._("Not verified.")
            elif tx.provider_code == 'mpesa' and tx.mpesa_receipt_status in ('confirmed', 'conflict'):
                note = tx.mpesa_receipt_proof
            tx.mpesa_receipt_proof_note = note

    # === BUSINESS METHODS - REFUNDS === #

    def _send_refund_request(self, amount_to_refund=None):
        """Override of `payment` to reverse the M-Pesa payment (Reversal API).

        The checks run before anything is written; the refund transaction holding the reversal
        is committed before the request leaves, so that a double click, a replayed request or a
        second worker never sends a second reversal.  Daraja's acknowledgement leaves the refund
        pending: its result, posted later, settles it.

        :param float amount_to_refund: the whole payment's amount or None (M-Pesa reverses whole
                                       payments only)
        :return: the refund transaction
        :rtype: payment.transaction
        :raise ValidationError: when this payment cannot be reversed, saying why
        """
        if self.provider_code != 'mpesa':
            return super()._send_refund_request(amount_to_refund=amount_to_refund)
        self.ensure_one()
        holder = self._mpesa_receipt_shares()[:1]
        if holder != self:  # A share of a receipt placed on several documents: M-Pesa reverses it whole.
            self._mpesa_check_refundable_amount(amount_to_refund)
            return holder._send_refund_request()
        self._mpesa_check_refund_rights()
        self._mpesa_lock_for_refund()
        self._mpesa_check_refundable(amount_to_refund)
        provider = self.provider_id
        initiator, credential = provider._mpesa_initiator()
        party = provider._mpesa_initiator_party()[0]

        refund_tx = super()._send_refund_request(amount_to_refund=self.amount)
        refund_tx.write({
            'mpesa_reversal_claim': True,
            'mpesa_refunded_by_id': self.env.user.id,
            'mpesa_api_url': self.mpesa_api_url or provider._mpesa_api_base_url(),
        })
        reversal = {
            'initiator': initiator,
            'security_credential': credential,
            'transaction_id': self.mpesa_receipt_number,
            # The whole receipt, also when a hand match placed it on several documents.
            'amount': int(self._mpesa_receipt_amount() or self.mpesa_requested_amount or -refund_tx.amount),
            'receiver_party': party,
            'result_url': provider._mpesa_daraja_url('reversal_result'),
            'timeout_url': provider._mpesa_daraja_url('reversal_timeout'),
            'remarks': self.env._("Refund %s", refund_tx.reference)[:100],
        }
        # Built and checked before the commit: a configuration error leaves nothing behind.
        client = provider._mpesa_client(transaction=refund_tx)
        try:
            daraja.build_reversal_payload(**reversal)
        except daraja.DarajaValidationError as error:
            raise ValidationError(str(error)) from error
        refund_tx.flush_recordset()  # The unique index speaks now, not after the request left.
        self._mpesa_commit()
        try:
            ack = client.reverse(**reversal)
        except daraja.DarajaError as error:
            refund_tx._mpesa_reversal_not_sent(error)
            self._mpesa_commit()
            return refund_tx
        refund_tx._mpesa_record_initiator_ack(ack, 'reversal')
        self._mpesa_commit()
        return refund_tx

    def _mpesa_check_refund_rights(self):
        """Odoo's refund runs in sudo: the user who asked must still be one who may refund."""
        user = self.env.user
        if not (user._is_superuser() or user.has_group('account.group_account_invoice')):
            raise AccessError(self.env._("You are not allowed to refund M-Pesa payments."))

    def _mpesa_lock_for_refund(self):
        """Lock the payment: a second click while the first is sending fails, it never waits."""
        try:
            with self.env.cr.savepoint(flush=False):
                self._mpesa_lock('nowait')
        except LockNotAvailable as error:
            raise ValidationError(self.env._("This M-Pesa payment is already being refunded.")) from error

    def _mpesa_check_refundable(self, amount_to_refund):
        """Whether M-Pesa can reverse this payment now, under its row lock.

        :raise ValidationError: saying why not
        """
        self.ensure_one()
        if self.operation == 'refund' or self.amount <= 0:
            raise ValidationError(self.env._("A refund cannot be refunded."))
        if self.state != 'done':
            raise ValidationError(self.env._("Only a paid M-Pesa payment can be refunded."))
        test_mode = self._mpesa_test_mode_reason()
        if test_mode:
            raise ValidationError(self.env._(
                "%(reason)s  M-Pesa cannot reverse it: if money really moved, pay it back by hand"
                " and record that refund.", reason=test_mode,
            ))
        self._mpesa_check_refundable_amount(amount_to_refund)
        if not self.mpesa_receipt_number:
            raise ValidationError(self.env._(
                "%s has no M-Pesa receipt yet (it was settled by STK Query): M-Pesa cannot reverse"
                " a payment without its receipt.", self.reference,
            ))
        by_hand = self._mpesa_receipt_shares().filtered('mpesa_paid_back_by_hand')
        if by_hand:
            raise ValidationError(self.env._(
                "%(amount)s of M-Pesa payment %(receipt)s was already paid back by hand: M-Pesa reverses"
                " whole payments, so the customer would get it twice. Pay back the rest by hand.",
                amount=self._mpesa_format_amount(sum(by_hand.mapped('mpesa_paid_back_by_hand'))),
                receipt=self.mpesa_receipt_number,
            ))
        # An unproven receipt may be somebody else's payment: never reverse it.
        if self.mpesa_receipt_status in ('unverified', 'conflict'):
            raise ValidationError(self.env._(
                "Receipt %(receipt)s is not verified (%(why)s): it is reversed only once M-Pesa's"
                " Transaction Status confirms it.", receipt=self.mpesa_receipt_number,
                why=self.mpesa_receipt_proof_note or self.env._("unverified"),
            ))
        holder = self.search([('source_transaction_id', '=', self.id), ('mpesa_reversal_claim', '=', True)],
                             limit=1)
        if holder.state == 'done':
            raise ValidationError(self.env._("%(ref)s was already refunded (%(refund)s).",
                                             ref=self.reference, refund=holder.reference))
        if holder.state == 'error':
            raise ValidationError(self.env._(
                "M-Pesa says %(ref)s was already reversed (%(refund)s): record that refund by hand.",
                ref=self.reference, refund=holder.reference,
            ))
        if holder:
            raise ValidationError(self.env._(
                "The refund %(refund)s of %(ref)s is under way: M-Pesa's result settles it.",
                ref=self.reference, refund=holder.reference,
            ))

    def _mpesa_check_refundable_amount(self, amount_to_refund):
        """M-Pesa reverses whole payments: the refund is this payment's whole amount, or none said."""
        if amount_to_refund and self.currency_id.compare_amounts(amount_to_refund, self.amount):
            raise ValidationError(self.env._(
                "M-Pesa reverses whole payments only: refund %(amount)s, or pay back part of it by"
                " hand.", amount=self._mpesa_format_amount(self.amount),
            ))

    def _mpesa_receipt_shares(self):
        """The done payments of this payment's M-Pesa receipt, the one that holds the receipt first.

        A hand match places one receipt on several documents: one transaction per document, the
        first holding the receipt.  M-Pesa reverses the whole receipt, so it is refunded whole,
        through that first one, and Odoo books the refund on every document it paid.

        :return: the shares (just this payment for a receipt of its own)
        :rtype: payment.transaction
        """
        self.ensure_one()
        row = self.mpesa_ledger_id
        if not row or self.mpesa_push_sent_at or self.operation == 'refund':
            return self
        shares = row.transaction_ids.filtered(
            lambda tx: not tx.mpesa_push_sent_at and tx.operation != 'refund' and tx.state == 'done')
        holder = shares.filtered('mpesa_receipt_number')[:1]
        if self not in shares or not holder:
            return self
        return holder + (shares - holder).sorted('id')

    def _mpesa_reversal_not_sent(self, error):
        """The Reversal request failed.  Refused by Daraja, or never sent: nothing was reversed
        and the payment may be refunded again.  Perhaps received (no answer we could read): the
        refund keeps the reversal, and Transaction Status tells later what became of it."""
        self.ensure_one()
        if self._mpesa_push_may_have_reached(error):
            self.mpesa_status_next_at = fields.Datetime.now() + timedelta(seconds=const.INITIATOR_RESULT_WAIT)
            self._set_pending(state_message=self.env._(
                "M-Pesa did not answer the reversal request (%s); its Transaction Status will tell"
                " whether the payment was reversed.", error,
            ))
            return
        self.mpesa_reversal_claim = False
        if isinstance(error, daraja.DarajaApiError):
            known = daraja.describe_api_error(error.error_code, error.error_message)
            message = known.message if known else str(error)
        else:
            message = str(error)
        self._set_error(self.env._("M-Pesa refused the reversal: %s", message))

    def _mpesa_record_initiator_ack(self, ack, api_name):
        """Daraja accepted a Reversal or a Transaction Status request: its result will name these
        conversation IDs.  Without a result by INITIATOR_RESULT_WAIT, Transaction Status asks."""
        self.ensure_one()
        check_at = fields.Datetime.now() + timedelta(seconds=const.INITIATOR_RESULT_WAIT)
        if api_name == 'reversal':
            self.write({
                'provider_reference': ack.conversation_id,
                'mpesa_originator_conversation_id': ack.originator_conversation_id,
                'mpesa_status_next_at': check_at,
            })
            self._set_pending()
        else:
            self.write({
                'mpesa_status_conversation_id': ack.conversation_id,
                'mpesa_status_originator_id': ack.originator_conversation_id,
                'mpesa_status_next_at': check_at,
            })
        self._mpesa_trigger_initiator_job(check_at)
        # The result may have come before this acknowledgement was recorded.
        self.env['muchiri.mpesa.event']._mpesa_wake_unmatched_results(
            self.provider_id, [ack.conversation_id, ack.originator_conversation_id],
        )

    # === BUSINESS METHODS - RESULTS === #

    def _mpesa_apply_initiator_result(self, result, api_name):
        """Apply a Reversal or Transaction Status result to this (locked) transaction.

        :param daraja.InitiatorResult result: the parsed result (or queue timeout)
        :param str api_name: 'reversal' or 'status', the route it came on
        :return: the result event's new state and the message saying why
        :rtype: tuple[str, str]
        """
        self.ensure_one()
        if api_name == 'reversal':
            return self._mpesa_apply_reversal_result(result)
        if self.operation == 'refund':
            return self._mpesa_apply_refund_status(result)
        return self._mpesa_apply_receipt_status(result)

    def _mpesa_apply_reversal_result(self, result):
        # A late success still wins over an error that its own result did not decide (Transaction
        # Status lagged behind M-Pesa's queue): the money went back, Odoo allows done after error.
        late_success = self.state == 'error' and not self.mpesa_result_code and result.is_success
        if self.operation != 'refund' or (self.state not in ('draft', 'pending') and not late_success):
            return 'ignored', self.env._("The refund is already %s.", self.state)
        if result.is_timeout:
            self._mpesa_ask_status_soon()
            return 'processed', self.env._(
                "Daraja's queue timed out: M-Pesa's Transaction Status will tell whether it was reversed."
            )
        original = result.original_transaction_id
        if original and original != self.source_transaction_id.mpesa_receipt_number:
            return 'rejected', self.env._(
                "The result reverses %(original)s, not %(receipt)s: it is not this refund's.",
                original=original, receipt=self.source_transaction_id.mpesa_receipt_number,
            )
        if result.result_code == '0':
            holder = self._mpesa_other_reversal_holder()
            if holder.state == 'done':
                return 'conflict', self.env._(
                    "M-Pesa says this refund reversed %(receipt)s, which %(holder)s refunded already:"
                    " an accountant must check the M-Pesa statement.",
                    receipt=original or '-', holder=holder.reference,
                )
            self._mpesa_set_refund_done(result.transaction_id, result.result_desc, result.finalised_at)
            return 'processed', self.env._("Refund %s done.", self.reference)
        self._mpesa_set_refund_failed(result.result_code, result.result_desc)
        return 'processed', self.env._("Refund %(ref)s failed (%(code)s).", ref=self.reference,
                                       code=result.result_code)

    def _mpesa_apply_refund_status(self, result):
        """A Transaction Status result of the payment a refund reverses (its own result never
        came): reversed, the refund is done; still completed, it was not, and may be sent again."""
        if self.state not in ('draft', 'pending'):
            return 'ignored', self.env._("The refund is already %s.", self.state)
        if result.is_timeout or result.result_code != '0':
            return self._mpesa_status_unanswered(result)
        status = (result.transaction_status or '').strip().lower()
        if status == 'reversed':
            self._mpesa_set_refund_done(False, self.env._("Reversed, per M-Pesa's Transaction Status."))
            return 'processed', self.env._("Refund %s done.", self.reference)
        if status == 'completed':
            self._mpesa_set_refund_failed(
                False, self.env._("M-Pesa's Transaction Status says the payment was not reversed."),
            )
            return 'processed', self.env._("Refund %s not done.", self.reference)
        self._mpesa_schedule_status_check()
        return 'processed', self.env._("M-Pesa says the payment is %s: asked again later.", status or '-')

    def _mpesa_other_reversal_holder(self):
        """The other refund of this payment that holds its reversal, if any."""
        self.ensure_one()
        return self.search([
            ('source_transaction_id', '=', self.source_transaction_id.id), ('mpesa_reversal_claim', '=', True),
            ('id', '!=', self.id),
        ], limit=1)

    def _mpesa_set_refund_done(self, reversal_id, description, reversed_at=None):
        """M-Pesa gave the whole receipt back: this refund is done, with the refunds of the
        receipt's other shares (one per document it paid); the ledger row says refunded, and the
        customer gets one mail.

        :param str reversal_id: the reversal's own receipt, when M-Pesa said it
        :param datetime reversed_at: when M-Pesa completed it (aware), else now
        """
        # The done refund holds the reversal.  Another holder (not done) can only be a later
        # attempt that M-Pesa refused, or will refuse, as already reversed: by this one.
        holder = self._mpesa_other_reversal_holder()
        if holder:
            holder.mpesa_reversal_claim = False
            holder.flush_recordset(['mpesa_reversal_claim'])
        reversed_at = reversed_at.astimezone(timezone.utc).replace(tzinfo=None) if reversed_at \
            else fields.Datetime.now()
        values = {
            'mpesa_reversal_claim': True,
            'mpesa_result_code': '0',
            'mpesa_result_desc': description or False,
            'mpesa_status_next_at': False,
            'mpesa_paid_at': reversed_at,
            # What M-Pesa gave back: the whole receipt, also when it paid several documents.
            'mpesa_paid_amount': -self.source_transaction_id._mpesa_receipt_amount() or self.amount,
            'mpesa_reversal_receipt': reversal_id or False,
        }
        # The reversal's own M-Pesa transaction, as the statement shows it (memo of the payment).
        if reversal_id and not self.search_count([('mpesa_receipt_number', '=', reversal_id)]):
            values.update(mpesa_receipt_number=reversal_id, mpesa_receipt_status='confirmed')
        self.write(values)
        message = self.env._("Reversed by M-Pesa%s.", f" ({reversal_id})" if reversal_id else '')
        self._set_done(state_message=message)
        refunds = self + self._mpesa_refund_other_shares(message)
        source = self.source_transaction_id
        if source.mpesa_ledger_id:
            source.mpesa_ledger_id._mpesa_refunded(self)
        refunds._mpesa_post_process()
        self._mpesa_send_mail('muchiri_mpesa.mail_template_mpesa_refund_done',
                              documents=source._mpesa_receipt_shares()._mpesa_documents()[:1])

    def _mpesa_refund_other_shares(self, message):
        """The receipt this refund reversed also paid other documents (a hand match): each share
        gets its done refund, for its own amount, so that each document is due again.

        :return: the refunds made
        :rtype: payment.transaction
        """
        self.ensure_one()
        source = self.source_transaction_id
        refunds = self.browse()
        for share in source._mpesa_receipt_shares() - source:
            if share.child_transaction_ids.filtered(lambda tx: tx.operation == 'refund' and tx.state == 'done'):
                continue
            refund = share._create_child_transaction(
                # No conversation IDs of its own: the reversal's result finds the refund that sent it.
                share.amount, is_refund=True,
                mpesa_refunded_by_id=self.mpesa_refunded_by_id.id,
                mpesa_reversal_receipt=self.mpesa_reversal_receipt,
                mpesa_result_code='0',
                mpesa_result_desc=self.mpesa_result_desc,
                mpesa_paid_at=self.mpesa_paid_at,  # Its money is in the reversal's amount.
            )
            refund._set_done(state_message=message)
            refunds |= refund
        return refunds

    def _mpesa_done_refund(self):
        """This payment's done refund, if M-Pesa gave its money back (the status banner, the order)."""
        return self.child_transaction_ids.filtered(
            lambda tx: tx.operation == 'refund' and tx.state == 'done').sorted('id')[-1:]

    def _mpesa_set_refund_failed(self, code, description):
        """M-Pesa did not reverse: the plain meaning of its code.  The payment may be refunded
        again, except when M-Pesa says it is reversed already."""
        meaning = daraja.describe_initiator_result(code) if code else description
        self.write({
            'mpesa_result_code': code or False,
            'mpesa_result_desc': description or False,
            'mpesa_status_next_at': False,
            # Already reversed: by another refund of Odoo (done, it holds the reversal), or outside.
            'mpesa_reversal_claim': code == daraja.ALREADY_REVERSED_CODE and not self._mpesa_other_reversal_holder(),
        })
        self._set_error(self.env._("%(meaning)s (%(code)s)", meaning=meaning, code=code) if code else meaning)
        self._mpesa_post_process()

    def _mpesa_apply_receipt_status(self, result):
        """A Transaction Status result of a receipt recorded after the fact: completed, for the
        amount paid, to our shortcode, it is confirmed; anything else is a conflict for
        accountants.  The receipt and the amount are never changed by it."""
        if self.mpesa_receipt_status != 'unverified':
            return 'ignored', self.env._("The receipt is %s already.", self.mpesa_receipt_status or '-')
        if result.is_timeout:
            return self._mpesa_status_unanswered(result)
        unknown = result.result_code in daraja.UNKNOWN_TRANSACTION_CODES
        if result.result_code != '0' and not unknown:
            return self._mpesa_status_unanswered(result)
        problems = self.env['muchiri.mpesa.ledger']._mpesa_status_disagreements(
            result, self.mpesa_receipt_number, self._mpesa_receipt_amount(),
            self.provider_id._mpesa_initiator_party()[0],
        )
        if problems:
            return self._mpesa_receipt_conflict(problems)
        self._mpesa_receipt_confirmed(self.env._(
            "Confirmed by M-Pesa's Transaction Status on %s.", fields.Date.today()))
        return 'processed', self.env._("Receipt %s confirmed.", self.mpesa_receipt_number)

    def _mpesa_receipt_amount(self):
        """The amount of the whole receipt this transaction holds: a receipt the ledger placed on
        several documents is one M-Pesa payment of the ledger row's amount."""
        self.ensure_one()
        if self.mpesa_ledger_id and not self.mpesa_push_sent_at:
            return self.mpesa_ledger_id.amount
        return self.mpesa_paid_amount

    def _mpesa_receipt_confirmed(self, proof):
        """Daraja confirmed this transaction's receipt (its Transaction Status, or its Pull list)."""
        self.write({'mpesa_receipt_status': 'confirmed', 'mpesa_status_next_at': False,
                    'mpesa_receipt_proof': proof[:250]})
        for tx in self:
            for document in tx._mpesa_documents():
                document.message_post(body=self.env._(
                    "M-Pesa receipt %(receipt)s is verified: %(proof)s", receipt=tx.mpesa_receipt_number, proof=proof,
                ))

    def _mpesa_receipt_confirmed_by_ledger(self, row, proof):
        """The ledger row of these transactions' receipt is confirmed by Daraja: so are they, when
        they say what Daraja said (a prompt of another amount stays unverified, for its own check)."""
        self.filtered(
            lambda tx: not row.currency_id.compare_amounts(tx._mpesa_receipt_amount(), row.amount)
        )._mpesa_receipt_confirmed(proof)

    def _mpesa_receipt_conflict(self, problems):
        message = self.env._(
            "M-Pesa's Transaction Status disagrees with receipt %(receipt)s: %(problems)s.",
            receipt=self.mpesa_receipt_number, problems='; '.join(problems),
        )
        self.write({'mpesa_receipt_status': 'conflict', 'mpesa_status_next_at': False,
                    'mpesa_receipt_proof': message[:250]})
        for document in self._mpesa_documents() or self.env['sale.order']:
            document.message_post(body=message)
        self.env['muchiri.mpesa.alert'].sudo()._mpesa_raise_receipt_proof_alert(self.provider_id)
        return 'conflict', message

    def _mpesa_status_unanswered(self, result):
        """A Transaction Status query with no usable answer: asked again later, except when the
        initiator set-up is wrong (asking again would change nothing)."""
        if result.is_timeout:
            said = self.env._("Daraja's queue timed out")
        else:
            said = self.env._("%(meaning)s (%(code)s)", code=result.result_code,
                              meaning=daraja.describe_initiator_result(result.result_code))
        if not result.is_timeout and result.result_code in daraja.INITIATOR_INVALID_CODES:
            self.mpesa_status_next_at = False
        else:
            self._mpesa_schedule_status_check()
        if self.operation != 'refund':
            self.mpesa_receipt_proof = self.env._("Transaction Status did not answer: %s", said)[:250]
        return 'processed', self.env._("Transaction Status did not answer: %s", said)

    # === BUSINESS METHODS - TRANSACTION STATUS === #

    def _mpesa_request_receipt_proof(self):
        """A receipt recorded after the fact waits, unverified, for Transaction Status: asked by
        the initiator job, never in the request that brought the receipt."""
        for tx in self:
            tx.mpesa_receipt_status = 'unverified'
            if tx._mpesa_skip_test_mode_status_check():
                continue
            if tx.provider_id._mpesa_has_initiator():
                tx.write({'mpesa_status_next_at': fields.Datetime.now(), 'mpesa_status_count': 0})
        if any(self.mapped('mpesa_status_next_at')):
            self._mpesa_trigger_initiator_job()

    def _mpesa_ask_status_soon(self):
        self.mpesa_status_next_at = fields.Datetime.now()
        self._mpesa_trigger_initiator_job()

    def _mpesa_schedule_status_check(self):
        if self.mpesa_status_count >= const.INITIATOR_MAX_CHECKS:
            self.mpesa_status_next_at = False
            return
        self.mpesa_status_next_at = fields.Datetime.now() + timedelta(seconds=const.INITIATOR_RESULT_WAIT)

    def _mpesa_send_status_query(self, session=None):
        """Send a Transaction Status query for this transaction's receipt (a refund: the receipt
        of the payment it reverses); its result comes to our ResultURL."""
        self.ensure_one()
        provider = self.provider_id
        initiator, credential = provider._mpesa_initiator()
        party, identifier = provider._mpesa_initiator_party()
        payment = self.source_transaction_id if self.operation == 'refund' else self
        client = provider._mpesa_client(transaction=self, session=session)
        self.mpesa_status_count += 1
        ack = client.transaction_status(
            initiator=initiator,
            security_credential=credential,
            transaction_id=payment.mpesa_receipt_number,
            party_a=party,
            identifier_type=identifier,
            result_url=provider._mpesa_daraja_url('status_result'),
            timeout_url=provider._mpesa_daraja_url('status_timeout'),
            remarks=self.env._("Check %s", self.reference)[:100],
        )
        self._mpesa_record_initiator_ack(ack, 'status')
        return ack

    @api.model
    def _mpesa_initiator_due_domain(self):
        return [
            ('provider_code', '=', 'mpesa'),
            ('mpesa_status_next_at', '<=', fields.Datetime.now()),
        ]

    @api.model
    def _cron_mpesa_initiator(self, batch_size=const.RECONCILE_BATCH_SIZE):
        """Settle the Reversal and Transaction Status results Daraja posted, then send the
        Transaction Status queries that are due: ledger payments awaiting M-Pesa's confirmation
        first (goods wait on them), then receipts to prove, and refunds whose result did not come.
        Each transaction is committed on its own."""
        self.env['muchiri.mpesa.event']._mpesa_settle_initiator_results(batch_size)
        due = self.sudo().search(self._mpesa_initiator_due_domain(), order='mpesa_status_next_at, id',
                                 limit=batch_size)
        session = requests.Session()
        checked = 0
        try:
            checked, stop = self.env['muchiri.mpesa.ledger']._mpesa_send_due_status_queries(session, batch_size)
            for tx in due if not stop else ():
                outcome = tx._mpesa_check_by_status(session)
                checked += outcome == 'sent'
                if outcome == 'stop':
                    break
        finally:
            session.close()
        return checked

    def _mpesa_check_by_status(self, session=None):
        """Send one due Transaction Status query, under the row lock; committed on its own.

        :return: 'sent', 'skipped', 'failed' or 'stop' (Daraja cannot be reached or throttles)
        """
        self.ensure_one()
        outcome = 'sent'
        try:
            with self.env.cr.savepoint():
                if not self._mpesa_lock('skip') or not self.mpesa_status_next_at \
                        or self.mpesa_status_next_at > fields.Datetime.now():
                    outcome = 'skipped'
                elif not self._mpesa_needs_status_check() or self._mpesa_skip_test_mode_status_check():
                    self.mpesa_status_next_at = False
                    outcome = 'skipped'
                elif self.mpesa_status_count >= const.INITIATOR_MAX_CHECKS:
                    self._mpesa_give_up_status_checks()
                    outcome = 'skipped'
                else:
                    self._mpesa_send_status_query(session)
        except OperationalError:
            outcome = 'skipped'
        except (daraja.DarajaConnectionError, daraja.DarajaProtocolError):
            outcome = 'stop'
            self._mpesa_status_retry_later(const.RECONCILE_THROTTLE_DELAY)
        except (daraja.DarajaError, UserError) as error:
            _logger.warning("M-Pesa Transaction Status query of %s failed: %s", self.reference, error)
            outcome = 'stop' if getattr(error, 'error_code', None) in const.THROTTLE_ERROR_CODES else 'failed'
            self._mpesa_status_retry_later(
                const.RECONCILE_THROTTLE_DELAY if outcome == 'stop' else const.INITIATOR_RESULT_WAIT,
                message=str(error),
            )
        self._mpesa_commit()
        return outcome

    def _mpesa_status_retry_later(self, seconds, message=None):
        with self.env.cr.savepoint():
            self.invalidate_recordset()
            self.mpesa_status_count += 1
            if self.mpesa_status_count >= const.INITIATOR_MAX_CHECKS:
                self._mpesa_give_up_status_checks(message)
            else:
                self.mpesa_status_next_at = fields.Datetime.now() + timedelta(seconds=seconds)
            if message and self.operation != 'refund' and self.mpesa_receipt_status == 'unverified':
                self.mpesa_receipt_proof = self.env._("Transaction Status could not be asked: %s", message)[:250]

    def _mpesa_needs_status_check(self):
        if self.operation == 'refund':
            return self.state in ('draft', 'pending') and bool(self.source_transaction_id.mpesa_receipt_number)
        return self.mpesa_receipt_status == 'unverified' and bool(self.mpesa_receipt_number)

    def _mpesa_skip_test_mode_status_check(self):
        """A transaction taken in test mode is never asked about in production: its check is
        dropped, and its documents are told once (see `_mpesa_test_mode_reason`).

        :return: whether it was such a transaction
        """
        reason = self._mpesa_test_mode_reason()
        if not reason:
            return False
        note = self.env._(
            "%(reason)s  Its receipt %(receipt)s is not checked with M-Pesa's Transaction Status.",
            reason=reason, receipt=(self.source_transaction_id if self.operation == 'refund' else self)
            .mpesa_receipt_number or '-',
        )
        self.mpesa_status_next_at = False
        if self.mpesa_receipt_proof != note[:250]:  # Said once, not at every run or save.
            self.mpesa_receipt_proof = note[:250]
            self._log_message_on_linked_documents(note)
        return True

    def _mpesa_give_up_status_checks(self, message=None):
        """No answer after every check: a person looks (the message says where)."""
        self.mpesa_status_next_at = False
        if self.operation == 'refund':
            note = self.env._(
                "M-Pesa gave no result for the reversal of %(payment)s after %(count)s checks: look it up"
                " on the M-Pesa statement before refunding again.",
                payment=self.source_transaction_id.reference, count=self.mpesa_status_count,
            )
            self.state_message = note
            self._log_message_on_linked_documents(note)
        elif message:
            self.mpesa_receipt_proof = message[:250]

    @api.model
    def _mpesa_trigger_initiator_job(self, at=None):
        cron = self.env.ref('muchiri_mpesa.cron_mpesa_initiator', raise_if_not_found=False)
        if cron:
            cron.sudo()._trigger(at=at)

    # === BUSINESS METHODS - POST-PROCESSING === #

    def _post_process(self):
        """Override: a done M-Pesa refund's payment (made by `account_payment`) is reconciled with
        the payment it reverses, and the documents it was refunded for no longer ask for it."""
        res = super()._post_process()
        for refund in self.filtered(lambda tx: tx.provider_code == 'mpesa' and tx.operation == 'refund'
                                    and tx.state == 'done'):
            try:
                with self.env.cr.savepoint():
                    refund._mpesa_reconcile_refund_payment()
            except Exception:
                _logger.warning("The M-Pesa refund payment of %s could not be reconciled.", refund.reference,
                                exc_info=True)
            refund._mpesa_clear_refund_flags()
        return res

    def _log_message_on_linked_documents(self, message):
        """Override of `payment`: an M-Pesa refund's lines are written as the person who asked for
        it.  Odoo writes them as the customer unless the superuser runs them, and the refund is
        asked in sudo and settled by a job.  They go where Odoo's `sale` and `account_payment` put
        them: the paid orders and invoices, and the payment refunded."""
        if self.provider_code != 'mpesa' or self.operation != 'refund':
            return super()._log_message_on_linked_documents(message)
        self.ensure_one()
        source = self.source_transaction_id
        for record in [*source.sale_order_ids, *source.invoice_ids, *source.payment_id, *self.invoice_ids]:
            record.message_post(body=message, author_id=self._mpesa_refund_author().id)
        return None

    def _mpesa_refund_author(self):
        """Who the lines of this refund are written as: the person who asked for it (while it is
        asked, the user asking)."""
        return (self.mpesa_refunded_by_id or self.env.user).partner_id

    def _create_payment(self, **extra_create_values):
        """Override: a refund's memo names the receipt it reverses and the reversal's own."""
        if self.provider_code == 'mpesa' and self.operation == 'refund' and 'memo' not in extra_create_values:
            source = self.source_transaction_id
            extra_create_values['memo'] = self.env._(
                "Reversal %(reversal)s of %(receipt)s - %(documents)s",
                reversal=self.mpesa_reversal_receipt or self.mpesa_receipt_number or '-',
                receipt=source.mpesa_receipt_number or source.mpesa_ledger_id.name or '-',
                documents=', '.join(source._mpesa_documents().mapped('name')) or source.reference,
            )
        return super()._create_payment(**extra_create_values)

    def _mpesa_reconcile_refund_payment(self):
        """Reconcile the refund payment with the payment it reverses.

        The reversed money was either still open on the customer (an overpayment: both lines then
        close each other) or applied to invoices: those are open again, since the customer has
        the money back, and the refund closes the payment instead.
        """
        self.ensure_one()
        refund_payment = self.payment_id
        source_payment = self.source_transaction_id.payment_id
        if not (refund_payment and source_payment):
            return
        account = refund_payment.destination_account_id
        refund_lines = refund_payment.move_id.line_ids.filtered(
            lambda line: line.account_id == account and not line.reconciled)
        source_lines = source_payment.move_id.line_ids.filtered(lambda line: line.account_id == account)
        if not refund_lines or not source_lines:
            return
        open_amount = -sum(source_lines.mapped('amount_residual'))
        if self.currency_id.compare_amounts(open_amount, refund_payment.amount) < 0:
            invoices = source_payment.reconciled_invoice_ids
            # Also a part-reconciled line: an overpayment paid its invoice and left the rest open.
            source_lines.filtered(lambda line: line.matched_debit_ids or line.matched_credit_ids)\
                .remove_move_reconcile()
            source_lines.invalidate_recordset()
            for invoice in invoices:
                invoice.message_post(body=self.env._(
                    "M-Pesa payment %(receipt)s was reversed (%(ref)s): this invoice is due again.",
                    receipt=self.source_transaction_id.mpesa_receipt_number
                    or self.source_transaction_id.mpesa_ledger_id.name,
                    ref=self.reference,
                ), author_id=self._mpesa_refund_author().id)
        (refund_lines + source_lines.filtered(lambda line: not line.reconciled)).reconcile()

    def _mpesa_clear_refund_flags(self):
        """The documents flagged for a refund that this one settles no longer ask for it."""
        for document in self.source_transaction_id._mpesa_documents():
            if not document.mpesa_needs_refund or document._mpesa_extra_amount() >= const.ROUNDING_TOLERANCE:
                continue
            document.mpesa_needs_refund = False
            document.message_post(body=self.env._(
                "The extra M-Pesa payment %(receipt)s was refunded (%(ref)s).",
                receipt=self.source_transaction_id.mpesa_receipt_number, ref=self.reference,
            ), author_id=self._mpesa_refund_author().id)
            document.activity_ids.filtered(
                lambda activity: activity.summary == self.env._("M-Pesa: check and refund an extra payment")
            ).action_feedback(feedback=self.env._("Refunded by M-Pesa (%s).", self.reference))
