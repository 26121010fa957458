# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from . import (
    test_accounting,
    test_b2b_flows,
    test_back_office,
    test_c2b_flows,
    test_demo_data,
    test_instalments,
    test_ledger,
    test_monitoring,
    test_notification_data,
    test_other_providers,
    test_paybill_qr,
    test_portal,
    test_provider,
    test_refund_flows,
    test_security,
    test_stk_flows,
)
