"""A local Daraja: OAuth, STK Push, STK Push Query and callbacks with Safaricom's exact wire format.

Standard library only, no Odoo: ``python3 -m muchiri_mpesa.daraja.simulator --port 8089`` from the repository
root, or in-process for tests::

    from muchiri_mpesa.daraja.simulator import DarajaSimulator

    with DarajaSimulator(port=0, callback_delay=0.1) as sim:
        ...  # DarajaCredentials(..., base_url=sim.base_url)

Outcomes are chosen by the phone number: see MAGIC_NUMBERS and the README.
"""

from .listener import ACCEPTED, CallbackListener, ReceivedCallback
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
    DEFAULT_CALLBACK_DELAY,
    DEFAULT_CALLBACK_RETRY_DELAYS,
    DEFAULT_CALLBACK_TIMEOUT,
    DEFAULT_CONSUMER_KEY,
    DEFAULT_CONSUMER_SECRET,
    DEFAULT_HOST,
    DEFAULT_PORT,
    DEFAULT_PROMPT_TIMEOUT,
    DEFAULT_SHORTCODE,
    DEFAULT_TILL,
    INJECTABLE_ERRORS,
    KENYA_TZ,
    OAUTH_PATH,
    PAYBILL,
    SANDBOX_PASSKEY,
    STK_PUSH_PATH,
    STK_QUERY_PATH,
    TILL,
    TOKEN_LIFETIME,
    CallbackAttempt,
    CallbackDelivery,
    DarajaSimulator,
    RequestRecord,
    StkTransaction,
)

__all__ = [
    "ABOVE_MAXIMUM_SCENARIO",
    "ACCEPTED",
    "DARAJA_MAX_AMOUNT",
    "DEFAULT_CALLBACK_DELAY",
    "DEFAULT_CALLBACK_RETRY_DELAYS",
    "DEFAULT_CALLBACK_TIMEOUT",
    "DEFAULT_CONSUMER_KEY",
    "DEFAULT_CONSUMER_SECRET",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DEFAULT_PROMPT_TIMEOUT",
    "DEFAULT_SCENARIO",
    "DEFAULT_SHORTCODE",
    "DEFAULT_TILL",
    "INJECTABLE_ERRORS",
    "KENYA_TZ",
    "MAGIC_NUMBERS",
    "OAUTH_PATH",
    "PAYBILL",
    "SANDBOX_PASSKEY",
    "SANDBOX_TEST_MSISDN",
    "STK_PUSH_PATH",
    "STK_QUERY_PATH",
    "TILL",
    "TOKEN_LIFETIME",
    "CallbackAttempt",
    "CallbackDelivery",
    "CallbackListener",
    "CallbackMode",
    "DarajaSimulator",
    "ReceivedCallback",
    "RequestRecord",
    "ResultTiming",
    "Scenario",
    "StkTransaction",
    "magic_numbers_table",
    "scenario_for",
]
