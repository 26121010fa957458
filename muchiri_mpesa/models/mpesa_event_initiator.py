# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""Reversal and Transaction Status results posted by Daraja: kept, matched, settled by a job.

The same lifecycle as an STK callback (docs/design.md, 2. Prompts and callbacks): the route keeps the body exactly on
its own committed cursor, checks the source, parses, matches within the provider whose secret path
it came on, and answers at once; the initiator job settles it under the transaction's row lock.
A result whose transaction is not known yet (its acknowledgement is not recorded yet, or it is
forged) waits, unmatched, and changes nothing.
"""
import logging
import time
from datetime import timedelta

from odoo import api, fields, models

from .. import const, daraja
from .mpesa_event import CONCURRENCY_ERRORS

_logger = logging.getLogger(__name__)

INITIATOR_KINDS = ('initiator_result', 'initiator_timeout')
INITIATOR_APIS = [
    ('reversal', "Reversal"),
    ('status', "Transaction Status"),
]


class MpesaEvent(models.Model):
    _inherit = 'muchiri.mpesa.event'

    initiator_api = fields.Selection(selection=INITIATOR_APIS, string="Initiator API", readonly=True)
    conversation_id = fields.Char(string="ConversationID", readonly=True, index='btree_not_null')
    originator_conversation_id = fields.Char(
        string="OriginatorConversationID", readonly=True, index='btree_not_null',
    )

    # === INBOUND: THE RESULT REQUEST === #

    @api.model
    def _mpesa_receive_initiator_result(self, provider, api_name, timeout, raw_body, remote_addr):
        """Keep, check, parse and queue a Reversal or Transaction Status result (or queue
        timeout) posted on `provider`'s secret path.  No Daraja call is made here.

        :return: the HTTP status and the JSON body to answer Daraja with
        :rtype: tuple[int, dict]
        """
        started = time.monotonic()
        kind = 'initiator_timeout' if timeout else 'initiator_result'
        with self._mpesa_keep_inbound(provider, kind, raw_body, remote_addr) as event:
            try:
                with event.env.cr.savepoint():
                    event.initiator_api = api_name
                    status, answer = event._mpesa_admit_initiator()
            except Exception:  # The body is kept: the job takes it from 'received'.
                _logger.warning("M-Pesa result %s is kept for the initiator job.", event.id, exc_info=True)
                status, answer = 200, dict(daraja.ACCEPTED_RESPONSE)
            event.env['payment.transaction']._mpesa_trigger_initiator_job()
            event._mpesa_record_answer(status, started)
            return status, answer

    def _mpesa_admit_initiator(self):
        """Source check, parse, match within the provider; run by the request, or by the job for
        a result whose request died after keeping it.

        :return: the HTTP status and the JSON body that answer Daraja
        """
        self.ensure_one()
        if not self.provider_id._mpesa_is_allowed_source(self.remote_addr):
            self._mark('rejected', self.env._("The source address %s is not allowed.", self.remote_addr))
            return 403, {'ResultCode': 1, 'ResultDesc': "Rejected"}
        if not self._mpesa_parse_initiator():
            return 400, {'ResultCode': 1, 'ResultDesc': "Rejected: not a Daraja result"}
        if self._mpesa_match_initiator(lock=False) or self._mpesa_match_ledger_status(lock=False):
            self._mark('queued', self.env._("Waiting for settlement."))
        else:
            self._mpesa_retry_later('unmatched', self.env._(
                "No request of this provider has both conversation IDs of this result yet."))
            return 200, dict(daraja.ACCEPTED_RESPONSE)
        self.next_attempt_at = False
        return 200, dict(daraja.ACCEPTED_RESPONSE)

    def _mpesa_parse_initiator(self):
        """The result this event holds, its searchable fields filled; None (and the event
        rejected) when the body is not a Daraja result."""
        self.ensure_one()
        try:
            result = daraja.parse_initiator_result(
                self._mpesa_raw_body(), timeout=self.kind == 'initiator_timeout')
        except daraja.CallbackParseError as error:
            self._mark('rejected', str(error))
            return None
        if self.conversation_id != result.conversation_id:
            self.write({
                'conversation_id': result.conversation_id or False,
                'originator_conversation_id': result.originator_conversation_id or False,
                'result_code': result.result_code,
                'receipt_number': result.transaction_id or False,
            })
        return result

    def _mpesa_request_domain(self, conversation_field, originator_field):
        """The domain of the request this result answers, on a record whose `conversation_field`
        and `originator_field` hold the two IDs of Daraja's acknowledgement.

        Daraja signs nothing it posts, and a ConversationID is partly guessable (AG_, the date,
        then hex) or may be read in a log: a result names both IDs of our request, or it answers
        none.  A queue timeout, which Daraja documents loosely and which only makes us ask again,
        is matched by either.

        :return: the domain, or None when the result names too little to be matched
        :rtype: list | None
        """
        self.ensure_one()
        if self.kind == 'initiator_timeout':
            ids = [value for value in (self.conversation_id, self.originator_conversation_id) if value]
            if not ids:
                return None
            return ['|', (conversation_field, 'in', ids), (originator_field, 'in', ids)]
        if not (self.conversation_id and self.originator_conversation_id):
            return None
        return [(conversation_field, '=', self.conversation_id),
                (originator_field, '=', self.originator_conversation_id)]

    def _mpesa_match_initiator(self, lock):
        """The transaction this result answers, among its provider's only: a refund by its
        Reversal's conversation IDs, any transaction by its last Transaction Status query's.

        :return: the transaction (sudo), row-locked when `lock`; empty when none matches yet
        """
        self.ensure_one()
        Transaction = self.env['payment.transaction'].sudo()
        tx = self.transaction_id.sudo()
        if not tx:
            if self.initiator_api == 'reversal':
                domain = self._mpesa_request_domain('provider_reference', 'mpesa_originator_conversation_id')
                domain = domain and [('operation', '=', 'refund'), *domain]
            else:
                domain = self._mpesa_request_domain('mpesa_status_conversation_id', 'mpesa_status_originator_id')
            if not domain:
                return Transaction
            tx = Transaction.search([('provider_id', '=', self.provider_id.id), *domain], limit=1)
            if tx:
                self.transaction_id = tx
        if tx and lock:
            tx._mpesa_lock()
        return tx

    def _mpesa_match_ledger_status(self, lock):
        """The ledger row whose confirmation this Transaction Status result answers, among its
        provider's only (by the query's conversation IDs); locked when `lock`."""
        self.ensure_one()
        row = self.ledger_id.sudo()
        domain = self.initiator_api == 'status' and self._mpesa_request_domain(
            'status_conversation_id', 'status_originator_id')
        if not row and domain:
            row = self.env['muchiri.mpesa.ledger'].sudo().search([
                ('provider_id', '=', self.provider_id.id), *domain,
            ], limit=1)
            if row:
                self.ledger_id = row
        if row and lock:
            row._mpesa_lock()
        return row

    @api.model
    def _mpesa_wake_unmatched_results(self, provider, conversation_ids):
        """A transaction of `provider` now holds these conversation IDs: results that came before
        it did are due at once."""
        conversation_ids = [value for value in conversation_ids if value]
        if not conversation_ids:
            return
        waiting = self.sudo().search([
            ('kind', 'in', INITIATOR_KINDS), ('provider_id', '=', provider.id),
            ('callback_state', '=', 'unmatched'),
            '|', ('conversation_id', 'in', conversation_ids), ('originator_conversation_id', 'in', conversation_ids),
        ])
        waiting.next_attempt_at = False

    # === THE INITIATOR JOB === #

    @api.model
    def _mpesa_due_results_domain(self):
        now = fields.Datetime.now()
        return [
            ('kind', 'in', INITIATOR_KINDS),
            ('callback_state', 'in', const.CALLBACK_WAITING_STATES),
            ('create_date', '>=', now - timedelta(days=const.INITIATOR_KEEP_MATCHING_DAYS)),
            '|', ('next_attempt_at', '=', False), ('next_attempt_at', '<=', now),
        ]

    @api.model
    def _mpesa_settle_initiator_results(self, batch_size=const.RECONCILE_BATCH_SIZE):
        """Settle the kept results that are due, each committed on its own."""
        events = self.sudo().search(self._mpesa_due_results_domain(), order='id', limit=batch_size)
        settled = 0
        for event in events:
            settled += event._mpesa_settle_initiator() == 'done'
            self.env['payment.transaction']._mpesa_commit()
        return settled

    def _mpesa_settle_initiator(self):
        """Take one kept result as far as it can go now.

        :return: 'done' (a final state) or 'wait' (kept for later)
        """
        self.ensure_one()
        try:
            with self.env.cr.savepoint():
                return self._mpesa_settle_initiator_locked()
        except CONCURRENCY_ERRORS:
            return 'wait'
        except Exception as error:  # Never the same failure on every run: it backs off.
            _logger.warning("Kept M-Pesa result %s could not be settled now.", self.id, exc_info=True)
            self._mpesa_retry_later('error', str(error))
            return 'wait'

    def _mpesa_settle_initiator_locked(self):
        self.env.cr.execute(
            "SELECT id FROM muchiri_mpesa_event WHERE id = %s FOR NO KEY UPDATE SKIP LOCKED", [self.id],
            log_exceptions=False,
        )
        if not self.env.cr.fetchone():
            return 'wait'
        self.invalidate_recordset()
        if self.callback_state not in const.CALLBACK_WAITING_STATES:
            return 'done'
        if self.callback_state == 'received' and self._mpesa_admit_initiator()[0] != 200:
            return 'done'
        result = self._mpesa_parse_initiator()
        if not result:
            return 'done'
        tx = self._mpesa_match_initiator(lock=True)
        row = not tx and self._mpesa_match_ledger_status(lock=True)
        if row:
            state, message = row._mpesa_apply_status_result(result)
            self._mark(state, message)
            return 'done'
        if not tx:
            self._mpesa_retry_later('unmatched', self.env._(
                "No request of this provider has both conversation IDs of this result yet."))
            return 'wait'
        state, message = tx._mpesa_apply_initiator_result(result, self.initiator_api)
        self._mark(state, message)
        return 'done'
