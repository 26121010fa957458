# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
import base64
import json
import logging
import time
from contextlib import contextmanager
from datetime import timedelta

from psycopg2.errors import DeadlockDetected, LockNotAvailable, SerializationFailure

from odoo import api, fields, models
from odoo.exceptions import UserError

from .. import const, daraja

_logger = logging.getLogger(__name__)

# Kept callbacks are retried this long: past it, an accountant looks at them in the log.
KEEP_RETRYING = timedelta(days=7)
# A kept callback is left to its request this long before the settlement job takes it over (the
# request died after keeping it): the job never races the request that is still admitting it.
ADMISSION_GRACE = timedelta(minutes=2)
# What another worker holding the same rows looks like: try again, nothing is wrong.
CONCURRENCY_ERRORS = (SerializationFailure, LockNotAvailable, DeadlockDetected)


def _as_text(body):
    if body is None:
        return False
    if isinstance(body, (dict, list)):
        return json.dumps(body, indent=2, sort_keys=True, default=str)
    return str(body)


def _readable(raw_body):
    """The raw bytes of a callback as text a person (and PostgreSQL) can read: what is not UTF-8,
    and NUL, shown as U+FFFD.  The exact bytes are kept in `raw_body`."""
    return raw_body.decode('utf-8', errors='replace').replace('\x00', '\ufffd')


def _indent_json(text):
    """`text` indented for reading if it is JSON, else as it is.  Only the whitespace between
    tokens changes: keys keep their order, and duplicate keys and numbers stay as they came."""
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return text
    out, depth, in_string, escaped = [], 0, False, False
    for char in text:
        if in_string:
            out.append(char)
            if escaped:
                escaped = False
            elif char == '\\':
                escaped = True
            elif char == '"':
                in_string = False
        elif char in ' \t\r\n':
            continue
        elif char in '{[':
            depth += 1
            out.extend((char, '\n' + '  ' * depth))
        elif char in '}]':
            depth -= 1
            if out[-2] in '{[' and out[-1].startswith('\n'):  # Empty: {} and [] stay folded.
                out[-1] = char
            else:
                out.append('\n' + '  ' * depth + char)
        elif char == ',':
            out.append(',\n' + '  ' * depth)
        elif char == ':':
            out.append(': ')
        else:
            in_string = char == '"'
            out.append(char)
    return ''.join(out)


class MpesaEvent(models.Model):
    """One exchange with Daraja: every request we send and every callback we receive.

    It is the audit log and the callback inbox.  A callback is kept, exactly as it came, on its own
    committed cursor before anything else; the request then matches it with a transaction of the
    provider whose secret path it came on and queues it.  The settlement job confirms it by STK
    Query and settles the transaction (docs/design.md, 2. Prompts and callbacks).  This model owns the callback's
    states: the route, the job and the matching wizard move them through its methods only.
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
    checkout_request_id = fields.Char(string="CheckoutRequestID", readonly=True, index=True)
    merchant_request_id = fields.Char(string="MerchantRequestID", readonly=True)
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
        attachment=False, readonly=True, help="The callback's bytes exactly as received.",
    )
    response_body = fields.Text(readonly=True)
    duration_ms = fields.Float(string="Duration (ms)", readonly=True)
    error = fields.Text(readonly=True)
    callback_state = fields.Selection(
        selection=const.CALLBACK_STATES, readonly=True, index='btree_not_null',
    )
    message = fields.Char(readonly=True, help="What was done with the callback, and why.")
    attempt_count = fields.Integer(string="Settlement Attempts", readonly=True)
    next_attempt_at = fields.Datetime(
        string="Next Attempt", readonly=True, index='btree_not_null',
        help="When the settlement job takes this callback again.",
    )

    # === COMPUTE METHODS === #

    @api.depends('request_body')
    def _compute_request_body_pretty(self):
        for event in self:
            event.request_body_pretty = _indent_json(event.request_body) if event.request_body else False

    # === OUTBOUND === #

    @api.model
    def _record_exchange(self, provider, exchange, transaction=None):
        """Keep one outbound HTTP exchange reported by the Daraja client (already redacted).

        On its own committed cursor: the answer of a push that is on a phone (its CheckoutRequestID)
        survives whatever later happens to the request that sent it.
        """
        request_body = exchange.request_body or {}
        response_body = exchange.response_body if isinstance(exchange.response_body, dict) else {}
        # The CallBackURL carries the provider's callback secret: readers of the log must not forge.
        secret = provider.sudo().mpesa_callback_secret
        request_text = _as_text(exchange.request_body)
        if secret and request_text:
            request_text = request_text.replace(secret, '***')
        values = {
            'kind': exchange.operation,
            'provider_id': provider.id,
            'transaction_id': transaction.id if transaction else False,
            'checkout_request_id': response_body.get('CheckoutRequestID')
            or request_body.get('CheckoutRequestID'),
            'merchant_request_id': response_body.get('MerchantRequestID'),
            'phone': request_body.get('PhoneNumber'),
            'result_code': response_body.get('ResultCode') or response_body.get('errorCode')
            or response_body.get('ResponseCode'),
            'http_status': exchange.status or 0,
            'url': exchange.url,
            'request_body': request_text,
            'response_body': _as_text(exchange.response_body),
            'duration_ms': exchange.duration_ms,
            'error': exchange.error or False,
        }
        with self.env.registry.cursor() as cr:
            return self.with_env(self.env(cr=cr, su=True)).create(values).id

    # === INBOUND: THE CALLBACK REQUEST === #

    @api.model
    def _mpesa_receive_callback(self, provider, raw_body, remote_addr):
        """Keep, check, parse and queue a callback posted on `provider`'s secret path.

        Runs on its own cursor, committed once the body is kept and again once it is queued: no
        rollback or replay of the request, and no input, can lose it.  No Daraja call is made here.
        The event records the HTTP status we answer and how long the intake took.

        :return: the HTTP status and the JSON body to answer Daraja with
        :rtype: tuple[int, dict]
        """
        started = time.monotonic()
        with self.env.registry.cursor() as cr:
            env = self.env(cr=cr, su=True)
            event = env[self._name]._mpesa_keep_callback(provider.with_env(env), raw_body, remote_addr)
            # Our own cursor: the body is kept, whatever follows.
            cr.commit()  # pylint: disable=invalid-commit
            try:
                with cr.savepoint():
                    status, answer = event._mpesa_intake()
            except Exception:  # The body is kept: the settlement job takes it from 'received'.
                _logger.warning("M-Pesa callback %s is kept for the settlement job.", event.id, exc_info=True)
                event._mpesa_wake_settlement()
                status, answer = 200, dict(daraja.ACCEPTED_RESPONSE)
            event._mpesa_record_answer(status, started)
            return status, answer

    def _mpesa_record_answer(self, status, started):
        """Write on the callback's event the HTTP status we answer and the intake's duration since
        `started` (a time.monotonic() reading).  Never fails the answer: the body is kept."""
        self.ensure_one()
        try:
            with self.env.cr.savepoint():  # Flushed inside: a failed write is rolled back here.
                self.write({
                    'http_status': status,
                    'duration_ms': round((time.monotonic() - started) * 1000.0, 2),
                })
        except Exception:
            _logger.warning("M-Pesa callback %s: its answer could not be recorded.", self.id, exc_info=True)

    @api.model
    def _mpesa_keep_callback(self, provider, raw_body, remote_addr):
        event = self._mpesa_inbound_values(provider, 'callback', raw_body, remote_addr)
        event['next_attempt_at'] = fields.Datetime.now() + ADMISSION_GRACE
        return self.create(event)

    @api.model
    def _mpesa_inbound_values(self, provider, kind, raw_body, remote_addr):
        raw_body = bytes(raw_body or b'')
        return {
            'kind': kind,
            'provider_id': provider.id,
            'remote_addr': remote_addr,
            'raw_body': base64.b64encode(raw_body),
            'request_body': _readable(raw_body),
            'callback_state': 'received',
        }

    @api.model
    @contextmanager
    def _mpesa_keep_inbound(self, provider, kind, raw_body, remote_addr):
        """Keep the exact bytes Daraja posted on one of `provider`'s routes (C2B, Pull, initiator
        results) on a cursor of its own, committed before anything reads them: whatever fails
        later, the body is in the log and can be handled again.

        Yields the event on that cursor's environment; what the caller does with it is committed
        when the block ends, and rolled back (the body staying kept) when it raises.
        """
        with self.env.registry.cursor() as cr:
            env = self.env(cr=cr, su=True)
            event = env[self._name].create(
                env[self._name]._mpesa_inbound_values(provider.with_env(env), kind, raw_body, remote_addr))
            cr.commit()  # pylint: disable=invalid-commit
            yield event

    def _mpesa_raw_body(self):
        """The exact bytes of a received callback."""
        self.ensure_one()
        raw = self.sudo().with_context(bin_size=False).raw_body
        return base64.b64decode(raw) if raw else (self.request_body or '').encode()

    def _mpesa_intake(self):
        """The request's part: admit the callback and wake the settlement job."""
        self.ensure_one()
        status, answer = self._mpesa_admit()
        if status == 200:
            self._mpesa_wake_settlement()
        return status, answer

    def _mpesa_admit(self):
        """Source check, parse, match within the provider: the callback is then due for settlement.
        Run by the request, or by the job for a callback whose request died after keeping it.

        :return: the HTTP status and the JSON body that answer Daraja
        """
        self.ensure_one()
        provider = self.provider_id
        if not provider._mpesa_is_allowed_source(self.remote_addr):
            self._mark('rejected', self.env._("The source address %s is not allowed.", self.remote_addr))
            return 403, {'ResultCode': 1, 'ResultDesc': "Rejected"}
        if not self._mpesa_parse():
            return 400, {'ResultCode': 1, 'ResultDesc': "Rejected: not an stkCallback"}
        if self._mpesa_match(lock=False):
            self._mark('queued', self.env._("Waiting for Daraja's confirmation."))
        else:
            self._mark('unmatched', self.env._("No transaction of this provider has this CheckoutRequestID yet."))
        self.next_attempt_at = False
        return 200, dict(daraja.ACCEPTED_RESPONSE)

    def _mpesa_parse(self):
        """The callback this event holds, its searchable fields filled; None (and the event
        rejected) when the body is not an stkCallback."""
        self.ensure_one()
        try:
            callback = daraja.parse_stk_callback(self._mpesa_raw_body())
        except daraja.CallbackParseError as error:
            self._mark('rejected', str(error))
            return None
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
        before it (failure mode 3) are due at once."""
        waiting = self.sudo().search([
            ('kind', '=', 'callback'), ('provider_id', '=', provider.id),
            ('checkout_request_id', '=', checkout_request_id), ('callback_state', '=', 'unmatched'),
        ])
        if waiting:
            waiting.next_attempt_at = False
            self._mpesa_wake_settlement()

    def _mpesa_wake_settlement(self):
        """Wake the settlement job, unless a wake-up is already due: Odoo's cron runner then runs
        it anyway (and it settles until nothing is due), and each ir.cron._trigger() costs a new
        database connection for its NOTIFY (Odoo keeps none to 'postgres' in its pool)."""
        cron = self.env.ref('muchiri_mpesa.cron_mpesa_settle_callbacks', raise_if_not_found=False)
        if not cron:
            return
        due = self.env['ir.cron.trigger'].sudo().search_count(
            [('cron_id', '=', cron.id), ('call_at', '<=', fields.Datetime.now())], limit=1,
        )
        if not due:
            cron.sudo()._trigger()

    # === STATES === #

    def _mark(self, state, message=''):
        """Move the callback to `state`."""
        self.ensure_one()
        values = {'callback_state': state, 'message': message or False}
        if state in const.CALLBACK_FINAL_STATES:
            values['next_attempt_at'] = False
        self.write(values)

    def _mpesa_retry_later(self, state, message, seconds=None):
        """Keep the callback for another attempt, backing off on its own: one callback that
        cannot be settled never holds up the others."""
        self.ensure_one()
        self.attempt_count += 1
        if seconds is None:
            seconds = min(const.SETTLE_RETRY_FIRST * 2 ** (self.attempt_count - 1), const.SETTLE_RETRY_MAX)
        self._mark(state, message)
        self.next_attempt_at = fields.Datetime.now() + timedelta(seconds=seconds)

    # === THE SETTLEMENT JOB === #

    @api.model
    def _mpesa_due_callbacks_domain(self):
        now = fields.Datetime.now()
        return [
            ('kind', '=', 'callback'),
            ('callback_state', 'in', const.CALLBACK_WAITING_STATES),
            ('create_date', '>=', now - KEEP_RETRYING),
            '|', ('next_attempt_at', '=', False), ('next_attempt_at', '<=', now),
        ]

    @api.model
    def _cron_mpesa_settle_callbacks(self, batch_size=const.RECONCILE_BATCH_SIZE):
        """Settle the kept callbacks, each committed on its own.

        Daraja's answer to one STK Query serves every callback of the same prompt in the run.
        Throttling, or a Daraja that cannot be reached, ends the run; any other failure backs off
        that callback only.  Settled transactions are post-processed by Odoo's own job, woken
        here: row locks are not held through invoicing and mails, and a burst of payments turns
        done without waiting for the invoices.
        """
        answers = {}  # (provider id, CheckoutRequestID) -> the STK Query's answer in this run
        settled = 0
        stopped = False
        Transaction = self.env['payment.transaction']
        deadline = time.monotonic() + const.SETTLE_RUN_SECONDS
        tried = self.browse()
        # Until nothing is due: a callback kept while the run works is taken by this run, since its
        # wake-up may find the run's own trigger still due (see _mpesa_wake_settlement).
        while not stopped and time.monotonic() < deadline:
            events = self.sudo().search(
                [*self._mpesa_due_callbacks_domain(), ('id', 'not in', tried.ids)], order='id', limit=batch_size,
            )
            if not events:
                break
            tried |= events
            for event in events:
                outcome = event._mpesa_settle(answers)
                Transaction._mpesa_commit()
                settled += outcome == 'done'
                if outcome == 'stop':
                    stopped = True
                    break
        if settled:
            # Confirming, invoicing and mailing (a PDF each) are Odoo's post-processing job's, run
            # next: a burst of payments turns done at once, and the invoices follow.
            post_process = self.env.ref('payment.cron_post_process_payment_tx', raise_if_not_found=False)
            if post_process:
                post_process.sudo()._trigger()
        remaining = 0 if stopped else self.sudo().search_count(self._mpesa_due_callbacks_domain())
        self.env['ir.cron']._notify_progress(done=settled, remaining=min(remaining, batch_size))
        return settled

    def _mpesa_settle(self, answers):
        """Take one kept callback as far as it can go now.

        :return: 'done' (a final state), 'wait' (kept for later) or 'stop' (Daraja throttles us or
                 cannot be reached: end the run)
        """
        self.ensure_one()
        try:
            with self.env.cr.savepoint():
                return self._mpesa_settle_locked(answers)
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
            _logger.warning("Kept M-Pesa callback %s could not be settled now.", self.id, exc_info=True)
            self._mpesa_retry_later('error', str(error))
            return 'wait'

    def _mpesa_settle_locked(self, answers):
        self.env.cr.execute(
            "SELECT id FROM muchiri_mpesa_event WHERE id = %s FOR NO KEY UPDATE SKIP LOCKED", [self.id],
            log_exceptions=False,
        )
        if not self.env.cr.fetchone():
            return 'wait'  # Another run has it.
        self.invalidate_recordset()
        if self.callback_state not in const.CALLBACK_WAITING_STATES:
            return 'done'
        if self.callback_state == 'received' and self._mpesa_admit()[0] != 200:
            return 'done'  # Its request died before admitting it; refused now, as it would have been.
        callback = self._mpesa_parse()
        if not callback:
            return 'done'
        tx = self._mpesa_match(lock=True)
        if not tx:
            self._mpesa_retry_later(
                'unmatched', self.env._("No transaction of this provider has this CheckoutRequestID yet."),
            )
            return 'wait'
        state, message = tx._mpesa_apply_callback(callback, answers)
        if state in const.CALLBACK_FINAL_STATES:
            self._mark(state, message)
            return 'done'
        self._mpesa_retry_later(state, message)
        return 'wait'

    # === MATCHING BY HAND === #

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
        if self.callback_state == 'processed' and tx.state == 'done' and tx.mpesa_receipt_number:
            # STK Query confirmed the prompt, not this receipt: the match is a person's word until
            # M-Pesa's Transaction Status says the receipt is this payment's.
            tx._mpesa_request_receipt_proof()
        return outcome
