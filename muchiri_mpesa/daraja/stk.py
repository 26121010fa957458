"""Building STK Push and STK Push Query bodies: the one place for timestamps and passwords.

Everything here is pure and validates before anything is sent: a bad phone, amount, URL or
shortcode raises a DarajaValidationError and no request leaves.  Timestamp and Password are made
from one instant, in Kenya time, so they always agree (docs/design.md, 3. Daraja facts).
"""

from __future__ import annotations

import base64
import re
import zoneinfo
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

from .errors import DarajaValidationError, InvalidConfiguration
from .money import DEFAULT_MAX_AMOUNT, check_amount
from .phone import normalize_msisdn
from .tokens import UTC

__all__ = [
    "ACCOUNT_REFERENCE_MAX",
    "KENYA_TZ",
    "PAYBILL",
    "PRODUCTION_URL",
    "SANDBOX_URL",
    "TILL",
    "TRANSACTION_DESC_MAX",
    "ShortcodeConfig",
    "account_reference",
    "build_stk_push_payload",
    "build_stk_query_payload",
    "redact",
    "timestamp_and_password",
    "transaction_desc",
]

KENYA_TZ = zoneinfo.ZoneInfo("Africa/Nairobi")
SANDBOX_URL = "https://sandbox.safaricom.co.ke"
PRODUCTION_URL = "https://api.safaricom.co.ke"

PAYBILL = "CustomerPayBillOnline"
TILL = "CustomerBuyGoodsOnline"

ACCOUNT_REFERENCE_MAX = 12
TRANSACTION_DESC_MAX = 13
DEFAULT_DESCRIPTION = "Payment"

_SHORTCODE = re.compile(r"[0-9]{5,7}")
_TOKEN = re.compile(r"[A-Za-z0-9]+")


def timestamp_and_password(
    shortcode: str, passkey: str, now: datetime | None = None
) -> tuple[str, str]:
    """Timestamp (Kenya time, ``YYYYMMDDHHmmss``) and the Password made from that same string.

    A naive ``now`` is read as UTC, like Odoo's datetimes.
    """
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    timestamp = now.astimezone(KENYA_TZ).strftime("%Y%m%d%H%M%S")
    password = base64.b64encode(f"{shortcode}{passkey}{timestamp}".encode()).decode("ascii")
    return timestamp, password


def _compact(text: str, limit: int) -> str:
    """Fit a reference into ``limit`` characters of [A-Za-z0-9-], keeping what identifies it.

    The rule, applied until the result fits:
      1. split on every character outside [A-Za-z0-9] and join the pieces with "-"
         ("INV/2025/00042" -> "INV-2025-00042");
      2. drop the leading zeros of all-digit pieces ("INV-2025-42"), Odoo's sequence padding;
      3. keep whole pieces from the left while they fit ("S00042-2-20251126" -> "S00042-2"),
         or the first ``limit`` characters of the first piece when even that is too long.
    The result may be empty (nothing usable in the text).
    """
    pieces = _TOKEN.findall(text)
    joined = "-".join(pieces)
    if len(joined) <= limit:
        return joined
    pieces = [(p.lstrip("0") or "0") if p.isdigit() else p for p in pieces]
    joined = "-".join(pieces)
    if len(joined) <= limit:
        return joined
    kept = pieces[0][:limit]
    for piece in pieces[1:]:
        candidate = f"{kept}-{piece}"
        if len(candidate) > limit:
            break
        kept = candidate
    return kept


def account_reference(reference: str) -> str:
    """The AccountReference (at most 12 of [A-Za-z0-9-]) for an Odoo reference; see _compact."""
    result = _compact(reference, ACCOUNT_REFERENCE_MAX) if isinstance(reference, str) else ""
    if not result:
        raise DarajaValidationError(
            "The payment reference must contain at least one letter or digit.", field="reference"
        )
    return result


def transaction_desc(text: str | None = None) -> str:
    """The TransactionDesc (at most 13 of [A-Za-z0-9-]); "Payment" when nothing usable is left."""
    result = _compact(text, TRANSACTION_DESC_MAX) if isinstance(text, str) else ""
    return result or DEFAULT_DESCRIPTION


def _digits_setting(value: object, label: str, field_name: str) -> str:
    text = value.strip() if isinstance(value, str) else ""
    if not _SHORTCODE.fullmatch(text):
        raise InvalidConfiguration(
            f"The M-Pesa {label} must be 5 to 7 digits (got {str(value)[:20]!r}).",
            field=field_name,
        )
    return text


@dataclass(frozen=True)
class ShortcodeConfig:
    """Which M-Pesa account is paid and how: till versus paybill (docs/design.md, 3. Daraja facts).

    Paybill: BusinessShortCode and PartyB are the paybill number.  Till (Buy Goods):
    BusinessShortCode is the store number, PartyB the till number.  A till number given with a
    paybill is ignored (set to None), so a leftover form value cannot change where money goes.
    Surrounding spaces are removed; the passkey never appears in the repr.
    """

    business_shortcode: str
    passkey: str = field(repr=False)
    transaction_type: str = PAYBILL
    till_number: str | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "business_shortcode",
             _digits_setting(self.business_shortcode, "shortcode", "business_shortcode"))
        passkey = self.passkey.strip() if isinstance(self.passkey, str) else ""
        if not passkey:
            raise InvalidConfiguration("The M-Pesa passkey is missing.", field="passkey")
        set_(self, "passkey", passkey)
        if self.transaction_type == TILL:
            if not self.till_number:
                raise InvalidConfiguration(
                    "A till number is required for Buy Goods (till) payments.", field="till_number"
                )
            set_(self, "till_number", _digits_setting(self.till_number, "till number", "till_number"))
        elif self.transaction_type == PAYBILL:
            set_(self, "till_number", None)
        else:
            raise InvalidConfiguration(
                f"The M-Pesa transaction type must be {PAYBILL} or {TILL} "
                f"(got {str(self.transaction_type)[:40]!r}).",
                field="transaction_type",
            )

    @property
    def party_b(self) -> str:
        """Who receives the money: the paybill itself, or the till number."""
        if self.transaction_type == TILL:
            assert self.till_number is not None  # guaranteed by __post_init__
            return self.till_number
        return self.business_shortcode


def _check_callback_url(url: object) -> str:
    """An absolute http(s) URL; the URL itself is never quoted back (it holds a secret path)."""
    text = url.strip() if isinstance(url, str) else ""
    parts = urlsplit(text) if text and not any(c.isspace() for c in text) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidConfiguration(
            "The M-Pesa callback URL must be an absolute http:// or https:// address.",
            field="callback_url",
        )
    return text


def _signed(shortcode: ShortcodeConfig, now: datetime | None) -> dict[str, Any]:
    """The three fields every STK request starts with, from one instant."""
    timestamp, password = timestamp_and_password(
        shortcode.business_shortcode, shortcode.passkey, now
    )
    return {
        "BusinessShortCode": shortcode.business_shortcode,
        "Password": password,
        "Timestamp": timestamp,
    }


def build_stk_push_payload(
    shortcode: ShortcodeConfig,
    *,
    phone: str | int,
    amount: Decimal | float | str,
    reference: str,
    description: str | None,
    callback_url: str,
    max_amount: int = DEFAULT_MAX_AMOUNT,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Validate everything, then return Daraja's exact processrequest body.

    Amount is an int, every other value a string.
    """
    msisdn = normalize_msisdn(phone)
    shillings = check_amount(amount, max_amount)
    url = _check_callback_url(callback_url)
    account = account_reference(reference)
    desc = transaction_desc(description)
    return {
        **_signed(shortcode, now),
        "TransactionType": shortcode.transaction_type,
        "Amount": shillings,
        "PartyA": msisdn,
        "PartyB": shortcode.party_b,
        "PhoneNumber": msisdn,
        "CallBackURL": url,
        "AccountReference": account,
        "TransactionDesc": desc,
    }


def build_stk_query_payload(
    shortcode: ShortcodeConfig, checkout_request_id: str, now: datetime | None = None
) -> dict[str, Any]:
    """Return Daraja's exact stkpushquery body for one CheckoutRequestID."""
    checkout = checkout_request_id.strip() if isinstance(checkout_request_id, str) else ""
    if not checkout:
        raise DarajaValidationError(
            "A CheckoutRequestID is required to query an M-Pesa payment.",
            field="checkout_request_id",
        )
    return {**_signed(shortcode, now), "CheckoutRequestID": checkout}


_SECRET_KEY_PARTS = ("password", "secret", "passkey", "token", "credential")
REDACTED = "***"


def _is_secret_key(key: object) -> bool:
    lowered = str(key).casefold()
    return any(part in lowered for part in _SECRET_KEY_PARTS)


def redact(payload: dict[str, Any]) -> dict[str, Any]:
    """A copy safe to log or store: secret-looking keys (at any depth) become "***"."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: REDACTED if _is_secret_key(k) else clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return clean(payload)
