# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""The M-Pesa provider: its Daraja credentials and callbacks, what keeps it from being offered,
where its money lands in the books, its initiator (docs/design.md, 8. Reversal and Transaction
Status), the money paid to the shortcode from the phone's menu (C2B) with Safaricom's own list of it
(Pull Transactions), and the thresholds of its alerts."""
import base64
import binascii
import hmac
import ipaddress
import logging
import secrets
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from urllib.parse import urlsplit

import requests
from markupsafe import Markup

from odoo import api, fields, models
from odoo.exceptions import AccessError, UserError, ValidationError
from odoo.tools.misc import formatLang

from odoo.addons.payment import utils as payment_utils

from .. import const, daraja
from ..demo import mpesa_demo
from ..utils import as_pem, aware, commit, kenya_text, reference_key, strong, strong_amount
from .mpesa_token import DatabaseTokenStore

_logger = logging.getLogger(__name__)

# Hosts of tunnelling services: Safaricom refuses them as production callback URLs.
TUNNEL_HOST_SUFFIXES = (
    'ngrok.io', 'ngrok-free.app', 'ngrok.app', 'trycloudflare.com', 'loca.lt', 'serveo.net',
    'localhost.run',
)

# Daraja refuses URLs holding these words (docs/design.md, 6. URLs and callback sources), in any case.
DARAJA_BANNED_URL_WORDS = ('mpesa', 'm-pesa', 'safaricom', 'exe', 'exec', 'cmd', 'sql', 'query')

JOURNAL_CODE = 'MPESA'
JOURNAL_SEQUENCE = 90

INITIATOR_FIELDS = {'mpesa_initiator_name', 'mpesa_initiator_password', 'mpesa_initiator_certificate',
                    'mpesa_initiator_certificate_file'}

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

    code = fields.Selection(
        selection_add=[('mpesa', "M-Pesa")], ondelete={'mpesa': 'set default'}
    )

    # === CREDENTIALS (system administrators only) === #
    mpesa_consumer_key = fields.Char(
        string="Consumer Key", required_if_provider='mpesa', groups='base.group_system', copy=False,
        help="On the Daraja portal (developer.safaricom.co.ke), under My Apps: the app that has Lipa"
             " Na M-Pesa Online (M-Pesa Express).  The sandbox app's in test mode, the production"
             " app's (after Go Live) once enabled.",
    )
    mpesa_consumer_secret = fields.Char(
        string="Consumer Secret", required_if_provider='mpesa', groups='base.group_system',
        copy=False,
        help="Next to the consumer key: on the Daraja portal (developer.safaricom.co.ke), under My"
             " Apps, the app that has Lipa Na M-Pesa Online.",
    )
    mpesa_passkey = fields.Char(
        string="Passkey", required_if_provider='mpesa', groups='base.group_system', copy=False,
        help="Sandbox: on the Lipa Na M-Pesa Online test credentials of the Daraja portal"
             " (developer.safaricom.co.ke, APIs > M-Pesa Express simulator).  Production: in the"
             " e-mail Safaricom sends after Go Live.",
    )
    mpesa_shortcode = fields.Char(
        string="Business Shortcode", required_if_provider='mpesa', groups='base.group_system',
        help="The paybill number, or the store number of a till.  Sandbox: 174379, on the Lipa Na"
             " M-Pesa Online test credentials (developer.safaricom.co.ke, APIs > M-Pesa Express"
             " simulator).",
    )
    mpesa_shortcode_type = fields.Selection(
        string="Shortcode Type", selection=const.SHORTCODE_TYPES, default='paybill',
        required_if_provider='mpesa', groups='base.group_system',
        help="Paybill: customers pay to the shortcode.  Buy Goods: the shortcode is the store number"
             " and the money goes to the till below.  The sandbox shortcode 174379 is a paybill.",
    )
    mpesa_till_number = fields.Char(
        string="Till Number", groups='base.group_system',
        help="For Buy Goods: the till that receives the money (PartyB).",
    )
    mpesa_api_url = fields.Char(
        string="API URL", groups='base.group_system',
        help="Leave empty to use Safaricom's sandbox in test mode and production when enabled. Set it"
             " to a local Daraja simulator (e.g. http://127.0.0.1:8089) to work offline.",
    )

    # === CALLBACKS AND PROMPTS === #
    mpesa_callback_base_url = fields.Char(
        string="Callback Base URL", groups='base.group_system',
        help="Where Safaricom reaches this Odoo; the web base URL when empty.  Production needs a"
             " public HTTPS address.",
    )
    mpesa_callback_secret = fields.Char(
        string="Callback Secret", groups='base.group_system', copy=False,
        default=lambda self: _new_callback_secret(),
        help="Part of the callback URL: a callback to any other path is refused.",
    )
    mpesa_ip_check = fields.Selection(
        string="Callback Source Check", selection=const.IP_CHECK_MODES, default='log',
        groups='base.group_system',
    )
    mpesa_allowed_ips = fields.Text(
        string="Allowed Callback Addresses", groups='base.group_system',
        default=lambda self: '\n'.join(const.SAFARICOM_CALLBACK_IPS),
        help="One address or network per line.",
    )
    mpesa_confirm_by_query = fields.Boolean(
        string="Confirm Callbacks by STK Query", default=True, groups='base.group_system',
        help="Daraja does not sign its callbacks: ask Daraja itself before a payment is marked done."
             "  Always on for an enabled provider; it can be switched off in test mode only.",
    )
    mpesa_push_cooldown = fields.Integer(
        string="Prompt Cooldown (s)", default=const.DEFAULT_PUSH_COOLDOWN,
        groups='base.group_system',
        help="While a prompt sent for an order is younger than this, another one is refused.",
    )
    mpesa_prompt_max_amount = fields.Integer(
        string="Maximum per Prompt (KES)", default=daraja.DEFAULT_MAX_AMOUNT,
        help="The most one M-Pesa prompt asks for; a larger order or invoice is paid in several"
             " prompts, each approved on the phone.  Daraja takes up to 250,000 in one payment."
             "  Lower it when your distributors' M-Pesa accounts have lower daily or balance"
             " limits: a prompt above what their account may pay fails, smaller ones go through."
             "  (Odoo's Maximum Amount, on the Configuration tab, hides M-Pesa for larger orders.)",
    )
    mpesa_reconcile_cutoff_hours = fields.Integer(
        string="Give Up After (hours)", default=const.DEFAULT_RECONCILE_CUTOFF_HOURS,
        groups='base.group_system',
        help="A prompt that neither a callback nor a query settles by then ends in error; a later"
             " success still confirms it.",
    )
    mpesa_distributors_only = fields.Boolean(
        string="Distributors Only", default=True,
        help="Offer M-Pesa only to customers marked as distributors.",
    )

    # === SET-UP WARNINGS: WHAT KEEPS M-PESA FROM BEING OFFERED === #
    mpesa_setup_warnings = fields.Html(
        string="M-Pesa Set-up Warnings", compute='_compute_mpesa_setup_warnings', sanitize=False,
        help="What is missing for M-Pesa to be offered to customers.",
    )
    mpesa_setup_needs_kes_pricelist = fields.Boolean(compute='_compute_mpesa_setup_warnings')

    # === ACCOUNTING === #
    mpesa_cash_rounding_id = fields.Many2one(
        'account.cash.rounding', string="Whole-Shilling Rounding",
        help="M-Pesa takes whole shillings, rounded up: the invoices of orders it pays get this cash"
             " rounding, so that the invoice total is what the phone was asked and nothing stays open.",
    )
    mpesa_bank_fees_account_id = fields.Many2one(
        'account.account', string="M-Pesa Charges Account", check_company=True,
        domain="[('account_type', 'in', ('expense', 'expense_direct_cost'))]",
        help="Where the M-Pesa statement's charges (Pay Bill Charge and the like) are booked.  Empty: the bank"
             " fees account of the company's chart of accounts.",
    )
    # The last balance check of an imported M-Pesa statement (models/mpesa_statement.py): the
    # journal's balance at the statement's last row against the statement's own Balance.
    mpesa_statement_checked_at = fields.Datetime(
        string="Statement Checked On", readonly=True, copy=False,
        help="The time (of the statement's last row) of the last balance check.",
    )
    mpesa_statement_balance = fields.Float(
        string="Balance per M-Pesa", digits=(16, 2), readonly=True, copy=False,
        help="The Balance column of the last imported statement's last row.",
    )
    mpesa_statement_journal_balance = fields.Float(
        string="Balance per Odoo", digits=(16, 2), readonly=True, copy=False,
        help="The M-Pesa journal's balance at that row's time.",
    )
    mpesa_statement_difference = fields.Float(
        string="Statement Difference", digits=(16, 2), readonly=True, copy=False,
        help="Balance per M-Pesa minus balance per Odoo, at the last balance check: zero when they agree.",
    )
    mpesa_statement_check_note = fields.Text(
        string="Statement Check", readonly=True, copy=False, help="What the last balance check found.",
    )
    mpesa_invoice_on_payment = fields.Boolean(
        string="Invoice on Payment", groups='base.group_system',
        help="An order this provider's M-Pesa payment pays is invoiced, the invoice posted and"
             " reconciled with the payment, even for products invoiced on delivered quantities. Other"
             " providers' payments are left as they are: Odoo's own Automatic Invoice (Sales > Settings)"
             " does this for every provider, M-Pesa included.",
    )
    mpesa_automatic_invoice = fields.Boolean(
        string="Odoo's Automatic Invoice", compute='_compute_mpesa_automatic_invoice',
        groups='base.group_system',
    )

    # === INITIATOR (system administrators only) === #
    mpesa_initiator_name = fields.Char(
        string="Initiator Name", groups='base.group_system', copy=False,
        help="A web operator of the shortcode with the API role (M-Pesa org portal, Operators)."
             "  Sandbox: the initiator of the Daraja portal's test credentials.",
    )
    mpesa_initiator_password = fields.Char(
        string="Initiator Password", groups='base.group_system', copy=False,
        help="That operator's password.  It is sent encrypted with Safaricom's certificate, never"
             " logged, and cleared on copies of the database.",
    )
    mpesa_initiator_certificate = fields.Text(
        string="Safaricom Certificate", groups='base.group_system', copy=False,
        help="Safaricom's public certificate (PEM) of the environment: the sandbox one in test"
             " mode, the production one when enabled (Daraja portal, APIs > Security Credentials).",
    )
    mpesa_initiator_certificate_file = fields.Binary(
        string="Upload Certificate", groups='base.group_system', store=False,
        compute='_compute_mpesa_initiator_certificate_file',
        inverse='_inverse_mpesa_initiator_certificate_file',
        help="Upload the .cer file Safaricom gives, instead of pasting it.",
    )
    mpesa_initiator_certificate_filename = fields.Char(groups='base.group_system', store=False,
                                                        compute='_compute_mpesa_initiator_certificate_file')
    mpesa_initiator_certificate_info = fields.Char(
        string="Certificate", compute='_compute_mpesa_initiator_certificate_info', groups='base.group_system',
    )

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

    # === MONITORING (see muchiri.mpesa.alert) === #
    mpesa_alert_group_id = fields.Many2one(
        'res.groups', string="Alert Recipients", ondelete='set null',
        default=lambda self: self.env.ref('account.group_account_manager', raise_if_not_found=False),
        help="Each user of this group gets an activity when an M-Pesa alert is raised. Empty: alerts"
             " are only listed under M-Pesa Alerts.",
    )
    mpesa_alert_window = fields.Integer(
        string="Success Rate Window (min)", default=60,
        help="The success rate is measured over the payments settled in this many last minutes.",
    )
    mpesa_alert_min_rate = fields.Float(
        string="Minimum Success Rate (%)", default=90.0,
        help="Below this success rate, an alert is raised.",
    )
    mpesa_alert_min_sample = fields.Integer(
        string="Minimum Sample", default=10,
        help="The success rate alert needs at least this many settled payments in the window.",
    )
    mpesa_alert_pending_delay = fields.Integer(
        string="Callback Alert Delay (s)", default=60,
        help="Payments still pending without any callback this many seconds after their prompt are"
             " reported, together, in one alert.",
    )
    mpesa_alert_order_failures = fields.Integer(
        string="Failures per Order", default=3,
        help="An order with this many failed M-Pesa payments in the look-back raises an alert.",
    )
    mpesa_alert_order_window = fields.Integer(
        string="Failures Look-back (h)", default=24,
    )
    mpesa_alert_quiet_period = fields.Integer(
        string="Alert Quiet Period (min)", default=60,
        help="Users are notified of the same alert at most once in this many minutes.",
    )

    # === COMPUTE METHODS === #

    def _compute_feature_support_fields(self):
        """Override of `payment`: a Reversal gives back a whole M-Pesa payment, never part of it."""
        res = super()._compute_feature_support_fields()
        self.filtered(lambda p: p.code == 'mpesa').support_refund = 'full_only'
        return res

    @api.depends('code', 'company_id', 'mpesa_distributors_only', 'available_country_ids')
    def _compute_mpesa_setup_warnings(self):
        # Not stored: currencies, pricelists and contacts change elsewhere; each read looks again.
        for provider in self:
            warnings, needs_pricelist = [], False
            if provider.code == 'mpesa':
                warnings, needs_pricelist = provider._mpesa_setup_problems()
            provider.mpesa_setup_warnings = Markup('<ul class="mb-0">%s</ul>') % Markup().join(
                Markup('<li>%s</li>') % warning for warning in warnings
            ) if warnings else False
            provider.mpesa_setup_needs_kes_pricelist = needs_pricelist

    def _compute_mpesa_automatic_invoice(self):
        enabled = self.env['payment.transaction']._mpesa_automatic_invoice_enabled()
        for provider in self:
            provider.mpesa_automatic_invoice = enabled

    def _compute_mpesa_initiator_certificate_file(self):
        for provider in self:
            provider.mpesa_initiator_certificate_file = False
            provider.mpesa_initiator_certificate_filename = False

    def _inverse_mpesa_initiator_certificate_file(self):
        for provider in self.filtered('mpesa_initiator_certificate_file'):
            try:
                content = base64.b64decode(provider.mpesa_initiator_certificate_file)
            except (binascii.Error, ValueError) as error:
                raise ValidationError(self.env._("The uploaded certificate cannot be read.")) from error
            provider.mpesa_initiator_certificate = as_pem(content)

    @api.depends('mpesa_initiator_certificate')
    def _compute_mpesa_initiator_certificate_info(self):
        for provider in self:
            summary = provider._mpesa_certificate_summary()
            provider.mpesa_initiator_certificate_info = summary and self.env._(
                "%(subject)s, valid until %(date)s", subject=summary.subject,
                date=summary.not_after.strftime('%Y-%m-%d'),
            )

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

    # === CONSTRAINT METHODS === #

    @api.constrains('state', 'code', 'mpesa_callback_base_url')
    def _check_mpesa_production_callback_url(self):
        for provider in self.filtered(lambda p: p.code == 'mpesa' and p.state == 'enabled'):
            url = provider._mpesa_callback_base_url()
            parts = urlsplit(url)
            host = (parts.hostname or '').lower()
            if parts.scheme != 'https':
                raise ValidationError(self.env._(
                    "M-Pesa production needs a public HTTPS callback URL; %(url)s is not one.",
                    url=url,
                ))
            if host.endswith(TUNNEL_HOST_SUFFIXES) or host == 'localhost' or _is_private(host):
                raise ValidationError(self.env._(
                    "Safaricom refuses tunnels and private addresses as production callback URLs"
                    " (%(host)s).", host=host,
                ))

    @api.constrains('state', 'code', 'mpesa_api_url')
    def _check_mpesa_production_api_url(self):
        """An API URL that the provider would not talk to is refused, not ignored: an enabled
        provider talks to Safaricom (`_mpesa_api_base_url`), and a simulator would confirm orders
        without money."""
        for provider in self.filtered(lambda p: p.code == 'mpesa'):
            url = (provider.sudo().mpesa_api_url or '').rstrip('/')
            if url and url != provider._mpesa_api_base_url():
                raise ValidationError(self.env._(
                    "An enabled M-Pesa provider talks to Safaricom's production API (%(prod)s), not"
                    " to %(url)s: use test mode for the sandbox or a simulator.",
                    prod=provider._mpesa_api_base_url(), url=url,
                ))

    @api.constrains('mpesa_prompt_max_amount')
    def _check_mpesa_prompt_max_amount(self):
        for provider in self.filtered(lambda p: p.code == 'mpesa'):
            if not daraja.MIN_AMOUNT <= provider.mpesa_prompt_max_amount <= daraja.DARAJA_MAX_AMOUNT:
                currency = self.env.ref('base.KES', raise_if_not_found=False) or provider.main_currency_id
                raise ValidationError(self.env._(
                    "The maximum of one M-Pesa prompt must be from %(minimum)s to %(maximum)s, the"
                    " limit of Daraja for one payment.",
                    minimum=formatLang(self.env, daraja.MIN_AMOUNT, currency_obj=currency),
                    maximum=formatLang(self.env, daraja.DARAJA_MAX_AMOUNT, currency_obj=currency),
                ))

    @api.constrains('mpesa_allowed_ips')
    def _check_mpesa_allowed_ips(self):
        for provider in self:
            provider._mpesa_allowed_networks()  # Raises on a bad line.

    @api.constrains('mpesa_shortcode', 'mpesa_shortcode_type', 'mpesa_till_number')
    def _check_mpesa_shortcode(self):
        # Checked once the passkey is there too (a duplicated provider has none yet).
        for provider in self.filtered(lambda p: p.code == 'mpesa' and p.mpesa_shortcode and p.mpesa_passkey):
            try:
                provider._mpesa_shortcode_config()
            except daraja.DarajaValidationError as error:
                raise ValidationError(str(error)) from error

    @api.constrains('state', 'code', 'company_id', 'mpesa_shortcode', 'mpesa_till_number', 'mpesa_api_url')
    def _check_mpesa_shortcode_company(self):
        """One shortcode, one company, in each M-Pesa (production, the sandbox, a simulator).

        A receipt is one payment: one transaction holds it, whatever its company (a global unique
        index), and Pull Transactions lists the shortcode's payments to every provider that asks.  Two
        companies on one shortcode would see the same money twice: the second one's ledger rows
        could never be booked, and its Pull window would never move.  Scoping the receipt to the
        company would book the same money in both.  So the set-up is refused.
        """
        for provider in self.sudo().filtered(lambda p: p.code == 'mpesa' and p.state != 'disabled'):
            shortcodes = provider._mpesa_c2b_shortcodes()
            if not shortcodes:
                continue
            others = self.sudo().search([
                ('code', '=', 'mpesa'), ('state', '!=', 'disabled'), ('id', '!=', provider.id),
                ('company_id', '!=', provider.company_id.id),
            ])
            for other in others:
                shared = shortcodes & other._mpesa_c2b_shortcodes()
                if shared and other._mpesa_api_base_url() == provider._mpesa_api_base_url():
                    raise ValidationError(self.env._(
                        "Shortcode %(shortcode)s is already used by %(other)s, the M-Pesa provider of"
                        " %(company)s.  The payments of a shortcode belong to one company: use another"
                        " shortcode, or disable the other provider first.",
                        shortcode=', '.join(sorted(shared)), other=other.name, company=other.company_id.name,
                    ))

    @api.constrains('mpesa_initiator_certificate')
    def _check_mpesa_initiator_certificate(self):
        """Checked when saved: a bad certificate would fail only at the first refund."""
        for provider in self.filtered(lambda p: p.sudo().mpesa_initiator_certificate):
            try:
                daraja.certificate_summary(provider.sudo().mpesa_initiator_certificate)
            except daraja.InvalidConfiguration as error:
                raise ValidationError(self.env._(
                    "This is not a usable Safaricom certificate: %s", error,
                )) from error

    @api.constrains(
        'mpesa_alert_window', 'mpesa_alert_min_rate', 'mpesa_alert_min_sample',
        'mpesa_alert_pending_delay', 'mpesa_alert_order_failures', 'mpesa_alert_order_window',
        'mpesa_alert_quiet_period',
    )
    def _check_mpesa_alert_settings(self):
        for provider in self.filtered(lambda p: p.code == 'mpesa'):
            if not 0 <= provider.mpesa_alert_min_rate <= 100:
                raise ValidationError(self.env._("The minimum success rate is a percentage, 0 to 100."))
            if min(provider.mpesa_alert_window, provider.mpesa_alert_min_sample,
                   provider.mpesa_alert_order_failures, provider.mpesa_alert_order_window) < 1:
                raise ValidationError(self.env._(
                    "The alert window, minimum sample, failures per order and look-back must be"
                    " at least 1."
                ))
            if provider.mpesa_alert_pending_delay < 0 or provider.mpesa_alert_quiet_period < 0:
                raise ValidationError(self.env._("Alert delays cannot be negative."))

    # === CRUD METHODS === #

    @api.model_create_multi
    def create(self, vals_list):
        """Override of `payment` to give a new M-Pesa provider (another company's) its journal."""
        providers = super().create(vals_list)
        providers.filtered(lambda p: p.code == const.PROVIDER_CODE)._mpesa_setup_accounting()
        return providers

    def write(self, vals):
        """Override of `payment`: receipts that wait for the initiator are asked about once it is set."""
        res = super().write(vals)
        if INITIATOR_FIELDS & set(vals):
            self._mpesa_recheck_unverified_receipts()
        return res

    # === ACTION METHODS === #

    def action_mpesa_test_connection(self):
        """Fetch a token and tell the administrator in plain words what is wrong, if anything; then
        say whether refunds and receipt proofs can work (the initiator)."""
        self.ensure_one()
        self._mpesa_check_group('base.group_system')
        client = self._mpesa_client()
        try:
            # Through the shared store: a token fetched aside could invalidate the workers' one.
            client.access_token(stale=client.token_store.load(client.credentials.cache_key))
        except daraja.DarajaAuthError as error:
            # Daraja's own words once (the client's message would repeat ours).
            said = ': '.join(part for part in (error.error_code, error.error_message) if part)
            said = f", {said}" if said else ''  # Outside _(): Odoo's term extraction cannot read f-strings.
            raise UserError(self.env._(
                "Daraja at %(url)s refused this consumer key and secret (HTTP %(status)s%(said)s)."
                "  Copy them again from My Apps on developer.safaricom.co.ke, from the app that has"
                " Lipa Na M-Pesa Online: the sandbox app's in test mode, the production app's when"
                " enabled.",
                url=self._mpesa_api_base_url(), status=error.http_status,
                said=said,
            )) from error
        except daraja.DarajaConnectionError as error:
            raise UserError(self.env._(
                "Daraja could not be reached at %(url)s.  Check the API URL (M-Pesa: advanced tab)"
                " and that this server can reach it.",
                url=self._mpesa_api_base_url(),
            )) from error
        except daraja.DarajaError as error:
            raise UserError(self.env._("Daraja answered with an error: %s", error)) from error
        connected = self.env._("Connected to Daraja at %s: the credentials work.", self._mpesa_api_base_url())
        kind = 'success'
        missing = self._mpesa_initiator_missing()
        summary = not missing and self._mpesa_certificate_summary()
        if missing:  # Optional: the consumer key works, and payments too.
            message = self.env._(
                "%(message)s  Refunds and receipt checks are off: set %(missing)s (M-Pesa: initiator).",
                message=connected, missing=', '.join(missing),
            )
        elif summary and aware(summary.not_after) < datetime.now(timezone.utc):
            kind = 'warning'
            message = self.env._(
                "%(message)s  Safaricom's certificate expired on %(date)s: upload the current one.",
                message=connected, date=summary.not_after.strftime('%Y-%m-%d'),
            )
        else:
            self._mpesa_initiator()  # Raises if the password cannot be encrypted with the certificate.
            message = self.env._(
                "%(message)s  The initiator %(name)s is set up: its certificate (%(certificate)s) is"
                " valid and encrypts its password.  Not checked: the initiator's name and password,"
                " which Daraja checks only at the first refund or receipt check (result 2001 then"
                " means they are wrong).",
                message=connected, name=self.sudo().mpesa_initiator_name,
                certificate=self.sudo().mpesa_initiator_certificate_info,
            )
        return _notification(message, kind, sticky=False, next_action={'type': 'ir.actions.act_window_close'})

    def action_mpesa_regenerate_callback_secret(self):
        self.ensure_one()
        self._mpesa_check_group('base.group_system')
        self.sudo().mpesa_callback_secret = _new_callback_secret()

    def action_mpesa_create_kes_pricelist(self):
        """Activate KES and create a KES pricelist for the provider's company, in one click."""
        self._mpesa_check_group('base.group_system')
        self.ensure_one()
        kes = self.env.ref('base.KES')
        if not kes.active:
            kes.active = True
        company = self.company_id or self.env.company
        pricelist = self.env['product.pricelist'].search([
            ('currency_id', '=', kes.id), ('company_id', 'in', [company.id, False]),
        ], limit=1) or self.env['product.pricelist'].create({
            'name': self.env._("Kenyan Shilling (KES)"), 'currency_id': kes.id, 'company_id': company.id,
        })
        return _notification(self.env._(
            "KES is active and the pricelist %(pricelist)s is ready: set it on your distributors"
            " (contact form, Sales & Purchase tab) so that their quotations are in KES.",
            pricelist=pricelist.display_name,
        ), 'success')

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

    # === BUSINESS METHODS - PAYMENT FLOW === #

    def _get_supported_currencies(self):
        supported_currencies = super()._get_supported_currencies()
        if self.code == 'mpesa':
            supported_currencies = supported_currencies.filtered(
                lambda c: c.name in const.SUPPORTED_CURRENCIES
            )
        return supported_currencies

    def _get_default_payment_method_codes(self):
        default_codes = super()._get_default_payment_method_codes()
        if self.code != 'mpesa':
            return default_codes
        return const.DEFAULT_PAYMENT_METHOD_CODES

    @api.model
    def _get_compatible_providers(self, *args, is_validation=False, report=None, **kwargs):
        """M-Pesa pays orders of distributors; it cannot save a payment method (validation)."""
        providers = super()._get_compatible_providers(
            *args, is_validation=is_validation, report=report, **kwargs
        )
        partner_id = kwargs.get('partner_id', args[1] if len(args) > 1 else None)
        partner = self.env['res.partner'].browse(partner_id).exists()
        for provider in providers.filtered(lambda p: p.code == 'mpesa'):
            reason = self.env._("M-Pesa cannot save a payment method") if is_validation \
                else provider._mpesa_unavailability_reason(partner)
            if reason:
                providers -= provider
                payment_utils.add_to_report(report, provider, available=False, reason=reason)
        return providers

    def _mpesa_unavailability_reason(self, partner, currency=None):
        """Why this provider cannot take a payment of `partner` (in `currency`, when known), or
        None when it can: the one place for the KES-only and distributors-only rules."""
        self.ensure_one()
        if currency and currency.name not in const.SUPPORTED_CURRENCIES:
            return self.env._("M-Pesa takes payments in Kenyan shillings (KES) only.")
        if self.mpesa_distributors_only and not (partner and partner._mpesa_is_distributor()):
            return self.env._("M-Pesa is offered to distributors only.")
        return None

    def _mpesa_confirms_callbacks(self):
        """Whether a callback waits for Daraja's own confirmation (STK Query) before it counts.
        Always outside test mode (a disabled provider too): an unsigned callback never decides a
        real payment."""
        self.ensure_one()
        return self.state != 'test' or self.sudo().mpesa_confirm_by_query

    @api.model
    def _mpesa_find_by_secret(self, secret):
        """The M-Pesa provider (sudo) whose callback secret is `secret`, enabled or not: a disabled
        provider's prompts still get their answers.  Compared in constant time, as bytes, so that
        any text in the path is just a wrong secret.

        One narrow query (the secret and what the source check reads), not every column: every
        inbound body pays for it (docs/design.md, 6. URLs and callback sources)."""
        given = (secret or '').encode('utf-8', errors='surrogateescape')
        providers = self.sudo().with_context(active_test=False).search_fetch(
            [('code', '=', 'mpesa')], ['mpesa_callback_secret', 'mpesa_ip_check', 'mpesa_allowed_ips'],
        )
        for provider in providers:
            expected = (provider.mpesa_callback_secret or '').encode()
            if expected and hmac.compare_digest(expected, given):
                return provider
        return providers.browse()

    def _mpesa_check_group(self, group_xmlid):
        """Buttons are public methods: anyone logged in can call them over RPC, so each checks its
        group on the server (a view's groups= hides, it protects nothing)."""
        if not (self.env.su or self.env.user.has_group(group_xmlid)):
            raise AccessError(self.env._("You are not allowed to do this with M-Pesa."))

    # === BUSINESS METHODS - DARAJA === #

    def _mpesa_api_base_url(self, transaction=None):
        """The Daraja this provider talks to, decided here only: Safaricom's production API once
        enabled, whatever the API URL field or `transaction` remembers.  Otherwise where
        `transaction`'s prompt went, else the API URL, else the sandbox in test mode.  A disabled
        provider that was live still reaches production, where its last prompts get their answers.

        :param payment.transaction transaction: the transaction a request is about, if any
        """
        self.ensure_one()
        if self.state == 'enabled':
            return daraja.PRODUCTION_URL
        remembered = transaction and transaction._mpesa_remembered_api_url()
        if remembered:
            return remembered
        if self.sudo().mpesa_api_url:
            return self.sudo().mpesa_api_url.rstrip('/')
        return daraja.SANDBOX_URL if self.state == 'test' else daraja.PRODUCTION_URL

    def _mpesa_callback_base_url(self):
        self.ensure_one()
        return (self.sudo().mpesa_callback_base_url or self.get_base_url()).rstrip('/')

    def _mpesa_daraja_url(self, name):
        """The URL Daraja must call to tell us `name` (a key of const.LNM_ROUTES): under the neutral
        prefix Daraja accepts, with the secret path that names and authenticates this provider."""
        self.ensure_one()
        path = const.LNM_ROUTES[name].replace('<string:secret>', self.sudo().mpesa_callback_secret or '')
        return f"{self._mpesa_callback_base_url()}{path}"

    def _mpesa_callback_url(self):
        """The URL given to Daraja as the STK Push's CallBackURL."""
        return self._mpesa_daraja_url('stk')

    def _mpesa_shortcode_config(self):
        self.ensure_one()
        provider = self.sudo()
        return daraja.ShortcodeConfig(
            business_shortcode=(provider.mpesa_shortcode or '').strip(),
            passkey=provider.mpesa_passkey or '',
            transaction_type=daraja.TILL if provider.mpesa_shortcode_type == 'till' else daraja.PAYBILL,
            till_number=(provider.mpesa_till_number or '').strip() or None
            if provider.mpesa_shortcode_type == 'till' else None,
        )

    def _mpesa_check_amount(self, amount, currency):
        """The whole shillings the phone will be asked for `amount`, or a ValidationError saying, in
        Odoo's monetary format, why M-Pesa cannot take it."""
        self.ensure_one()
        maximum = self._mpesa_max_amount()
        try:
            # Rounded to the currency first: float noise must not round up a whole shilling.
            return daraja.check_amount(Decimal(str(currency.round(amount))), maximum)
        except daraja.DarajaValidationError as error:
            shillings = daraja.to_whole_shillings(Decimal(str(currency.round(amount))))
            if shillings < daraja.MIN_AMOUNT:
                raise ValidationError(self.env._(
                    "%(amount)s is below the %(minimum)s minimum for an M-Pesa payment.",
                    amount=formatLang(self.env, shillings, currency_obj=currency),
                    minimum=formatLang(self.env, daraja.MIN_AMOUNT, currency_obj=currency),
                )) from error
            if shillings > maximum:
                raise ValidationError(self.env._(
                    "%(amount)s is above the %(maximum)s limit for one M-Pesa payment.",
                    amount=formatLang(self.env, shillings, currency_obj=currency),
                    maximum=formatLang(self.env, maximum, currency_obj=currency),
                )) from error
            raise ValidationError(str(error)) from error

    def _mpesa_max_amount(self):
        """The most one prompt asks for: the provider's own maximum, within what Daraja accepts
        for one payment.  Odoo's `maximum_amount` keeps its meaning (it hides the provider for
        larger amounts); an amount above this one is paid in instalments."""
        self.ensure_one()
        maximum = self.mpesa_prompt_max_amount or daraja.DEFAULT_MAX_AMOUNT
        return max(daraja.MIN_AMOUNT, min(maximum, daraja.DARAJA_MAX_AMOUNT))

    def _mpesa_instalment_amount(self, due, currency):
        """What the next prompt asks of `due`: all of it when one prompt may take it, else the
        largest prompt allowed (the rest is asked by the next ones)."""
        self.ensure_one()
        return min(currency.round(due), self._mpesa_max_amount())

    def _mpesa_amount_limits(self, amount, currency):
        """The M-Pesa limits the payment form says before Pay for `amount`: whether it is below
        M-Pesa's minimum, and how many prompts it takes (each at most the provider's maximum, the
        first one asking `first`).

        :rtype: dict
        """
        self.ensure_one()
        shillings = daraja.to_whole_shillings(Decimal(str(currency.round(max(amount or 0.0, 0.0)))))
        maximum = self._mpesa_max_amount()
        return {
            'minimum': daraja.MIN_AMOUNT,
            'below_minimum': shillings < daraja.MIN_AMOUNT,
            'maximum': maximum,
            'prompts': max(1, -(-shillings // maximum)),
            'first': min(shillings, maximum),
        }

    def _mpesa_amount_notes(self, amount, currency):
        """What the payment form says before Pay for `amount`, whole sentences in the reader's
        language (the amounts inside, in bold): the whole shillings the phone will ask, M-Pesa's
        minimum, or the instalments it takes (docs/design.md, 5. Money rules).

        :return: {'whole_shillings', 'below_minimum', 'instalments'}: Markup each, or None when
                 there is nothing to say
        :rtype: dict
        """
        self.ensure_one()
        notes = dict.fromkeys(('whole_shillings', 'below_minimum', 'instalments'))
        whole = amount and currency and -(-amount // 1)  # M-Pesa takes whole shillings, rounded up.
        if not whole:
            return notes
        if currency.compare_amounts(whole, amount):
            notes['whole_shillings'] = self.env._(
                "M-Pesa takes whole shillings: the prompt will ask %(amount)s.",
                amount=strong_amount(self.env, whole, currency),
            )
        limits = self._mpesa_amount_limits(amount, currency)
        if limits['below_minimum']:
            notes['below_minimum'] = self.env._(
                "M-Pesa takes at least %(minimum)s in one payment.",
                minimum=strong_amount(self.env, limits['minimum'], currency),
            )
        elif limits['prompts'] > 1:
            notes['instalments'] = self.env._(
                "%(amount)s will be asked in %(prompts)s prompts of at most %(maximum)s: approve each"
                " one as it comes. This payment asks the first, %(first)s; then come back here for the"
                " next one.",
                amount=strong_amount(self.env, whole, currency),
                prompts=strong(limits['prompts']),
                maximum=strong_amount(self.env, limits['maximum'], currency),
                first=strong_amount(self.env, limits['first'], currency),
            )
        return notes

    def _mpesa_client(self, transaction=None, session=None):
        """A Daraja client whose token is shared through the database and whose every HTTP exchange
        lands in the audit log (linked to `transaction` when given).

        The one place that decides where a request goes.  An enabled provider talks to Safaricom's
        production API only, with its production credentials, whatever a transaction remembers: a
        transaction taken in test mode is refused here, before anything leaves (its old host, a
        sandbox or a developer's simulator, must never see the production key, secret or
        SecurityCredential, and production does not know its receipt).  In test mode, and once
        disabled, a transaction's request goes where its prompt went.

        :param payment.transaction transaction: the transaction the requests are about, if any
        :param requests.Session session: reuse its connections (the cron's many queries)
        :raise UserError: when the credentials are missing, or `transaction` was taken in test mode
                          and the provider is now enabled (saying so)
        """
        self.ensure_one()
        provider = self.sudo()
        if not (provider.mpesa_consumer_key and provider.mpesa_consumer_secret):
            raise UserError(self.env._("Set the M-Pesa consumer key and secret on %s first.", self.name))
        reason = transaction and transaction._mpesa_test_mode_reason()
        if reason:
            raise UserError(reason)
        return daraja.DarajaClient(
            daraja.DarajaCredentials(
                consumer_key=provider.mpesa_consumer_key.strip(),
                consumer_secret=provider.mpesa_consumer_secret.strip(),
                base_url=self._mpesa_api_base_url(transaction),
            ),
            self._mpesa_shortcode_config(),
            session=session,
            token_store=DatabaseTokenStore(self.env),
            max_amount=self._mpesa_max_amount(),
            observer=lambda exchange: self.env['muchiri.mpesa.event']._record_exchange(
                provider, exchange, transaction
            ),
        )

    # === BUSINESS METHODS - CALLBACK SOURCE === #

    def _mpesa_allowed_networks(self):
        self.ensure_one()
        networks = []
        for line in (self.sudo().mpesa_allowed_ips or '').splitlines():
            line = line.split('#')[0].strip()
            if not line:
                continue
            try:
                networks.append(ipaddress.ip_network(line, strict=False))
            except ValueError as error:
                raise ValidationError(self.env._("%s is not an IP address or network.", line)) from error
        return networks

    def _mpesa_is_allowed_source(self, remote_addr):
        """Whether a callback from `remote_addr` passes the provider's source check."""
        self.ensure_one()
        mode = self.sudo().mpesa_ip_check
        if mode == 'off':
            return True
        try:
            address = ipaddress.ip_address(remote_addr or '')
        except ValueError:
            allowed = False
        else:
            allowed = any(address in network for network in self._mpesa_allowed_networks())
        if not allowed:
            _logger.warning("M-Pesa callback from %s, which is not an allowed address.", remote_addr)
        return allowed or mode == 'log'

    # === BUSINESS METHODS - SET-UP WARNINGS === #

    def _mpesa_kes_has_rate(self, company):
        """Whether Odoo has a KES rate to convert with for `company`, looked up as
        res.currency._get_rates does: its root company's or one of no company, never another company's."""
        return bool(self.env['res.currency.rate'].sudo().search_count([
            ('currency_id', '=', self.env.ref('base.KES').id),
            ('company_id', 'in', [False, company.root_id.id]),
        ], limit=1))

    def _mpesa_setup_problems(self):
        """What keeps M-Pesa from being offered, in plain words, and whether the one-click KES
        pricelist would fix it.  Counts only (sudo): nothing of the records shows.

        :return: the warnings, and whether KES or a KES pricelist is missing
        :rtype: tuple[list[str], bool]
        """
        self.ensure_one()
        company = self.company_id or self.env.company
        kes = self.env.ref('base.KES').sudo()
        kenya = self.env.ref('base.ke')
        warnings = []
        if not kes.active:
            warnings.append(self.env._(
                "The Kenyan shilling (KES) is not active: M-Pesa takes payments in KES only."
            ))
        pricelists = self.env['product.pricelist'].sudo().search(
            [('company_id', 'in', [company.id, False])]
        )
        # Without any pricelist, quotations are in the company's currency.
        no_kes_quotation = not pricelists.filtered(lambda pricelist: pricelist.currency_id == kes) \
            and (pricelists or company.currency_id != kes)
        if no_kes_quotation:
            warnings.append(self.env._(
                "No pricelist is in KES, so no quotation is in KES and M-Pesa is never offered."
                "  Create a KES pricelist, then set it on your distributors (contact form, Sales &"
                " Purchase tab)."
            ))
        elif kes.active and company.currency_id != kes and not self._mpesa_kes_has_rate(company):
            warnings.append(self.env._(
                "KES has no exchange rate: prices in %(currency)s would be charged one shilling for"
                " one %(currency)s.  Set a rate (Accounting > Configuration > Currencies).",
                currency=company.currency_id.name,
            ))
        if self.mpesa_distributors_only and not self.env['res.partner'].sudo().search_count(
            [('is_distributor', '=', True)], limit=1,
        ):
            warnings.append(self.env._(
                "M-Pesa is offered to distributors only, and no contact is a distributor: tick"
                " Distributor on their contact form (or untick Distributors Only in the M-Pesa:"
                " advanced tab)."
            ))
        if company.country_id != kenya:
            warnings.append(self.env._(
                "%(company)s is not in Kenya: M-Pesa is offered only to customers whose address is"
                " in Kenya.", company=company.name,
            ))
        if self.available_country_ids and kenya not in self.available_country_ids:
            warnings.append(self.env._(
                "Kenya is not among the provider's countries (Configuration tab): M-Pesa is offered"
                " in Kenya only."
            ))
        return warnings, not kes.active or bool(no_kes_quotation)

    # === BUSINESS METHODS - ACCOUNTING SET-UP === #

    def _mpesa_setup_accounting(self):
        """Give each M-Pesa provider (all of them when called on none) its own bank journal, with
        its own outstanding receipts account, and a whole-shilling cash rounding; idempotent.
        Skipped for a company without a chart of accounts."""
        providers = self or self.search([('code', '=', const.PROVIDER_CODE)])
        for provider in providers.sudo():
            company = provider.company_id
            if not self.env['account.account'].sudo().search_count(
                [*self.env['account.account']._check_company_domain(company)], limit=1,
            ):
                _logger.info("M-Pesa: %s has no chart of accounts yet; no M-Pesa journal.", company.name)
                continue
            provider._mpesa_setup_journal()
            # Also for a copy that kept another company's rounding: its accounts are per company.
            provider.mpesa_cash_rounding_id = provider._mpesa_whole_shilling_rounding()

    def _mpesa_setup_journal(self):
        self.ensure_one()
        company = self.company_id
        Journal = self.env['account.journal'].sudo().with_company(company)
        journal = Journal.search([*Journal._check_company_domain(company), ('code', '=', JOURNAL_CODE)], limit=1)
        if not journal:
            kes = self.env.ref('base.KES')
            journal = Journal.create({
                'name': "M-Pesa",
                'code': JOURNAL_CODE,
                'type': 'bank',
                # After the shop's own bank journals: where Odoo looks for the first bank journal
                # (another provider's default journal, a payment's), it finds theirs, not M-Pesa's.
                'sequence': JOURNAL_SEQUENCE,
                'company_id': company.id,
                'currency_id': kes.id if company.currency_id != kes else False,
            })
        self.journal_id = journal  # account_payment then adds the provider's payment method line.
        line = journal.inbound_payment_method_line_ids.filtered(lambda pm_line: pm_line.payment_provider_id == self)
        if line and not line.payment_account_id:
            line.payment_account_id = self._mpesa_outstanding_receipts_account(journal)
        return journal

    def _mpesa_outstanding_receipts_account(self, journal):
        """An account of its own for M-Pesa money received and not yet on a statement, as Odoo's
        outstanding receipts account is for the bank journal's."""
        company = journal.company_id
        Account = self.env['account.account'].sudo().with_company(company)
        existing = Account.search([
            *Account._check_company_domain(company), ('name', '=', "M-Pesa Outstanding Receipts"),
        ], limit=1)
        if existing:
            return existing
        return Account.create({
            'name': "M-Pesa Outstanding Receipts",
            'code': Account._search_new_account_code(journal.default_account_id.code or '101400'),
            'account_type': 'asset_current',
            'reconcile': True,
        })

    def action_mpesa_import_statement(self):
        """The M-Pesa statement import, for accounting managers."""
        self.ensure_one()
        self._mpesa_check_group('account.group_account_manager')
        return {
            'type': 'ir.actions.act_window',
            'name': self.env._("Import M-Pesa statement"),
            'res_model': 'muchiri.mpesa.statement.import',
            'view_mode': 'form',
            'target': 'new',
            'context': {'default_provider_id': self.id},
        }

    def _mpesa_bank_fees_account(self):
        """Where the M-Pesa statement's charges go: the provider's account, else the bank fees
        account of the company's chart (Odoo's generic chart calls it expense_finance, Kenya's
        ke5138 'Bank Charges'), else an expense account named so; empty when none is found (the
        charges then stay open in the journal)."""
        self.ensure_one()
        if self.mpesa_bank_fees_account_id:
            return self.mpesa_bank_fees_account_id
        company = self.company_id
        Account = self.env['account.account'].sudo().with_company(company)
        ChartTemplate = self.env['account.chart.template'].with_company(company)
        for xmlid in ('expense_finance', 'ke5138'):
            account = ChartTemplate.ref(xmlid, raise_if_not_found=False)
            if account and account._name == 'account.account':
                return account
        return Account.search([
            *Account._check_company_domain(company), ('account_type', 'in', ('expense', 'expense_direct_cost')),
            '|', ('name', 'ilike', "bank fee"), ('name', 'ilike', "bank charge"),
        ], limit=1)

    def _mpesa_whole_shilling_rounding(self):
        company = self.company_id
        Rounding = self.env['account.cash.rounding'].sudo().with_company(company)
        rounding = self.mpesa_cash_rounding_id.with_company(company) \
            or Rounding.search([('name', '=', "M-Pesa: whole shillings")], limit=1) or Rounding.create({
            'name': "M-Pesa: whole shillings",
            'rounding': 1.0,
            'rounding_method': 'UP',
            'strategy': 'add_invoice_line',
        })
        Account = self.env['account.account'].sudo()
        domain = Account._check_company_domain(company)
        rounding.profit_account_id = rounding.profit_account_id or company.default_cash_difference_income_account_id \
            or Account.search([*domain, ('account_type', '=', 'income_other')], limit=1) \
            or Account.search([*domain, ('account_type', '=', 'income')], limit=1)
        rounding.loss_account_id = rounding.loss_account_id or company.default_cash_difference_expense_account_id \
            or Account.search([*domain, ('account_type', '=', 'expense')], limit=1)
        return rounding

    def _mpesa_business_number(self):
        """What a customer pays into from the phone's menu: the paybill, or the till for Buy Goods."""
        self.ensure_one()
        provider = self.sudo()
        number = provider.mpesa_till_number if provider.mpesa_shortcode_type == 'till' else provider.mpesa_shortcode
        return (number or '').strip()

    def _mpesa_bank_account(self):
        """The company's bank account (res.partner.bank, sudo) of this provider's paybill or till,
        made on first use: Odoo's QR mechanism draws its 'M-Pesa' QR codes for it
        (models/res_partner_bank.py).  Empty while the number is not set."""
        self.ensure_one()
        number = self._mpesa_business_number()
        Bank = self.env['res.partner.bank'].sudo().with_context(active_test=False)
        if not number.isdigit():
            return Bank.browse()
        partner = self.company_id.partner_id
        account = Bank.search([('partner_id', '=', partner.id), ('sanitized_acc_number', '=', number)], limit=1)
        return account or Bank.create({
            'partner_id': partner.id,
            'acc_number': number,
            'acc_holder_name': self.company_id.name,
            'currency_id': self.env.ref('base.KES').id,
        })

    # === BUSINESS METHODS - INITIATOR === #

    def _mpesa_recheck_unverified_receipts(self):
        """The initiator is set up (or fixed): the receipts that wait unverified are asked about."""
        for provider in self.filtered(lambda p: p.code == 'mpesa' and p._mpesa_has_initiator()):
            waiting = self.env['payment.transaction'].sudo().search([
                ('provider_id', '=', provider.id), ('mpesa_receipt_status', '=', 'unverified'),
                ('mpesa_status_next_at', '=', False),
            ])
            if waiting:
                waiting._mpesa_request_receipt_proof()
            # Paybill payments awaiting a confirmation that nothing could ask for: asked now.
            awaiting = self.env['muchiri.mpesa.ledger'].sudo().search([
                ('provider_id', '=', provider.id), ('state', '=', 'awaiting'), ('confirmation', '=', False),
                ('conflict', '=', False), ('status_next_at', '=', False),
            ])
            if awaiting:
                awaiting.write({'status_next_at': fields.Datetime.now(), 'status_count': 0})
                self.env['payment.transaction']._mpesa_trigger_initiator_job()

    def _mpesa_certificate_summary(self):
        """The certificate's subject and expiry, or None when there is none or it is unusable."""
        self.ensure_one()
        pem = self.sudo().mpesa_initiator_certificate
        if not pem:
            return None
        try:
            return daraja.certificate_summary(pem)
        except daraja.InvalidConfiguration:
            return None

    def _mpesa_initiator_missing(self):
        """What the initiator set-up lacks, in plain words (empty when it is complete)."""
        self.ensure_one()
        provider = self.sudo()
        missing = []
        if not (provider.mpesa_initiator_name or '').strip():
            missing.append(self.env._("the initiator name"))
        if not provider.mpesa_initiator_password:
            missing.append(self.env._("the initiator password"))
        if not provider.mpesa_initiator_certificate:
            missing.append(self.env._("Safaricom's certificate"))
        return missing

    def _mpesa_has_initiator(self):
        self.ensure_one()
        return not self._mpesa_initiator_missing()

    def _mpesa_initiator(self):
        """The Initiator and SecurityCredential of a Reversal or Transaction Status request.

        The credential is computed for each request (RSA PKCS#1 v1.5 is randomised) and never
        stored: only the password and the certificate are.

        :return: the initiator name and the SecurityCredential
        :rtype: tuple[str, str]
        :raise UserError: when the initiator is not set up
        """
        self.ensure_one()
        missing = self._mpesa_initiator_missing()
        if missing:
            raise UserError(self.env._(
                "Set %(missing)s on %(provider)s first (M-Pesa: initiator).",
                missing=', '.join(missing), provider=self.name,
            ))
        provider = self.sudo()
        try:
            credential = daraja.security_credential(
                provider.mpesa_initiator_password, provider.mpesa_initiator_certificate,
            )
        except daraja.InvalidConfiguration as error:
            raise UserError(self.env._("The initiator credential cannot be made: %s", error)) from error
        return provider.mpesa_initiator_name.strip(), credential

    def _mpesa_security_credential(self):
        """The SecurityCredential: the initiator password encrypted with Safaricom's certificate."""
        return self._mpesa_initiator()[1]

    def _mpesa_initiator_party(self):
        """Who received the money, as Reversal and Transaction Status name it: the paybill
        (identifier type 4, organisation shortcode), or the till (2)."""
        self.ensure_one()
        config = self._mpesa_shortcode_config()
        if config.till_number:
            return config.till_number, '2'
        return config.business_shortcode, '4'

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
                    commit(self.env)
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
            when=kenya_text(fields.Datetime.now()),
            error=str(error)[:200] or type(error).__name__,
            until=kenya_text(self.mpesa_pull_synced_until) if self.mpesa_pull_synced_until else '-',
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
        session = requests.Session()
        seen = new = failed = 0
        try:
            client = provider._mpesa_client(session=session)
            listing = client.pull_transactions(provider.mpesa_shortcode.strip(), aware(start), aware(now))
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
                commit(self.env)
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
        commit(self.env)
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
            when=kenya_text(listing.end), why=why, until=kenya_text(listing.read_until),
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
            when=kenya_text(pulled.trx_date),
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

    # === DEMO DATA (demo/mpesa_demo.xml calls these, on a database with demo data only) === #

    @api.model
    def _mpesa_demo_setup(self):
        mpesa_demo.setup_provider(self.env)

    @api.model
    def _mpesa_demo_quotations(self):
        mpesa_demo.create_quotations(self.env)

    # === BUSINESS METHODS - B2B EXPRESS CHECKOUT === #

    def _mpesa_till_payment_refusal(self):
        """Why this provider cannot prompt a distributor's till to pay (B2B Express Checkout), or None.

        The till pays our paybill, and nothing the till's result says is booked before M-Pesa's
        Transaction Status confirms it: without an initiator the money could never be proven.
        """
        self.ensure_one()
        provider = self.sudo()
        if provider.mpesa_shortcode_type == 'till':
            return self.env._("M-Pesa takes till payments into a paybill only.")
        if not provider._mpesa_has_initiator():
            return self.env._(
                "Paying from a till needs the provider's initiator: M-Pesa's Transaction Status proves the money.")
        return None

    def _mpesa_takes_till_payments(self):
        self.ensure_one()
        return self.code == 'mpesa' and not self._mpesa_till_payment_refusal()

    # === BUSINESS METHODS - DARAJA SIMULATOR === #

    def _mpesa_simulator_forgot_c2b(self):
        """Whether the Daraja simulator this test provider talks to no longer knows the C2B URLs it
        registered (a simulator restarted without its state file); if so the registration is
        cleared, so that the provider stops saying "C2B URLs Registered" and asks for a new one.

        Only a test provider with its own API URL can talk to a simulator; Safaricom has no such
        question, so anything but the simulator's answer (GET /__sim__/c2b/registrations) tells
        nothing and changes nothing.

        :return: True when the simulator forgot the URLs
        :rtype: bool
        """
        self.ensure_one()
        provider = self.sudo()
        if (provider.state != 'test' or not provider.mpesa_c2b_registered_at or not provider.mpesa_api_url
                or self._mpesa_api_base_url() in (daraja.SANDBOX_URL, daraja.PRODUCTION_URL)):
            return False
        try:
            answer = requests.get(
                f'{self._mpesa_api_base_url()}/__sim__/c2b/registrations',
                params={'shortcode': provider.mpesa_shortcode.strip()}, timeout=5,
            )
            known = answer.json().get('registered') if answer.status_code == 200 else None
        except (requests.RequestException, ValueError, AttributeError):
            return False
        if known is not False:
            return False
        provider.write({
            'mpesa_c2b_registered_at': False,
            'mpesa_c2b_registration': self.env._(
                "The Daraja simulator no longer knows these URLs (it restarted without its state file):"
                " register them again."),
        })
        return True


def _new_callback_secret():
    """A random path secret that holds none of the words Daraja refuses in a URL."""
    while True:
        secret = secrets.token_urlsafe(24)
        if not any(word in secret.lower() for word in DARAJA_BANNED_URL_WORDS):
            return secret


def _is_private(host):
    try:
        return not ipaddress.ip_address(host).is_global
    except ValueError:
        return False


def _notification(message, kind, sticky=None, next_action=None):
    """A client action that shows `message`; a notification that is no success stays until closed."""
    return {
        'type': 'ir.actions.client',
        'tag': 'display_notification',
        'params': {'type': kind, 'message': message, 'sticky': kind != 'success' if sticky is None else sticky,
                   'next': next_action or {'type': 'ir.actions.client', 'tag': 'soft_reload'}},
    }
