# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""The most one M-Pesa prompt asks is the provider's own field now (mpesa_prompt_max_amount, Daraja's
250,000 by default; a larger order is paid in instalments).  Odoo's Maximum Amount keeps Odoo's
meaning: it hides the provider for larger payments.  The 150,000 this addon's data used to put
there would hide M-Pesa from the very orders it now pays in instalments: it is cleared.  Another
value was an administrator's choice and stays."""


def migrate(cr, version):
    if not version:
        return
    cr.execute("""
        UPDATE payment_provider SET maximum_amount = NULL
         WHERE code = 'mpesa' AND maximum_amount = 150000
    """)
