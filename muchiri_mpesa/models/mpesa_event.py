# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
import json
import logging
from datetime import timedelta

from psycopg2 import OperationalError

from odoo import api, fields, models

from .. import const, daraja

_logger = logging.getLogger(__name__)

# Kept callbacks are retried this long: past it, an accountant looks at them in the log.
KEEP_RETRYING = timedelta(days=7)


def _as_text(body):
    if body is None:
        return False
    if isinstance(body, (dict, list)):
        return json.dumps(body, indent=2, sort_keys=True, default=str)
    return str(body)


class MpesaEvent(models.Model):
    """One exchange with Daraja: every request we send and every callback we receive.

    It is the audit log and, for callbacks whose transaction is not known yet (the callback can beat
    the commit of the STK Push answer), the inbox from which they are matched later.
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
    result_code = fields.Char(readonly=True)
    http_status = fields.Integer(string="HTTP Status", readonly=True)
    url = fields.Char(string="URL", readonly=True)
    remote_addr = fields.Char(string="Source Address", readonly=True)
    request_body = fields.Text(readonly=True, help="Secrets are redacted before they are stored.")
    response_body = fields.Text(readonly=True)
    duration_ms = fields.Float(string="Duration (ms)", readonly=True)
    error = fields.Text(readonly=True)
    callback_state = fields.Selection(
        selection=const.CALLBACK_STATES, readonly=True, index='btree_not_null',
    )
    message = fields.Char(readonly=True, help="What was done with the callback, and why.")

    # === OUTBOUND === #

    @api.model
    def _record_exchange(self, provider, exchange, transaction=None):
        """Keep one outbound HTTP exchange reported by the Daraja client (already redacted)."""
        request_body = exchange.request_body or {}
        response_body = exchange.response_body if isinstance(exchange.response_body, dict) else {}
        # The CallBackURL carries the provider's callback secret: readers of the log must not forge.
        secret = provider.sudo().mpesa_callback_secret
        request_text = _as_text(exchange.request_body)
        if secret and request_text:
            request_text = request_text.replace(secret, '***')
        # In a savepoint: a failed insert must not leave the payment's transaction aborted.
        with self.env.cr.savepoint():
            return self.sudo().create({
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
            })

    # === INBOUND === #

    @api.model
    def _record_callback(self, provider, raw_body, remote_addr):
        """Keep a received callback as it came, before anything is done with it."""
        return self.sudo().create({
            'kind': 'callback',
            'provider_id': provider.id,
            'remote_addr': remote_addr,
            'request_body': raw_body.decode('utf-8', errors='replace')
            if isinstance(raw_body, bytes) else raw_body,
            'callback_state': 'received',
        })

    def _set_parsed(self, callback):
        """Fill the searchable fields from the parsed callback."""
        self.ensure_one()
        self.write({
            'checkout_request_id': callback.checkout_request_id,
            'merchant_request_id': callback.merchant_request_id,
            'receipt_number': callback.receipt_number or False,
            'phone': callback.phone_number or False,
            'result_code': callback.result_code,
        })

    def _mark(self, state, message='', transaction=None):
        self.ensure_one()
        values = {'callback_state': state, 'message': message or False}
        if transaction:
            values['transaction_id'] = transaction.id
        self.write(values)

    def _parse(self):
        """The callback this event holds, parsed again from its stored body."""
        self.ensure_one()
        return daraja.parse_stk_callback(self.request_body or '')

    @api.model
    def _match_unmatched(self, checkout_request_ids=None, limit=None, commit=False):
        """Process again the kept callbacks whose transaction can now take them.

        Callbacks wait here when their transaction was not committed yet, when Daraja had not yet
        confirmed them, or when processing failed.  Without `checkout_request_ids` (the cron), only
        those whose transaction is no longer pending are taken: a pending one is settled by its own
        scheduled query first, which this leaves to the reconciliation, and then gets its receipt
        here without a second query.

        :return: the number of callbacks processed again
        """
        if checkout_request_ids is not None:
            events = self.sudo().search([
                ('kind', '=', 'callback'),
                ('callback_state', 'in', ('unmatched', 'error')),
                ('checkout_request_id', 'in', list(checkout_request_ids)),
            ], order='id', limit=limit)
        else:
            self.env.flush_all()
            self.env.cr.execute("""
                SELECT event.id
                  FROM muchiri_mpesa_event event
                  JOIN payment_transaction tx ON tx.provider_reference = event.checkout_request_id
                  JOIN payment_provider provider ON provider.id = tx.provider_id
                 WHERE event.kind = 'callback'
                   AND event.callback_state IN ('unmatched', 'error')
                   AND event.create_date >= %s
                   AND provider.code = 'mpesa'
                   AND tx.state NOT IN ('draft', 'pending')
                 ORDER BY event.id
                 LIMIT %s
            """, [fields.Datetime.now() - KEEP_RETRYING, limit])
            events = self.sudo().browse([row[0] for row in self.env.cr.fetchall()])
        Transaction = self.env['payment.transaction'].sudo()
        processed = 0
        for event in events:
            try:
                with self.env.cr.savepoint():
                    tx = Transaction._mpesa_find_by_checkout_request(event.checkout_request_id)
                    if tx:
                        tx._mpesa_process_callback(event._parse(), event)
                        processed += 1
            except OperationalError:
                continue  # A concurrent worker has it: the next run sees the result.
            except daraja.DarajaError as error:
                _logger.warning("Kept M-Pesa callback %s waits: %s", event.id, error)
                break  # Daraja cannot answer now: the next run tries again.
            except Exception as error:
                _logger.exception("Kept M-Pesa callback %s could not be processed.", event.id)
                event._mark('error', str(error))
            if commit:
                Transaction._mpesa_commit()
        return processed
