# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""The settlement job now also takes the kept C2B confirmations: their own job is gone (its record
is noupdate, so the update would keep it, calling a method that no longer exists)."""
from odoo import SUPERUSER_ID, api


def migrate(cr, version):
    if not version:
        return
    env = api.Environment(cr, SUPERUSER_ID, {})
    cron = env.ref('muchiri_mpesa.cron_mpesa_ledger_inbound', raise_if_not_found=False)
    if cron:
        action = cron.ir_actions_server_id
        cron.unlink()
        action.unlink()
