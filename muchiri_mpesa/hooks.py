# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from odoo.addons.payment import reset_payment_provider, setup_provider

from .const import PROVIDER_CODE


def post_init_hook(env):
    setup_provider(env, PROVIDER_CODE)
    env['payment.provider']._mpesa_setup_accounting()


def uninstall_hook(env):
    reset_payment_provider(env, PROVIDER_CODE)
