# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
import base64
import contextlib
import logging
import time
from datetime import timedelta

import requests
from psycopg2.errors import DeadlockDetected, LockNotAvailable, SerializationFailure

from odoo import api, fields, models
from odoo.exceptions import UserError
from odoo.tools import SQL

from .. import const, daraja, utils

_logger = logging.getLogger(__name__)

# A kept body is left to its request this long before the settlement job takes it over (the
# request died after keeping it): the job never races the request that is still admitting it.
ADMISSION_GRACE = timedelta(minutes=2)
# What another worker holding the same rows looks like: try again, nothing is wrong.
CONCURRENCY_ERRORS = (SerializationFailure, LockNotAvailable, DeadlockDetected)
# A body that another worker's transaction holds is handled again this many times, each time on a
# fresh snapshot, before the settlement job is left to it.
CONCURRENCY_ATTEMPTS = 3
REJECTED = {'ResultCode': 1, 'ResultDesc': "Rejected"}
INITIATOR_KINDS = ('initiator_result', 'initiator_timeout')
INITIATOR_APIS = [
    ('reversal', "Reversal"),
    ('status', "Transaction Status"),
]

# What the request and the settlement job do with each kind of body Daraja posts (docs/design.md,
# 2. Prompts and callbacks, 7. The ledger and C2B, 8. Reversal and Transaction Status):
#   handler: the request's step once the source is allowed (parse, record or match), answering Daraja;
#   settle: the job's step for a body still waiting (None: the request's answer is final);
#   refusal: the answer to a body from a source that is not allowed.
# An STK callback is given to its request for ADMISSION_GRACE by its next attempt; a confirmation by
# the time it was kept (the job's domain).
INBOUND_KINDS = {
    'stk_callback': {
        'handler': '_mpesa_admit_stk_callback', 'settle': '_mpesa_settle_stk_callback', 'refusal': REJECTED,
    },
    'c2b_validation': {
        'handler': '_mpesa_handle_c2b_validation', 'settle': None,
        'refusal': daraja.c2b_validation_reject(daraja.C2B_OTHER_ERROR),
    },
    'c2b_confirmation': {
        'handler': '_mpesa_handle_c2b_confirmation', 'settle': '_mpesa_settle_c2b_confirmation', 'refusal': REJECTED,
    },
    'pull_callback': {'handler': '_mpesa_handle_pull_callback', 'settle': None, 'refusal': REJECTED},
    'initiator_result': {
        'handler': '_mpesa_admit_initiator_result', 'settle': '_mpesa_settle_initiator_result', 'refusal': REJECTED,
    },
    'initiator_timeout': {
        'handler': '_mpesa_admit_initiator_result', 'settle': '_mpesa_settle_initiator_result', 'refusal': REJECTED,
    },
    'b2b_result': {'handler': '_mpesa_admit_b2b_result', 'settle': '_mpesa_settle_b2b_result', 'refusal': REJECTED},
}
SETTLED_KINDS = tuple(kind for kind, inbound in INBOUND_KINDS.items() if inbound['settle'])


class InboundRefusal(Exception):
    """A body that is refused: (HTTP status, Daraja's answer, why)."""

    def __init__(self, status, answer, reason):
        super().__init__(reason)
        self.status, self.answer, self.reason = status, answer, reason


class MpesaEvent(models.Model):
    """One exchange with Daraja: every request we send and every body Daraja posts to us.

    It is the audit log and the inbox.  A body is kept, exactly as it came, on its own committed
    cursor before anything else; the request then admits it (source check, parse, match within
    the provider whose secret path it came on) and answers.  The settlement job takes what is left
    waiting: an STK callback confirmed by STK Query, a Reversal or Transaction Status result, a
    confirmation whose request died (docs/design.md, 2. Prompts and callbacks).  This model owns
    the bodies' states: the route, the job and the matching wizard move them through its methods.
    """

    _name = 'muchiri.mpesa.event'
    _description = "M-Pesa Exchange"
    _order = 'id desc'
    _rec_name = 'checkout_request_id'

    kind = fields.Selection(selection=const.EVENT_KINDS, required=True, readonly=True, index=True)
    provider_id = fields.Many2one('payment.provider', readonly=True, ondelete='cascade')
    transaction_id = fields.Many2one(
        'payment.transaction', readonly=True, index='btree_not_null', ondelete='set null',
    )
    sale_order_ids = fields.Many2many(related='transaction_id.sale_order_ids', string="Orders")
    ledger_id = fields.Many2one(
        'muchiri.mpesa.ledger', string="Ledger Row", readonly=True, index='btree_not_null', ondelete='set null',
    )
    checkout_request_id = fields.Char(string="CheckoutRequestID", readonly=True, index=True)
    merchant_request_id = fields.Char(string="MerchantRequestID", readonly=True)
    initiator_api = fields.Selection(selection=INITIATOR_APIS, string="Initiator API", readonly=True)
    conversation_id = fields.Char(string="ConversationID", readonly=True, index='btree_not_null')
    originator_conversation_id = fields.Char(
        string="OriginatorConversationID", readonly=True, index='btree_not_null',
    )
    receipt_number = fields.Char(string="Receipt", readonly=True, index='btree_not_null')
    phone = fields.Char(readonly=True, index='btree_not_null')
    amount = fields.Float(string="Amount (KES)", readonly=True)
    result_code = fields.Char(readonly=True)
    http_status = fields.Integer(string="HTTP Status", readonly=True)
    url = fields.Char(string="URL", readonly=True)
    remote_addr = fields.Char(string="Source Address", readonly=True)
    request_body = fields.Text(
        string="Request Body (as stored)", readonly=True, help="Secrets are redacted before they are stored.",
    )
    request_body_pretty = fields.Text(
        string="Request Body", compute='_compute_request_body_pretty',
        help="The request body indented for reading when it is JSON; the stored body is kept as it came.",
    )
    raw_body = fields.Binary(
        attachment=False, readonly=True, help="The body's bytes exactly as received.",
    )
    response_body = fields.Text(readonly=True)
    duration_ms = fields.Float(string="Duration (ms)", readonly=True)
    error = fields.Text(readonly=True)
    state = fields.Selection(
        selection=const.CALLBACK_STATES, readonly=True, index='btree_not_null',
        help="What became of a received body; empty for the requests we send.",
    )
    message = fields.Char(readonly=True, help="What was done with the body, and why.")
    attempt_count = fields.Integer(string="Settlement Attempts", readonly=True)
    next_attempt_at = fields.Datetime(
        string="Next Attempt", readonly=True, index='btree_not_null',
        help="When the settlement job takes this body again.",
    )

    # === COMPUTE METHODS === #

    @api.depends('request_body')
    def _compute_request_body_pretty(self):
        for event in self:
            event.request_body_pretty = utils.indent_json(event.request_body) if event.request_body else False

    # === BUSINESS METHODS - OUTBOUND === #

    @api.model
    def _record_exchange(self, provider, exchange, transaction=None):
        """Keep one outbound HTTP exchange reported by the Daraja client (already redacted).

        On its own committed cursor: the answer of a push that is on a phone (its CheckoutRequestID)
        survives whatever later happens to the request that sent it.  Inserted as a kept body is
        (`_mpesa_insert`): the fresh cursor reads neither the user nor the database's clock.

        An STK Query of the settlement job is the exception (context `mpesa_exchange_log`, a
        list): it changes nothing at Daraja, so the job inserts it on its own cursor with the
        body it settles, whatever became of that body, and commits them together (one cursor
        and commit fewer for each callback; see `_mpesa_keep_exchanges`).
        """
        request_body = exchange.request_body or {}
        response_body = exchange.response_body if isinstance(exchange.response_body, dict) else {}
        # The CallBackURL carries the provider's callback secret: readers of the log must not forge.
        secret = provider.sudo().mpesa_callback_secret
        request_text = utils.as_text(exchange.request_body)
        if secret and request_text:
            request_text = request_text.replace(secret, '***')
        values = {
            'kind': exchange.operation,
            'provider_id': provider.id,
            'transaction_id': transaction.id if transaction else False,
            'checkout_request_id': response_body.get('CheckoutRequestID')
            or request_body.get('CheckoutRequestID') or request_body.get('RequestRefID'),
            'merchant_request_id': response_body.get('MerchantRequestID'),
            'phone': request_body.get('PhoneNumber'),
            'result_code': response_body.get('ResultCode') or response_body.get('errorCode')
            or response_body.get('ResponseCode') or response_body.get('code'),
            'http_status': exchange.status or 0,
            'url': exchange.url,
            'request_body': request_text,
            'response_body': utils.as_text(exchange.response_body),
            'duration_ms': exchange.duration_ms,
            'error': exchange.error or False,
        }
        log = self.env.context.get('mpesa_exchange_log')
        if log is not None and exchange.operation == 'stk_query':
            log.append(values)
            return None
        with self.env.registry.cursor() as cr:
            return self.with_env(self.env(cr=cr, su=True))._mpesa_insert(values).id

    @api.model
    def _mpesa_keep_exchanges(self, log):
        """Insert the exchanges `_record_exchange` left in `log` on this cursor, and empty it."""
        for values in log:
            self.sudo()._mpesa_insert(values)
        log.clear()

    # === BUSINESS METHODS - INBOUND: THE REQUEST === #

    @api.model
    def _mpesa_receive(self, provider, kind, raw_body, remote_addr, initiator_api=False):
        """Keep, admit and answer a body Daraja posted on `provider`'s secret path (every inbound
        route's one entry).  No Daraja call is made here.

        The body is kept on its own cursor, committed before anything reads it: no rollback or
        replay of the request, and no input, can lose it.  Nothing that follows the keeping turns
        into a 5xx: the kind's fallback answers, and the settlement job takes the kept body.

        :return: the HTTP status and the JSON body to answer Daraja with
        :rtype: tuple[int, dict]
        """
        started = time.monotonic()
        # A body that could not be kept is not acknowledged (Odoo's own error answer): only what is
        # kept may be accepted, or the payment's report would be lost.
        with self._mpesa_keep_inbound(provider, kind, raw_body, remote_addr, initiator_api) as event:
            # The bytes in hand: the commit that kept them emptied the cache, they are not read again.
            event = event.with_context(mpesa_raw_body=(event.id, bytes(raw_body or b'')))
            try:
                status, answer = event._mpesa_handle_inbound(started=started, provider=provider)
            except Exception:  # The body is kept: never a 5xx.
                _logger.warning("M-Pesa %s %s could not be handled now; it is kept.", kind, event.id, exc_info=True)
                event.env.cr.rollback()  # Back to the kept body, committed: the settlement job takes it.
                event.env.invalidate_all()
                status, answer = event._mpesa_inbound_fallback(provider, kind)
                if kind in SETTLED_KINDS:
                    event._mpesa_wake_settlement()
                event._mpesa_record_answer(status, started)
            return status, answer

    @api.model
    def _mpesa_inbound_values(self, provider, kind, raw_body, remote_addr):
        raw_body = bytes(raw_body or b'')
        return {
            'kind': kind,
            'provider_id': provider.id,
            'remote_addr': remote_addr,
            'raw_body': base64.b64encode(raw_body),
            'request_body': utils.readable(raw_body),
            'state': 'received',
        }

    @api.model
    def _mpesa_keep(self, provider, kind, raw_body, remote_addr, initiator_api=False):
        """Keep the exact bytes Daraja posted, on this environment's cursor.

        :return: the event, 'received'
        """
        return self._mpesa_insert(self._mpesa_keep_values(provider, kind, raw_body, remote_addr, initiator_api))

    @api.model
    def _mpesa_keep_values(self, provider, kind, raw_body, remote_addr, initiator_api=False):
        values = self._mpesa_inbound_values(provider, kind, raw_body, remote_addr)
        values['initiator_api'] = initiator_api
        if kind == 'stk_callback':  # Its request admits it; the job only once the request is past.
            values['next_attempt_at'] = fields.Datetime.now() + ADMISSION_GRACE
        return values

    @api.model
    def _mpesa_insert(self, values):
        """The event of `values` (stored fields only), inserted by one INSERT ... RETURNING.

        Not the ORM's create: on the fresh cursor of a callback it also reads the user (the company
        of its defaults lookup) and asks the database for its clock, two statements more on every
        callback.  This model has nothing else for create to do: no default, constraint, stored
        computed field or create override.  The values are converted as the ORM converts them.

        :param dict values: completed here with the log access fields (the row, as inserted)
        """
        now = fields.Datetime.now()
        values.update(create_uid=self.env.uid, write_uid=self.env.uid, create_date=now, write_date=now)
        names = list(values)
        self.env.cr.execute(SQL(
            "INSERT INTO %s (%s) VALUES (%s) RETURNING id",
            SQL.identifier(self._table),
            SQL(", ").join(map(SQL.identifier, names)),
            SQL(", ").join(self._fields[name].convert_to_column_insert(values[name], self, values) for name in names),
        ))
        event = self.browse(self.env.cr.fetchone()[0])
        event._mpesa_cache_row(values)
        return event

    def _mpesa_cache_row(self, values):
        """Put this new event's row, inserted with `values`, in the cache as the ORM's create does:
        the commit that keeps it empties the cache, and the row is known without reading it."""
        self.ensure_one()
        record = self.with_context(bin_size=False)
        for name, field in self._fields.items():
            if name != 'id' and field.store and field.column_type and (name in values or not field.compute):
                self.env.cache.set(record, field, field.convert_to_cache(values.get(name), record))

    @api.model
    @contextlib.contextmanager
    def _mpesa_keep_inbound(self, provider, kind, raw_body, remote_addr, initiator_api=False):
        """Keep the exact bytes Daraja posted on one of `provider`'s routes on a cursor of its own,
        committed before anything reads them: whatever fails later, the body is in the log and can
        be handled again.

        Yields the event on that cursor's environment; what the caller does with it is committed
        when the block ends, and rolled back (the body staying kept) when it raises.
        """
        with self.env.registry.cursor() as cr:
            env = self.env(cr=cr, su=True)
            Event = env[self._name]
            values = Event._mpesa_keep_values(provider.with_env(env), kind, raw_body, remote_addr, initiator_api)
            event = Event._mpesa_insert(values)
            cr.commit()  # pylint: disable=invalid-commit
            # The row is what was just inserted and committed: it is not read back.
            event._mpesa_cache_row(values)
            # The admission's transaction takes its clock from Python, as the INSERT did: the ORM's
            # writes would otherwise ask the database for it (cr.now()), one statement more.
            cr._now = fields.Datetime.now()
            yield event

    def _mpesa_raw_body(self):
        """The exact bytes of a received body."""
        self.ensure_one()
        event_id, raw = self.env.context.get('mpesa_raw_body') or (None, None)
        if event_id == self.id:
            return raw
        raw = self.sudo().with_context(bin_size=False).raw_body
        return base64.b64decode(raw) if raw else (self.request_body or '').encode()

    def _mpesa_handle_inbound(self, own_transaction=True, started=None, provider=None):
        """Admit this kept body and wake the settlement job when it waits for it.

        :param bool own_transaction: whether the caller's database transaction holds nothing but
            this handling (the route's cursor of `_mpesa_keep_inbound`): a concurrency error is
            then retried at once on a fresh transaction; otherwise it is raised
        :param provider: the body's provider as the caller read it (see `_mpesa_admit`)
        :return: the HTTP status and the JSON body that answer Daraja
        :rtype: tuple[int, dict]
        """
        self.ensure_one()
        started = started or time.monotonic()
        for attempt in range(CONCURRENCY_ATTEMPTS):
            try:
                # The route's own transaction holds nothing but the kept body, committed: a failure
                # rolls back to it (see _mpesa_receive), and no savepoint is needed.
                with contextlib.nullcontext() if own_transaction else self.env.cr.savepoint():
                    status, answer = self._mpesa_admit(provider)
                    # Written with the admission's own UPDATE: one statement for the whole intake.
                    self.write({
                        'http_status': status,
                        'duration_ms': round((time.monotonic() - started) * 1000.0, 2),
                    })
                    self.env.flush_all()
                break
            except CONCURRENCY_ERRORS:
                if not own_transaction or attempt + 1 == CONCURRENCY_ATTEMPTS:
                    raise
                # The same receipt on another worker: its row is invisible to this snapshot.  The
                # body is committed already; a new database transaction sees the other's row.
                self.env.cr.rollback()
                self.env.invalidate_all()
                time.sleep(0.05 * (attempt + 1))
        if self.state in const.CALLBACK_WAITING_STATES and not self.next_attempt_at:
            self._mpesa_wake_settlement()
        return status, answer

    def _mpesa_admit(self, provider=None):
        """Source check, then the kind's handler (parse, record or match).  Run by the request, or
        by the job for a body whose request died after keeping it.  A refused body is marked
        rejected here, and only here.

        :param provider: the body's provider (its `provider_id`) as the request read it when its
            secret path named it: checked as read then, not read again on the body's cursor
        :return: the HTTP status and the JSON body that answer Daraja
        """
        self.ensure_one()
        inbound = INBOUND_KINDS[self.kind]
        if not (provider and provider.id == self.provider_id.id):
            provider = self.provider_id
        try:
            if not provider._mpesa_is_allowed_source(self.remote_addr):
                raise InboundRefusal(403, dict(inbound['refusal']),
                                     self.env._("The source address %s is not allowed.", self.remote_addr))
            return getattr(self, inbound['handler'])()
        except InboundRefusal as refusal:
            return self._mpesa_refuse(refusal)

    def _mpesa_refuse(self, refusal):
        """Mark this body rejected for `refusal`; its answer."""
        self._mark('rejected', refusal.reason)
        return refusal.status, refusal.answer

    @api.model
    def _mpesa_inbound_fallback(self, provider, kind):
        """The answer when handling failed after the body was kept (never a 5xx).

        A validation gets what Daraja would do on our timeout: the provider's ResponseType decides.
        Anything else is accepted: its body is kept, and the settlement job handles it.
        """
        if kind == 'c2b_validation':
            if provider.sudo().mpesa_c2b_response_type == 'Cancelled':
                return 200, daraja.c2b_validation_reject(daraja.C2B_OTHER_ERROR)
            return 200, daraja.c2b_validation_accept()
        if kind in ('c2b_confirmation', 'pull_callback'):
            return 200, dict(daraja.C2B_CONFIRMATION_ACK)
        return 200, dict(daraja.ACCEPTED_RESPONSE)

    # === BUSINESS METHODS - INBOUND: STK CALLBACKS === #

    def _mpesa_admit_stk_callback(self):
        self._mpesa_parse()
        if self._mpesa_match(lock=False):
            self._mark('queued', self.env._("Waiting for Daraja's confirmation."))
        else:
            self._mark('unmatched', self.env._("No transaction of this provider has this CheckoutRequestID yet."))
        self.next_attempt_at = False
        return 200, dict(daraja.ACCEPTED_RESPONSE)

    def _mpesa_parse(self):
        """The STK callback this event holds, its searchable fields filled.

        :raise InboundRefusal: when the body is not an stkCallback
        """
        self.ensure_one()
        try:
            callback = daraja.parse_stk_callback(self._mpesa_raw_body())
        except daraja.CallbackParseError as error:
            raise InboundRefusal(400, {'ResultCode': 1, 'ResultDesc': "Rejected: not an stkCallback"},
                                 str(error)) from error
        if self.checkout_request_id != callback.checkout_request_id:
            self.write({
                'checkout_request_id': callback.checkout_request_id,
                'merchant_request_id': callback.merchant_request_id,
                'receipt_number': callback.receipt_number or False,
                'phone': callback.phone_number or False,
                'amount': float(callback.amount) if callback.amount is not None else 0.0,
                'result_code': callback.result_code,
            })
        return callback

    def _mpesa_match(self, lock):
        """The transaction of this callback, among its provider's only; the event keeps it.

        :return: the transaction (sudo), row-locked when `lock`; empty when none has the
                 CheckoutRequestID yet
        """
        self.ensure_one()
        if self.transaction_id:  # Matched once (by the request, or by hand): for good.
            tx = self.transaction_id.sudo()
            if lock:
                tx._mpesa_lock()
            return tx
        Transaction = self.env['payment.transaction'].sudo()
        tx = Transaction._mpesa_find_by_checkout_request(self.provider_id, self.checkout_request_id, lock=lock)
        if not tx:  # Our own log may know the push whose answer its transaction lost.
            tx = Transaction._mpesa_find_by_logged_push(self.provider_id, self.checkout_request_id)
            if tx and lock:
                tx._mpesa_lock()
        if tx:
            self.transaction_id = tx
        return tx

    @api.model
    def _mpesa_wake_unmatched(self, provider, checkout_request_id):
        """A transaction of `provider` now holds `checkout_request_id`: the callbacks that came
        before it are due at once (docs/design.md, 12. Failure modes and what handles each)."""
        waiting = self.sudo().search([
            ('kind', '=', 'stk_callback'), ('provider_id', '=', provider.id),
            ('checkout_request_id', '=', checkout_request_id), ('state', '=', 'unmatched'),
        ])
        if waiting:
            waiting.next_attempt_at = False
            self._mpesa_wake_settlement()

    def _mpesa_settle_stk_callback(self, answers, session=None):
        """Confirm the callback by STK Query (one per prompt and run: `answers`, on the run's
        `session`) and settle its transaction under the transaction's row lock."""
        callback = self._mpesa_parse()
        tx = self._mpesa_match(lock=True)
        if not tx:
            self._mpesa_retry_later(
                'unmatched', self.env._("No transaction of this provider has this CheckoutRequestID yet."),
            )
            return 'wait'
        state, message = tx._mpesa_apply_callback(callback, answers, session=session)
        if state in const.CALLBACK_FINAL_STATES:
            self._mark(state, message)
            return 'done'
        self._mpesa_retry_later(state, message)
        return 'wait'

    def _mpesa_match_by_hand(self, tx, override_reason=None):
        """Give this kept callback the transaction whose push answer was never read, and settle it
        as any other: confirmed by STK Query, its receipt and CheckoutRequestID unique.  The
        receipt then waits, unverified, for M-Pesa's Transaction Status (the initiator job).

        :raise UserError: when the callback or the transaction cannot be matched, or the payment
                          is refused; nothing is changed then
        """
        self.ensure_one()
        tx._mpesa_check_match_by_hand(self, override_reason)
        callback = self._mpesa_parse()
        tx.provider_reference = self.checkout_request_id
        if override_reason and callback.amount is not None:
            tx._mpesa_accept_paid_amount(callback.amount)
        self.write({'transaction_id': tx.id, 'next_attempt_at': False})
        self._mark('queued', self.env._("Matched by hand with %s.", tx.reference))
        try:
            outcome = self._mpesa_settle_locked({})
        except daraja.DarajaError as error:
            raise UserError(self.env._(
                "M-Pesa cannot confirm this payment now (%s); try again in a few minutes.", error,
            )) from error
        if self.state == 'processed' and tx.state == 'done' and tx.mpesa_receipt_number:
            # STK Query confirmed the prompt, not this receipt: the match is a person's word until
            # M-Pesa's Transaction Status says the receipt is this payment's.
            tx._mpesa_request_receipt_proof()
        return outcome

    # === BUSINESS METHODS - INBOUND: C2B AND PULL === #

    def _mpesa_parse_c2b(self):
        """The C2B payment this event holds, its searchable fields filled.

        :raise InboundRefusal: when the body is not a C2B payment
        """
        self.ensure_one()
        try:
            payment = daraja.parse_c2b_payment(self._mpesa_raw_body())
        except daraja.CallbackParseError as error:
            raise InboundRefusal(400, dict(INBOUND_KINDS[self.kind]['refusal']), str(error)) from error
        self.write({
            'receipt_number': payment.trans_id or False,
            'phone': payment.phone or False,
            'amount': float(payment.amount),
        })
        return payment

    def _mpesa_handle_c2b_validation(self):
        """Accept or refuse a payment before M-Pesa takes it, by the provider's rule: one indexed
        lookup, no Daraja call."""
        payment = self._mpesa_parse_c2b()
        refusal = self.provider_id._mpesa_c2b_refusal(payment)
        if refusal:
            code, why = refusal
            raise InboundRefusal(200, daraja.c2b_validation_reject(code),
                                 self.env._("Refused (%(code)s): %(why)s", code=code, why=why))
        self._mark('processed', self.env._("Accepted."))
        return 200, daraja.c2b_validation_accept()

    def _mpesa_handle_c2b_confirmation(self):
        """Record the payment in the ledger (once per TransID) and match it.  Post-processing
        (payment, invoice, mails) is Odoo's job, woken here: Daraja never waits for it."""
        payment = self._mpesa_parse_c2b()
        if payment.amount <= 0 or not payment.trans_id:
            # Nothing M-Pesa took: kept in the log, never money in the ledger.
            raise InboundRefusal(400, dict(REJECTED), self.env._(
                "A confirmation of %s without a receipt, or of no money, is not a payment.", payment.amount))
        row, created = self.env['muchiri.mpesa.ledger'].sudo()._mpesa_record_c2b(self.provider_id, payment)
        self.ledger_id = row
        if created:
            self._mark('processed', row.note or dict(row._fields['state']._description_selection(self.env))[row.state])
        else:
            self._mark('ignored', self.env._("Receipt %(receipt)s is already in the ledger (%(sources)s).",
                                             receipt=row.name, sources=row.sources))
        if row.transaction_ids.filtered(lambda tx: tx.state == 'done' and not tx.is_post_processed):
            self._mpesa_wake_post_processing()
        return 200, dict(daraja.C2B_CONFIRMATION_ACK)

    def _mpesa_settle_c2b_confirmation(self, _answers, _session=None):
        """A confirmation whose request died (or failed) before it recorded it: handled as the
        request would have, source check included."""
        if self.state not in ('received', 'error'):
            return 'done'
        self._mpesa_handle_inbound(own_transaction=False)
        return 'done'

    def _mpesa_handle_pull_callback(self):
        """Kept for the record: the hourly Pull query reads Safaricom's transactions itself."""
        self._mark('ignored', self.env._("Kept; the hourly Pull query reads the transactions."))
        return 200, dict(daraja.C2B_CONFIRMATION_ACK)

    # === BUSINESS METHODS - INBOUND: REVERSAL AND TRANSACTION STATUS RESULTS === #

    def _mpesa_admit_initiator_result(self):
        """Parse and match a Reversal or Transaction Status result (or queue timeout); a result
        whose request is not known yet (its acknowledgement is not recorded yet, or it is forged)
        waits, unmatched, and changes nothing."""
        self._mpesa_parse_initiator()
        if not (self._mpesa_match_initiator(lock=False) or self._mpesa_match_ledger_status(lock=False)):
            self._mpesa_retry_later('unmatched', self.env._(
                "No request of this provider has both conversation IDs of this result yet."))
            return 200, dict(daraja.ACCEPTED_RESPONSE)
        self._mark('queued', self.env._("Waiting for settlement."))
        self.next_attempt_at = False
        return 200, dict(daraja.ACCEPTED_RESPONSE)

    def _mpesa_parse_initiator(self):
        """The result this event holds, its searchable fields filled.

        :raise InboundRefusal: when the body is not a Daraja result
        """
        self.ensure_one()
        try:
            result = daraja.parse_initiator_result(
                self._mpesa_raw_body(), timeout=self.kind == 'initiator_timeout')
        except daraja.CallbackParseError as error:
            raise InboundRefusal(400, {'ResultCode': 1, 'ResultDesc': "Rejected: not a Daraja result"},
                                 str(error)) from error
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
            ('state', '=', 'unmatched'),
            '|', ('conversation_id', 'in', conversation_ids), ('originator_conversation_id', 'in', conversation_ids),
        ])
        waiting.next_attempt_at = False

    def _mpesa_settle_initiator_result(self, _answers, _session=None):
        """Settle the result under its transaction's (or ledger row's) lock."""
        result = self._mpesa_parse_initiator()
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

    # === BUSINESS METHODS - B2B EXPRESS CHECKOUT === #

    def _mpesa_admit_b2b_result(self):
        """Parse and match the result of a till prompt (B2B Express Checkout) by its requestId,
        our RequestRefID; one whose request is unknown waits, unmatched, and changes nothing."""
        self._mpesa_parse_b2b()
        if not self._mpesa_match_b2b(lock=False):
            self._mpesa_retry_later('unmatched', self.env._("No till prompt of this provider has this requestId."))
            return 200, dict(daraja.ACCEPTED_RESPONSE)
        self._mark('queued', self.env._("Waiting for settlement."))
        self.next_attempt_at = False
        return 200, dict(daraja.ACCEPTED_RESPONSE)

    def _mpesa_parse_b2b(self):
        """The B2B checkout result this event holds, its searchable fields filled.

        :raise InboundRefusal: when the body is not one
        """
        self.ensure_one()
        try:
            result = daraja.parse_b2b_checkout_result(self._mpesa_raw_body())
        except daraja.CallbackParseError as error:
            raise InboundRefusal(400, {'ResultCode': 1, 'ResultDesc': "Rejected: not a B2B checkout result"},
                                 str(error)) from error
        if self.checkout_request_id != result.request_id:
            self.write({
                'checkout_request_id': result.request_id,
                'receipt_number': result.transaction_id or False,
                'amount': float(result.amount),
                'result_code': result.result_code,
            })
        return result

    def _mpesa_match_b2b(self, lock):
        """The till prompt of this result, among its provider's only; the event keeps it."""
        self.ensure_one()
        tx = self.transaction_id.sudo()
        if not tx and self.checkout_request_id:
            tx = self.env['payment.transaction'].sudo().search([
                ('provider_id', '=', self.provider_id.id), ('provider_code', '=', 'mpesa'),
                ('provider_reference', '=', self.checkout_request_id), ('mpesa_push_sent_at', '!=', False),
                ('mpesa_b2b_till', '!=', False),
            ], limit=1)
            if tx:
                self.transaction_id = tx
        if tx and lock:
            tx._mpesa_lock()
        return tx

    def _mpesa_settle_b2b_result(self, _answers, _session=None):
        """Apply the result under its transaction's lock: a success only asks Transaction Status."""
        result = self._mpesa_parse_b2b()
        tx = self._mpesa_match_b2b(lock=True)
        if not tx:
            self._mpesa_retry_later('unmatched', self.env._("No till prompt of this provider has this requestId."))
            return 'wait'
        state, message = tx._mpesa_apply_b2b_result(result)
        self._mark(state, message)
        return 'done'

    # === BUSINESS METHODS - STATES === #

    def _mark(self, state, message=''):
        """Move the body to `state`."""
        self.ensure_one()
        values = {'state': state, 'message': message or False}
        if state in const.CALLBACK_FINAL_STATES:
            values['next_attempt_at'] = False
        self.write(values)

    def _mpesa_retry_later(self, state, message, seconds=None):
        """Keep the body for another attempt, backing off on its own: one body that cannot be
        settled never holds up the others."""
        self.ensure_one()
        self.attempt_count += 1
        if seconds is None:
            seconds = min(const.SETTLE_RETRY_FIRST * 2 ** (self.attempt_count - 1), const.SETTLE_RETRY_MAX)
        self._mark(state, message)
        self.next_attempt_at = fields.Datetime.now() + timedelta(seconds=seconds)

    def _mpesa_record_answer(self, status, started):
        """Write on the body's event the HTTP status we answer and the intake's duration since
        `started` (a time.monotonic() reading).  Never fails the answer: the body is kept."""
        self.ensure_one()
        try:
            with self.env.cr.savepoint():  # Flushed inside: a failed write is rolled back here.
                self.write({
                    'http_status': status,
                    'duration_ms': round((time.monotonic() - started) * 1000.0, 2),
                })
        except Exception:
            _logger.warning("M-Pesa %s %s: its answer could not be recorded.", self.kind, self.id, exc_info=True)

    # === BUSINESS METHODS - THE SETTLEMENT JOB === #

    @api.model
    def _mpesa_due_domain(self, kinds=SETTLED_KINDS):
        """The kept bodies of `kinds` the settlement job takes now.  A confirmation is left to its
        request ADMISSION_GRACE from its keeping; a callback by its next attempt (set when kept)."""
        now = fields.Datetime.now()
        return [
            ('kind', 'in', list(kinds)),
            ('state', 'in', const.CALLBACK_WAITING_STATES),
            ('create_date', '>=', now - timedelta(days=const.KEEP_WORKING_DAYS)),
            '|', ('next_attempt_at', '=', False), ('next_attempt_at', '<=', now),
            '|', ('kind', '!=', 'c2b_confirmation'), ('create_date', '<=', now - ADMISSION_GRACE),
        ]

    @api.model
    def _mpesa_due_callbacks_domain(self):
        """The kept STK callbacks the settlement job takes now."""
        return self._mpesa_due_domain(kinds=('stk_callback',))

    @api.model
    def _cron_mpesa_settle_callbacks(self, batch_size=const.RECONCILE_BATCH_SIZE, kinds=SETTLED_KINDS):
        """Settle every kept body that is due (STK callbacks, C2B confirmations, Reversal and
        Transaction Status results), each committed on its own.

        Daraja's answer to one STK Query serves every callback of the same prompt in the run.
        Throttling, or a Daraja that cannot be reached, ends the run; any other failure backs off
        that body only.  Settled transactions are post-processed by Odoo's own job, woken here:
        row locks are not held through invoicing and mails, and a burst of payments turns done
        without waiting for the invoices.
        """
        answers = {}  # (provider id, CheckoutRequestID) -> the STK Query's answer in this run
        exchanges = []  # The STK Queries of the body in hand, for its commit (see _record_exchange)
        # One connection to Daraja for the whole run, not a new one for each query.
        session = requests.Session()
        settled = 0
        stopped = False
        deadline = time.monotonic() + const.SETTLE_RUN_SECONDS
        tried = set()
        # Until nothing is due: a body kept while the run works is taken by this run, since its
        # wake-up may find the run's own trigger still due (see _mpesa_wake_settlement).
        try:
            while not stopped and time.monotonic() < deadline:
                domain = self._mpesa_due_domain(kinds)
                if tried:
                    domain.append(('id', 'not in', list(tried)))
                events = self.sudo().search(domain, order='id', limit=batch_size)
                if not events:
                    break
                tried.update(events.ids)
                for event in events:
                    # On its own: each commit empties the cache, and the batch's other bodies
                    # (their raw bytes too) would be read again with each one.
                    event = event.with_prefetch().with_context(mpesa_exchange_log=exchanges)
                    outcome = event._mpesa_settle(answers, session)
                    self._mpesa_keep_exchanges(exchanges)  # Its STK Query, committed with it.
                    utils.commit(self.env)
                    settled += outcome == 'done'
                    # Past the run's time, the rest waits for the next run: never Odoo's cron time limit.
                    if outcome == 'stop' or time.monotonic() >= deadline:
                        stopped = outcome == 'stop'
                        break
        finally:
            session.close()
        if settled:
            # Confirming, invoicing and mailing (a PDF each) are Odoo's post-processing job's, run
            # next: a burst of payments turns done at once, and the invoices follow.
            self._mpesa_wake_post_processing()
        if kinds == SETTLED_KINDS:
            remaining = 0 if stopped else self.sudo().search_count(self._mpesa_due_domain(kinds), limit=batch_size)
            self.env['ir.cron']._notify_progress(done=settled, remaining=remaining)
        return settled

    @api.model
    def _mpesa_settle_initiator_results(self, batch_size=const.RECONCILE_BATCH_SIZE):
        """The settlement job, for the Reversal and Transaction Status results only (the
        initiator job settles them before it sends its queries)."""
        return self._cron_mpesa_settle_callbacks(batch_size, kinds=INITIATOR_KINDS)

    def _mpesa_settle(self, answers, session=None):
        """Take one kept body as far as it can go now (its STK Query on the run's `session`).

        :return: 'done' (a final state), 'wait' (kept for later) or 'stop' (Daraja throttles us or
                 cannot be reached: end the run)
        """
        self.ensure_one()
        try:
            with self.env.cr.savepoint():
                return self._mpesa_settle_locked(answers, session)
        except CONCURRENCY_ERRORS:
            return 'wait'  # A concurrent worker has it: the next run sees the result.
        except (daraja.DarajaConnectionError, daraja.DarajaProtocolError) as error:
            self._mpesa_retry_later('error', str(error), const.RECONCILE_THROTTLE_DELAY)
            return 'stop'
        except daraja.DarajaApiError as error:
            self._mpesa_retry_later('error', str(error))
            if error.error_code in const.THROTTLE_ERROR_CODES:
                return 'stop'
            return 'wait'
        except Exception as error:  # Never the same failure on every run: it backs off.
            _logger.warning("Kept M-Pesa %s %s could not be settled now.", self.kind, self.id, exc_info=True)
            self._mpesa_retry_later('error', str(error))
            return 'wait'

    def _mpesa_settle_locked(self, answers, session=None):
        self.ensure_one()
        # Locked as `utils.lock_rows(self, 'skip')` locks it; its bytes read by the same statement.
        self.env.cr.execute(SQL(
            "SELECT raw_body FROM %s WHERE id = %s FOR NO KEY UPDATE SKIP LOCKED", SQL.identifier(self._table), self.id,
        ), log_exceptions=False)
        locked = self.env.cr.fetchone()
        if not locked:
            return 'wait'  # Another run has it.
        self.invalidate_recordset()
        event = self.with_context(mpesa_raw_body=(self.id, base64.b64decode(locked[0]))) if locked[0] else self
        if event.state not in const.CALLBACK_WAITING_STATES:
            return 'done'
        inbound = INBOUND_KINDS[event.kind]
        if event.kind != 'c2b_confirmation' and event.state == 'received' and event._mpesa_admit()[0] != 200:
            return 'done'  # Its request died before admitting it; refused now, as it would have been.
        try:
            return getattr(event, inbound['settle'])(answers, session)
        except InboundRefusal as refusal:
            event._mpesa_refuse(refusal)
            return 'done'

    # === BUSINESS METHODS - WAKING THE JOBS === #

    def _mpesa_wake_settlement(self):
        """Wake the settlement job, unless a wake-up is already due: Odoo's cron runner then runs
        it anyway (and it settles until nothing is due), and each ir.cron._trigger() costs a new
        database connection for its NOTIFY (Odoo keeps none to 'postgres' in its pool)."""
        self._mpesa_wake('muchiri_mpesa.cron_mpesa_settle_callbacks')

    def _mpesa_wake_post_processing(self):
        """Wake Odoo's post-processing job, unless a wake-up is due already."""
        self._mpesa_wake('payment.cron_post_process_payment_tx')

    def _mpesa_wake(self, xmlid):
        cron_id = self.env['ir.model.data']._xmlid_to_res_id(xmlid, raise_if_not_found=False)  # Cached.
        if cron_id and not self.env['ir.cron.trigger'].sudo().search_count(
            [('cron_id', '=', cron_id), ('call_at', '<=', fields.Datetime.now())], limit=1,
        ):
            self.env['ir.cron'].sudo().browse(cron_id)._trigger()
