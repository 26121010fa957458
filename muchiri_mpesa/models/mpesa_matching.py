# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""Where a ledger row's money goes: one method per rule, tried in this order.

1. Prompt.  The receipt of one of our STK prompts (a C2B or Pull report of money a prompt took) is
   that prompt's: linked, never paid a second time.  A prompt settled by STK Query (no receipt)
   gets its receipt from the Pull row that fits it (by account or payer, never by amount alone); a
   prompt still unsettled (pending, or its push answer lost) is waited for.
2. Partner.  The payer by phone: the plain MSISDN, or the SHA-256 C2B confirmations now carry.
3. Account.  BillRefNumber to an order or invoice of the provider's company, normalised (case,
   spaces, slashes, dashes); none, or more than one: the exceptions queue, never a guess.
4. Amount.  Exact: the document is paid.  Partial: part-paid, the rest stays due.  Over: the
   document is paid and the rest, booked as the customer's credit, flagged for refund.

Matched money becomes a payment transaction of the provider per document, set done with the
receipt: Odoo's post-processing creates the posted account.payment in the M-Pesa journal,
reconciles it with the invoice, and confirms (and invoices, when the provider says so) an order, as
for an STK payment.
"""
import logging
from datetime import timedelta

from odoo import models

from .. import const, daraja, utils
from .mpesa_ledger import DARAJA_CONFIRMATIONS

_logger = logging.getLogger(__name__)


class MpesaMatching(models.AbstractModel):
    _name = 'muchiri.mpesa.matching'
    _description = "M-Pesa payment matching"

    def _mpesa_match(self, row):
        """Match a locked, unmatched ledger row as far as the rules allow.

        :return: the row's new state ('unmatched' when it waits in the exceptions queue)
        """
        if self._mpesa_match_prompt(row):
            return row.state
        partner = self._mpesa_match_partner(row)
        if partner:
            row.partner_id = partner
        why = self._mpesa_why_not_matchable(row)
        if why:
            row.note = why
            return row.state
        documents, why = self._mpesa_match_account(row)
        if not documents:
            row.note = why
            return row.state
        return self._mpesa_pay_documents(row, documents, self.env._(
            "The account number %(account)s names %(document)s.", account=row.bill_ref,
            document=documents.display_name,
        ))

    # === RULE 1: OUR OWN PROMPTS === #

    def _mpesa_match_holder(self, row):
        """Whether a transaction of ours holds the row's receipt already (a prompt's, reported
        again): the row is linked to it, and its money is never placed a second time.

        :return: True when linked
        """
        holder = self.env['payment.transaction'].sudo().search([
            ('provider_id', '=', row.provider_id.id), ('mpesa_receipt_number', '=', row.name),
        ], limit=1)
        if holder:
            holder._mpesa_ledger_link(row)
        return bool(holder)

    def _mpesa_match_prompt(self, row):
        """Whether the row's money is one of our STK prompts' (linked, or waited for).

        :return: True when the row is settled by this rule, or must wait for its prompt
        """
        if self._mpesa_match_holder(row):
            return True
        prompts = self._mpesa_prompt_candidates(row)
        if len(prompts) > 1:
            row.note = self.env._(
                "The payment fits several M-Pesa prompts (%s): match it by hand.",
                ', '.join(prompts.mapped('reference')),
            )
            return True
        if not prompts:
            return False
        if prompts.state != 'done':
            row.note = self.env._("Waiting for prompt %s to be settled.", prompts.reference)
            return True
        # Settled by STK Query, which carries no receipt: Safaricom's own report brings it.
        prompts.write({
            'mpesa_receipt_number': row.name,
            'mpesa_receipt_status': 'confirmed' if row.confirmation in DARAJA_CONFIRMATIONS else 'unverified',
        })
        prompts._mpesa_update_payment_memo()
        prompts._mpesa_ledger_link(row)
        return True

    def _mpesa_prompt_candidates(self, row):
        """Our prompts of the row's amount, account and phone whose receipt never came."""
        if not row.trans_time or row.amount <= 0:
            return self.env['payment.transaction']
        prompts = self.env['payment.transaction'].sudo().search([
            ('provider_id', '=', row.provider_id.id),
            ('mpesa_push_sent_at', '!=', False),
            ('mpesa_push_sent_at', '>=', row.trans_time - timedelta(days=const.PROMPT_REPORTED_WITHIN_DAYS)),
            ('mpesa_push_sent_at', '<=', row.trans_time + timedelta(minutes=5)),
            ('mpesa_receipt_number', '=', False),
            ('mpesa_requested_amount', '=', round(row.amount)),
            # A prompt whose push answer never came (still draft, or failed with its outcome
            # unknown) may be paid too: its late callback would pay its documents a second time.
            '|', ('state', 'in', ('draft', 'pending', 'done')),
            '&', ('state', '=', 'error'), ('mpesa_outcome_unknown', '=', True),
        ], limit=20)
        return prompts.filtered(lambda tx: self._mpesa_prompt_fits(tx, row))

    def _mpesa_prompt_fits(self, tx, row):
        if row.currency_id.compare_amounts(row.amount, tx.mpesa_requested_amount):
            return False
        if row.bill_ref_key:
            try:
                sent = daraja.account_reference(tx.reference)
            except daraja.DarajaValidationError:
                return False
            if utils.reference_key(sent) != row.bill_ref_key:
                return False
        payer = row.phone or row.msisdn_hash
        if payer and tx.mpesa_phone:
            return payer in (tx.mpesa_phone, daraja.hash_msisdn(tx.mpesa_phone))
        # Neither the account nor the payer says it is the prompt's: waiting for an unsettled
        # prompt is harmless, but a settled one taking the receipt would hide another payer's money.
        return bool(row.bill_ref_key) or tx.state != 'done'

    # === RULE 2: THE PAYER === #

    def _mpesa_match_partner(self, row):
        """The commercial partner whose M-Pesa number paid, when exactly one has it."""
        Partner = self.env['res.partner'].sudo()
        if row.phone:
            domain = [('mpesa_msisdn', '=', row.phone)]
        elif row.msisdn_hash:
            domain = [('mpesa_msisdn_hash', '=', row.msisdn_hash)]
        else:
            return Partner
        partners = Partner.search([*domain, ('company_id', 'in', [False, row.company_id.id])], limit=10)
        commercial = partners.commercial_partner_id
        return commercial if len(commercial) == 1 else Partner

    # === RULE 3: THE ACCOUNT === #

    def _mpesa_why_not_matchable(self, row):
        """Why no document may take this money automatically, or None."""
        if row.currency_id.compare_amounts(row.amount, 0) <= 0:
            return self.env._("The amount is not a payment.")
        shortcodes = row.provider_id._mpesa_c2b_shortcodes()
        if row.shortcode and row.shortcode not in shortcodes:
            return self.env._("Paid to shortcode %s, which is not this provider's.", row.shortcode)
        return None

    def _mpesa_match_account(self, row):
        """The one document the account number names, among the company's open ones.

        :return: the document (empty when none or several), and why not
        """
        documents = self._mpesa_find_documents(row.company_id, row.bill_ref_key)
        if not documents:
            if not row.bill_ref_key:
                return documents, self.env._("No account number was given.")
            return documents, self.env._(
                "No open order or invoice of %(company)s has the number %(account)s.",
                company=row.company_id.name, account=row.bill_ref,
            )
        if len(documents) > 1:
            return documents.browse(), self.env._(
                "Account %(account)s may be %(documents)s: match it by hand.",
                account=row.bill_ref, documents=', '.join(documents.mapped('display_name')),
            )
        if documents.currency_id != row.currency_id:
            return documents.browse(), self.env._(
                "%(document)s is in %(currency)s, not in %(kes)s.", document=documents.display_name,
                currency=documents.currency_id.name, kes=row.currency_id.name,
            )
        return documents, None

    def _mpesa_find_documents(self, company, key, open_only=False):
        """The orders and invoices of `company` whose number normalises to `key`: one indexed
        lookup each.  An order that has an open invoice is paid through that invoice.

        :param bool open_only: only what still has something to pay (Daraja's validation)
        :return: the documents, sale orders and invoices in one list
        """
        if not key:
            return _Documents()
        orders = self.env['sale.order']._mpesa_search_reference(company, key).filtered(
            lambda order: order.state in ('draft', 'sent', 'sale'))
        invoices = self.env['account.move']._mpesa_search_reference(company, key).filtered(
            lambda move: move.state == 'posted' and not (open_only and not move._mpesa_is_due()))
        documents = _Documents()
        for order in orders:
            open_invoices = order.invoice_ids.filtered(
                lambda move: move.state == 'posted' and move.move_type == 'out_invoice' and move._mpesa_is_due()
            )
            if open_invoices:
                documents.extend(open_invoices)
            elif not open_only or order.invoice_status != 'invoiced':
                documents.append(order)
        documents.extend(invoices)
        return documents.unique()

    # === RULE 4: THE AMOUNT === #

    def _mpesa_pay_documents(self, row, documents, note):
        """Place the row's money on `documents`, in that order, each up to what it still owes;
        what is left over goes to the last one, as the customer's credit, flagged for refund.

        :return: the row's new state: 'matched', 'partial' or 'over'
        """
        documents = _Documents(documents)
        currency = row.currency_id
        remaining = row.amount
        plan = []
        for document in documents:
            due = document._mpesa_amount_due()
            part = min(remaining, due)
            if currency.compare_amounts(part, 0) > 0:
                plan.append([document, part, due])
                remaining = currency.round(remaining - part)
        if not plan:  # Everything is paid already: the money goes to the last one, to refund.
            plan.append([documents[-1], 0.0, 0.0])
        excess = remaining
        plan[-1][1] = currency.round(plan[-1][1] + excess)
        # Done transactions; the payments are Odoo's post-processing's (the caller runs or wakes it).
        for index, (document, amount, _due) in enumerate(plan):
            self.env['payment.transaction'].sudo()._mpesa_ledger_create_tx(row, document, amount, index == 0)
        paid_docs = [document for document, _amount, _due in plan]
        short = sum(due for _document, _amount, due in plan) - (row.amount - excess)
        if utils.is_material(excess):
            state = 'over'
        elif currency.compare_amounts(short, 0) > 0:
            state = 'partial'
        else:
            state = 'matched'
        row._mpesa_placed(state, note, paid_docs, excess if state == 'over' else 0.0)
        row.message_post(body=self._mpesa_summary(row, plan, excess, state))
        if state == 'over':
            document = plan[-1][0]
            document._mpesa_update_refund_flag(self.env._(
                "M-Pesa payment %(receipt)s of %(amount)s is %(excess)s more than %(document)s owed: the"
                " rest is the customer's credit.  Check it and refund the customer.",
                receipt=row.name, amount=row._mpesa_format(row.amount), excess=row._mpesa_format(excess),
                document=document.display_name,
            ), provider=row.provider_id)
        return state

    def _mpesa_summary(self, row, plan, excess, state):
        lines = ', '.join(self.env._(
            "%(amount)s to %(document)s", amount=row._mpesa_format(amount), document=document.display_name,
        ) for document, amount, _due in plan)
        text = self.env._("%(note)s Paid: %(lines)s.", note=row.note or '', lines=lines)
        if state == 'partial':
            text += ' ' + self.env._("Part-payment: the rest stays due.")
        if state == 'over':
            text += ' ' + self.env._("%s more than due, to refund.", row._mpesa_format(excess))
        return text


class _Documents(list):
    """Orders and invoices in one ordered list (two models: no recordset holds both)."""

    def unique(self):
        seen, result = set(), _Documents()
        for record in self:
            if (record._name, record.id) not in seen:
                seen.add((record._name, record.id))
                result.append(record)
        return result

    @property
    def display_name(self):
        return ', '.join(record.display_name for record in self)

    @property
    def currency_id(self):
        currencies = {record.currency_id for record in self}
        return currencies.pop() if len(currencies) == 1 else None

    def mapped(self, name):
        return [record[name] for record in self]

    def browse(self):
        return _Documents()
