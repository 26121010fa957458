# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""M-Pesa payment transactions: STK prompts and their settlement, the ledger's money as
transactions, refunds by Reversal and the proof of receipts by Transaction Status.

LEDGER.  A done STK prompt's receipt lands in the ledger as source 'stk', linked to the prompt: the
same receipt reported later by C2B or Pull only adds its source, and is never paid again.  Money the
ledger matches to a document becomes a transaction of the provider (operation 'offline') set done
with the receipt, so that Odoo's own post-processing makes the payment, as for a prompt.

REVERSAL AND TRANSACTION STATUS (docs/design.md, 8. Reversal and Transaction Status).  Both requests
are answered at once with an acknowledgement (accepted, not done); Daraja posts the result later to
our ResultURL (or, when its queue timed out, to the QueueTimeOutURL).  The transaction keeps the
request's ConversationID so that the result finds it:

- a refund transaction (Odoo's R- child of the payment) holds its Reversal's ConversationID as
  `provider_reference`; its result settles it, done or error;
- any transaction holds the ConversationID of its last Transaction Status query: the proof of a
  receipt that came after the fact, or the outcome of a Reversal whose result did not come.

One reversal per payment, in the database: a partial unique index on the source transaction of
the refunds that hold the reversal (`mpesa_reversal_claim`), taken under the payment's row lock
and committed before the request leaves (Daraja has no idempotency key).
"""
import logging
import uuid
from datetime import timedelta
from decimal import Decimal
from urllib.parse import urlsplit

import requests
from markupsafe import Markup
from psycopg2 import OperationalError
from psycopg2.errors import LockNotAvailable

from odoo import api, fields, models
from odoo.exceptions import AccessError, UserError, ValidationError
from odoo.fields import Command
from odoo.tools.misc import format_amount, format_datetime, formatLang, str2bool

from odoo.addons.payment import utils as payment_utils

from .. import const, daraja, utils
from .mpesa_ledger import DARAJA_CONFIRMATIONS

_logger = logging.getLogger(__name__)

SUCCESS, CANCELED, PENDING = daraja.Outcome.SUCCESS, daraja.Outcome.CANCELED, daraja.Outcome.PENDING


class PaymentTransaction(models.Model):
    _inherit = 'payment.transaction'

    # provider_reference holds Daraja's CheckoutRequestID, the key of callbacks and queries.
    mpesa_merchant_request_id = fields.Char(string="MerchantRequestID", readonly=True, copy=False)
    mpesa_phone = fields.Char(string="M-Pesa Phone", readonly=True, copy=False)
    mpesa_requested_amount = fields.Integer(
        string="Amount Requested (KES)", readonly=True, copy=False,
        help="The whole-shilling amount of the STK Push: a payment must match it exactly.",
    )
    mpesa_push_sent_at = fields.Datetime(string="Prompt Sent", readonly=True, copy=False)
    mpesa_api_url = fields.Char(
        string="Daraja API", readonly=True, copy=False,
        help="The Daraja this payment went through (its prompt, or the receipt of paybill money):"
             " in test mode its status is asked there.  An enabled provider asks production only,"
             " and never about a payment taken in test mode.",
    )
    mpesa_receipt_number = fields.Char(
        string="M-Pesa Receipt", readonly=True, copy=False, index='btree_not_null',
    )
    mpesa_receipt_status = fields.Selection(
        string="Receipt Status", selection=[*const.RECEIPT_STATUSES, ('conflict', "Conflict")],
        readonly=True, copy=False,
        help="Confirmed: it came with the callback that Daraja's query confirmed.  Pending: the"
             " payment was settled by STK Query, which carries no receipt.  Unverified: it came"
             " later, and nothing Daraja told us proves it yet.  Conflict: M-Pesa contradicts it.",
    )
    mpesa_paid_amount = fields.Float(string="Amount Paid (KES)", readonly=True, copy=False)
    mpesa_paid_at = fields.Datetime(string="Paid On", readonly=True, copy=False)
    mpesa_result_code = fields.Char(string="M-Pesa Result Code", readonly=True, copy=False)
    mpesa_result_desc = fields.Char(string="M-Pesa Result", readonly=True, copy=False)
    mpesa_settled_by = fields.Selection(
        string="Settled By", selection=const.SETTLEMENT_SOURCES, readonly=True, copy=False,
    )
    mpesa_settled_at = fields.Datetime(string="Settled On", readonly=True, copy=False)
    mpesa_callback_at = fields.Datetime(
        string="First Callback", readonly=True, copy=False,
        help="When Daraja's first callback for this prompt arrived.",
    )
    mpesa_next_check_at = fields.Datetime(
        string="Next Status Check", readonly=True, copy=False, index='btree_not_null',
        help="When the reconciliation cron asks Daraja about this pending prompt next.",
    )
    mpesa_check_count = fields.Integer(string="Status Checks", readonly=True, copy=False)
    mpesa_last_check_at = fields.Datetime(string="Last Status Check", readonly=True, copy=False)
    mpesa_outcome_unknown = fields.Boolean(
        string="Prompt Outcome Unknown", readonly=True, copy=False,
        help="Daraja gave no answer we could read to the STK Push: the prompt may be on the phone,"
             " and only its callback can tell.",
    )
    mpesa_event_ids = fields.One2many(
        'muchiri.mpesa.event', 'transaction_id', string="M-Pesa Exchanges", readonly=True,
    )
    mpesa_ledger_id = fields.Many2one(
        'muchiri.mpesa.ledger', string="M-Pesa Ledger", readonly=True, copy=False,
        index='btree_not_null', ondelete='restrict',
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
    # B2B Express Checkout: provider_reference holds the RequestRefID (see _mpesa_send_b2b_checkout).
    mpesa_b2b_till = fields.Char(
        string="Paying Till", readonly=True, copy=False, index='btree_not_null',
        help="The distributor's till prompted to pay this (M-Pesa's B2B Express Checkout).",
    )

    # === CRUD METHODS === #

    def init(self):
        """One payment, one transaction (docs/design.md, 2. Prompts and callbacks), in the database itself.

        Partial unique indexes: PostgreSQL lets no foreign key use them, so writing a receipt takes
        no row lock that would block the exchange log's own cursor (see _mpesa_lock).
        """
        res = super().init()
        cr = self.env.cr
        # Replaced by the partial index below.
        cr.execute(
            "ALTER TABLE payment_transaction DROP CONSTRAINT IF EXISTS payment_transaction_mpesa_receipt_number_unique"
        )
        self._mpesa_create_unique_index(
            'payment_transaction_mpesa_receipt_uniq',
            "SELECT array_agg(reference) FROM payment_transaction WHERE mpesa_receipt_number IS NOT NULL"
            " GROUP BY mpesa_receipt_number HAVING count(*) > 1 LIMIT 5",
            "CREATE UNIQUE INDEX IF NOT EXISTS payment_transaction_mpesa_receipt_uniq"
            " ON payment_transaction (mpesa_receipt_number) WHERE mpesa_receipt_number IS NOT NULL",
        )
        self._mpesa_create_unique_index(  # Only M-Pesa prompts set mpesa_push_sent_at.
            'payment_transaction_mpesa_checkout_uniq',
            "SELECT array_agg(reference) FROM payment_transaction"
            " WHERE mpesa_push_sent_at IS NOT NULL AND provider_reference IS NOT NULL"
            " GROUP BY provider_id, provider_reference HAVING count(*) > 1 LIMIT 5",
            "CREATE UNIQUE INDEX IF NOT EXISTS payment_transaction_mpesa_checkout_uniq"
            " ON payment_transaction (provider_id, provider_reference)"
            " WHERE mpesa_push_sent_at IS NOT NULL AND provider_reference IS NOT NULL",
        )
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

    # === BUSINESS METHODS - PROCESSING VALUES === #

    def _get_specific_processing_values(self, processing_values):
        """Sign the values our STK Push route will be called with (as payment_adyen does)."""
        values = super()._get_specific_processing_values(processing_values)
        if self.provider_code != 'mpesa':
            return values
        values['mpesa_access_token'] = payment_utils.generate_access_token(
            processing_values['reference'], processing_values['amount'],
            processing_values['currency_id'], processing_values['partner_id'],
        )
        return values

    def _mpesa_check_access_token(self, access_token):
        self.ensure_one()
        return payment_utils.check_access_token(
            access_token, self.reference, self.amount, self.currency_id.id, self.partner_id.id,
        )

    # === BUSINESS METHODS - STK PUSH === #

    def _mpesa_send_stk_push(self, phone):
        """Send the STK Push of this draft transaction to `phone` and set it pending.

        Bad input raises a ValidationError before anything leaves and changes nothing.  A refusal by
        Daraja sets the transaction in error (it is a real, audited attempt) and is returned as the
        message to show.

        The push is the one flow that commits (besides the crons), on purpose: Daraja has no
        idempotency key, so the attempt is committed before the request leaves, and a retried or
        repeated request never sends a second prompt.  Daraja's answer is kept at once in the
        exchange log on its own cursor, so a failure later in the request never loses the
        CheckoutRequestID of a prompt that is on a phone (a replay takes it from there).

        :return: None when the prompt was sent, else the message explaining why not.
        :rtype: str | None
        """
        self.ensure_one()
        self._mpesa_lock_or_refuse(self.env._("This payment is already being sent to M-Pesa."))
        if self.provider_code == 'mpesa' and self.state == 'pending' and self.provider_reference:
            return None  # A replay of a request whose prompt is already on the phone.
        if self.provider_code == 'mpesa' and self.state == 'draft' and self.mpesa_push_sent_at:
            return self._mpesa_resume_push()
        if self.provider_code != 'mpesa' or self.state != 'draft':
            raise ValidationError(self.env._("This payment can no longer be sent to M-Pesa."))
        provider = self.provider_id
        reason = provider._mpesa_unavailability_reason(self.partner_id, self.currency_id)
        if reason:
            raise ValidationError(reason)
        try:
            msisdn = daraja.normalize_msisdn(phone or '')
        except daraja.DarajaValidationError as error:
            raise ValidationError(str(error)) from error
        amount = provider._mpesa_check_amount(self.amount, self.currency_id)
        self._mpesa_check_no_prompt_waiting()
        # Built and checked before the attempt is committed: a configuration error sends nothing
        # and leaves no false "outcome unknown" attempt behind.
        client = provider._mpesa_client(transaction=self)
        push = {
            'phone': msisdn, 'amount': amount, 'reference': self.reference,
            'description': self.company_id.name or 'Payment', 'callback_url': provider._mpesa_callback_url(),
        }
        try:
            daraja.build_stk_push_payload(client.shortcode, max_amount=client.max_amount, **push)
        except daraja.DarajaValidationError as error:
            raise ValidationError(str(error)) from error

        values = {
            'mpesa_phone': msisdn,
            'mpesa_requested_amount': amount,
            'mpesa_push_sent_at': fields.Datetime.now(),
            'mpesa_api_url': client.credentials.base_url,
        }
        if self.currency_id.compare_amounts(amount, self.amount):
            # M-Pesa takes whole shillings, rounded up: record what the phone is really asked.
            values['amount'] = amount
        self.write(values)
        self.sale_order_ids.write({'mpesa_phone': msisdn})
        self._mpesa_documents()._mpesa_touch()  # See _mpesa_check_no_prompt_waiting.
        utils.commit(self.env)

        try:
            result = client.stk_push(**push)
        except daraja.DarajaError as error:
            message = self._mpesa_push_error_message(error)
            self.mpesa_outcome_unknown = self._mpesa_push_may_have_reached(error)
            self._set_error(message)
            utils.commit(self.env)
            return message
        self._mpesa_record_push_answer(result.checkout_request_id, result.merchant_request_id)
        utils.commit(self.env)
        return None

    def _mpesa_send_stk_push_or_refuse(self, phone):
        """The portal's push: a push refused before anything left (a phone M-Pesa cannot prompt, a
        prompt still on the phone) cancels this draft with the reason, instead of leaving it
        initiated forever; the distributor's next try is a transaction of its own.

        :return: None when the prompt was sent, else the message to show
        """
        self.ensure_one()
        # A second click fails here, before anything else: it never cancels the push in progress.
        self._mpesa_lock_or_refuse(self.env._("This payment is already being sent to M-Pesa."))
        # No savepoint: the push commits its attempt.  Its refusals come before any write.
        try:
            return self._mpesa_send_stk_push(phone)
        except ValidationError as error:
            if self.state != 'draft' or self.mpesa_push_sent_at:
                raise  # Not a refusal of this attempt (a replay): change nothing.
            self._set_canceled(state_message=str(error))
            return str(error)

    def _mpesa_record_push_answer(self, checkout_request_id, merchant_request_id):
        """Daraja took the push: the transaction waits for its answer, first checked soon."""
        self.write({
            'provider_reference': checkout_request_id,
            'mpesa_merchant_request_id': merchant_request_id,
            'mpesa_next_check_at': fields.Datetime.now() + timedelta(seconds=const.RECONCILE_FIRST_CHECK),
        })
        self._set_pending()
        self._mpesa_trigger_reconciliation(self.mpesa_next_check_at)
        # A callback may have beaten this answer: it waits, unmatched, for this CheckoutRequestID.
        self.env['muchiri.mpesa.event']._mpesa_wake_unmatched(self.provider_id, checkout_request_id)

    def _mpesa_resume_push(self):
        """A replay of a push request that died after the prompt left: never a second prompt.

        :return: None when the prompt is on its way, else the message explaining why not
        """
        if self._mpesa_take_logged_push_answer():
            return None
        raise ValidationError(self.env._("This payment can no longer be sent to M-Pesa."))

    def _mpesa_take_logged_push_answer(self, checkout_request_id=None):
        """Record Daraja's answer to this transaction's push from the exchange log, where it is kept
        on its own cursor, when the transaction lost it (its request replayed, or its worker killed
        between the two commits).

        :return: whether an answer was found and recorded
        """
        self.ensure_one()
        if self.provider_reference or not self.mpesa_push_sent_at:
            return False
        answer = self.env['muchiri.mpesa.event'].sudo().search([
            ('kind', '=', 'stk_push'), ('transaction_id', '=', self.id), ('provider_id', '=', self.provider_id.id),
            ('checkout_request_id', '=', checkout_request_id) if checkout_request_id
            else ('checkout_request_id', '!=', False),
        ], order='id desc', limit=1)
        if not answer:
            return False
        if self.state == 'draft':
            self._mpesa_record_push_answer(answer.checkout_request_id, answer.merchant_request_id)
        else:  # Ended as "outcome unknown": a confirmed success may still turn it done.
            self.write({'provider_reference': answer.checkout_request_id,
                        'mpesa_merchant_request_id': answer.merchant_request_id, 'mpesa_outcome_unknown': False})
        return True

    @api.model
    def _mpesa_find_by_logged_push(self, provider, checkout_request_id):
        """The transaction whose push Daraja answered with `checkout_request_id`, per our own
        exchange log, when the transaction itself lost that answer; it takes the answer back."""
        answer = self.env['muchiri.mpesa.event'].sudo().search([
            ('kind', '=', 'stk_push'), ('provider_id', '=', provider.id),
            ('checkout_request_id', '=', checkout_request_id), ('transaction_id', '!=', False),
        ], limit=1)
        tx = answer.transaction_id.sudo()
        if tx and tx._mpesa_take_logged_push_answer(checkout_request_id):
            return tx
        return self.browse()

    def _mpesa_lock_or_refuse(self, message):
        """Lock the transaction: a second click or a replayed request (a push, a refund) waits for
        nothing, it fails with `message`."""
        try:
            with self.env.cr.savepoint(flush=False):
                utils.lock_rows(self, 'nowait')
        except LockNotAvailable as error:
            raise ValidationError(message) from error

    @staticmethod
    def _mpesa_push_may_have_reached(error):
        """Whether Daraja may have taken the push although we saw no answer we could read."""
        if isinstance(error, daraja.DarajaConnectionError):
            return error.request_may_have_reached
        return isinstance(error, daraja.DarajaProtocolError)

    def _mpesa_push_error_message(self, error):
        if self._mpesa_push_may_have_reached(error):
            return self.env._(
                "M-Pesa did not answer in time, so we cannot tell whether the prompt reached"
                " your phone.  If you paid, your payment will be matched; otherwise try again"
                " in two minutes."
            )
        if isinstance(error, daraja.DarajaConnectionError):
            return self.env._("M-Pesa cannot be reached right now.  Please try again in a few minutes.")
        if isinstance(error, daraja.DarajaApiError):
            known = daraja.describe_api_error(error.error_code, error.error_message)
            if known:
                return known.message
        return self.env._("M-Pesa refused the payment request: %(error)s", error=error)

    def _mpesa_check_no_prompt_waiting(self):
        """One prompt per order or invoice at a time, and none for a paid one.

        A prompt younger than the provider's cooldown refuses the new one.  An older one that is
        still pending is asked about first (STK Query): the new prompt goes only once Daraja says
        the old one is over, and not at all if the customer paid it.

        Locks are taken in the order the settlement takes them (a transaction, then its documents):
        an older prompt's row without waiting (busy: try again), then the documents' rows.  The push
        then updates the documents before it commits: a concurrent push for the same document fails
        its lock with a serialization error, and Odoo replays it on a fresh snapshot that sees this
        prompt.
        """
        documents = self._mpesa_documents()
        if not documents:
            return
        others = self._mpesa_other_prompts(documents)
        previous = others.filtered(lambda tx: tx._mpesa_prompt_may_be_waiting())
        if previous:
            for other in previous:
                other._mpesa_settle_previous_prompt()
            # Part of the push's commits: Daraja's answer is kept even if this push is refused
            # below.  Then this transaction's lock is taken again, and the checks run afresh.
            utils.commit(self.env)
            self._mpesa_lock_or_refuse(self.env._("This payment is already being sent to M-Pesa."))
            others = self._mpesa_other_prompts(documents)
        # FOR UPDATE: a concurrent push waiting here fails to serialize once this one touched them.
        utils.lock_rows(documents, strength='UPDATE')
        if others.filtered(lambda tx: tx._mpesa_prompt_may_be_waiting()):
            raise ValidationError(self.env._(
                "M-Pesa is still processing the previous prompt for %(documents)s.  Try again in a few minutes.",
                documents=', '.join(documents.mapped('name')),
            ))
        for document in documents:
            if not document._mpesa_is_due():
                raise ValidationError(self.env._("%(document)s is already paid.", document=document.name))

    def _mpesa_other_prompts(self, documents):
        """The other prompts for `documents` that may still be on a phone; refuses at once while
        one is younger than the provider's cooldown."""
        document_field = 'sale_order_ids' if documents._name == 'sale.order' else 'invoice_ids'
        others = self.search([
            ('id', '!=', self.id),
            ('provider_code', '=', 'mpesa'),
            (document_field, 'in', documents.ids),
            ('mpesa_push_sent_at', '!=', False),
            '|', ('state', 'in', ('draft', 'pending')), ('mpesa_outcome_unknown', '=', True),
        ])
        young_since = fields.Datetime.now() - timedelta(seconds=self.provider_id.sudo().mpesa_push_cooldown or 0)
        for other in others:
            if other.mpesa_push_sent_at > young_since:
                raise ValidationError(self.env._(
                    "An M-Pesa prompt for %(document)s was already sent to %(phone)s.  Complete it"
                    " on that phone, or try again in a couple of minutes.",
                    document=', '.join(documents.mapped('name')),
                    phone=daraja.mask_msisdn(other.mpesa_phone or ''),
                ))
        return others

    def _mpesa_prompt_may_be_waiting(self):
        """Whether this prompt may still be answered: pending, or a till prompt whose worker died
        before it recorded Daraja's answer (the till may have it: see _mpesa_resume_b2b_checkout)."""
        self.ensure_one()
        return (self.state == 'pending' and bool(self.provider_reference)) or self._mpesa_is_unanswered_till_prompt()

    def _mpesa_settle_previous_prompt(self):
        """Settle an older pending prompt of the same order before a new one may go."""
        if self.mpesa_b2b_till:  # No STK Query for a till prompt: its result or Transaction Status tells.
            raise ValidationError(self.env._(
                "M-Pesa is still processing the till prompt for this order.  Try again in a few minutes."
            ))
        try:
            with self.env.cr.savepoint(flush=False):
                utils.lock_rows(self, 'nowait')  # Busy with the cron or a callback: never wait on it.
        except OperationalError as error:
            raise ValidationError(self.env._(
                "M-Pesa is still processing the previous prompt for this order.  Try again in a few minutes."
            )) from error
        try:
            result = self._mpesa_settle_by_query()
        except daraja.DarajaError as error:
            raise ValidationError(self.env._(
                "M-Pesa cannot tell yet what became of the previous prompt for this order (%(error)s)."
                "  Try again in a few minutes.", error=error,
            )) from error
        if result is not None and result.outcome == PENDING:
            raise ValidationError(self.env._(
                "M-Pesa is still processing the previous prompt for this order.  Try again in a"
                " few minutes."
            ))

    # === BUSINESS METHODS - STK QUERY === #

    def _mpesa_query(self, session=None):
        """Ask Daraja for the state of this transaction's STK Push.

        :rtype: daraja.StkQueryResult
        :raise daraja.DarajaError: when Daraja cannot answer now.
        """
        self.ensure_one()
        client = self.provider_id._mpesa_client(transaction=self, session=session)
        return client.stk_query(self.provider_reference)

    def _mpesa_settle_by_query(self, session=None):
        """Query Daraja and settle the transaction with its answer, as a callback would.

        :return: Daraja's answer, or None when this prompt cannot be asked about (taken in test
                 mode, the provider now enabled): it is then ended in error, saying so
        :rtype: daraja.StkQueryResult | None
        """
        self.ensure_one()
        self._mpesa_lock()  # As a callback's settlement does.
        if self.mpesa_b2b_till:  # A till prompt has no STK Query: Transaction Status is asked now.
            self._mpesa_resume_b2b_checkout()  # Its worker died before it recorded Daraja's answer.
            if self.state == 'pending' and self.provider_id._mpesa_has_initiator():
                self._mpesa_ask_status_soon()
            return None
        if self._mpesa_end_test_mode_prompt():
            return None
        result = self._mpesa_query(session=session)
        if result.outcome != PENDING:
            self._mpesa_settle_with_query_result(result)
        return result

    def _mpesa_remembered_api_url(self):
        """The Daraja this transaction went through (a refund: its own, else its payment's)."""
        self.ensure_one()
        payment = self.source_transaction_id if self.operation == 'refund' else self
        return (self.mpesa_api_url or payment.mpesa_api_url or '').rstrip('/')

    def _mpesa_taken_in_test_mode(self):
        """Whether this transaction went through another Daraja than Safaricom's production API
        (the sandbox or a simulator): its receipt and CheckoutRequestID mean nothing there."""
        self.ensure_one()
        url = self._mpesa_remembered_api_url()
        return bool(url) and url != daraja.PRODUCTION_URL

    def _mpesa_test_mode_reason(self):
        """Why Daraja may not be asked about this transaction, or None: an enabled provider talks
        to production only (see `payment.provider._mpesa_client`), and a transaction taken in test
        mode is never reversed nor queried there.

        :rtype: str | None
        """
        self.ensure_one()
        if self.provider_id.state != 'enabled' or not self._mpesa_taken_in_test_mode():
            return None
        return self.env._(
            "%(reference)s was taken while M-Pesa was in test mode: Safaricom's production M-Pesa, the"
            " only one this provider talks to now, does not know it.",
            reference=(self.source_transaction_id if self.operation == 'refund' else self).reference,
        )

    def _mpesa_end_test_mode_prompt(self):
        """End a prompt taken in test mode that is still pending now that the provider is live,
        instead of asking production about it (see `_mpesa_test_mode_reason`).

        :return: why, when it was such a prompt (then it is in error, saying so), else None
        :rtype: str | None
        """
        self.ensure_one()
        reason = self._mpesa_test_mode_reason()
        if reason and self.state in ('draft', 'pending'):
            self.mpesa_next_check_at = False
            self._set_error(self.env._(
                "%(reason)s  Its prompt is no longer followed; a payment made in test mode moved no"
                " real money.", reason=reason,
            ))
        return reason

    # === BUSINESS METHODS - NOTIFICATIONS === #

    @api.model
    def _mpesa_find_by_checkout_request(self, provider, checkout_request_id, lock=True):
        """The transaction of `provider` that holds a CheckoutRequestID, row-locked when `lock` so
        that racing callbacks and queries handle it one after the other.

        Scoped to the provider whose secret authenticated the callback: a callback on one
        provider's path never touches another provider's transactions (docs/design.md, 6. URLs and
        callback sources).  And to prompts: a transaction that sent none (the ledger's, whose
        reference is its receipt; a refund, whose reference is its reversal's ConversationID) has
        no STK callback to take.
        """
        if not (provider and checkout_request_id):
            return self.browse()
        tx = self.sudo().search([
            ('provider_id', '=', provider.id), ('provider_code', '=', 'mpesa'),
            ('provider_reference', '=', checkout_request_id),
            ('mpesa_push_sent_at', '!=', False),
            ('mpesa_b2b_till', '=', False),
        ], limit=1)
        if tx and lock:
            tx._mpesa_lock()
        return tx

    def _mpesa_lock(self, how='wait'):
        """Hold this transaction's row lock until the end of the database transaction, so that
        pushes, callbacks, queries and the crons handle it one after the other (`utils.lock_rows`).

        FOR NO KEY UPDATE, for the exchange log written on its own cursor meanwhile: for the same
        reason no column of this table that a foreign key could use (a full unique index) may be
        written before a Daraja call: the M-Pesa uniques are partial indexes (see init).

        :param str how: 'wait' for the lock, 'nowait' (raise LockNotAvailable at once) or 'skip'
        :return: whether the lock is held ('skip': False when another worker has it)
        """
        self.ensure_one()
        return bool(utils.lock_rows(self, how))

    def _get_tx_from_notification_data(self, provider_code, notification_data):
        """Override of `payment` to find the transaction by its provider and CheckoutRequestID."""
        tx = super()._get_tx_from_notification_data(provider_code, notification_data)
        if provider_code != 'mpesa' or len(tx) == 1:
            return tx
        provider = self.env['payment.provider'].browse(notification_data.get('provider_id'))
        tx = self._mpesa_find_by_checkout_request(provider, notification_data.get('checkout_request_id'))
        if not tx:
            raise ValidationError(self.env._(
                "M-Pesa: no transaction matches CheckoutRequestID %s.",
                notification_data.get('checkout_request_id'),
            ))
        return tx

    def _mpesa_is_final_for(self, outcome):
        """Whether an answer with `outcome` can no longer change this transaction: a done or
        cancelled one never changes, an error only to a (late) success."""
        self.ensure_one()
        return self.state in ('done', 'cancel') or (self.state == 'error' and outcome != SUCCESS)

    def _mpesa_notification(self, result_code, result_desc, source, **values):
        """The notification dict of an M-Pesa answer for this transaction (one path for all)."""
        self.ensure_one()
        return {
            'provider_id': self.provider_id.id,
            'checkout_request_id': self.provider_reference,
            'result_code': result_code,
            'result_desc': result_desc,
            'source': source,
            **values,
        }

    def _process_notification_data(self, notification_data):
        """Override of `payment` to settle the transaction with a final M-Pesa answer; the one
        place for the guards.

        `notification_data` comes from a callback (`source` 'callback', with the amount and the
        receipt; `confirmed` False when Daraja's query did not confirm it, in test mode only) or
        from an STK Query (`source` 'query': Daraja answered us directly, for our own
        CheckoutRequestID, so the amount is the one we asked).  A done prompt's M-Pesa receipt
        lands in the ledger.
        """
        super()._process_notification_data(notification_data)
        if self.provider_code != 'mpesa':
            return
        self._mpesa_apply_answer(notification_data)
        if self.state == 'done' and self.mpesa_receipt_number:
            self._mpesa_ledger_record_stk()

    def _mpesa_apply_answer(self, notification_data):
        """Settle this transaction with M-Pesa's answer (see `_process_notification_data`)."""
        result = daraja.classify_result(notification_data.get('result_code'))
        if self._mpesa_is_final_for(result.outcome):
            return
        last_result = {
            'mpesa_result_code': result.code,
            'mpesa_result_desc': notification_data.get('result_desc') or result.message,
        }
        if result.outcome == PENDING:
            self.write(last_result)  # Unknown codes wait for a final answer.
            return

        source = notification_data.get('source', 'callback')
        settled = {
            **last_result,
            'mpesa_settled_by': source,
            'mpesa_settled_at': fields.Datetime.now(),
            'mpesa_next_check_at': False,
            'mpesa_outcome_unknown': False,
        }
        if result.outcome == SUCCESS:
            if source == 'callback':
                settled.update(self._mpesa_check_paid_amount_and_receipt(notification_data))
                settled['mpesa_receipt_status'] = 'confirmed' if notification_data.get('confirmed', True) \
                    else 'unverified'
            else:
                settled.update(mpesa_paid_amount=self.mpesa_requested_amount, mpesa_receipt_status='pending')
            self.write(settled)
            # Shown on the status page, so that the customer sees the M-Pesa receipt too.
            self._set_done(state_message=self.mpesa_receipt_number and self.env._(
                "M-Pesa receipt %(receipt)s", receipt=self.mpesa_receipt_number,
            ))
            self._mpesa_flag_overpaid_documents()
            if not self.sale_order_ids:  # An order's customer gets Odoo's own mail (confirmed, or paid).
                self._mpesa_send_mail('muchiri_mpesa.mail_template_mpesa_payment_confirmed')
            return

        self.write(settled)
        if result.outcome == CANCELED and notification_data.get('confirmed', True):
            self._set_canceled(state_message=result.message)
        else:
            # An unconfirmed failure is an error, never a cancellation: a later confirmed success wins.
            self._set_error(result.message)
        self._mpesa_send_mail('muchiri_mpesa.mail_template_mpesa_payment_failed')

    def _mpesa_check_paid_amount_and_receipt(self, notification_data):
        """A success callback must carry a new receipt and exactly the amount asked."""
        receipt = (notification_data.get('receipt_number') or '').strip()
        amount = notification_data.get('amount')
        if not receipt:
            raise ValidationError(self.env._("M-Pesa: a success without a receipt number is refused."))
        if amount is None or Decimal(str(amount)) != Decimal(self.mpesa_requested_amount or 0):
            raise ValidationError(self.env._(
                "M-Pesa: the callback says %(paid)s was paid, but %(asked)s was asked.",
                paid=self._mpesa_format_amount(float(amount)) if amount is not None else '-',
                asked=self._mpesa_format_amount(self.mpesa_requested_amount),
            ))
        self._mpesa_check_receipt_is_new(receipt)
        return {
            'mpesa_receipt_number': receipt,
            'mpesa_paid_amount': float(amount),
            'mpesa_paid_at': notification_data.get('paid_at') or fields.Datetime.now(),
        }

    def _mpesa_check_receipt_is_new(self, receipt):
        if receipt and self.search_count([('mpesa_receipt_number', '=', receipt), ('id', '!=', self.id)]):
            raise ValidationError(self.env._(
                "M-Pesa: receipt %s is already recorded on another transaction.", receipt,
            ))

    # === BUSINESS METHODS - CALLBACKS === #

    def _mpesa_apply_callback(self, callback, answers, session=None):
        """Apply a kept callback to this (locked) transaction, after the checks a forged one fails.

        Daraja does not sign callbacks: its answer to our own STK Query decides.  `answers` holds
        the answers of this run by (provider, CheckoutRequestID), so that duplicates of one prompt
        ride on one confirmation.

        :return: the callback's new state and the message saying why
        :rtype: tuple[str, str]
        :raise daraja.DarajaError: when Daraja cannot answer the query now
        """
        self.ensure_one()
        outcome = callback.outcome
        if self.state == 'done' and outcome == SUCCESS:
            return self._mpesa_record_late_receipt(callback)
        if self._mpesa_is_final_for(outcome):
            return 'ignored', self.env._("The transaction is already %s.", self.state)
        test_mode = self._mpesa_end_test_mode_prompt()
        if test_mode:  # Production cannot confirm it: never trusted.
            return 'rejected', test_mode
        confirmed = self.provider_id._mpesa_confirms_callbacks()
        query = None
        if confirmed:
            key = (self.provider_id.id, self.provider_reference)
            query = answers.get(key) or self._mpesa_query(session=session)
            answers[key] = query
            if query.outcome == PENDING:
                return 'queued', self.env._("Daraja has not confirmed this result yet.")
            if daraja.classify_result(query.result_code).code != callback.result.code:
                self._mpesa_settle_with_query_result(query)
                return 'rejected', self.env._(
                    "Daraja's query answers %(code)s (%(desc)s): the callback is not trusted.",
                    code=query.result_code, desc=query.result_desc,
                )
        # Trusted from here on: a forged callback must not mute the no-callback alert.
        self.mpesa_callback_at = self.mpesa_callback_at or fields.Datetime.now()
        try:
            with self.env.cr.savepoint():
                self._handle_notification_data('mpesa', self._mpesa_callback_notification(callback, confirmed))
        except ValidationError as error:
            _logger.warning("Refused M-Pesa callback for %s: %s", self.reference, error)
            if query:  # The callback lies (amount, receipt), but Daraja's answer is the truth.
                self._mpesa_settle_with_query_result(query)
            return 'rejected', str(error)
        return 'processed', self.env._("Transaction %s.", self.state)

    def _mpesa_callback_notification(self, callback, confirmed):
        return self._mpesa_notification(
            callback.result_code, callback.result_desc, 'callback',
            checkout_request_id=callback.checkout_request_id,
            amount=callback.amount,
            receipt_number=callback.receipt_number,
            paid_at=utils.naive_utc(callback.transaction_date),
            confirmed=confirmed,
        )

    def _mpesa_record_late_receipt(self, callback):
        """A success callback for a payment already done: the receipt of a payment settled by STK
        Query (which carries none), or a duplicate; never a second payment of the same prompt.

        A late receipt is not proven by anything Daraja told us: it is recorded as unverified, and
        a different one after it is a conflict for accountants, neither replacing nor dropped.  The
        initiator job then asks M-Pesa's Transaction Status about it (not this job: its run must
        stay short), whose result confirms it or raises the conflict.
        """
        receipt = callback.receipt_number
        if self.mpesa_receipt_number:
            if receipt == self.mpesa_receipt_number:
                return 'ignored', self.env._("This receipt is already recorded.")
            # Daraja sends one receipt per prompt, and its query carries none: one of the two is
            # forged, and only an accountant can tell which.
            return 'conflict', self.env._(
                "A second receipt (%(new)s) for a prompt already paid with %(old)s: an accountant must"
                " tell which one is real.", new=receipt, old=self.mpesa_receipt_number,
            )
        try:
            with self.env.cr.savepoint():
                values = self._mpesa_check_paid_amount_and_receipt(
                    self._mpesa_callback_notification(callback, False)
                )
                self.write(values)
                self._mpesa_request_receipt_proof()
        except ValidationError as error:
            return 'rejected', str(error)
        self._mpesa_update_payment_memo()
        self._mpesa_ledger_record_stk()  # The receipt lands in the ledger too.
        return 'processed', self.env._(
            "Receipt recorded, unverified, for a payment settled by STK Query; M-Pesa's Transaction"
            " Status is asked about it."
        )

    def _mpesa_check_match_by_hand(self, event, override_reason):
        """Whether an accountant may give `event`'s callback to this transaction.

        :raise UserError: saying why not
        """
        self.ensure_one()
        if event.kind != 'stk_callback' or event.state not in ('unmatched', 'error') \
                or event.transaction_id:
            raise UserError(self.env._("This callback is not waiting for a transaction."))
        if not self.mpesa_outcome_unknown or self.provider_reference or self.provider_id != event.provider_id:
            raise UserError(self.env._("%s is not a prompt whose answer was lost.", self.reference))
        holders = self.search([
            ('id', '!=', self.id), ('provider_id', '=', event.provider_id.id), '|',
            ('provider_reference', '=', event.checkout_request_id),
            *([('mpesa_receipt_number', '=', event.receipt_number)] if event.receipt_number
              else [('id', '=', 0)]),
        ])
        if holders:
            raise UserError(self.env._(
                "This payment already belongs to %s: one M-Pesa payment settles one transaction.",
                ', '.join(holders.mapped('reference')),
            ))
        mismatches = []
        if event.amount and round(event.amount) != self.mpesa_requested_amount:
            mismatches.append(self.env._(
                "the payment is of %(paid)s, the prompt asked %(asked)s",
                paid=self._mpesa_format_amount(event.amount),
                asked=self._mpesa_format_amount(self.mpesa_requested_amount),
            ))
        if event.phone and self.mpesa_phone and not daraja.phones_may_match(event.phone, self.mpesa_phone):
            mismatches.append(self.env._(
                "the payer's phone is %(payer)s, the prompt went to %(phone)s",
                payer=event.phone, phone=self.mpesa_phone,
            ))
        if not mismatches:
            return
        if not (override_reason or '').strip():
            raise UserError(self.env._(
                "This payment does not fit %(ref)s: %(why)s.  An accounting manager can still match it,"
                " giving the reason.", ref=self.reference, why='; '.join(mismatches),
            ))
        if not self.env.user.has_group('account.group_account_manager'):
            raise AccessError(self.env._("Only an accounting manager can match a payment that does not fit."))
        for document in self._mpesa_documents() or self:
            document.message_post(body=self.env._(
                "M-Pesa payment %(receipt)s matched with %(ref)s by %(user)s although %(why)s."
                "  Reason: %(reason)s",
                receipt=event.receipt_number or event.checkout_request_id, ref=self.reference,
                user=self.env.user.name, why='; '.join(mismatches), reason=override_reason.strip(),
            ))

    def _mpesa_create_unique_index(self, name, duplicates_query, create_query):
        """Create a unique index, unless existing rows break it: those are money to sort out by hand,
        never resolved by guessing (they are named in the log)."""
        self.env.cr.execute(duplicates_query)
        duplicates = [row[0] for row in self.env.cr.fetchall()]
        if duplicates:
            _logger.warning("M-Pesa: %s not created, these transactions share a payment: %s", name, duplicates)
            return
        self.env.cr.execute(create_query)

    def _mpesa_accept_paid_amount(self, amount):
        """An accounting manager vouched for a payment of another amount than the prompt asked:
        the transaction is for what was paid (the documents then show it part-paid or overpaid)."""
        self.ensure_one()
        self.write({'mpesa_requested_amount': int(amount), 'amount': float(amount)})

    def _mpesa_settle_with_query_result(self, query):
        self._handle_notification_data('mpesa', self._mpesa_notification(
            query.result_code, query.result_desc, 'query',
        ))

    # === BUSINESS METHODS - ORDERS AND INVOICES === #

    def _mpesa_documents(self):
        """What this transaction pays: its sale orders, else its invoices (payment links)."""
        return self.sale_order_ids or self.invoice_ids

    def _mpesa_flag_overpaid_documents(self):
        """Money beyond an order's or invoice's total is recorded, never hidden: ask for a refund
        (the document's one rule, `_mpesa_update_refund_flag`, decides)."""
        for document in self._mpesa_documents():
            document._mpesa_update_refund_flag(lambda document=document: self.env._(
                "M-Pesa payments of %(paid)s exceed the total of %(total)s of %(document)s (last:"
                " %(ref)s, receipt %(receipt)s).  Check them and refund the customer.",
                paid=document._mpesa_format_amount(document._mpesa_paid_amount()),
                total=document._mpesa_format_amount(document.amount_total),
                document=document.name, ref=self.reference, receipt=self.mpesa_receipt_number or '-',
            ), provider=self.provider_id)

    def _mpesa_format_amount(self, amount):
        return formatLang(self.env, amount, currency_obj=self.currency_id)

    def _mpesa_state_message(self):
        """The status message in the reader's language.  The job that settles a payment writes it in
        English; the catalogue's plain words (daraja/codes.py marks them) are terms of this addon,
        translated where a distributor reads them: the status page and the mails."""
        self.ensure_one()
        message = self.state_message or self.mpesa_result_desc
        receipt = self.mpesa_receipt_number
        if receipt and message == f"M-Pesa receipt {receipt}":  # What the job writes when it is paid.
            return self.env._("M-Pesa receipt %(receipt)s", receipt=receipt)
        return message and self.env._(message)  # pylint: disable=translation-not-lazy

    def _mpesa_result_text(self):
        """What the last M-Pesa answer means, in the catalogue's plain words with Daraja's code
        beside them (the order's tab, the alerts); Daraja's own wording only for a code the
        catalogue does not know."""
        self.ensure_one()
        code = self.mpesa_result_code
        if not code:  # No M-Pesa answer (the push was refused, or the cut-off ended it).
            return self.state_message or dict(self._fields['state']._description_selection(self.env))[self.state]
        result = daraja.classify_result(code)
        if result.outcome == CANCELED:
            text = self.env._("Cancelled by the customer")
        elif result.outcome == daraja.Outcome.FAILED:
            # The catalogue's first sentence says what happened; the rest tells the customer what to do.
            text = result.message.split('. ')[0].rstrip('.')
        else:  # A success we refused (amount, receipt), or a code the catalogue does not know.
            text = self.state_message or self.mpesa_result_desc or self.env._("Unknown result")
        return self.env._("%(text)s (%(code)s)", text=text, code=code)

    def _mpesa_send_mail(self, template_xmlid, documents=None):
        """Mail the customer through the chatter of what the transaction pays (its orders, else its
        invoices), so that the mail shows where the salesperson and the accountant look.

        :param documents: where to post it instead (one document: one mail)
        """
        # By its cached id: env.ref() would ask the database whether it exists, on every settlement.
        template_id = self.env['ir.model.data']._xmlid_to_res_id(template_xmlid, raise_if_not_found=False)
        if not (template_id and self.partner_id.email):
            return
        template = self.env['mail.template'].browse(template_id)
        try:
            with self.env.cr.savepoint():  # A mail problem must never undo a settlement.
                template = template.sudo()
                subject = template._render_field('subject', self.ids, compute_lang=True)[self.id]
                body = template._render_field('body_html', self.ids, compute_lang=True)[self.id]
                for document in (documents if documents is not None else self._mpesa_documents()).sudo() \
                        or self.sudo():
                    if document._name == self._name:
                        template.send_mail(self.id)  # Nothing else to post on: a plain mail.
                        continue
                    document.with_context(mail_notify_force_send=False).message_post(
                        subject=subject, body=body, partner_ids=self.partner_id.ids,
                        message_type='comment', subtype_xmlid='mail.mt_comment',
                        email_layout_xmlid='mail.mail_notification_light',
                    )
        except Exception:
            _logger.warning("M-Pesa mail %s for %s could not be queued.", template_xmlid, self.reference,
                            exc_info=True)

    def _create_payment(self, **extra_create_values):
        """Override of `account_payment` to make the M-Pesa receipt the payment's memo, so that it
        can be matched with the M-Pesa statement; a refund's memo names the receipt it reverses and
        the reversal's own."""
        if self.provider_code == 'mpesa' and 'memo' not in extra_create_values:
            extra_create_values['memo'] = self._mpesa_refund_memo() if self.operation == 'refund' \
                else self._mpesa_payment_memo()
        return super()._create_payment(**extra_create_values)

    def _mpesa_payment_memo(self):
        documents = ', '.join(self._mpesa_documents().mapped('name')) or self.reference
        if self.mpesa_ledger_id and not self.mpesa_push_sent_at:
            # The ledger's receipt is the memo of its payments, also of those whose transaction
            # does not carry it (one receipt, several documents).
            return f"{self.mpesa_ledger_id.name} - {documents}"
        return self.env._(
            "%(receipt)s - %(documents)s", documents=documents,
            receipt=self.mpesa_receipt_number or self.env._("M-Pesa receipt pending"),
        )

    def _mpesa_update_payment_memo(self):
        """The receipt came after the payment was made: the memo (and its entry's reference) say
        it, so that the payment still matches the M-Pesa statement."""
        payment = self.payment_id
        if not payment:
            return
        try:
            with self.env.cr.savepoint():
                memo = self._mpesa_payment_memo()
                payment.sudo().memo = memo
                payment.move_id.sudo().ref = memo
        except Exception:  # Never undo a receipt over a memo: the transaction holds the receipt.
            _logger.warning("The memo of payment %s could not be updated.", payment.id, exc_info=True)

    def _post_process(self):
        """Override of `payment`: a pending M-Pesa prompt waits for its final answer, which comes
        within a minute or two; Odoo's "payment pending" mail would be one mail too many.  The
        invoices of the orders M-Pesa paid with *Invoice on Payment* go to the customer, as Odoo's
        Automatic Invoice sends its own."""
        mpesa_pending = self.filtered(lambda tx: tx.provider_code == 'mpesa' and tx.state == 'pending')
        # The status page's poll and Odoo's job (woken by the callback) both post-process a paid
        # prompt: the first to lock it does; the other leaves it, rather than confirming and invoicing
        # the order again into a serialization failure (an ERROR in the log, a replayed request).
        mpesa_done = self.filtered(lambda tx: tx.provider_code == 'mpesa' and tx.state == 'done'
                                   and not tx.is_post_processed)
        busy = mpesa_done - utils.lock_rows(mpesa_done, how='skip')
        processed = self - mpesa_pending - busy
        res = super(PaymentTransaction, processed)._post_process()
        processed._mpesa_to_invoice_on_payment()._send_invoice()
        # A done M-Pesa refund's payment (made by `account_payment`) is reconciled with the payment
        # it reverses, and the documents it was refunded for no longer ask for it.
        for refund in processed.filtered(lambda tx: tx.provider_code == 'mpesa' and tx.operation == 'refund'
                                         and tx.state == 'done'):
            try:
                with self.env.cr.savepoint():
                    refund._mpesa_reconcile_refund_payment()
            except Exception:
                _logger.warning("The M-Pesa refund payment of %s could not be reconciled.", refund.reference,
                                exc_info=True)
            refund._mpesa_clear_refund_flags()
        return res

    # === BUSINESS METHODS - INSTALMENTS === #

    def _mpesa_limit_to_instalment(self):
        """An order or invoice above what one prompt may ask is paid in instalments, one prompt
        (one transaction, receipt and payment) each: this new transaction asks the next one,
        min(what is still due, the provider's maximum).  Decided here from the documents, never
        from the amount the browser sent; an amount one prompt may take is left as Odoo made it."""
        self.ensure_one()
        provider = self.provider_id
        documents = self._mpesa_documents()
        if (
            self.provider_code != 'mpesa' or self.state != 'draft' or self.operation != 'online_direct'
            or not documents
            or self.currency_id.compare_amounts(self.amount, provider._mpesa_max_amount()) <= 0
        ):
            return
        due = sum(document._mpesa_amount_due() for document in documents)
        if self.currency_id.compare_amounts(due, 0) <= 0:
            return  # Nothing left: the push refuses it, saying so.
        self.amount = provider._mpesa_instalment_amount(due, self.currency_id)

    def _mpesa_instalments(self):
        """What the status page says after this prompt of the documents it paid part of: for each
        one partly paid and still due, what is paid, what is left, the next prompt's amount and
        the page where it is asked.

        :rtype: list[dict]
        """
        self.ensure_one()
        if self.provider_code != 'mpesa' or self.operation == 'refund' \
                or self.state not in ('done', 'cancel', 'error'):
            return []
        lines = []
        for document in self._mpesa_documents():
            currency = document.currency_id
            paid, due = document._mpesa_paid_amount(), document._mpesa_amount_due()
            if currency.compare_amounts(paid, 0) <= 0 or currency.compare_amounts(due, 0) <= 0:
                continue
            next_amount = self.provider_id._mpesa_instalment_amount(due, currency)
            lines.append({
                'document': document,
                'paid': paid,
                'due': due,
                'total': document.amount_total,
                'next': next_amount,
                # The button only where the page offers the payment form (Odoo's own rule).
                'url': document._has_to_be_paid() and document.get_portal_url(),
                # Whole sentences, so that a translation may put the amounts where its grammar does.
                'status': self.env._(
                    "%(document)s: paid %(paid)s of %(total)s; still to pay: %(due)s.",
                    document=document.name,
                    paid=utils.strong_amount(self.env, paid, currency),
                    total=format_amount(self.env, document.amount_total, currency),
                    due=utils.strong_amount(self.env, due, currency),
                ),
                'next_label': self.env._(
                    "Pay the next prompt of %(amount)s", amount=format_amount(self.env, next_amount, currency),
                ),
            })
        return lines

    def _mpesa_limit_advice(self):
        """After an M-Pesa limit (ResultCode 4: the daily limit, 8: the balance limit), where the
        rest can be paid from the phone's menu instead, or None."""
        self.ensure_one()
        if self.provider_code != 'mpesa' or self.mpesa_result_code not in const.LIMIT_RESULT_CODES:
            return None
        provider = self.provider_id.sudo()
        number = provider._mpesa_business_number()
        if not number:
            return None
        if provider.mpesa_shortcode_type == 'till':
            return self.env._(
                "You can also pay from your phone's M-Pesa menu: Lipa na M-Pesa, Buy Goods and"
                " Services, till number %(till)s.", till=number,
            )
        account = ', '.join(self._mpesa_documents().mapped('name')) or self.reference
        return self.env._(
            "You can also pay from your phone's M-Pesa menu: Lipa na M-Pesa, Pay Bill, business"
            " number %(paybill)s, account number %(account)s.",
            paybill=number, account=account,
        )

    # === BUSINESS METHODS - INVOICE ON PAYMENT === #

    @api.model
    def _mpesa_automatic_invoice_enabled(self):
        """Whether Odoo's own Automatic Invoice (Sales > Settings) is on: it invoices the orders
        every provider pays, M-Pesa's included."""
        return str2bool(self.env['ir.config_parameter'].sudo().get_param('sale.automatic_invoice'))

    def _mpesa_to_invoice_on_payment(self):
        """The done M-Pesa payments whose provider invoices the orders they pay (*Invoice on
        Payment*).  None when Odoo's own Automatic Invoice is on: it does the same for every
        provider, and an order is invoiced once.  Other providers' payments are never among them."""
        if self._mpesa_automatic_invoice_enabled():
            return self.browse()
        return self.filtered(lambda tx: (
            tx.provider_code == 'mpesa' and tx.state == 'done' and tx.operation != 'validation'
            and tx.provider_id.sudo().mpesa_invoice_on_payment
        ))

    def _check_amount_and_confirm_order(self):
        """Override of `sale` to invoice the orders of M-Pesa payments with *Invoice on Payment*
        right after their confirmation, as Odoo's Automatic Invoice does at this point of the
        post-processing: `account_payment` then posts the invoice and reconciles it with the payment."""
        confirmed_orders = super()._check_amount_and_confirm_order()
        self._mpesa_to_invoice_on_payment().filtered(
            lambda tx: not any(order._mpesa_invoiced_before_paid() for order in tx.sale_order_ids)
        )._invoice_sale_orders()
        return confirmed_orders

    # === BUSINESS METHODS - RECONCILIATION === #

    @api.model
    def _cron_mpesa_reconcile(self, batch_size=const.RECONCILE_BATCH_SIZE):
        """Settle pending M-Pesa transactions whose callback is late or lost, by STK Query.

        Each transaction is handled under its own row lock (skipped when another worker holds it)
        and committed on its own, so that a crash loses nothing and one failure blocks nothing.
        """
        due = self.sudo().search(
            self._mpesa_due_domain(), order='mpesa_next_check_at, id', limit=batch_size,
        )
        session = requests.Session()  # One connection to Daraja for the whole run.
        checked = 0
        throttled = False
        try:
            for tx in due:
                outcome = tx._mpesa_reconcile(session)
                checked += outcome != 'skipped'
                if outcome == 'stop':
                    throttled = True
                    break
        finally:
            session.close()
        self._mpesa_expire_unanswered_pushes()
        # Odoo runs the job again at once while work remains: not when Daraja asks us to wait.
        remaining = 0 if throttled else self.sudo().search_count(self._mpesa_due_domain())
        self.env['ir.cron']._notify_progress(done=checked, remaining=remaining)
        return checked

    @api.model
    def _mpesa_due_domain(self):
        return [
            ('provider_code', '=', 'mpesa'),
            ('state', '=', 'pending'),
            ('provider_reference', '!=', False),
            ('mpesa_next_check_at', '<=', fields.Datetime.now()),
        ]

    @api.model
    def _mpesa_expire_unanswered_pushes(self):
        """A draft whose push left but whose answer was never recorded (the worker died in
        between): its prompt may be on a phone, and only its callback can tell."""
        stale = self.sudo().search([
            ('provider_code', '=', 'mpesa'),
            ('state', '=', 'draft'),
            ('provider_reference', '=', False),
            ('mpesa_push_sent_at', '<', fields.Datetime.now() - timedelta(minutes=5)),
        ], limit=const.RECONCILE_BATCH_SIZE)
        for tx in stale:
            if tx._mpesa_take_logged_push_answer():
                utils.commit(tx.env)
                continue
            tx.mpesa_outcome_unknown = True
            tx._set_error(self.env._(
                "The answer to this M-Pesa prompt was never recorded: if the customer paid, the"
                " payment waits in M-Pesa Exchanges to be matched."
            ))
            utils.commit(tx.env)

    @api.model
    def _mpesa_trigger_reconciliation(self, at):
        cron = self.env.ref('muchiri_mpesa.cron_mpesa_reconcile', raise_if_not_found=False)
        if cron and at:
            cron.sudo()._trigger(at=at)

    def _mpesa_reconcile(self, session=None):
        """Query one due transaction and settle or reschedule it; committed on its own.

        :return: 'settled', 'pending', 'failed', 'skipped' (another worker has it, or it is no
                 longer due), or 'stop' (Daraja throttles us or cannot be reached: end the run)
        """
        self.ensure_one()
        try:
            with self.env.cr.savepoint():
                outcome = self._mpesa_reconcile_locked(session)
        except OperationalError:
            outcome = 'skipped'  # Changed by a concurrent worker meanwhile: the next run sees it.
        except Exception:
            _logger.exception("M-Pesa reconciliation of %s failed.", self.reference)
            outcome = 'failed'
            with self.env.cr.savepoint():
                self.invalidate_recordset()
                # Whatever the failure, a prompt never waits past its cut-off.
                if not self._mpesa_end_at_cutoff(fields.Datetime.now()):
                    self._mpesa_schedule_next_check(self._mpesa_next_check_delay(fields.Datetime.now()))
        utils.commit(self.env)
        return outcome

    def _mpesa_reconcile_locked(self, session):
        if not self._mpesa_lock('skip'):
            return 'skipped'
        now = fields.Datetime.now()
        if self.state != 'pending' or not self.mpesa_next_check_at or self.mpesa_next_check_at > now:
            return 'skipped'
        self.write({'mpesa_check_count': self.mpesa_check_count + 1, 'mpesa_last_check_at': now})
        try:
            result = self._mpesa_settle_by_query(session=session)
        except (daraja.DarajaConnectionError, daraja.DarajaProtocolError):
            self._mpesa_schedule_next_check(const.RECONCILE_THROTTLE_DELAY)
            return 'stop'
        except daraja.DarajaApiError as error:
            if error.error_code in const.THROTTLE_ERROR_CODES:
                self._mpesa_schedule_next_check(const.RECONCILE_THROTTLE_DELAY)
                return 'stop'
            _logger.warning("M-Pesa query of %s refused: %s", self.reference, error)
            result = None
        if result is not None and result.outcome != PENDING:
            self._mpesa_post_process()
            return 'settled'
        if self.state != 'pending':  # Ended unasked: taken in test mode (see _mpesa_settle_by_query).
            return 'failed'
        if self._mpesa_end_at_cutoff(now):
            return 'failed'
        self._mpesa_schedule_next_check(self._mpesa_next_check_delay(now))
        return 'pending'

    def _mpesa_end_at_cutoff(self, now):
        """End a pending prompt that nothing settled by the provider's cut-off, in error.

        :return: whether it was past the cut-off
        """
        if self.state != 'pending' or not self._mpesa_is_past_cutoff(now):
            return False
        self.write({'mpesa_next_check_at': False, 'mpesa_settled_by': 'cutoff', 'mpesa_settled_at': now})
        self._set_error(self.env._(
            "M-Pesa gave no final answer within %(hours)s hours; a late payment will still be"
            " matched.", hours=self.provider_id.sudo().mpesa_reconcile_cutoff_hours,
        ))
        return True

    def _mpesa_expedite_status_check(self):
        """The distributor is watching the status page of a pending prompt.

        Its callback came: settle it now, for this one transaction, so that the page turns paid at
        once even when the cron worker is busy with other jobs (one STK Query, in the distributor's
        request, never in Daraja's).  Its callback is late (the prompt is older than 20 s): ask
        Daraja now, at most once per 10 s, as the reconciliation would.
        """
        self.ensure_one()
        now = fields.Datetime.now()
        if self.provider_code != 'mpesa' or self.state != 'pending' or not self.provider_reference:
            return
        Event = self.env['muchiri.mpesa.event'].sudo()
        received = Event.search([
            *Event._mpesa_due_callbacks_domain(), ('transaction_id', '=', self.id), ('state', '=', 'queued'),
        ], order='id', limit=1)
        if received:
            if received._mpesa_settle({}) == 'done':
                self.invalidate_recordset()
            return
        if not self.mpesa_push_sent_at or not self.mpesa_next_check_at:
            return
        age = (now - self.mpesa_push_sent_at).total_seconds()
        last = self.mpesa_last_check_at
        if age < const.STATUS_POLL_EXPEDITE_AFTER or (
            last and (now - last).total_seconds() < const.STATUS_POLL_EXPEDITE_INTERVAL
        ):
            return
        try:
            with self.env.cr.savepoint():
                if not self._mpesa_lock('skip'):
                    return  # The cron or a callback has it right now.
                self.mpesa_next_check_at = now
                self._mpesa_reconcile_locked(session=None)
        except (OperationalError, daraja.DarajaError):
            return  # The row just changed, or Daraja cannot answer: the cron asks again.

    def _mpesa_post_process(self):
        """Confirm and invoice the orders of the settled transactions now, as Odoo's status page
        would; a failure is left to Odoo's post-processing cron."""
        # Odoo computes amount_paid from transaction_ids only: it must see the new states.
        self.sale_order_ids.invalidate_recordset(['amount_paid'])
        for tx in self.filtered(lambda tx: tx.state in ('done', 'cancel', 'error') and not tx.is_post_processed):
            try:
                with self.env.cr.savepoint():
                    tx._post_process()
            except Exception:
                _logger.warning("Post-processing of %s failed; Odoo's cron will retry.", tx.reference,
                                exc_info=True)

    def _mpesa_next_check_delay(self, now):
        """Seconds until the next query: often while the customer may still answer, then rarely."""
        age = (now - (self.mpesa_push_sent_at or now)).total_seconds()
        if age < const.RECONCILE_FAST_PERIOD:
            return const.RECONCILE_FAST_INTERVAL
        return const.RECONCILE_SLOW_INTERVAL

    def _mpesa_is_past_cutoff(self, now):
        hours = self.provider_id.sudo().mpesa_reconcile_cutoff_hours or const.DEFAULT_RECONCILE_CUTOFF_HOURS
        return (now - (self.mpesa_push_sent_at or now)) >= timedelta(hours=hours)

    def _mpesa_schedule_next_check(self, seconds):
        self.mpesa_next_check_at = fields.Datetime.now() + timedelta(seconds=seconds)

    # === BUSINESS METHODS - STK PROMPTS IN THE LEDGER === #

    def _mpesa_ledger_record_stk(self):
        """Record this done prompt's receipt in the ledger, linked to it.

        In a savepoint: the ledger never undoes a settled payment (a Pull row records the receipt
        later, and rule 1 of the matching links it to this prompt then).
        """
        self.ensure_one()
        try:
            with self.env.cr.savepoint():
                notes = []  # The row's report, confirmation and link: one message (_mpesa_post_notes).
                row, created = self.env['muchiri.mpesa.ledger'].sudo()._mpesa_record(
                    self.provider_id, self.mpesa_receipt_number, 'stk', self._mpesa_ledger_values(), notes,
                )
                linked = created or row.state in ('awaiting', 'unmatched')
                if linked:
                    self._mpesa_ledger_link(row, notes)
                row._mpesa_post_notes(notes)
                if not linked and self.mpesa_ledger_id != row:
                    # Placed already (by C2B or Pull, before its prompt said it was ours): the same
                    # money now pays two things.  Never hidden, never undone by guessing.
                    self.mpesa_ledger_id = row
                    row.conflict = True
                    row._mpesa_ask_accountants(self.env._(
                        "Receipt %(receipt)s was matched to %(documents)s, and prompt %(reference)s says"
                        " it paid it: the money is counted twice.  Cancel one of the payments.",
                        receipt=row.name, reference=self.reference,
                        documents=', '.join(row.sale_order_ids.mapped('name') + row.invoice_ids.mapped('name'))
                        or '-',
                    ))
        except Exception:
            _logger.warning("M-Pesa receipt %s of %s is not in the ledger yet.", self.mpesa_receipt_number,
                            self.reference, exc_info=True)

    def _mpesa_ledger_values(self):
        self.ensure_one()
        try:
            account = daraja.account_reference(self.reference)
        except daraja.DarajaValidationError:
            account = False
        provider = self.provider_id.sudo()
        return {
            'amount': self.mpesa_paid_amount or self.amount,
            'trans_time': self.mpesa_paid_at or fields.Datetime.now(),
            'phone': self.mpesa_phone or False,
            'msisdn': self.mpesa_phone or False,
            'shortcode': (provider.mpesa_till_number if provider.mpesa_shortcode_type == 'till'
                          else provider.mpesa_shortcode) or False,
            'bill_ref': account,
            'transaction_type': "STK Push",
            # Daraja's STK Query confirmed the callback that brought the receipt (not a late one).
            'confirmation': self.mpesa_receipt_status == 'confirmed' and 'stk',
        }

    def _mpesa_ledger_link(self, row, notes=None):
        """This transaction holds `row`'s receipt: the row's money is its money (the row's chatter
        note to `notes` when given: see muchiri.mpesa.ledger._mpesa_note)."""
        self.ensure_one()
        if row.state != 'unmatched' and self.mpesa_ledger_id == row:  # A new row is unmatched: no read.
            return
        self.mpesa_ledger_id = row
        row._mpesa_link_prompt(self, notes)

    # === BUSINESS METHODS - LEDGER MONEY AS TRANSACTIONS === #

    @api.model
    def _mpesa_ledger_create_tx(self, row, document, amount, holds_receipt):
        """A done transaction of `amount` of the row's money for `document` (an order or an
        invoice), as Odoo's payment form would have made it; post-processing does the rest.

        :param bool holds_receipt: whether the transaction carries the receipt (one per receipt:
                                   the first of the row's transactions)
        """
        provider = row.provider_id
        field = 'sale_order_ids' if document._name == 'sale.order' else 'invoice_ids'
        command = [Command.set(document.ids)]
        partner = document.partner_invoice_id if document._name == 'sale.order' else document.partner_id
        tx = self.sudo().create({
            'provider_id': provider.id,
            'payment_method_id': self.env.ref('payment.payment_method_mpesa').id,
            'reference': self._compute_reference(provider.code, **{field: command}),
            'amount': amount,
            'currency_id': document.currency_id.id,
            'partner_id': partner.id,
            field: command,
            'operation': 'offline',
            'provider_reference': row.name,
            'mpesa_ledger_id': row.id,
            'mpesa_receipt_number': row.name if holds_receipt else False,
            'mpesa_receipt_status': 'confirmed' if row.confirmation in DARAJA_CONFIRMATIONS else 'unverified',
            'mpesa_phone': row.phone or False,
            'mpesa_paid_amount': amount,
            'mpesa_paid_at': row.trans_time or fields.Datetime.now(),
            'mpesa_api_url': provider._mpesa_api_base_url(),  # Test mode or production: see _mpesa_client.
        })
        tx._set_done(state_message=self.env._("M-Pesa receipt %(receipt)s", receipt=row.name))
        if tx.mpesa_receipt_number and tx.mpesa_receipt_status == 'unverified':
            tx._mpesa_request_receipt_proof()  # Booked on the source check or a hand: Daraja's word still counts.
        return tx

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
        # A second click while the first is sending fails, it never waits.
        self._mpesa_lock_or_refuse(self.env._("This M-Pesa payment is already being refunded."))
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
        utils.commit(self.env)
        try:
            ack = client.reverse(**reversal)
        except daraja.DarajaError as error:
            refund_tx._mpesa_reversal_not_sent(error)
            utils.commit(self.env)
            return refund_tx
        refund_tx._mpesa_record_initiator_ack(ack, 'reversal')
        utils.commit(self.env)
        return refund_tx

    def _mpesa_check_refund_rights(self):
        """Odoo's refund runs in sudo: the user who asked must still be one who may refund."""
        user = self.env.user
        if not (user._is_superuser() or user.has_group('account.group_account_invoice')):
            raise AccessError(self.env._("You are not allowed to refund M-Pesa payments."))

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
        if self._mpesa_is_unproven_till_payment():
            return self._mpesa_apply_b2b_status(result)
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
        if result.is_success:
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
        if not result.is_success:
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
        reversed_at = utils.naive_utc(reversed_at) or fields.Datetime.now()
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
        reversal = f" ({reversal_id})" if reversal_id else ''  # Outside _(): Odoo's extraction cannot read f-strings.
        message = self.env._("Reversed by M-Pesa%s.", reversal)
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

    def _mpesa_refunded_note(self):
        """What the status banner says of this payment once M-Pesa gave its money back (its done
        refund's amount, time and reversal receipt), or None.

        :rtype: Markup | None
        """
        self.ensure_one()
        refund = self._mpesa_done_refund()
        if not refund:
            return None
        note = self.env._(
            "This M-Pesa payment of %(amount)s was refunded to your M-Pesa account on %(date)s.",
            amount=utils.strong_amount(self.env, -refund.amount, self.currency_id),
            # As Odoo's datetime widget writes it: the reader's time zone and date format.
            date=utils.strong(format_datetime(
                self.env, refund.mpesa_paid_at or refund.last_state_change,
                tz=self.env.context.get('tz'), dt_format=False,
            )),
        )
        if refund.mpesa_reversal_receipt:
            note += Markup(' ') + self.env._(
                "M-Pesa reversal receipt: %(receipt)s.", receipt=utils.strong(refund.mpesa_reversal_receipt),
            )
        return note

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
        if not result.is_success and not unknown:
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
        of the payment it reverses; a till prompt not proven yet: its RequestRefID); its result
        comes to our ResultURL."""
        self.ensure_one()
        provider = self.provider_id
        initiator, credential = provider._mpesa_initiator()
        party, identifier = provider._mpesa_initiator_party()
        if self._mpesa_is_unproven_till_payment():
            # A till prompt by its RequestRefID (Daraja's OriginalConversationID): Daraja's own
            # record of the payment, whatever a result claimed.
            self._mpesa_resume_b2b_checkout()
            subject = {'original_conversation_id': self.provider_reference}
        else:
            payment = self.source_transaction_id if self.operation == 'refund' else self
            subject = {'transaction_id': payment.mpesa_receipt_number}
        client = provider._mpesa_client(transaction=self, session=session)
        self.mpesa_status_count += 1
        ack = client.transaction_status(
            initiator=initiator,
            security_credential=credential,
            **subject,
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
        utils.commit(self.env)
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
        if self._mpesa_is_unproven_till_payment():
            return True
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

    def _mpesa_refund_memo(self):
        source = self.source_transaction_id
        return self.env._(
            "Reversal %(reversal)s of %(receipt)s - %(documents)s",
            reversal=self.mpesa_reversal_receipt or self.mpesa_receipt_number or '-',
            receipt=source.mpesa_receipt_number or source.mpesa_ledger_id.name or '-',
            documents=', '.join(source._mpesa_documents().mapped('name')) or source.reference,
        )

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
        """The documents flagged for a refund that this one settles no longer ask for it (the
        document's one rule, `_mpesa_update_refund_flag`, decides)."""
        for document in self.source_transaction_id._mpesa_documents():
            document._mpesa_update_refund_flag(
                lambda: self.env._(
                    "The extra M-Pesa payment %(receipt)s was refunded (%(ref)s).",
                    receipt=self.source_transaction_id.mpesa_receipt_number, ref=self.reference,
                ),
                feedback=self.env._("Refunded by M-Pesa (%s).", self.reference),
                author=self._mpesa_refund_author(),
            )

    # === BUSINESS METHODS - B2B EXPRESS CHECKOUT === #

    def _mpesa_send_b2b_checkout(self, till):
        """Prompt the distributor's `till` to pay this draft transaction into our paybill (Daraja's
        B2B Express Checkout) and set it pending (docs/design.md, 15. Pay from the till).

        The guards of the STK Push: one prompt at a time per document, none for a paid one, the
        amount limits, whole shillings.  The RequestRefID is ours (a UUID): it is written as the
        provider reference and committed before the request leaves, so that the result always
        finds its transaction and a replay never sends a second prompt.  Daraja's refusal in the
        acknowledgement sets the transaction in error with Daraja's words.

        :return: None when the prompt was started, else the message explaining why not
        :rtype: str | None
        """
        self.ensure_one()
        self._mpesa_lock_or_refuse(self.env._("This payment is already being sent to M-Pesa."))
        if self.provider_code == 'mpesa' and self.state == 'pending' and self.mpesa_b2b_till:
            return None  # A replay of a request whose prompt is already on its way.
        if self.provider_code != 'mpesa' or self.state != 'draft' or self.mpesa_push_sent_at:
            raise ValidationError(self.env._("This payment can no longer be sent to M-Pesa."))
        provider = self.provider_id
        reason = provider._mpesa_unavailability_reason(self.partner_id, self.currency_id) \
            or provider._mpesa_till_payment_refusal()
        if reason:
            raise ValidationError(reason)
        till = self.env['res.partner']._mpesa_clean_till(till)
        amount = provider._mpesa_check_amount(self.amount, self.currency_id)
        self._mpesa_check_no_prompt_waiting()
        client = provider._mpesa_client(transaction=self)
        checkout = {
            'till': till, 'amount': amount, 'reference': self._mpesa_b2b_payment_ref(),
            'callback_url': provider._mpesa_daraja_url('b2b_result'),
            'partner_name': self.company_id.name or 'Payment', 'request_id': str(uuid.uuid4()),
        }
        try:  # Checked before the attempt is committed: a configuration error sends nothing.
            daraja.B2BCheckoutRequest(
                primary_shortcode=till, receiver_shortcode=client.shortcode.business_shortcode, amount=amount,
                payment_ref=checkout['reference'], callback_url=checkout['callback_url'],
                partner_name=checkout['partner_name'], request_id=checkout['request_id'],
                max_amount=client.max_amount, allow_http=urlsplit(client.credentials.base_url).scheme == 'http',
            )
        except daraja.DarajaValidationError as error:
            raise ValidationError(str(error)) from error
        values = {
            'provider_reference': checkout['request_id'],
            'mpesa_b2b_till': till,
            'mpesa_requested_amount': amount,
            'mpesa_push_sent_at': fields.Datetime.now(),
            'mpesa_api_url': client.credentials.base_url,
        }
        if self.currency_id.compare_amounts(amount, self.amount):
            values['amount'] = amount  # What the till is really asked (whole shillings, rounded up).
        self.write(values)
        # Committed with the attempt: should this worker die before it records Daraja's answer,
        # Transaction Status by the RequestRefID still tells (see _mpesa_resume_b2b_checkout).
        self._mpesa_ask_b2b_status_later()
        self._mpesa_documents()._mpesa_touch()  # See _mpesa_check_no_prompt_waiting.
        utils.commit(self.env)

        try:
            client.b2b_checkout(**checkout)
        except daraja.DarajaError as error:
            message = self._mpesa_push_error_message(error)
            if not self._mpesa_b2b_still_unanswered():
                return message
            if self._mpesa_push_may_have_reached(error):
                # The prompt may be on its way: its result, or Transaction Status by our RequestRefID, tells.
                self._set_pending(state_message=message)
                self._mpesa_ask_b2b_status_later()
            else:
                self.write({'mpesa_result_code': getattr(error, 'error_code', None) or False,
                            'mpesa_status_next_at': False})
                self._set_error(message)
            utils.commit(self.env)
            return message
        if self._mpesa_b2b_still_unanswered():
            self._set_pending()
            self._mpesa_ask_b2b_status_later()
            utils.commit(self.env)
        return None

    def _mpesa_b2b_still_unanswered(self):
        """After the request (sent unlocked, its attempt committed): lock the transaction again and
        tell whether it is still the draft this request left, which nothing else took meanwhile
        (the till's result or the initiator job, see _mpesa_resume_b2b_checkout)."""
        self._mpesa_lock()
        self.invalidate_recordset()
        return self.state == 'draft'

    def _mpesa_resume_b2b_checkout(self):
        """A till prompt still draft although its request was committed as sent: the worker died
        before it recorded Daraja's answer (or Daraja's result beat it).  The till may have been
        prompted: the prompt is followed as a pending one, its result or Transaction Status by the
        RequestRefID books it, and "not found" after the checks ends it (docs/design.md, 15. Pay
        from the till)."""
        self.ensure_one()
        if self.state == 'draft' and self.mpesa_b2b_till and self.mpesa_push_sent_at and self.operation != 'refund':
            self._set_pending(state_message=self.env._(
                "Daraja's answer to this till prompt was never recorded: M-Pesa's Transaction Status"
                " tells whether till %(till)s paid.", till=self.mpesa_b2b_till,
            ))

    def _mpesa_send_b2b_checkout_or_refuse(self, till):
        """The portal's till prompt: a refusal before anything left cancels this draft with the
        reason (as `_mpesa_send_stk_push_or_refuse`)."""
        self.ensure_one()
        self._mpesa_lock_or_refuse(self.env._("This payment is already being sent to M-Pesa."))
        try:
            return self._mpesa_send_b2b_checkout(till)
        except ValidationError as error:
            if self.state != 'draft' or self.mpesa_push_sent_at:
                raise
            self._set_canceled(state_message=str(error))
            return str(error)

    def _mpesa_b2b_payment_ref(self):
        try:
            return daraja.account_reference(self.reference)
        except daraja.DarajaValidationError:
            return daraja.account_reference(self.reference.replace('/', '-')[:12])

    def _mpesa_is_unproven_till_payment(self):
        """A till prompt whose money Transaction Status has not proven yet (pending, or in error
        after an unsigned failure result: a proven payment still wins; or sent, its answer never
        recorded)."""
        self.ensure_one()
        return bool(self.mpesa_b2b_till) and self.operation != 'refund' and self.mpesa_receipt_status != 'confirmed' \
            and (self.state in ('pending', 'error') or self._mpesa_is_unanswered_till_prompt())

    def _mpesa_is_unanswered_till_prompt(self):
        """A till prompt committed as sent whose Daraja answer was never recorded (still draft)."""
        self.ensure_one()
        return self.state == 'draft' and bool(self.mpesa_b2b_till) and bool(self.mpesa_push_sent_at) \
            and self.operation != 'refund'

    def _mpesa_ask_b2b_status_later(self):
        """Without a result by B2B_RESULT_WAIT, Transaction Status asks (the result may be lost)."""
        if self.provider_id._mpesa_has_initiator():
            self.write({'mpesa_status_next_at': fields.Datetime.now() + timedelta(seconds=const.B2B_RESULT_WAIT),
                        'mpesa_status_count': 0})
            self._mpesa_trigger_initiator_job(self.mpesa_status_next_at)

    def _mpesa_apply_b2b_result(self, result):
        """Apply the till's result (a daraja.B2BCheckoutResult) to this (locked) transaction.

        Daraja signs nothing it posts: a failure ends the prompt in error (never cancelled, so that
        a proven payment still wins), and a success books nothing by itself.  Its receipt is kept,
        unverified, and Transaction Status is asked at once; only its answer pays.

        :return: the result event's new state and the message saying why
        :rtype: tuple[str, str]
        """
        self.ensure_one()
        self._mpesa_resume_b2b_checkout()
        if self.state == 'done':
            if result.is_success and result.transaction_id == self.mpesa_receipt_number:
                return 'ignored', self.env._("This receipt is already recorded.")
            if result.is_success:
                return 'conflict', self.env._(
                    "A second receipt (%(new)s) for a till payment already paid with %(old)s.",
                    new=result.transaction_id, old=self.mpesa_receipt_number,
                )
            return 'ignored', self.env._("The transaction is already done.")
        if self.state not in ('pending', 'error'):
            return 'ignored', self.env._("The transaction is already %s.", self.state)
        last = {'mpesa_result_code': result.result_code, 'mpesa_result_desc': result.result_desc or result.description}
        if result.outcome == PENDING:
            self.write(last)
            self._mpesa_ask_status_soon()
            return 'processed', self.env._("An undocumented result code: M-Pesa's Transaction Status is asked.")
        if not result.is_success:
            if self.state != 'pending' or self.mpesa_receipt_number:
                return 'ignored', self.env._("A success was reported already: M-Pesa's Transaction Status decides.")
            self.write({**last, 'mpesa_settled_by': 'callback', 'mpesa_settled_at': fields.Datetime.now(),
                        'mpesa_status_next_at': False, 'mpesa_callback_at': fields.Datetime.now()})
            self._set_error(result.description)
            self._mpesa_send_mail('muchiri_mpesa.mail_template_mpesa_payment_failed')
            return 'processed', self.env._("Not paid: %s", result.description)
        receipt = result.transaction_id
        if Decimal(result.amount) != Decimal(self.mpesa_requested_amount or 0):
            self._mpesa_ask_status_soon()  # Daraja's own record of the request decides.
            return 'conflict', self.env._(
                "The result says %(paid)s was paid, but %(asked)s was asked: nothing is paid on it,"
                " M-Pesa's Transaction Status is asked.",
                paid=self._mpesa_format_amount(float(result.amount)),
                asked=self._mpesa_format_amount(self.mpesa_requested_amount),
            )
        if self.mpesa_receipt_number:
            if receipt == self.mpesa_receipt_number:
                return 'ignored', self.env._("This receipt is already recorded.")
            return 'conflict', self.env._(
                "A second receipt (%(new)s) for a till prompt that reported %(old)s: M-Pesa's Transaction"
                " Status decides.", new=receipt, old=self.mpesa_receipt_number,
            )
        try:
            self._mpesa_check_receipt_is_new(receipt)
        except ValidationError as error:
            self._mpesa_ask_status_soon()
            return 'conflict', str(error)
        self.write({**last, 'mpesa_receipt_number': receipt, 'mpesa_receipt_status': 'unverified',
                    'mpesa_paid_amount': float(result.amount), 'mpesa_paid_at': fields.Datetime.now(),
                    'mpesa_callback_at': self.mpesa_callback_at or fields.Datetime.now()})
        if not self.provider_id._mpesa_has_initiator():
            self.mpesa_receipt_proof = self.env._(
                "Not paid: the provider has no initiator to ask M-Pesa's Transaction Status.")[:250]
            return 'processed', self.mpesa_receipt_proof
        self.mpesa_status_count = 0
        self._mpesa_ask_status_soon()
        return 'processed', self.env._(
            "Receipt %s recorded, unverified: M-Pesa's Transaction Status is asked.", receipt)

    def _mpesa_apply_b2b_status(self, result):
        """A Transaction Status result of this till prompt, asked by its RequestRefID.  Completed,
        for the amount asked, into our paybill: the payment is booked with the receipt Daraja
        names (the ledger row, the transaction done, Odoo's post-processing).  An unknown payment
        leaves a claimed receipt in conflict and pays nothing.

        :return: the result event's new state and the message saying why
        """
        self._mpesa_resume_b2b_checkout()
        if result.is_timeout:
            return self._mpesa_status_unanswered(result)
        unknown = result.result_code in daraja.UNKNOWN_TRANSACTION_CODES
        if not result.is_success and not unknown:
            return self._mpesa_status_unanswered(result)
        claimed = self.mpesa_receipt_number
        if unknown:
            message = self.env._(
                "M-Pesa's Transaction Status knows no payment from till %(till)s for this prompt (%(code)s).",
                till=self.mpesa_b2b_till, code=result.result_code,
            )
            if self.state == 'pending' and self.mpesa_status_count < const.INITIATOR_MAX_CHECKS:
                self._mpesa_schedule_status_check()  # The prompt may still be on the till.
            else:
                self.mpesa_status_next_at = False
                if self.state == 'pending':
                    self._set_error(message)
            if claimed:
                return self._mpesa_receipt_conflict([message])
            self.mpesa_receipt_proof = message[:250]
            return 'processed', message
        party = self.provider_id._mpesa_initiator_party()[0]
        problems = self.env['muchiri.mpesa.ledger']._mpesa_status_disagreements(
            result, result.receipt_no, self.mpesa_requested_amount, party,
        ) if result.receipt_no else [self.env._("it names no receipt")]
        originator = result.parameters.get('OriginatorConversationID')
        if originator and originator != self.provider_reference:
            problems.append(self.env._("it describes the request %s", originator))
        debit = (result.parameters.get('DebitPartyName') or '').split(' - ', 1)[0].strip()
        if debit and debit != self.mpesa_b2b_till:
            problems.append(self.env._("it was paid by %(debit)s, not till %(till)s", debit=debit,
                                       till=self.mpesa_b2b_till))
        if not problems:
            try:
                self._mpesa_check_receipt_is_new(result.receipt_no)
            except ValidationError as error:
                problems.append(str(error))
        if problems:
            return self._mpesa_receipt_conflict(problems)
        return self._mpesa_set_b2b_paid(result, claimed)

    def _mpesa_set_b2b_paid(self, result, claimed):
        """Daraja's Transaction Status proved the till's payment: book it."""
        receipt = result.receipt_no
        proof = self.env._("Confirmed by M-Pesa's Transaction Status on %s.", fields.Date.today())
        self.write({
            'mpesa_receipt_number': receipt,
            'mpesa_receipt_status': 'confirmed',
            'mpesa_receipt_proof': proof,
            'mpesa_paid_amount': float(result.amount),
            'mpesa_paid_at': utils.naive_utc(result.finalised_at) or fields.Datetime.now(),
            'mpesa_result_code': '0',
            'mpesa_result_desc': result.result_desc or False,
            'mpesa_settled_by': 'status',
            'mpesa_settled_at': fields.Datetime.now(),
            'mpesa_status_next_at': False,
            'mpesa_outcome_unknown': False,
        })
        self._set_done(state_message=self.env._("M-Pesa receipt %(receipt)s", receipt=receipt))
        self._mpesa_flag_overpaid_documents()
        self._mpesa_ledger_record_b2b()
        if claimed and claimed != receipt:
            self._log_message_on_linked_documents(self.env._(
                "The till's result named receipt %(claimed)s; M-Pesa's Transaction Status names %(receipt)s,"
                " which paid.", claimed=claimed, receipt=receipt,
            ))
        if not self.sale_order_ids:
            self._mpesa_send_mail('muchiri_mpesa.mail_template_mpesa_payment_confirmed')
        return 'processed', self.env._("Paid from till %(till)s: receipt %(receipt)s, confirmed.",
                                       till=self.mpesa_b2b_till, receipt=receipt)

    def _mpesa_ledger_record_b2b(self):
        """The till's proven receipt in the ledger (source 'b2b', confirmed by Transaction Status),
        linked to this transaction; a row another source placed already is a conflict, as for STK."""
        self.ensure_one()
        provider = self.provider_id.sudo()
        values = {
            'amount': self.mpesa_paid_amount,
            'trans_time': self.mpesa_paid_at or fields.Datetime.now(),
            'msisdn': self.mpesa_b2b_till,
            'shortcode': provider.mpesa_shortcode or False,
            'bill_ref': self._mpesa_b2b_payment_ref(),
            'transaction_type': "B2B Express Checkout",
            'confirmation': 'status',
        }
        row, created = self.env['muchiri.mpesa.ledger'].sudo()._mpesa_record(
            provider, self.mpesa_receipt_number, 'b2b', values,
        )
        if created or row.state in ('awaiting', 'unmatched'):
            self._mpesa_ledger_link(row)
        elif self.mpesa_ledger_id != row:
            self.mpesa_ledger_id = row
            row.conflict = True
            row._mpesa_ask_accountants(self.env._(
                "Receipt %(receipt)s was placed already, and till prompt %(reference)s says it paid it: the"
                " money is counted twice.  Cancel one of the payments.", receipt=row.name, reference=self.reference,
            ))

    def _mpesa_till_pending_message(self):
        """What the status page says while a till prompt waits: the till's operator confirms it,
        no phone does."""
        self.ensure_one()
        return self.env._(
            "We sent an M-Pesa prompt to your till %(till)s: its operator enters the operator ID and"
            " PIN to complete the payment.", till=self.mpesa_b2b_till,
        )
