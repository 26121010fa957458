# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.

# The Daraja layer (``muchiri_mpesa.daraja``) is plain Python and is also imported, and run as the
# simulator, from the repository root where Odoo may not be installed.  Odoo loads this package as
# ``odoo.addons.muchiri_mpesa``: only then are the Odoo parts imported.
if __name__.startswith("odoo.addons."):
    from . import controllers, demo, models, wizards
    from .hooks import post_init_hook, uninstall_hook
