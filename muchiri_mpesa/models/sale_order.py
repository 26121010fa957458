# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.

from odoo import api, fields, models
from odoo.exceptions import UserError, ValidationError
from odoo.fields import Command

from .. import const, daraja


class SaleOrder(models.Model):
    _name = 'sale.order'
    _inherit = ['sale.order', 'muchiri.mpesa.payable']

    mpesa_phone = fields.Char(
        string="M-Pesa Phone", copy=False, tracking=True,
        help="The phone that receives the M-Pesa prompt.",
    )
    mpesa_receipt_number = fields.Char(
        string="M-Pesa Receipt", compute='_compute_mpesa_payment', store=True, index='btree_not_null',
    )
    mpesa_payment_status = fields.Selection(
        string="M-Pesa Status", selection=const.ORDER_PAYMENT_STATUSES,
        compute='_compute_mpesa_payment', store=True,
    )
    mpesa_last_result = fields.Char(
        string="M-Pesa Last Result", compute='_compute_mpesa_payment', store=True,
    )
    mpesa_paid_at = fields.Datetime(
        string="M-Pesa Paid On", compute='_compute_mpesa_payment', store=True,
    )
    mpesa_receipt_pending = fields.Boolean(
        string="M-Pesa Receipt Pending", compute='_compute_mpesa_payment', store=True,
        help="Paid, as Daraja's STK Query confirmed, but the receipt number has not come yet.",
    )
    mpesa_refund_receipt = fields.Char(
        string="M-Pesa Reversal", compute='_compute_mpesa_payment', store=True,
        help="The receipt of the M-Pesa reversal that gave the last refunded payment back.",
    )
    mpesa_refunded_at = fields.Datetime(
        string="M-Pesa Refunded On", compute='_compute_mpesa_payment', store=True,
    )

    mpesa_can_request_payment = fields.Boolean(
        string="Can Request M-Pesa Payment", compute='_compute_mpesa_back_office',
    )
    mpesa_has_pending_payment = fields.Boolean(
        string="M-Pesa Payment Pending", compute='_compute_mpesa_back_office',
    )

    # === CRUD METHODS === #

    def init(self):
        res = super().init()
        self._mpesa_create_reference_index()
        return res

    # === COMPUTE METHODS === #

    @api.depends(
        'amount_total', 'transaction_ids.state', 'transaction_ids.amount',
        'transaction_ids.mpesa_receipt_number', 'transaction_ids.mpesa_receipt_status',
        'transaction_ids.mpesa_result_code', 'transaction_ids.mpesa_paid_at',
        'transaction_ids.child_transaction_ids.state',
    )
    def _compute_mpesa_payment(self):
        for order in self:
            txs = order.transaction_ids.filtered(lambda tx: tx.provider_code == 'mpesa').sorted('id')
            done = txs.filtered(lambda tx: tx.state == 'done')
            refunded = done.filtered(lambda tx: tx._mpesa_done_refund())
            # A payment M-Pesa reversed pays nothing: the customer has the money back.
            paid = done - refunded
            last = txs[-1:]
            last_refund = refunded.sorted(lambda tx: tx._mpesa_done_refund().id)[-1:]._mpesa_done_refund()
            if not txs:
                status = False
            elif paid and order.currency_id.compare_amounts(sum(paid.mapped('amount')), order.amount_total) >= 0:
                status = 'paid'
            elif paid:
                status = 'partial'
            elif txs.filtered(lambda tx: tx.state == 'pending'):
                status = 'pending'
            elif refunded:
                status = 'refunded'
            elif last.state == 'cancel':
                status = 'cancelled'
            elif last.state == 'error':
                status = 'failed'
            else:
                status = 'unpaid'
            order.mpesa_payment_status = status
            shown = paid or refunded  # The receipts that paid it, else the ones given back.
            order.mpesa_receipt_number = ', '.join(filter(None, shown.mapped('mpesa_receipt_number'))) or False
            order.mpesa_receipt_pending = any(tx.mpesa_receipt_status == 'pending' for tx in paid)
            order.mpesa_paid_at = shown[-1:].mpesa_paid_at or shown[-1:].last_state_change
            order.mpesa_last_result = (last and last._mpesa_result_text()) or False
            order.mpesa_refund_receipt = last_refund.mpesa_reversal_receipt or False
            order.mpesa_refunded_at = last_refund.mpesa_paid_at or last_refund.last_state_change

    @api.depends(
        'state', 'company_id', 'currency_id', 'amount_total', 'partner_id', 'partner_invoice_id',
        'transaction_ids.state',
    )
    def _compute_mpesa_back_office(self):
        for order in self:
            order.mpesa_has_pending_payment = bool(order._mpesa_pending_transactions())
            order.mpesa_can_request_payment = not order._mpesa_payment_request_blocker()

    # === BUSINESS METHODS === #

    def _mpesa_search_reference(self, company, key, limit=5):
        """The orders (sudo) of `company` whose number normalises to `key`: one indexed lookup."""
        return self._mpesa_search_key(company, key, '', ['name', 'company_id'], limit)

    def _prepare_invoice(self):
        """Override of `sale` to round the invoice of an order M-Pesa pays to whole shillings, as
        the phone was asked: the payment then settles it exactly and nothing stays open."""
        values = super()._prepare_invoice()
        rounding = self._mpesa_whole_shilling_rounding()
        if rounding and not values.get('invoice_cash_rounding_id'):
            values['invoice_cash_rounding_id'] = rounding.id
        return values

    def _mpesa_whole_shilling_rounding(self):
        """The cash rounding of the M-Pesa provider that paid this order, if any."""
        self.ensure_one()
        paid = self.sudo().transaction_ids.filtered(lambda tx: tx.provider_code == 'mpesa' and tx.state == 'done')
        return paid[:1].provider_id.mpesa_cash_rounding_id

    def _mpesa_invoiced_before_paid(self):
        """Whether invoicing this order on payment would invoice money twice: Odoo invoices a partly
        paid order with a down payment of all that was paid so far, and a fully invoiced one with
        nothing (and unlinks the payment's invoices).  Such an order is invoiced once it is paid."""
        self.ensure_one()
        invoiced = self.invoice_ids.filtered(lambda move: move.state != 'cancel')
        return bool(invoiced) and (not self._is_paid() or self.invoice_status != 'to invoice')

    # === BUSINESS METHODS - M-PESA PAYMENT REQUESTS AND STATUS CHECKS === #

    def _mpesa_payment_request_blocker(self):
        """Why no M-Pesa payment can be requested for this order, or None when one can."""
        self.ensure_one()
        provider = self._mpesa_provider()
        if not provider:
            return self.env._("No M-Pesa payment provider is enabled for %s.", self.company_id.name)
        if self.state == 'cancel':
            return self.env._("%s is cancelled.", self.name)
        reason = provider._mpesa_unavailability_reason(self.partner_invoice_id or self.partner_id, self.currency_id)
        if reason:
            return reason
        if not self._mpesa_is_due():
            return self.env._("%s has nothing left to pay.", self.name)
        return None

    def _mpesa_pending_transactions(self):
        """The order's M-Pesa transactions (sudo) whose prompt waits for Daraja's final answer (a
        till prompt whose worker died before it recorded Daraja's answer included)."""
        self.ensure_one()
        return self.sudo().transaction_ids.filtered(
            lambda tx: tx.provider_code == 'mpesa' and tx._mpesa_prompt_may_be_waiting()
        )

    def action_mpesa_request_payment(self):
        """Open the wizard that sends an M-Pesa prompt for this order."""
        self.ensure_one()
        self.env['payment.provider']._mpesa_check_group('sales_team.group_sale_salesman')
        blocker = self._mpesa_payment_request_blocker()
        if blocker:
            raise UserError(blocker)
        return {
            'type': 'ir.actions.act_window',
            'name': self.env._("Request M-Pesa payment"),
            'res_model': 'muchiri.mpesa.payment.request',
            'view_mode': 'form',
            'target': 'new',
            'context': {'default_sale_order_id': self.id},
        }

    def _mpesa_check_payment_request(self, phone, amount):
        """Validate a payment request made from the back office, before anything is created or sent.

        :return: the provider (sudo), the normalised MSISDN and the amount rounded to the currency
        :raise ValidationError: saying what to correct
        """
        self.ensure_one()
        blocker = self._mpesa_payment_request_blocker()
        if blocker:
            raise ValidationError(blocker)
        provider = self._mpesa_provider()
        try:
            msisdn = daraja.normalize_msisdn(phone or '')
        except daraja.DarajaValidationError as error:
            raise ValidationError(str(error)) from error
        return provider, msisdn, self._mpesa_check_request_amount(provider, amount)

    def _mpesa_request_payment(self, phone, amount):
        """Send an M-Pesa prompt of `amount` for this order to `phone`, and note it in the chatter.

        The transaction is made as Odoo's payment form makes one for a sales order.  Bad input and
        the rules of the transaction (one young prompt per order, distributors only) raise a
        ValidationError: the caller's rollback then leaves nothing created and nothing was sent.  A
        refusal by Daraja leaves the transaction in error and is returned.

        :return: the transaction (sudo), and None or the message of Daraja's refusal
        """
        self.ensure_one()
        provider, msisdn, amount = self._mpesa_check_payment_request(phone, amount)
        tx = self._mpesa_new_transaction(provider, amount)
        error = tx._mpesa_send_stk_push(msisdn)
        values = {
            'amount': self._mpesa_format_amount(tx.mpesa_requested_amount),
            'phone': tx.mpesa_phone or msisdn,  # Internal notes: staff see the full number.
            'checkout': tx.provider_reference,
            'reason': error,
        }
        if error:
            note = self.env._(
                "M-Pesa prompt of %(amount)s to %(phone)s was refused: %(reason)s", **values,
            )
        else:
            note = self.env._(
                "M-Pesa prompt of %(amount)s sent to %(phone)s (CheckoutRequestID %(checkout)s).",
                **values,
            )
        self.message_post(body=note, subtype_xmlid='mail.mt_note')
        return tx, error

    def _mpesa_new_transaction(self, provider, amount):
        """A new M-Pesa transaction (sudo) of `amount` for this order, as Odoo's portal makes one."""
        Transaction = self.env['payment.transaction'].sudo()
        order_command = [Command.set([self.id])]
        return Transaction.create({
            'provider_id': provider.id,
            'payment_method_id': self.env.ref('payment.payment_method_mpesa').id,
            'reference': Transaction._compute_reference(provider.code, sale_order_ids=order_command),
            'amount': amount,
            'currency_id': self.currency_id.id,
            'partner_id': (self.partner_invoice_id or self.partner_id).id,
            'sale_order_ids': order_command,
            'operation': 'online_direct',
        })

    # === BUSINESS METHODS - B2B EXPRESS CHECKOUT === #

    def _mpesa_request_till_payment(self, till, amount):
        """Prompt the distributor's `till` to pay `amount` of this order (B2B Express Checkout), and
        note it in the chatter; the rules of `_mpesa_request_payment`, with a till for a phone.

        :return: the transaction (sudo), and None or the message of the refusal
        """
        self.ensure_one()
        provider, amount = self._mpesa_check_till_request(amount)
        tx = self._mpesa_new_transaction(provider, amount)
        error = tx._mpesa_send_b2b_checkout(till)
        values = {'amount': self._mpesa_format_amount(tx.mpesa_requested_amount), 'till': tx.mpesa_b2b_till or till,
                  'reason': error}
        if error:
            note = self.env._("M-Pesa till prompt of %(amount)s to till %(till)s was refused: %(reason)s", **values)
        else:
            note = self.env._("M-Pesa till prompt of %(amount)s sent to till %(till)s.", **values)
        self.message_post(body=note, subtype_xmlid='mail.mt_note')
        return tx, error

    def _mpesa_check_till_request(self, amount):
        """`_mpesa_check_payment_request` for a till: the provider (sudo) and the amount to request."""
        self.ensure_one()
        blocker = self._mpesa_payment_request_blocker()
        if blocker:
            raise ValidationError(blocker)
        provider = self._mpesa_provider()
        refusal = provider._mpesa_till_payment_refusal() if provider else self.env._("M-Pesa is not set up.")
        if refusal:
            raise ValidationError(refusal)
        return provider, self._mpesa_check_request_amount(provider, amount)

    def _mpesa_check_request_amount(self, provider, amount):
        """The amount to request, rounded: above zero, at most what is still due; above what
        `provider` asks in one prompt, the first instalment of it (the next request asks the next
        one, as the portal does); else a ValidationError saying why."""
        currency = self.currency_id
        amount = currency.round(amount or 0.0)
        due = self._mpesa_amount_due()
        if currency.compare_amounts(amount, 0) <= 0:
            raise ValidationError(self.env._("The amount to request must be above zero."))
        if currency.compare_amounts(amount, due) > 0:
            raise ValidationError(self.env._(
                "%(amount)s is more than the %(due)s still due on %(order)s.",
                amount=self._mpesa_format_amount(amount), due=self._mpesa_format_amount(due), order=self.name,
            ))
        amount = provider._mpesa_instalment_amount(amount, currency)
        provider._mpesa_check_amount(amount, currency)
        return amount

    def _mpesa_instalment_note(self, amount):
        """What a back-office request of `amount` says when one prompt cannot take it all, else None."""
        self.ensure_one()
        provider = self._mpesa_provider()
        currency = self.currency_id
        if not provider or currency.compare_amounts(amount or 0.0, provider._mpesa_max_amount()) <= 0:
            return None
        return self.env._(
            "%(amount)s is above one prompt's %(maximum)s: this request asks %(asked)s; request again for"
            " the rest.", amount=self._mpesa_format_amount(amount),
            maximum=self._mpesa_format_amount(provider._mpesa_max_amount()),
            asked=self._mpesa_format_amount(provider._mpesa_instalment_amount(amount, currency)),
        )

    def action_mpesa_check_status(self):
        """Ask Daraja now where each pending M-Pesa prompt of the order stands, settle what it
        answers (as a callback would) and note the answers in the chatter.

        Daraja's errors are shown, not raised: what was already settled and noted stays.
        """
        self.ensure_one()
        self.env['payment.provider']._mpesa_check_group('sales_team.group_sale_salesman')
        pending = self._mpesa_pending_transactions()
        if not pending:
            raise UserError(self.env._("No M-Pesa payment of %s is waiting for an answer.", self.name))
        answers, errors = [], []
        for tx in pending:
            # The row lock the callback takes: a callback or the cron handling it meanwhile waits.
            tx._mpesa_lock()
            if not tx._mpesa_prompt_may_be_waiting():
                note = self._mpesa_status_note(tx, None)  # Settled meanwhile.
            else:
                try:
                    result = tx._mpesa_settle_by_query()
                except daraja.DarajaError as error:
                    errors.append(self.env._("%(reference)s: %(error)s", reference=tx.reference, error=error))
                    continue
                note = self._mpesa_status_note(tx, result)
            self.message_post(body=note, subtype_xmlid='mail.mt_note')
            answers.append(note)
        pending._mpesa_post_process()

        if errors:
            kind = 'danger'
            title = self.env._("M-Pesa could not answer now")
        elif self._mpesa_pending_transactions():
            kind = 'info'
            title = self.env._("No final answer from M-Pesa yet")
        else:
            kind = 'success'
            title = self.env._("M-Pesa answered")
        return {
            'type': 'ir.actions.client',
            'tag': 'display_notification',
            'params': {
                'type': kind,
                'title': title,
                'message': '\n'.join(errors + answers),
                'sticky': bool(errors),
                'next': {'type': 'ir.actions.client', 'tag': 'soft_reload'},
            },
        }

    def _mpesa_status_note(self, tx, result):
        """What Daraja says of `tx`, for the chatter (`result`: the query's answer, if one was asked)."""
        values = {
            'amount': self._mpesa_format_amount(tx.mpesa_requested_amount),
            'phone': tx.mpesa_phone or (tx.mpesa_b2b_till and self.env._("till %s", tx.mpesa_b2b_till)) or '',
            'checkout': tx.provider_reference,
        }
        if tx.state == 'done':
            return self.env._(
                "M-Pesa confirms the payment of %(amount)s from %(phone)s (CheckoutRequestID"
                " %(checkout)s).", **values,
            )
        if tx.state == 'pending':
            return self.env._(
                "M-Pesa has no final answer yet for the prompt of %(amount)s sent to %(phone)s"
                " (CheckoutRequestID %(checkout)s): %(answer)s", **values,
                answer=(result and result.result_desc)
                or (tx.mpesa_b2b_till and self.env._("M-Pesa's Transaction Status is asked now."))
                or self.env._("the customer has not answered."),
            )
        states = dict(tx._fields['state']._description_selection(self.env))
        return self.env._(
            "M-Pesa answers for the prompt of %(amount)s sent to %(phone)s (CheckoutRequestID"
            " %(checkout)s): %(answer)s (the payment is now %(state)s).", **values,
            answer=(tx.state_message or (result and result.result_desc) or '').rstrip('.'),
            state=states[tx.state],
        )
