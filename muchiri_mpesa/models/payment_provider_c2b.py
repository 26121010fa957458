# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""Money paid to the shortcode from the phone's menu (C2B) and Safaricom's own list of it (Pull
Transactions): registration, the validation rule, and the hourly Pull backfill of the ledger."""
import logging
from datetime import timedelta, timezone

import requests

from odoo import api, fields, models
from odoo.exceptions import UserError

from .. import const, daraja
from .mpesa_payable_reference import reference_key

_logger = logging.getLogger(__name__)

C2B_RESPONSE_TYPES = [
    ('Completed', "Completed: the payment goes through"),
    ('Cancelled', "Cancelled: the payment is refused"),
]
C2B_VALIDATION_RULES = [
    ('any', "Any account"),
    ('open_document', "An open order or invoice number only"),
]
# Each Pull query reaches back over the end of the previous one (rows Safaricom lists late), and
# never before what Daraja keeps (48 hours, less a margin for the clocks).
PULL_OVERLAP = timedelta(minutes=30)
PULL_CLOCK_MARGIN = timedelta(minutes=5)


class PaymentProvider(models.Model):
    _inherit = 'payment.provider'

    # === C2B (PAYBILL / TILL PAYMENTS FROM THE PHONE'S MENU) === #
    mpesa_c2b_response_type = fields.Selection(
        string="When Validation Does Not Answer", selection=C2B_RESPONSE_TYPES, default='Completed',
        groups='base.group_system',
        help="Registered with Safaricom (ResponseType): what M-Pesa does with a payment when this"
             " Odoo does not answer its validation within about 8 seconds.  Register the URLs again"
             " after a change.",
    )
    mpesa_c2b_validation_rule = fields.Selection(
        string="Accept Payments To", selection=C2B_VALIDATION_RULES, default='any',
        groups='base.group_system',
        help="Only for shortcodes where Safaricom enabled external validation: which account"
             " numbers are accepted before M-Pesa takes the money.  An open order or invoice number"
             " only: any other account is refused (C2B00012).",
    )
    mpesa_c2b_registered_at = fields.Datetime(string="C2B URLs Registered", readonly=True, copy=False)
    mpesa_c2b_registration = fields.Char(
        string="C2B Registration", readonly=True, copy=False, help="Daraja's answer to the last registration.",
    )

    mpesa_c2b_confirmation = fields.Char(
        string="How Paybill Payments Are Confirmed", compute='_compute_mpesa_c2b_confirmation',
        groups='base.group_system',
    )
    mpesa_c2b_confirmation_weak = fields.Boolean(compute='_compute_mpesa_c2b_confirmation', groups='base.group_system')

    # === PULL TRANSACTIONS === #
    mpesa_pull_nominated_number = fields.Char(
        string="Pull Nominated Number", groups='base.group_system',
        help="The Safaricom number of the shortcode's administrator that Safaricom nominated for Pull"
             " Transactions (it receives the registration's confirmation).",
    )
    mpesa_pull_registered_at = fields.Datetime(string="Pull Registered", readonly=True, copy=False)
    mpesa_pull_synced_until = fields.Datetime(
        string="Pull Synced Until", readonly=True, copy=False,
        help="Every payment Safaricom listed before this time is in the ledger: the end of the last"
             " Pull Transactions run that read its whole window, or the last row read by one that was"
             " cut short.",
    )
    mpesa_pull_cut_short = fields.Char(
        string="Last Pull Cut Short", readonly=True, copy=False,
        help="Why the last Pull Transactions run did not read its whole window (an alert says so);"
             " empty once a run reads it all.",
    )

    # === COMPUTE METHODS === #

    @api.depends('mpesa_ip_check', 'mpesa_pull_registered_at', 'state')
    @api.depends_context('uid')
    def _compute_mpesa_c2b_confirmation(self):
        """Say how a paybill payment's money is confirmed before it pays anything (the ledger's
        `_mpesa_await_confirmation` decides it, in that order)."""
        for provider in self:
            weak = False
            if provider.code != const.PROVIDER_CODE:
                text = False
            elif provider._mpesa_has_initiator():
                text = self.env._(
                    "Each paybill payment is confirmed by M-Pesa's Transaction Status before it pays an order"
                    " or invoice.")
            elif provider.mpesa_pull_registered_at and not provider._mpesa_pull_refusal():
                text = self.env._(
                    "Each paybill payment is confirmed by Pull Transactions (hourly) before it pays an order or"
                    " invoice.  Set up the initiator to confirm them within seconds.")
            elif provider.mpesa_ip_check == 'enforce':
                weak = True
                text = self.env._(
                    "Paybill payments are booked on the callback source check alone, the weaker lock: Daraja"
                    " signs nothing, so a leaked callback URL sent from an allowed address would pay documents."
                    "  Set up the initiator (Transaction Status) so that M-Pesa confirms each payment.")
            else:
                weak = True
                text = self.env._(
                    "Paybill payments wait for an accountant, who confirms each against the M-Pesa statement:"
                    " this provider can ask M-Pesa neither by Transaction Status (no initiator) nor by Pull,"
                    " and its source check does not refuse unknown addresses.")
            provider.mpesa_c2b_confirmation = text
            provider.mpesa_c2b_confirmation_weak = weak

    # === BUSINESS METHODS - C2B === #

    def _mpesa_c2b_shortcodes(self):
        """The shortcodes money paid to this provider may name (paybill, or a till's store and till)."""
        self.ensure_one()
        provider = self.sudo()
        return {code.strip() for code in (provider.mpesa_shortcode, provider.mpesa_till_number) if code}

    def _mpesa_c2b_refusal(self, payment):
        """Why Daraja's validation of `payment` (a daraja.C2BPayment) is refused, or None.

        One indexed lookup per kind of document, no Daraja call: Daraja waits about 8 s.

        :return: the C2B result code and the reason, or None to accept
        :rtype: tuple[str, str] | None
        """
        self.ensure_one()
        if payment.amount <= 0 or payment.amount > daraja.DARAJA_MAX_AMOUNT:
            return daraja.C2B_INVALID_AMOUNT, self.env._("%s is not an amount M-Pesa pays.", payment.amount)
        if payment.shortcode and payment.shortcode not in self._mpesa_c2b_shortcodes():
            return daraja.C2B_INVALID_SHORTCODE, self.env._("%s is not this provider's shortcode.", payment.shortcode)
        if self.sudo().mpesa_c2b_validation_rule != 'open_document':
            return None
        documents = self.env['muchiri.mpesa.matching']._mpesa_find_documents(
            self.company_id, reference_key(payment.bill_ref), open_only=True,
        )
        if not documents:
            return daraja.C2B_INVALID_ACCOUNT, self.env._(
                "No open order or invoice has the number %s.", payment.bill_ref or '-',
            )
        return None

    def action_mpesa_c2b_register(self):
        """Register the confirmation and validation URLs of the shortcode with Safaricom."""
        self.ensure_one()
        self._mpesa_check_group('base.group_system')
        provider = self.sudo()
        urls = {name: self._mpesa_daraja_url(name) for name in ('c2b_confirmation', 'c2b_validation')}
        try:
            for url in urls.values():
                daraja.check_daraja_url(url)
            registration = self._mpesa_client().register_c2b_urls(
                provider.mpesa_shortcode.strip(), provider.mpesa_c2b_response_type or 'Completed',
                urls['c2b_confirmation'], urls['c2b_validation'],
            )
        except daraja.InvalidConfiguration as error:
            raise UserError(self.env._(
                "Daraja would refuse this URL: %(error)s  Set a Callback Base URL (M-Pesa: advanced tab)"
                " that Safaricom accepts.", error=error,
            )) from error
        except daraja.DarajaError as error:
            raise UserError(self.env._("Daraja refused the C2B registration: %s", error)) from error
        said = f"{registration.version}: {registration.response_code} {registration.description}".strip()
        if registration.already_registered:
            provider.mpesa_c2b_registration = said
            message = self.env._(
                "Safaricom already has URLs registered for shortcode %(shortcode)s (%(said)s).  In"
                " production, registration is one-time: if the registered URLs are not this Odoo's,"
                " ask Safaricom (apisupport@safaricom.co.ke) to delete them, then register again.",
                shortcode=provider.mpesa_shortcode, said=said,
            )
            kind = 'warning'
        else:
            provider.write({'mpesa_c2b_registered_at': fields.Datetime.now(), 'mpesa_c2b_registration': said})
            message = self.env._(
                "M-Pesa will send the payments made to %(shortcode)s to this Odoo (%(version)s).",
                shortcode=provider.mpesa_shortcode, version=registration.version,
            )
            kind = 'success'
        return _notification(message, kind)

    # === BUSINESS METHODS - PULL TRANSACTIONS === #

    def _mpesa_pull_refusal(self):
        """Why this provider may not use Pull Transactions, or None.

        Safaricom offers Pull to production shortcodes: an enabled provider registers.  In test mode,
        only a provider that talks to a simulator (a custom API URL) does, so that the backfill can
        be proved without Safaricom.
        """
        self.ensure_one()
        if self.code != const.PROVIDER_CODE:
            return self.env._("Pull Transactions is for M-Pesa providers.")
        if self.state == 'disabled':
            return self.env._("The provider is disabled.")
        if self.state == 'test' and not self.sudo().mpesa_api_url:
            return self.env._(
                "Safaricom offers Pull Transactions in production only: enable the provider first (or,"
                " in test mode, use a Daraja simulator as the API URL)."
            )
        return None

    def action_mpesa_pull_register(self):
        """Register the shortcode for Pull Transactions (once, with the nominated number)."""
        self.ensure_one()
        self._mpesa_check_group('base.group_system')
        provider = self.sudo()
        refusal = self._mpesa_pull_refusal()
        if refusal:
            raise UserError(refusal)
        try:
            nominated = daraja.normalize_msisdn(provider.mpesa_pull_nominated_number or '')
        except daraja.DarajaValidationError as error:
            raise UserError(self.env._("The Pull nominated number: %s", error)) from error
        callback_url = self._mpesa_daraja_url('pull')
        try:
            daraja.check_daraja_url(callback_url)
            self._mpesa_client().pull_register(provider.mpesa_shortcode.strip(), nominated, callback_url)
        except daraja.DarajaError as error:
            raise UserError(self.env._("Daraja refused the Pull Transactions registration: %s", error)) from error
        provider.mpesa_pull_registered_at = fields.Datetime.now()
        return _notification(self.env._(
            "Shortcode %s is registered for Pull Transactions: the ledger is completed from it every hour.",
            provider.mpesa_shortcode,
        ), 'success')

    def action_mpesa_pull_now(self):
        """Run the Pull Transactions backfill of this provider now."""
        self.ensure_one()
        self._mpesa_check_group('account.group_account_manager')
        if not self.sudo().mpesa_pull_registered_at:
            raise UserError(self.env._("Register the shortcode for Pull Transactions first."))
        try:
            seen, new = self.sudo()._mpesa_pull()
        except daraja.DarajaError as error:
            raise UserError(self.env._("Daraja could not list the transactions now: %s", error)) from error
        message = self.env._(
            "Safaricom listed %(seen)s payments; %(new)s were new to the ledger.", seen=seen, new=new,
        )
        if self.sudo().mpesa_pull_cut_short:
            return _notification(f"{message}  {self.sudo().mpesa_pull_cut_short}", 'warning')
        return _notification(message, 'success')

    @api.model
    def _cron_mpesa_pull_transactions(self):
        """Complete the ledger from Safaricom's list of the shortcode's payments, hourly: a lost C2B
        confirmation is recovered, and a prompt whose callback was lost gets its receipt."""
        providers = self.sudo().search([
            ('code', '=', const.PROVIDER_CODE), ('state', '!=', 'disabled'), ('mpesa_pull_registered_at', '!=', False),
        ])
        for provider in providers.filtered(lambda p: not p._mpesa_pull_refusal()):
            try:
                provider._mpesa_pull()
            except Exception as error:  # Each row was committed on its own: the next run goes on from there.
                _logger.warning("M-Pesa Pull Transactions of provider %s failed; the next run asks again.",
                                provider.id, exc_info=True)
                try:
                    with self.env.cr.savepoint():
                        provider._mpesa_pull_failed(error)
                    self.env['payment.transaction']._mpesa_commit()
                except Exception:  # The database itself failed: the log above is all we can do.
                    _logger.warning("M-Pesa provider %s: the failed Pull could not be recorded.", provider.id,
                                    exc_info=True)

    def _mpesa_pull_failed(self, error):
        """A run that failed read nothing: its window stays, and the accountants are told (Daraja
        keeps 48 hours: a Pull that keeps failing loses what a lost confirmation left only there)."""
        self.ensure_one()
        self.mpesa_pull_cut_short = self.env._(
            "The Pull Transactions run of %(when)s failed (%(error)s).  The payments after %(until)s"
            " (Kenya time) are not read yet; the next run asks again.",
            when=_kenya_text(_aware(fields.Datetime.now())),
            error=str(error)[:200] or type(error).__name__,
            until=_kenya_text(_aware(self.mpesa_pull_synced_until)) if self.mpesa_pull_synced_until else '-',
        )
        self.env['muchiri.mpesa.alert'].sudo()._mpesa_raise_ledger_gaps(self)

    def _mpesa_pull(self, now=None):
        """Query the window since the last completed query (with overlap; at most Daraja's 48 h),
        page by page, and record every payment in the ledger (the ledger skips what it has).

        Each row is committed on its own (a crash loses nothing).  The window moves on only past
        what was read: to the end of the query when every page was read, to the last row read
        when Daraja cut the run short (a repeated page, too many pages), and not at all while a row
        failed.  A run cut short says so in an alert, until a run reads its whole window.  Rows
        that are not money in (a reversal, a settlement) are never booked: see
        `_mpesa_pull_note_outflow`.

        :return: the payments Safaricom listed, and how many were new to the ledger
        :rtype: tuple[int, int]
        """
        self.ensure_one()
        provider = self.sudo()
        now = now or fields.Datetime.now()
        start = now - daraja.PULL_WINDOW + PULL_CLOCK_MARGIN
        if provider.mpesa_pull_synced_until:
            start = max(start, provider.mpesa_pull_synced_until - PULL_OVERLAP)
        Ledger = self.env['muchiri.mpesa.ledger'].sudo()
        Transaction = self.env['payment.transaction']
        session = requests.Session()
        seen = new = failed = 0
        try:
            client = provider._mpesa_client(session=session)
            listing = client.pull_transactions(provider.mpesa_shortcode.strip(), _aware(start), _aware(now))
            for pulled in listing.payments:
                seen += 1
                try:
                    with self.env.cr.savepoint():
                        row, created = Ledger._mpesa_record_pull(provider, pulled)
                        new += created
                        row.transaction_ids._mpesa_post_process()
                except Exception:
                    failed += 1
                    _logger.warning("M-Pesa Pull row %s could not be recorded now.", pulled.transaction_id,
                                    exc_info=True)
                Transaction._mpesa_commit()
        finally:
            session.close()
        for pulled in listing.others:
            try:
                with self.env.cr.savepoint():
                    provider._mpesa_pull_note_outflow(pulled)
            except Exception:  # A note is no reason to hold the window back.
                _logger.warning("M-Pesa Pull row %s could not be noted.", pulled.transaction_id, exc_info=True)
        # Never past what was read, never backwards; a row that failed is asked for again: the
        # window stays until it lands.
        read_until = listing.read_until.astimezone(timezone.utc).replace(tzinfo=None)
        synced = provider.mpesa_pull_synced_until
        if not failed and (not synced or read_until > synced):
            provider.mpesa_pull_synced_until = read_until
        provider._mpesa_pull_set_cut_short(listing)
        self.env['muchiri.mpesa.alert'].sudo()._mpesa_raise_ledger_gaps(provider)
        Transaction._mpesa_commit()
        return seen, new

    def _mpesa_pull_set_cut_short(self, listing):
        """Say why a run (a daraja.PullListing) did not read its whole window, or clear it (and its
        alert) once one did."""
        self.ensure_one()
        if listing.complete:
            if self.mpesa_pull_cut_short:
                self.mpesa_pull_cut_short = False
                self.env['muchiri.mpesa.alert'].sudo().search([
                    ('key', '=', f'pull_cut_short:{self.id}'), ('state', '=', 'open'),
                ])._close(self.env._("A Pull Transactions run read its whole window."))
            return
        why = {
            daraja.PULL_CUT_REPEATED_PAGE: self.env._(
                "Daraja answered a page it had already sent (it ignored the offset asked)"),
            daraja.PULL_CUT_PAGE_LIMIT: self.env._("the run reached its limit of pages"),
        }.get(listing.cut_short, listing.cut_short)
        self.mpesa_pull_cut_short = self.env._(
            "The Pull Transactions run of %(when)s was cut short: %(why)s.  It read the payments up to"
            " %(until)s (Kenya time) only; the next run goes on from there.",
            when=_kenya_text(listing.end), why=why, until=_kenya_text(listing.read_until),
        )
        _logger.warning("M-Pesa provider %s: %s", self.id, self.mpesa_pull_cut_short)

    def _mpesa_pull_note_outflow(self, pulled):
        """A Pull row that is not money in (a daraja.PullTransaction: a reversal, a settlement, a type
        Daraja may add) is never booked in the ledger.  It stays in the exchange log; a reversal
        that one of Odoo's refunds holds (by its receipt) is noted, once, on the ledger row of the
        payment it reversed (else on that payment's documents)."""
        self.ensure_one()
        receipt = pulled.transaction_id.strip().upper()
        marker = self.env._("Pull Transactions lists %s", receipt)
        note = self.env._(
            "%(marker)s (%(type)s, %(amount)s, %(when)s Kenya time): money going out, never booked as a"
            " payment.", marker=marker, type=pulled.transaction_type or '-', amount=pulled.amount,
            when=_kenya_text(pulled.trx_date),
        )
        refund = self.env['payment.transaction'].sudo().search([
            ('mpesa_receipt_number', '=', receipt), ('operation', '=', 'refund'),
        ], limit=1)
        if not refund:
            _logger.info("M-Pesa provider %s: %s  No refund in Odoo holds it.", self.id, note)
            return
        payment = refund.source_transaction_id
        for record in payment.mpesa_ledger_id or payment._mpesa_documents():
            if not self.env['mail.message'].sudo().search_count([
                ('model', '=', record._name), ('res_id', '=', record.id), ('body', 'ilike', marker),
            ], limit=1):
                record.message_post(body=self.env._("%(note)s  It reverses %(payment)s (refund %(refund)s).",
                                                    note=note, payment=payment.mpesa_receipt_number or '-',
                                                    refund=refund.reference))


def _kenya_text(moment):
    """An aware datetime as Kenya's wall-clock time, to the second."""
    return moment.astimezone(daraja.KENYA_TZ).strftime('%Y-%m-%d %H:%M:%S')


def _aware(value):
    """An Odoo datetime (naive UTC) as the aware datetime the Daraja layer takes."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def _notification(message, kind):
    return {
        'type': 'ir.actions.client',
        'tag': 'display_notification',
        'params': {'type': kind, 'message': message, 'sticky': kind != 'success',
                   'next': {'type': 'ir.actions.client', 'tag': 'soft_reload'}},
    }

