"""The one rounding rule for M-Pesa amounts, and the per-payment limits.

Daraja takes whole shillings only.  Rounding happens here and nowhere else, and always up
(ROUND_CEILING), so a customer is never under-charged; a float goes through ``Decimal(str(x))``
so that 100.1 means 100.1 and not 100.099999...  Pass Odoo amounts already rounded to the
currency (``currency.round(amount)``) or as Decimal so float noise never adds a shilling.
"""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal, InvalidOperation

from .errors import InvalidAmount, InvalidConfiguration

__all__ = [
    "DARAJA_MAX_AMOUNT",
    "DEFAULT_MAX_AMOUNT",
    "MIN_AMOUNT",
    "check_amount",
    "to_whole_shillings",
]

DARAJA_MAX_AMOUNT = 250_000  # Safaricom's ceiling for one transaction
DEFAULT_MAX_AMOUNT = DARAJA_MAX_AMOUNT  # one prompt's default cap (docs/design.md, 5. Money rules)
MIN_AMOUNT = 1

# Far above any payment, low enough that int() of the value stays cheap for absurd input.
_ABSURD = Decimal(10) ** 15


def _shown(amount: object) -> str:
    text = str(amount).strip()
    return text if len(text) <= 30 else text[:27] + "..."


def _as_decimal(
    amount: object, error: type[InvalidAmount | InvalidConfiguration], field: str, what: str
) -> Decimal:
    """Read a number as Decimal (floats through their shortest text), or raise ``error``."""
    refused = error(f"{_shown(amount)!r} is not {what}.", field=field)
    if isinstance(amount, Decimal):
        value = amount
    elif isinstance(amount, bool) or not isinstance(amount, (int, float, str)):
        raise refused
    else:
        try:
            value = Decimal(str(amount).strip())
        except (InvalidOperation, ValueError):  # ValueError: int too long to print
            raise refused from None
    if not value.is_finite():
        raise refused
    return value


def _kes(value: int) -> str:
    return f"KES {value:,}"


def to_whole_shillings(amount: Decimal | float | str) -> int:
    """Round up to a whole shilling; raise InvalidAmount for negative or non-numeric input."""
    value = _as_decimal(amount, InvalidAmount, "amount", "an amount")
    if value < 0:
        raise InvalidAmount(f"The amount cannot be negative ({_shown(amount)}).")
    if value >= _ABSURD:
        raise InvalidAmount(f"{_shown(amount)} is far too large to be a payment amount.")
    return int(value.to_integral_value(rounding=ROUND_CEILING))


def check_amount(amount: Decimal | float | str, maximum: int = DEFAULT_MAX_AMOUNT) -> int:
    """Whole shillings within MIN_AMOUNT..maximum, where maximum itself is within Daraja's limit."""
    limit = _as_decimal(maximum, InvalidConfiguration, "max_amount", "a number of shillings")
    if limit != limit.to_integral_value() or not MIN_AMOUNT <= limit <= DARAJA_MAX_AMOUNT:
        raise InvalidConfiguration(
            f"The M-Pesa payment limit must be a whole number of shillings from {_kes(MIN_AMOUNT)}"
            f" to {_kes(DARAJA_MAX_AMOUNT)} (got {_shown(maximum)}).",
            field="max_amount",
        )
    ceiling = int(limit)
    shillings = to_whole_shillings(amount)
    if shillings < MIN_AMOUNT:
        raise InvalidAmount(
            f"{_kes(shillings)} is below the {_kes(MIN_AMOUNT)} minimum for an M-Pesa payment."
        )
    if shillings > ceiling:
        raise InvalidAmount(
            f"{_kes(shillings)} is above the {_kes(ceiling)} limit for one M-Pesa payment."
        )
    return shillings
