"""The Daraja (Safaricom M-Pesa STK Push) layer: plain Python, ``requests`` only, no Odoo.

The Odoo models call this package; it knows nothing of Odoo, the database or incoming HTTP.
Payload shapes, passwords, timestamps and the meaning of Daraja's codes live here and only here.
"""

from __future__ import annotations

from .callback import (
    ACCEPTED_RESPONSE,
    StkCallback,
    parse_stk_callback,
    stk_callback_body,
)
from .client import (
    DarajaClient,
    DarajaCredentials,
    Exchange,
    StkPushResult,
    StkQueryResult,
)
from .codes import (
    ERROR_CODES,
    INVALID_TOKEN_CODES,
    RESULT_CODES,
    ApiErrorCode,
    Outcome,
    ResultCode,
    classify_result,
    describe_api_error,
    is_being_processed,
)
from .errors import (
    CallbackParseError,
    DarajaApiError,
    DarajaAuthError,
    DarajaConnectionError,
    DarajaError,
    DarajaProtocolError,
    DarajaValidationError,
    InvalidAmount,
    InvalidConfiguration,
    InvalidPhoneNumber,
)
from .money import (
    DARAJA_MAX_AMOUNT,
    DEFAULT_MAX_AMOUNT,
    MIN_AMOUNT,
    check_amount,
    to_whole_shillings,
)
from .phone import mask_msisdn, normalize_msisdn, phones_may_match
from .stk import (
    KENYA_TZ,
    PAYBILL,
    PRODUCTION_URL,
    SANDBOX_URL,
    TILL,
    ShortcodeConfig,
    account_reference,
    build_stk_push_payload,
    build_stk_query_payload,
    redact,
    timestamp_and_password,
    transaction_desc,
)
from .tokens import AccessToken, MemoryTokenStore, TokenStore, token_cache_key

__all__ = [
    "ACCEPTED_RESPONSE",
    "DARAJA_MAX_AMOUNT",
    "DEFAULT_MAX_AMOUNT",
    "ERROR_CODES",
    "INVALID_TOKEN_CODES",
    "KENYA_TZ",
    "MIN_AMOUNT",
    "PAYBILL",
    "PRODUCTION_URL",
    "RESULT_CODES",
    "SANDBOX_URL",
    "TILL",
    "AccessToken",
    "ApiErrorCode",
    "CallbackParseError",
    "DarajaApiError",
    "DarajaAuthError",
    "DarajaClient",
    "DarajaConnectionError",
    "DarajaCredentials",
    "DarajaError",
    "DarajaProtocolError",
    "DarajaValidationError",
    "Exchange",
    "InvalidAmount",
    "InvalidConfiguration",
    "InvalidPhoneNumber",
    "MemoryTokenStore",
    "Outcome",
    "ResultCode",
    "ShortcodeConfig",
    "StkCallback",
    "StkPushResult",
    "StkQueryResult",
    "TokenStore",
    "account_reference",
    "build_stk_push_payload",
    "build_stk_query_payload",
    "check_amount",
    "classify_result",
    "describe_api_error",
    "is_being_processed",
    "mask_msisdn",
    "normalize_msisdn",
    "parse_stk_callback",
    "phones_may_match",
    "redact",
    "stk_callback_body",
    "timestamp_and_password",
    "to_whole_shillings",
    "token_cache_key",
    "transaction_desc",
]
