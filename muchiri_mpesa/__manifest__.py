# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
{
    "name": "Payment Provider: M-Pesa (Daraja STK Push)",
    "version": "18.0.1.2.0",
    "category": "Accounting/Payment Providers",
    "sequence": 350,
    "summary": "Take M-Pesa payments from distributors by STK Push (Lipa Na M-Pesa Online).",
    "author": "Muchiri Warehouse",
    "website": "https://github.com/muchiri/muchiri_mpesa",
    "license": "LGPL-3",
    "depends": ["payment", "account_payment", "sale", "portal", "mail"],
    "external_dependencies": {"python": ["requests"]},
    "data": [
        "security/muchiri_mpesa_security.xml",
        "security/ir.model.access.csv",
        "views/payment_provider_views.xml",
        "views/payment_mpesa_templates.xml",
        "views/mpesa_paybill_templates.xml",
        "views/payment_transaction_views.xml",
        "wizards/mpesa_callback_match_views.xml",  # Its action is a button of the exchanges' form.
        "views/mpesa_event_views.xml",
        "views/sale_order_views.xml",
        "views/account_move_views.xml",
        "views/res_partner_views.xml",
        "views/mpesa_report_views.xml",
        "views/mpesa_alert_views.xml",
        "wizards/mpesa_payment_request_views.xml",
        "data/mail_templates.xml",
        "data/ir_cron_data.xml",
        "data/payment_method_data.xml",
        "wizards/mpesa_ledger_match_views.xml",  # Its actions are buttons of the ledger's form.
        "wizards/mpesa_refund_extra_views.xml",
        "wizards/mpesa_statement_import_views.xml",
        "views/mpesa_ledger_views.xml",
        # Refers to the inline form of payment_mpesa_templates.xml.
        "data/payment_provider_data.xml",
    ],
    # Databases with demo data only: a provider on the local simulator, a distributor, quotations.
    "demo": [
        "demo/mpesa_demo.xml",
    ],
    "assets": {
        "web.assets_frontend": [
            "muchiri_mpesa/static/src/js/payment_form.js",
        ],
        "web.assets_tests": [
            "muchiri_mpesa/static/tests/tours/**/*",
        ],
    },
    "post_init_hook": "post_init_hook",
    "uninstall_hook": "uninstall_hook",
}
