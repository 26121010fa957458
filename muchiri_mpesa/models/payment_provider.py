# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
import hmac
import ipaddress
import logging
import secrets
from decimal import Decimal
from urllib.parse import urlsplit

from markupsafe import Markup

from odoo import api, fields, models
from odoo.exceptions import AccessError, UserError, ValidationError
from odoo.tools.misc import formatLang

from odoo.addons.payment import utils as payment_utils

from .. import const, daraja
from .mpesa_token import DatabaseTokenStore

_logger = logging.getLogger(__name__)

# Hosts of tunnelling services: Safaricom refuses them as production callback URLs.
TUNNEL_HOST_SUFFIXES = (
    'ngrok.io', 'ngrok-free.app', 'ngrok.app', 'trycloudflare.com', 'loca.lt', 'serveo.net',
    'localhost.run',
)


# Daraja refuses URLs holding these words (docs/design.md, 6. URLs and callback sources), in any case.
DARAJA_BANNED_URL_WORDS = ('mpesa', 'm-pesa', 'safaricom', 'exe', 'exec', 'cmd', 'sql', 'query')


def _new_callback_secret():
    """A random path secret that holds none of the words Daraja refuses in a URL."""
    while True:
        secret = secrets.token_urlsafe(24)
        if not any(word in secret.lower() for word in DARAJA_BANNED_URL_WORDS):
            return secret


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

    # === CALLBACKS === #
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

    # === CONSTRAINTS === #

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
        """An enabled provider talks to Safaricom: a simulator would confirm orders without money."""
        for provider in self.filtered(lambda p: p.code == 'mpesa' and p.state == 'enabled'):
            url = (provider.sudo().mpesa_api_url or '').rstrip('/')
            if url and url != daraja.PRODUCTION_URL:
                raise ValidationError(self.env._(
                    "An enabled M-Pesa provider talks to Safaricom's production API (%(prod)s), not"
                    " to %(url)s: use test mode for the sandbox or a simulator.",
                    prod=daraja.PRODUCTION_URL, url=url,
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
        any text in the path is just a wrong secret."""
        given = (secret or '').encode('utf-8', errors='surrogateescape')
        providers = self.sudo().with_context(active_test=False).search([('code', '=', 'mpesa')])
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

    def _mpesa_api_base_url(self):
        """The Daraja this provider talks to: Safaricom's production API once enabled, whatever the
        API URL field holds; the API URL or the sandbox in test mode.  A disabled provider that was
        live still reaches production, where its last prompts get their answers."""
        self.ensure_one()
        if self.state == 'enabled':
            return daraja.PRODUCTION_URL
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
        """Odoo's maximum amount, capped by what Daraja accepts for one payment."""
        self.ensure_one()
        maximum = int(self.maximum_amount or daraja.DEFAULT_MAX_AMOUNT)
        return min(maximum, daraja.DARAJA_MAX_AMOUNT)

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
        base_url = self._mpesa_api_base_url()
        if transaction:
            reason = transaction._mpesa_test_mode_reason()
            if reason:
                raise UserError(reason)
            if self.state != 'enabled':
                base_url = transaction._mpesa_remembered_api_url() or base_url
        return daraja.DarajaClient(
            daraja.DarajaCredentials(
                consumer_key=provider.mpesa_consumer_key.strip(),
                consumer_secret=provider.mpesa_consumer_secret.strip(),
                base_url=base_url,
            ),
            self._mpesa_shortcode_config(),
            session=session,
            token_store=DatabaseTokenStore(self.env),
            max_amount=self._mpesa_max_amount(),
            observer=lambda exchange: self.env['muchiri.mpesa.event']._record_exchange(
                provider, exchange, transaction
            ),
        )

    def action_mpesa_test_connection(self):
        """Fetch a token and tell the administrator in plain words what is wrong, if anything."""
        self.ensure_one()
        self._mpesa_check_group('base.group_system')
        client = self._mpesa_client()
        try:
            # Through the shared store: a token fetched aside could invalidate the workers' one.
            client.access_token(stale=client.token_store.load(client.credentials.cache_key))
        except daraja.DarajaAuthError as error:
            # Daraja's own words once (the client's message would repeat ours).
            said = ': '.join(part for part in (error.error_code, error.error_message) if part)
            raise UserError(self.env._(
                "Daraja at %(url)s refused this consumer key and secret (HTTP %(status)s%(said)s)."
                "  Copy them again from My Apps on developer.safaricom.co.ke, from the app that has"
                " Lipa Na M-Pesa Online: the sandbox app's in test mode, the production app's when"
                " enabled.",
                url=self._mpesa_api_base_url(), status=error.http_status,
                said=f", {said}" if said else '',
            )) from error
        except daraja.DarajaConnectionError as error:
            raise UserError(self.env._(
                "Daraja could not be reached at %(url)s.  Check the API URL (M-Pesa: advanced tab)"
                " and that this server can reach it.",
                url=self._mpesa_api_base_url(),
            )) from error
        except daraja.DarajaError as error:
            raise UserError(self.env._("Daraja answered with an error: %s", error)) from error
        return {
            'type': 'ir.actions.client',
            'tag': 'display_notification',
            'params': {
                'type': 'success',
                'message': self.env._("Connected to Daraja at %s: the credentials work.",
                             self._mpesa_api_base_url()),
                'next': {'type': 'ir.actions.act_window_close'},
            },
        }

    def action_mpesa_regenerate_callback_secret(self):
        self.ensure_one()
        self._mpesa_check_group('base.group_system')
        self.sudo().mpesa_callback_secret = _new_callback_secret()

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

    # === SET-UP CHECKS: WHAT KEEPS M-PESA FROM BEING OFFERED === #

    mpesa_setup_warnings = fields.Html(
        string="M-Pesa Set-up Warnings", compute='_compute_mpesa_setup_warnings', sanitize=False,
        help="What is missing for M-Pesa to be offered to customers.",
    )
    mpesa_setup_needs_kes_pricelist = fields.Boolean(compute='_compute_mpesa_setup_warnings')

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
        return {
            'type': 'ir.actions.client',
            'tag': 'display_notification',
            'params': {
                'type': 'success',
                'message': self.env._(
                    "KES is active and the pricelist %(pricelist)s is ready: set it on your"
                    " distributors (contact form, Sales & Purchase tab) so that their quotations"
                    " are in KES.", pricelist=pricelist.display_name,
                ),
                'next': {'type': 'ir.actions.client', 'tag': 'soft_reload'},
            },
        }


def _is_private(host):
    try:
        return not ipaddress.ip_address(host).is_global
    except ValueError:
        return False
