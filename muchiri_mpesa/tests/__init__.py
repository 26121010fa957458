# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from . import (
    test_accounting,
    test_back_office,
    test_callback,
    test_demo_data,
    test_hostile_callbacks,
    test_money_safety,
    test_monitoring,
    test_portal_payment,
    test_portal_tour,
    test_provider_security,
    test_provider_setup,
    test_receipt_proof,
    test_reconciliation,
    test_refund,
)
