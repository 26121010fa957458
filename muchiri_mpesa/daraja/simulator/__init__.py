"""A local Daraja with Safaricom's exact wire format: OAuth, M-Pesa Express (STK Push, Query, callbacks), C2B
(register URL v1/v2, simulate, validation, confirmation), Pull Transactions, Reversal and Transaction Status, B2B
Express Checkout (USSD push to a till) and Dynamic QR.

``python3 -m muchiri_mpesa.daraja.simulator --port 8089`` from the repository root (``--help`` lists every flag),
or in-process for tests::

    from muchiri_mpesa.daraja.simulator import DarajaSimulator

    with DarajaSimulator(port=0, callback_delay=0.1) as sim:
        ...  # DarajaCredentials(..., base_url=sim.base_url)

The package is split by API around one shared state: ``state`` (settings, records, the ledger of receipts),
``delivery`` (POSTs to merchant URLs, retries), ``httpd`` (HTTP plumbing), ``oauth``, ``stk``, ``c2b``, ``pull``,
``initiator`` (with ``keys``: its RSA key pair and certificate), ``qr``, and ``server.DarajaSimulator``, the façade.
Standard library only, except ``keys`` which imports ``cryptography`` when the initiator APIs first need it, and
``qr`` which imports ``qrcode`` (with Pillow) when a Dynamic QR image is first drawn.

Magic values (full table in README.md of this folder):

- STK: the PhoneNumber chooses the outcome, see ``MAGIC_NUMBERS`` (254700000001 cancelled ... 254700000009
  subscriber locked); any Amount above 250,000 ends with ResultCode 3.
- C2B: the payer's MSISDN, see ``C2B_MAGIC_NUMBERS``: 254700000101 the confirmation is lost (the payment is in
  Pull Transactions only), 254700000102 the confirmation is sent twice, 254700000103 the validation answer is
  too slow (the registered ResponseType decides, whatever the ValidationURL said).
- Reversal / Transaction Status: ``SIM-NO-RESULT`` in Remarks or Occasion (processed, the Result never comes),
  ``SIM-QUEUE-TIMEOUT`` (not processed, the timeout body goes to QueueTimeOutURL); see ``MAGIC_REMARKS``.
  A real receipt reverses once (then R000001); unknown receipt, other amount or shortcode R000002; an Initiator or
  SecurityCredential other than ``initiator_name`` / ``initiator_password`` encrypted with ``certificate_pem``
  gives 2001.  Transaction Status answers TransactionStatus "Completed", or "Reversed" once reversed; it names the
  payment by TransactionID, or by OriginalConversationID (the request that made it: a B2B RequestRefID).
- B2B Express Checkout: the paying till (primaryShortCode) chooses the outcome, see ``B2B_MAGIC_TILLS``: 600101
  cancelled (4001), 600102 never answers, 600103 pays but the result is lost (Transaction Status by
  OriginalConversationID = RequestRefID finds it), 600104 refused at once (4104), 600105 4102 in the result; any
  other till pays.

Settings (keyword arguments of DarajaSimulator, attributes of the same name, CLI flags): consumer_key,
consumer_secret, shortcode, passkey, till_number, callback_delay, prompt_timeout, late_callback_delay,
duplicate_callback_gap, callback_retry_delays, callback_timeout, token_lifetime, invalidate_previous_tokens,
reject_mpesa_in_callback_url, initiator_name ("testapi"), initiator_password ("Safaricom999!*!"),
organization_name, result_delay (default callback_delay), c2b_versions (("v1", "v2"); the other version answers
401.003.01), c2b_register_once (production-like "500.003.1001 Urls are already registered"),
c2b_external_validation (False), c2b_validation_timeout (8.0), c2b_delay (0.0), c2b_msisdn_format ("hash",
"masked", "plain"), pull_page_size (100).

Python helpers for tests (on a DarajaSimulator ``sim``):

- STK: ``sim.pushes``, ``sim.transaction(checkout_id)``, ``sim.callbacks``, ``sim.callbacks_for(checkout_id)``,
  ``sim.wait_for_callback(checkout_id=None, count=1, timeout=5)``.
- Every POST to a merchant URL: ``sim.deliveries(kind=None, reference=None)``,
  ``sim.wait_for_deliveries(kind=None, count=1, reference=None, timeout=5)``; kinds ``STK_CALLBACK``,
  ``C2B_VALIDATION``, ``C2B_CONFIRMATION`` (reference: the TransID), ``INITIATOR_RESULT``, ``INITIATOR_TIMEOUT``
  (reference: the ConversationID of the acknowledgement), ``B2B_RESULT`` (reference: the RequestRefID).
- B2B: ``sim.b2b_checkouts``, ``sim.b2b_checkout(request_id)``.
- C2B: ``sim.c2b_pay(amount, msisdn, bill_ref="", command_id=PAYBILL, first_name=..., middle_name=...,
  last_name=...) -> TransID`` (what a phone paying the paybill or till does), ``sim.wait_for_c2b(trans_id)``,
  ``sim.c2b_payments``, ``sim.c2b_registrations``, ``sim.pull_registrations``, ``sim.pull_next("repeat_page" |
  "with_reversals", count=1)`` (the next Pull queries ignore OffSetValue, or list reversals too).
- Ledger: ``sim.payments``, ``sim.payment(receipt)`` (``Payment``: receipt, source "stk" | "c2b" | "reversal",
  shortcode, amount, msisdn, bill_ref, at, reversed_by, reverses), ``sim.age_transaction(receipt, hours)``
  (Pull keeps 48 hours).
- Initiator: ``sim.certificate_pem``, ``sim.initiator_name``, ``sim.initiator_password``,
  ``sim.security_credential(password=None)``, ``sim.initiator_next("no_result" | "queue_timeout", count=1)``,
  ``sim.initiator_requests``.
- Dynamic QR: ``sim.qr_codes``, ``sim.pay_qr(content, msisdn) -> TransID`` (a phone scanning the code: a C2B
  payment with its RefNo); the image encodes ``qr_content(...)``, read back with ``read_qr_content``.
- Statement (``statement``): ``sim.statement(start=None, end=None, newest_first=True)`` (the paybill's
  organisation statement in the org portal's CSV: payments, their charges by ``PAYBILL_TARIFF``, reversals,
  failed payments, sweeps; every wording in ``DETAILS`` / ``REASON_TYPES``), ``sim.sweep(amount)`` (a
  settlement to the bank).
- State file (``persist``): ``DarajaSimulator(state_file=PATH)`` / ``--state-file`` / ``DARAJA_SIM_STATE_FILE``
  keeps registrations, the certificate and its key, receipts and balances across restarts; ``sim.save_state()``;
  a file that is not a state file stops the start (``StateFileError``); ``sim.c2b_registration(shortcode)``.
- Gateway: ``sim.fail_next``, ``sim.delay_next``, ``sim.expire_tokens()``, ``sim.requests_for(operation)``,
  ``sim.reset()``, ``sim.state()``.

Control API for other processes: ``/__sim__/health``, ``state``, ``certificate``, ``statement?from=&to=``,
``c2b/registrations?shortcode=`` (GET); ``expire-tokens``, ``reset``, ``fail-next``, ``delay-next``, ``c2b-pay``,
``age``, ``initiator-next``, ``pull-next``, ``sweep`` (POST, JSON).
"""

from .b2b import B2B_DEFAULT_SCENARIO, B2B_MAGIC_TILLS, B2BScenario, b2b_magic_tills_table, b2b_scenario_for
from .c2b import C2B_MAGIC_NUMBERS
from .listener import ACCEPTED, CallbackListener, ReceivedCallback
from .persist import StateFileError
from .qr import qr_content, read_qr_content
from .scenarios import (
    ABOVE_MAXIMUM_SCENARIO,
    DARAJA_MAX_AMOUNT,
    DEFAULT_SCENARIO,
    MAGIC_NUMBERS,
    SANDBOX_TEST_MSISDN,
    CallbackMode,
    ResultTiming,
    Scenario,
    magic_numbers_table,
    scenario_for,
)
from .server import (
    B2B_CHECKOUT_PATH,
    C2B_REGISTER_V1_PATH,
    C2B_REGISTER_V2_PATH,
    C2B_SIMULATE_PATH,
    DEFAULT_CALLBACK_DELAY,
    DEFAULT_CALLBACK_RETRY_DELAYS,
    DEFAULT_CALLBACK_TIMEOUT,
    DEFAULT_CONSUMER_KEY,
    DEFAULT_CONSUMER_SECRET,
    DEFAULT_HOST,
    DEFAULT_INITIATOR_NAME,
    DEFAULT_INITIATOR_PASSWORD,
    DEFAULT_ORGANIZATION_NAME,
    DEFAULT_PORT,
    DEFAULT_PROMPT_TIMEOUT,
    DEFAULT_PULL_PAGE_SIZE,
    DEFAULT_SHORTCODE,
    DEFAULT_TILL,
    DEFAULT_VALIDATION_TIMEOUT,
    INJECTABLE_ERRORS,
    KENYA_TZ,
    MAGIC_REMARKS,
    OAUTH_PATH,
    PAYBILL,
    PULL_QUERY_PATH,
    PULL_REGISTER_PATH,
    QR_PATH,
    REVERSAL_PATH,
    SANDBOX_PASSKEY,
    STK_PUSH_PATH,
    STK_QUERY_PATH,
    TILL,
    TOKEN_LIFETIME,
    TRANSACTION_STATUS_PATH,
    CallbackAttempt,
    CallbackDelivery,
    DarajaSimulator,
    Payment,
    RequestRecord,
    StkTransaction,
)
from .state import (
    B2B_RESULT,
    C2B_CONFIRMATION,
    C2B_VALIDATION,
    DELIVERY_KINDS,
    INITIATOR_RESULT,
    INITIATOR_TIMEOUT,
    STK_CALLBACK,
)
from .statement import (
    ACCOUNT_TYPE,
    DETAILS,
    FAILED_STK_CODES,
    PAYBILL_TARIFF,
    REASON_TYPES,
    STATEMENT_HEADER,
    paybill_charge,
)

__all__ = [
    "ABOVE_MAXIMUM_SCENARIO",
    "ACCEPTED",
    "ACCOUNT_TYPE",
    "B2B_CHECKOUT_PATH",
    "B2B_DEFAULT_SCENARIO",
    "B2B_MAGIC_TILLS",
    "B2B_RESULT",
    "C2B_CONFIRMATION",
    "C2B_MAGIC_NUMBERS",
    "C2B_REGISTER_V1_PATH",
    "C2B_REGISTER_V2_PATH",
    "C2B_SIMULATE_PATH",
    "C2B_VALIDATION",
    "DARAJA_MAX_AMOUNT",
    "DEFAULT_CALLBACK_DELAY",
    "DEFAULT_CALLBACK_RETRY_DELAYS",
    "DEFAULT_CALLBACK_TIMEOUT",
    "DEFAULT_CONSUMER_KEY",
    "DEFAULT_CONSUMER_SECRET",
    "DEFAULT_HOST",
    "DEFAULT_INITIATOR_NAME",
    "DEFAULT_INITIATOR_PASSWORD",
    "DEFAULT_ORGANIZATION_NAME",
    "DEFAULT_PORT",
    "DEFAULT_PROMPT_TIMEOUT",
    "DEFAULT_PULL_PAGE_SIZE",
    "DEFAULT_SCENARIO",
    "DEFAULT_SHORTCODE",
    "DEFAULT_TILL",
    "DEFAULT_VALIDATION_TIMEOUT",
    "DELIVERY_KINDS",
    "DETAILS",
    "FAILED_STK_CODES",
    "INITIATOR_RESULT",
    "INITIATOR_TIMEOUT",
    "INJECTABLE_ERRORS",
    "KENYA_TZ",
    "MAGIC_NUMBERS",
    "MAGIC_REMARKS",
    "OAUTH_PATH",
    "PAYBILL",
    "PAYBILL_TARIFF",
    "PULL_QUERY_PATH",
    "PULL_REGISTER_PATH",
    "QR_PATH",
    "REASON_TYPES",
    "REVERSAL_PATH",
    "SANDBOX_PASSKEY",
    "SANDBOX_TEST_MSISDN",
    "STATEMENT_HEADER",
    "STK_CALLBACK",
    "STK_PUSH_PATH",
    "STK_QUERY_PATH",
    "TILL",
    "TOKEN_LIFETIME",
    "TRANSACTION_STATUS_PATH",
    "B2BScenario",
    "CallbackAttempt",
    "CallbackDelivery",
    "CallbackListener",
    "CallbackMode",
    "DarajaSimulator",
    "Payment",
    "ReceivedCallback",
    "RequestRecord",
    "ResultTiming",
    "Scenario",
    "StateFileError",
    "StkTransaction",
    "b2b_magic_tills_table",
    "b2b_scenario_for",
    "magic_numbers_table",
    "paybill_charge",
    "qr_content",
    "read_qr_content",
    "scenario_for",
]
