# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""What becomes of the C2B and Pull bodies Daraja posts to the provider's routes.

The route keeps the body first (`_mpesa_keep_inbound`), then hands the event to
`_mpesa_handle_inbound`, which owns its fate: checked, parsed, recorded in the ledger (deduplicated
by TransID), matched, and answered.  A confirmation whose handling failed stays 'received' and the
retry job takes it over; a validation is answered at once, with one indexed lookup and no Daraja call.
"""
import logging
import time

from odoo import api, fields, models

from .. import daraja
from .mpesa_event import ADMISSION_GRACE, CONCURRENCY_ERRORS, KEEP_RETRYING

_logger = logging.getLogger(__name__)

# A body that another worker's transaction holds is handled again this many times, each time on a
# fresh snapshot, before the retry job is left to it.
CONCURRENCY_ATTEMPTS = 3
REJECTED = {'ResultCode': 1, 'ResultDesc': "Rejected"}
LEDGER_KINDS = ('c2b_validation', 'c2b_confirmation', 'pull_callback')


class MpesaEvent(models.Model):
    _inherit = 'muchiri.mpesa.event'

    ledger_id = fields.Many2one(
        'muchiri.mpesa.ledger', string="Ledger Row", readonly=True, index='btree_not_null', ondelete='set null',
    )

    # === INBOUND: C2B AND PULL === #

    def _mpesa_handle_inbound(self, own_transaction=True):
        """Handle this kept C2B or Pull body (the route's, and the retry job's, one entry).

        :param bool own_transaction: whether the caller's database transaction holds nothing but
            this handling (the route's cursor of `_mpesa_keep_inbound`): a concurrency error is
            then retried at once on a fresh transaction; otherwise it is raised
        :return: the HTTP status and the JSON body that answer Daraja
        :rtype: tuple[int, dict]
        """
        self.ensure_one()
        started = time.monotonic()
        for attempt in range(CONCURRENCY_ATTEMPTS):
            try:
                with self.env.cr.savepoint():
                    status, answer = self._mpesa_dispatch_inbound()
                break
            except CONCURRENCY_ERRORS:
                if not own_transaction or attempt + 1 == CONCURRENCY_ATTEMPTS:
                    raise
                # The same receipt on another worker: its row is invisible to this snapshot.  The
                # body is committed already; a new database transaction sees the other's row.
                self.env.cr.rollback()
                self.env.invalidate_all()
                time.sleep(0.05 * (attempt + 1))
        self._mpesa_record_answer(status, started)
        return status, answer

    def _mpesa_dispatch_inbound(self):
        handler = {
            'c2b_validation': self._mpesa_handle_c2b_validation,
            'c2b_confirmation': self._mpesa_handle_c2b_confirmation,
            'pull_callback': self._mpesa_handle_pull_callback,
        }[self.kind]
        if not self.provider_id._mpesa_is_allowed_source(self.remote_addr):
            self._mark('rejected', self.env._("The source address %s is not allowed.", self.remote_addr))
            if self.kind == 'c2b_validation':
                return 403, daraja.c2b_validation_reject(daraja.C2B_OTHER_ERROR)
            return 403, dict(REJECTED)
        return handler()

    @api.model
    def _mpesa_inbound_fallback(self, provider, kind):
        """The answer when handling failed after the body was kept (never a 5xx).

        A confirmation is accepted: its body is kept, and the retry job handles it.  A validation
        gets what Daraja would do on our timeout: the provider's ResponseType decides.
        """
        if kind == 'c2b_validation':
            if provider.sudo().mpesa_c2b_response_type == 'Cancelled':
                return 200, daraja.c2b_validation_reject(daraja.C2B_OTHER_ERROR)
            return 200, daraja.c2b_validation_accept()
        return 200, dict(daraja.C2B_CONFIRMATION_ACK)

    def _mpesa_parse_c2b(self):
        """The C2B payment this event holds, its searchable fields filled.

        :return: the payment, or None (the event rejected) when the body is not a C2B payment
        """
        self.ensure_one()
        try:
            payment = daraja.parse_c2b_payment(self._mpesa_raw_body())
        except daraja.CallbackParseError as error:
            self._mark('rejected', str(error))
            return None
        self.write({
            'receipt_number': payment.trans_id or False,
            'phone': payment.phone or False,
            'amount': float(payment.amount),
        })
        return payment

    def _mpesa_handle_c2b_validation(self):
        """Accept or refuse a payment before M-Pesa takes it, by the provider's rule."""
        payment = self._mpesa_parse_c2b()
        if not payment:
            return 400, daraja.c2b_validation_reject(daraja.C2B_OTHER_ERROR)
        refusal = self.provider_id._mpesa_c2b_refusal(payment)
        if refusal:
            code, why = refusal
            self._mark('rejected', self.env._("Refused (%(code)s): %(why)s", code=code, why=why))
            return 200, daraja.c2b_validation_reject(code)
        self._mark('processed', self.env._("Accepted."))
        return 200, daraja.c2b_validation_accept()

    def _mpesa_handle_c2b_confirmation(self):
        """Record the payment in the ledger (once per TransID) and match it.  Post-processing
        (payment, invoice, mails) is Odoo's job, woken here: Daraja never waits for it."""
        payment = self._mpesa_parse_c2b()
        if not payment:
            return 400, dict(REJECTED)
        if payment.amount <= 0 or not payment.trans_id:
            # Nothing M-Pesa took: kept in the log, never money in the ledger.
            self._mark('rejected', self.env._("A confirmation of %s without a receipt, or of no money, is not a"
                                              " payment.", payment.amount))
            return 400, dict(REJECTED)
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

    def _mpesa_wake_post_processing(self):
        """Wake Odoo's post-processing job, unless a wake-up is due already (each ir.cron._trigger()
        opens a database connection for its NOTIFY: a burst of payments needs one)."""
        cron = self.env.ref('payment.cron_post_process_payment_tx', raise_if_not_found=False)
        if cron and not self.env['ir.cron.trigger'].sudo().search_count(
            [('cron_id', '=', cron.id), ('call_at', '<=', fields.Datetime.now())], limit=1,
        ):
            cron.sudo()._trigger()

    def _mpesa_handle_pull_callback(self):
        """Kept for the record: the hourly Pull query reads Safaricom's transactions itself."""
        self._mark('ignored', self.env._("Kept; the hourly Pull query reads the transactions."))
        return 200, dict(daraja.C2B_CONFIRMATION_ACK)

    # === THE RETRY JOB === #

    @api.model
    def _mpesa_due_inbound_domain(self):
        now = fields.Datetime.now()
        return [
            ('kind', '=', 'c2b_confirmation'),
            ('callback_state', 'in', ('received', 'error')),
            ('create_date', '<=', now - ADMISSION_GRACE),
            ('create_date', '>=', now - KEEP_RETRYING),
            '|', ('next_attempt_at', '=', False), ('next_attempt_at', '<=', now),
        ]

    @api.model
    def _cron_mpesa_ledger_inbound(self, batch_size=200):
        """Handle the kept C2B confirmations whose request died (or failed) before it recorded
        them; each under its own lock, committed on its own, backing off when it fails again."""
        events = self.sudo().search(self._mpesa_due_inbound_domain(), order='id', limit=batch_size)
        Transaction = self.env['payment.transaction']
        handled = 0
        for event in events:
            try:
                with self.env.cr.savepoint():
                    self.env.cr.execute(
                        "SELECT id FROM muchiri_mpesa_event WHERE id = %s FOR NO KEY UPDATE SKIP LOCKED",
                        [event.id], log_exceptions=False,
                    )
                    if self.env.cr.fetchone():
                        event.invalidate_recordset()
                        if event.callback_state in ('received', 'error'):
                            event._mpesa_handle_inbound(own_transaction=False)
                            handled += 1
            except Exception as error:
                _logger.warning("Kept M-Pesa C2B confirmation %s could not be handled now.", event.id, exc_info=True)
                event._mpesa_retry_later('error', str(error))
            Transaction._mpesa_commit()
        return handled

