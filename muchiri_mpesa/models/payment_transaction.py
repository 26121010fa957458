# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
import logging
from datetime import timedelta, timezone
from decimal import Decimal

import requests
from psycopg2 import OperationalError
from psycopg2.errors import LockNotAvailable

from odoo import api, fields, models, modules
from odoo.exceptions import ValidationError

from odoo.addons.payment import utils as payment_utils

from .. import const, daraja

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
    mpesa_receipt_number = fields.Char(
        string="M-Pesa Receipt", readonly=True, copy=False, index='btree_not_null',
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
    mpesa_outcome_unknown = fields.Boolean(
        string="Prompt Outcome Unknown", readonly=True, copy=False,
        help="Daraja gave no answer we could read to the STK Push: the prompt may be on the phone,"
             " and only its callback can tell.",
    )
    mpesa_event_ids = fields.One2many(
        'muchiri.mpesa.event', 'transaction_id', string="M-Pesa Exchanges", readonly=True,
    )

    _sql_constraints = [(
        'mpesa_receipt_number_unique', 'UNIQUE(mpesa_receipt_number)',
        "This M-Pesa receipt number is already recorded on another transaction.",
    )]

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
        message to show.  The attempt is committed before the request leaves and its answer right
        after: a retried or repeated request never sends a second prompt, and a failure later in the
        request never loses the CheckoutRequestID of a prompt that is on the phone.

        :return: None when the prompt was sent, else the message explaining why not.
        :rtype: str | None
        """
        self.ensure_one()
        self._mpesa_lock_for_push()
        if self.provider_code == 'mpesa' and self.state == 'pending' and self.provider_reference:
            return None  # A replay of a request whose prompt is already on the phone.
        if self.provider_code != 'mpesa' or self.state != 'draft' or self.mpesa_push_sent_at:
            raise ValidationError(self.env._("This payment can no longer be sent to M-Pesa."))
        if self.currency_id.name not in const.SUPPORTED_CURRENCIES:
            raise ValidationError(self.env._("M-Pesa takes payments in Kenyan shillings (KES) only."))
        provider = self.provider_id
        if provider.mpesa_distributors_only and not self.partner_id._mpesa_is_distributor():
            raise ValidationError(self.env._("M-Pesa is offered to distributors only."))
        try:
            msisdn = daraja.normalize_msisdn(phone or '')
            # Rounded to the currency first: float noise must not round up a whole shilling.
            amount = daraja.check_amount(
                Decimal(str(self.currency_id.round(self.amount))), provider._mpesa_max_amount(),
            )
        except daraja.DarajaValidationError as error:
            raise ValidationError(str(error)) from error
        self._mpesa_check_no_prompt_waiting()

        values = {
            'mpesa_phone': msisdn,
            'mpesa_requested_amount': amount,
            'mpesa_push_sent_at': fields.Datetime.now(),
        }
        if self.currency_id.compare_amounts(amount, self.amount):
            # M-Pesa takes whole shillings, rounded up: record what the phone is really asked.
            values['amount'] = amount
        self.write(values)
        self.sale_order_ids.write({'mpesa_phone': msisdn})
        self.env.cr.execute(  # See _mpesa_check_no_prompt_waiting: the orders must change.
            "UPDATE sale_order SET write_date = now() at time zone 'UTC' WHERE id = ANY(%s)",
            [self.sale_order_ids.ids],
        )
        self._mpesa_commit()

        client = provider._mpesa_client(transaction=self)
        try:
            result = client.stk_push(
                phone=msisdn, amount=amount, reference=self.reference,
                description=self.company_id.name or 'Payment',
                callback_url=provider._mpesa_callback_url(),
            )
        except daraja.DarajaError as error:
            self._mpesa_commit()  # The audit of the attempt; the writes below start afresh.
            message = self._mpesa_push_error_message(error)
            self.mpesa_outcome_unknown = self._mpesa_push_may_have_reached(error)
            self._set_error(message)
            self._mpesa_commit()
            return message

        # A fresh snapshot for the answer's writes: the request's one began before the HTTP call,
        # and a serialization failure now would replay the request and lose the CheckoutRequestID.
        self._mpesa_commit()
        self.write({
            'provider_reference': result.checkout_request_id,
            'mpesa_merchant_request_id': result.merchant_request_id,
            'mpesa_next_check_at': fields.Datetime.now()
            + timedelta(seconds=const.RECONCILE_FIRST_CHECK),
        })
        self._set_pending()
        self._mpesa_commit()
        self._mpesa_trigger_reconciliation(self.mpesa_next_check_at)
        return None

    def _mpesa_lock_for_push(self):
        """Lock the transaction: a second click or a replayed request waits for nothing, it fails."""
        try:
            with self.env.cr.savepoint(flush=False):
                self.env.cr.execute(
                    "SELECT id FROM payment_transaction WHERE id = %s FOR UPDATE NOWAIT", [self.id],
                    log_exceptions=False,  # A second click is expected: no ERROR line.
                )
        except LockNotAvailable as error:
            raise ValidationError(self.env._("This payment is already being sent to M-Pesa.")) from error
        self.invalidate_recordset()

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
        return self.env._("M-Pesa refused the payment request: %s", error)

    def _mpesa_check_no_prompt_waiting(self):
        """One prompt per order at a time, and none for a paid order.

        A prompt younger than the provider's cooldown refuses the new one.  An older one that is
        still pending is asked about first (STK Query): the new prompt goes only once Daraja says
        the old one is over, and not at all if the customer paid it.

        The orders' rows are locked, and the push then updates them before it commits: a concurrent
        push for the same order fails its lock with a serialization error, and Odoo replays it on a
        fresh snapshot that sees this prompt.
        """
        orders = self.sale_order_ids
        if not orders:
            return
        self.env.cr.execute(
            "SELECT id FROM sale_order WHERE id IN %s FOR UPDATE", [tuple(orders.ids)], log_exceptions=False
        )
        others = self.search([
            ('id', '!=', self.id),
            ('provider_code', '=', 'mpesa'),
            ('sale_order_ids', 'in', orders.ids),
            ('mpesa_push_sent_at', '!=', False),
            '|', ('state', 'in', ('draft', 'pending')), ('mpesa_outcome_unknown', '=', True),
        ])
        young_since = fields.Datetime.now() - timedelta(
            seconds=self.provider_id.sudo().mpesa_push_cooldown or 0
        )
        for other in others:
            if other.mpesa_push_sent_at > young_since:
                raise ValidationError(self.env._(
                    "An M-Pesa prompt for this order was already sent to %(phone)s.  Complete it"
                    " on that phone, or try again in a couple of minutes.",
                    phone=daraja.mask_msisdn(other.mpesa_phone or ''),
                ))
        previous = others.filtered(lambda tx: tx.state == 'pending' and tx.provider_reference)
        if previous:
            for other in previous:
                other._mpesa_settle_previous_prompt()
            # Kept whatever comes next; then check again, under fresh locks and snapshot.
            self._mpesa_commit()
            self._mpesa_check_no_prompt_waiting()
            return
        orders.invalidate_recordset(['amount_paid'])  # It does not follow the transactions' state.
        for order in orders:
            if order.currency_id.compare_amounts(order.amount_paid, order.amount_total) >= 0:
                raise ValidationError(self.env._("Order %s is already paid.", order.name))

    def _mpesa_settle_previous_prompt(self):
        """Settle an older pending prompt of the same order before a new one may go."""
        try:
            result = self._mpesa_settle_by_query()
        except daraja.DarajaError as error:
            raise ValidationError(self.env._(
                "M-Pesa cannot tell yet what became of the previous prompt for this order (%s)."
                "  Try again in a few minutes.", error,
            )) from error
        if result.outcome == PENDING:
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
        """Query Daraja and settle the transaction with its answer, as a callback would."""
        self.ensure_one()
        self._mpesa_find_by_checkout_request(self.provider_reference)  # Locks it as a callback does.
        result = self._mpesa_query(session=session)
        if result.outcome != PENDING:
            self._mpesa_settle_with_query_result(result)
        return result

    # === BUSINESS METHODS - NOTIFICATIONS === #

    @api.model
    def _mpesa_find_by_checkout_request(self, checkout_request_id, lock=True):
        """The M-Pesa transaction of a CheckoutRequestID, row-locked so that racing callbacks and
        queries handle it one after the other."""
        if not checkout_request_id:
            return self.browse()
        tx = self.sudo().search([
            ('provider_code', '=', 'mpesa'), ('provider_reference', '=', checkout_request_id),
        ], limit=1)
        if tx and lock:
            self.env.cr.execute(
                "SELECT id FROM payment_transaction WHERE id = %s FOR UPDATE", [tx.id], log_exceptions=False
            )
            tx.invalidate_recordset()
        return tx

    def _get_tx_from_notification_data(self, provider_code, notification_data):
        tx = super()._get_tx_from_notification_data(provider_code, notification_data)
        if provider_code != 'mpesa' or len(tx) == 1:
            return tx
        tx = self._mpesa_find_by_checkout_request(notification_data.get('checkout_request_id'))
        if not tx:
            raise ValidationError(self.env._(
                "M-Pesa: no transaction matches CheckoutRequestID %s.",
                notification_data.get('checkout_request_id'),
            ))
        return tx

    def _process_notification_data(self, notification_data):
        """Settle the transaction with a final M-Pesa answer; the one place for the guards.

        `notification_data` comes from a callback (`source` 'callback', with the amount and the
        receipt) or from an STK Query (`source` 'query': Daraja answered us directly, for our own
        CheckoutRequestID, so the amount is the one we asked).
        """
        super()._process_notification_data(notification_data)
        if self.provider_code != 'mpesa':
            return
        result = daraja.classify_result(notification_data.get('result_code'))
        if self.state in ('done', 'cancel') or (self.state == 'error' and result.outcome != SUCCESS):
            return  # A final transaction never changes; only a late success may change an error.
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
            else:
                settled['mpesa_paid_amount'] = self.mpesa_requested_amount
            self.write(settled)
            # Shown on the status page, so that the customer sees the M-Pesa receipt too.
            self._set_done(state_message=self.mpesa_receipt_number and self.env._(
                "M-Pesa receipt %s", self.mpesa_receipt_number,
            ))
            self._mpesa_flag_overpaid_orders()
            self._mpesa_send_mail('muchiri_mpesa.mail_template_mpesa_payment_confirmed')
            return

        self.write(settled)
        if result.outcome == CANCELED:
            self._set_canceled(state_message=result.message)
        else:
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
                "M-Pesa: the callback says KES %(paid)s was paid, but KES %(asked)s was asked.",
                paid=amount, asked=self.mpesa_requested_amount,
            ))
        if self.search_count([('mpesa_receipt_number', '=', receipt), ('id', '!=', self.id)]):
            raise ValidationError(self.env._(
                "M-Pesa: receipt %s is already recorded on another transaction.", receipt,
            ))
        return {
            'mpesa_receipt_number': receipt,
            'mpesa_paid_amount': float(amount),
            'mpesa_paid_at': notification_data.get('paid_at') or fields.Datetime.now(),
        }

    # === BUSINESS METHODS - CALLBACKS === #

    @api.model
    def _mpesa_handle_callback(self, callback, event):
        """Handle a parsed callback kept as `event`: match it, or keep it for later matching."""
        tx = self._mpesa_find_by_checkout_request(callback.checkout_request_id)
        if not tx:
            event._mark('unmatched', self.env._("No transaction has this CheckoutRequestID yet."))
            return tx
        tx._mpesa_process_callback(callback, event)
        return tx

    def _mpesa_process_callback(self, callback, event):
        """Apply a callback to this (locked) transaction, after the checks a forged one fails."""
        self.ensure_one()
        if not self.mpesa_callback_at:
            self.mpesa_callback_at = event.create_date
        outcome = callback.outcome
        if self.state == 'done' and outcome == SUCCESS:
            self._mpesa_record_late_receipt(callback, event)
            return
        if self.state in ('done', 'cancel') or (self.state == 'error' and outcome != SUCCESS):
            event._mark('ignored', self.env._("The transaction is already %s.", self.state), self)
            return
        if self.provider_id.sudo().mpesa_confirm_by_query:
            # Daraja does not sign callbacks: its own answer to our query is the truth.
            query = self._mpesa_query()
            if query.outcome == PENDING:
                event._mark('unmatched', self.env._("Daraja has not confirmed this result yet."), self)
                return
            if daraja.classify_result(query.result_code).code != callback.result.code:
                event._mark('rejected', self.env._(
                    "Daraja's query answers %(code)s (%(desc)s): the callback is not trusted.",
                    code=query.result_code, desc=query.result_desc,
                ), self)
                self._mpesa_settle_with_query_result(query)
                return
        try:
            with self.env.cr.savepoint():
                self._handle_notification_data('mpesa', self._mpesa_callback_notification(callback))
        except ValidationError as error:
            _logger.warning("Refused M-Pesa callback for %s: %s", self.reference, error)
            event._mark('rejected', str(error), self)
            return
        event._mark('processed', self.env._("Transaction %s.", self.state), self)

    @staticmethod
    def _mpesa_callback_notification(callback):
        return {
            'checkout_request_id': callback.checkout_request_id,
            'result_code': callback.result_code,
            'result_desc': callback.result_desc,
            'amount': callback.amount,
            'receipt_number': callback.receipt_number,
            'paid_at': callback.transaction_date
            and callback.transaction_date.astimezone(timezone.utc).replace(tzinfo=None),
            'source': 'callback',
        }

    def _mpesa_record_late_receipt(self, callback, event):
        """A success callback for a payment already done: the receipt of a payment settled by STK
        Query (which carries none), or a duplicate; never a second payment of the same prompt."""
        if self.mpesa_receipt_number:
            if callback.receipt_number == self.mpesa_receipt_number:
                event._mark('ignored', self.env._("This receipt is already recorded."), self)
            else:
                event._mark('rejected', self.env._(
                    "A second receipt (%(new)s) for a prompt already paid with %(old)s: Daraja sends"
                    " one per prompt, so this callback is not trusted.",
                    new=callback.receipt_number, old=self.mpesa_receipt_number,
                ), self)
            return
        try:
            with self.env.cr.savepoint():
                self.write(self._mpesa_check_paid_amount_and_receipt(
                    self._mpesa_callback_notification(callback)
                ))
        except ValidationError as error:
            event._mark('rejected', str(error), self)
            return
        event._mark('processed', self.env._("Receipt recorded for a payment settled by STK Query."), self)

    def _mpesa_settle_with_query_result(self, query):
        self._handle_notification_data('mpesa', {
            'checkout_request_id': self.provider_reference,
            'result_code': query.result_code,
            'result_desc': query.result_desc,
            'source': 'query',
        })

    def _mpesa_flag_overpaid_orders(self):
        """Money beyond an order's total is recorded, never hidden: ask for a refund."""
        for order in self.sale_order_ids:
            paid = sum(order.transaction_ids.filtered(lambda tx: tx.state == 'done').mapped('amount'))
            # Less than a shilling over is M-Pesa's whole-shilling rounding, not a second payment.
            if paid - order.amount_total >= 1:
                order._mpesa_flag_for_refund(provider=self.provider_id, message=self.env._(
                    "M-Pesa payments of %(paid)s %(currency)s exceed the order total of %(total)s"
                    " (last: %(ref)s, receipt %(receipt)s).  Check them and refund the customer.",
                    paid=paid, currency=order.currency_id.name, total=order.amount_total,
                    ref=self.reference, receipt=self.mpesa_receipt_number or '-',
                ))

    def _mpesa_send_mail(self, template_xmlid):
        template = self.env.ref(template_xmlid, raise_if_not_found=False)
        if not (template and self.partner_id.email):
            return
        try:
            with self.env.cr.savepoint():  # A mail problem must never undo a settlement.
                template.sudo().send_mail(self.id)  # Queued: sent by the mail queue's cron.
        except Exception:
            _logger.exception("M-Pesa mail %s for %s could not be queued.", template_xmlid, self.reference)

    # === BUSINESS METHODS - RECONCILIATION === #

    @api.model
    def _cron_mpesa_reconcile(self, batch_size=const.RECONCILE_BATCH_SIZE):
        """Settle pending M-Pesa transactions whose callback is late or lost, by STK Query.

        Each transaction is handled under its own row lock (skipped when another worker holds it)
        and committed on its own, so that a crash loses nothing and one failure blocks nothing.
        """
        self.env['muchiri.mpesa.event']._match_unmatched(limit=batch_size, commit=True)
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
            tx.mpesa_outcome_unknown = True
            tx._set_error(self.env._(
                "The answer to this M-Pesa prompt was never recorded: if the customer paid, the"
                " payment waits in M-Pesa Exchanges to be matched."
            ))
            tx._mpesa_commit()

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
                self._mpesa_schedule_next_check(self._mpesa_next_check_delay(fields.Datetime.now()))
        self._mpesa_commit()
        return outcome

    def _mpesa_reconcile_locked(self, session):
        self.env.cr.execute(
            "SELECT id FROM payment_transaction WHERE id = %s FOR UPDATE SKIP LOCKED", [self.id], log_exceptions=False
        )
        if not self.env.cr.fetchone():
            return 'skipped'
        self.invalidate_recordset()
        now = fields.Datetime.now()
        if self.state != 'pending' or not self.mpesa_next_check_at or self.mpesa_next_check_at > now:
            return 'skipped'
        self.mpesa_check_count += 1
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
        if self._mpesa_is_past_cutoff(now):
            self.write({'mpesa_next_check_at': False, 'mpesa_settled_by': 'cutoff',
                        'mpesa_settled_at': now})
            self._set_error(self.env._(
                "M-Pesa gave no final answer within %(hours)s hours; a late payment will still be"
                " matched.", hours=self.provider_id.sudo().mpesa_reconcile_cutoff_hours,
            ))
            return 'failed'
        self._mpesa_schedule_next_check(self._mpesa_next_check_delay(now))
        return 'pending'

    def _mpesa_post_process(self):
        """Confirm and invoice the order now, as the status page would; Odoo's own cron retries."""
        try:
            with self.env.cr.savepoint():
                self._post_process()
        except Exception:
            _logger.exception("Post-processing of %s failed; Odoo's cron will retry.", self.reference)

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

    def _mpesa_commit(self):
        """Keep each transaction's progress: a later crash must not lose it (not inside tests)."""
        if not modules.module.current_test:
            # Per transaction, on purpose: see _cron_mpesa_reconcile and _mpesa_send_stk_push.
            self.env.cr.commit()  # pylint: disable=invalid-commit
