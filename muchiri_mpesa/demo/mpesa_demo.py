# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""What the demo data cannot say in XML: where the simulator and this Odoo are, and quotations that
a restart must not reset.  Plain functions, called by demo/mpesa_demo.xml only (through the
provider's `_mpesa_demo_*` methods), so only on a database with demo data."""
import logging
import os
import urllib.request

from odoo.fields import Command

from ..daraja.simulator import DEFAULT_INITIATOR_NAME, DEFAULT_INITIATOR_PASSWORD

_logger = logging.getLogger(__name__)

# The local simulator's defaults (python3 -m muchiri_mpesa.daraja.simulator --help).
DEMO_API_URL = 'http://127.0.0.1:8089'
DEMO_CREDENTIALS = {
    'mpesa_consumer_key': 'sim-consumer-key',
    'mpesa_consumer_secret': 'sim-consumer-secret',
    'mpesa_shortcode': '174379',
    'mpesa_shortcode_type': 'paybill',
    'mpesa_passkey': 'bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919',
}

# xmlid, then (product xmlid, quantity, unit price in KES): the third shows the whole-shilling
# rounding, the fourth is above one prompt's 250,000 (paid in instalments, or from the till).
DEMO_QUOTATIONS = [
    ('demo_quotation_maize', [('demo_product_maize', 3, 1500.0)]),
    ('demo_quotation_oil', [('demo_product_oil', 10, 2350.0), ('demo_product_maize', 2, 812.5)]),
    ('demo_quotation_sugar', [('demo_product_sugar', 1, 8326.12)]),
    ('demo_quotation_bulk', [('demo_product_sugar', 40, 8300.0), ('demo_product_oil', 20, 2350.0)]),
]
# The products' prices in KES, for a company that keeps its books in KES (the demo's, scripts/demo).
DEMO_PRICES_KES = {'demo_product_maize': 1500.0, 'demo_product_oil': 2350.0, 'demo_product_sugar': 8300.0}


def demo_setting(env, variable, parameter, default):
    """The environment wins (docker compose sets it), then the system parameter, then `default`."""
    return (
        os.environ.get(variable)
        or env['ir.config_parameter'].sudo().get_param(parameter)
        or default
    ).strip().rstrip('/')


def setup_provider(env):
    """Point the M-Pesa provider at the local simulator, in test mode, published.

    Runs at each load of the demo data, so that a restarted container picks up its URLs.  A
    provider that went live (enabled) is never touched: only Safaricom may confirm its money.
    """
    provider = env.ref('muchiri_mpesa.payment_provider_mpesa')
    if provider.state == 'enabled':
        _logger.warning("M-Pesa demo data: %s is enabled; it stays as it is.", provider.name)
        return
    api_url = demo_setting(env, 'MPESA_DEMO_API_URL', 'muchiri_mpesa.demo_api_url', DEMO_API_URL)
    # Empty: the web base URL (Odoo's own address as the browser last saw it).
    callback_url = demo_setting(
        env, 'MPESA_DEMO_CALLBACK_URL', 'muchiri_mpesa.demo_callback_base_url', '',
    )
    # The simulator's initiator: Transaction Status proves a till's payment, Reversal refunds.
    certificate = simulator_certificate(api_url)
    initiator = {
        'mpesa_initiator_name': DEFAULT_INITIATOR_NAME,
        'mpesa_initiator_password': DEFAULT_INITIATOR_PASSWORD,
        'mpesa_initiator_certificate': certificate,
    } if certificate else {}
    if not certificate:
        _logger.info("M-Pesa demo data: the simulator at %s does not answer; no initiator is set"
                     " (no till payments nor refunds until it is).", api_url)
    provider.write({
        **DEMO_CREDENTIALS,
        **initiator,
        'state': 'test',
        'is_published': True,
        'mpesa_api_url': api_url,
        'mpesa_callback_base_url': callback_url or False,
        # The simulator posts from wherever it runs (another container, this machine).
        'mpesa_ip_check': 'log',
        # An order M-Pesa paid is invoiced and its payment reconciled, as the README shows;
        # the shop's other providers are left as they are.
        'mpesa_invoice_on_payment': True,
    })
    _logger.info("M-Pesa demo data: the provider talks to %s; callbacks go to %s.",
                 api_url, provider._mpesa_callback_base_url())

def simulator_certificate(api_url):
    """The simulator's certificate, which encrypts the initiator's password, or None when nothing
    answers at `api_url` as the simulator does (GET /__sim__/certificate)."""
    try:
        with urllib.request.urlopen(f'{api_url}/__sim__/certificate', timeout=5) as answer:
            pem = answer.read(16384).decode('ascii', 'replace')
    except (OSError, ValueError):
        return None
    return pem if pem.startswith('-----BEGIN CERTIFICATE-----') else None


def demo_vat(env):
    """The sales tax of the demo's quotations: Kenya's VAT (the company's default sales tax) where
    the company is Kenyan for tax (Kenya's chart of accounts, as scripts/demo makes it), else none,
    so that the quotations' amounts stay the same on any other demo database."""
    company = env.company
    if company.account_fiscal_country_id.code != 'KE':
        return env['account.tax']
    return company.account_sale_tax_id


def create_quotations(env):
    """The distributor's quotations, sent and ready to pay: created once, never reset (a paid
    one stays paid when the module is loaded again)."""
    IrModelData = env['ir.model.data']
    partner = env.ref('muchiri_mpesa.demo_distributor_contact')
    pricelist = env.ref('muchiri_mpesa.demo_pricelist_kes')
    vat = demo_vat(env)
    if env.company.currency_id == env.ref('base.KES'):
        for product, price in DEMO_PRICES_KES.items():
            env.ref(f'muchiri_mpesa.{product}').write({'list_price': price, 'taxes_id': [Command.set(vat.ids)]})
    for name, lines in DEMO_QUOTATIONS:
        if env.ref(f'muchiri_mpesa.{name}', raise_if_not_found=False):
            continue
        order = env['sale.order'].create({
            'partner_id': partner.id,
            'user_id': env.ref('base.user_admin').id,  # The distributor's contact at the warehouse.
            'pricelist_id': pricelist.id,
            'require_payment': True,
            'require_signature': False,
            'prepayment_percent': 1.0,
            'order_line': [Command.create({
                'product_id': env.ref(f'muchiri_mpesa.{product}').id,
                'product_uom_qty': quantity,
                'price_unit': price,
                'tax_id': [Command.set(vat.ids)],
            }) for product, quantity, price in lines],
        })
        # Sent, with the distributor following it: listed under the portal's Quotations.
        order.message_subscribe(partner_ids=partner.ids)
        order.state = 'sent'
        IrModelData.create({
            'module': 'muchiri_mpesa',
            'name': name, 'model': 'sale.order', 'res_id': order.id, 'noupdate': True,
        })
