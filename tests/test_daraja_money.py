"""The one rounding rule (always up to a whole shilling) and the per-payment limits."""

from __future__ import annotations

from decimal import Decimal

import pytest

from muchiri_mpesa.daraja import (
    DARAJA_MAX_AMOUNT,
    DEFAULT_MAX_AMOUNT,
    MIN_AMOUNT,
    InvalidAmount,
    InvalidConfiguration,
    check_amount,
    to_whole_shillings,
)


def test_limits() -> None:
    assert (MIN_AMOUNT, DEFAULT_MAX_AMOUNT, DARAJA_MAX_AMOUNT) == (1, 250_000, 250_000)


@pytest.mark.parametrize(
    ("amount", "expected"),
    [
        (Decimal(100), 100),
        (Decimal("100.00"), 100),
        (Decimal("100.01"), 101),
        (Decimal("99.999"), 100),
        (Decimal("0.0001"), 1),
        (Decimal(0), 0),
        (Decimal("-0"), 0),
        (5, 5),
        (0, 0),
        (100.0, 100),
        (100.1, 101),
        (1999.99, 2000),
        (0.1 + 0.2, 1),
        ("99.5", 100),
        (" 250 ", 250),
        ("1e2", 100),
        ("150000.01", 150_001),
    ],
)
def test_rounds_up_to_a_whole_shilling(amount: object, expected: int) -> None:
    result = to_whole_shillings(amount)  # type: ignore[arg-type]
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize(
    "amount",
    [-1, -0.01, "-0.5", Decimal(-1), float("nan"), float("inf"), Decimal("NaN"),
     Decimal("sNaN"), Decimal("Infinity"), "nan", "inf", "abc", "", "1,000", "KES 100",
     None, True, False, [], b"100", "1e20", 10**30],
)
def test_bad_amounts_are_refused(amount: object) -> None:
    with pytest.raises(InvalidAmount) as caught:
        to_whole_shillings(amount)  # type: ignore[arg-type]
    assert caught.value.field == "amount"
    assert isinstance(caught.value, ValueError)


def test_negative_amount_message() -> None:
    with pytest.raises(InvalidAmount, match="cannot be negative"):
        to_whole_shillings("-5")


@pytest.mark.parametrize(
    ("amount", "expected"),
    [(1, 1), (0.5, 1), (Decimal("0.01"), 1), (250_000, 250_000), ("249999.2", 250_000)],
)
def test_check_amount_accepts_within_limits(amount: object, expected: int) -> None:
    assert check_amount(amount) == expected  # type: ignore[arg-type]


def test_above_the_default_limit_says_so_after_rounding() -> None:
    with pytest.raises(InvalidAmount) as caught:
        check_amount(Decimal("250000.01"))
    assert str(caught.value) == "KES 250,001 is above the KES 250,000 limit for one M-Pesa payment."


def test_zero_is_below_the_minimum() -> None:
    with pytest.raises(InvalidAmount) as caught:
        check_amount(0)
    assert str(caught.value) == "KES 0 is below the KES 1 minimum for an M-Pesa payment."


def test_a_lower_business_limit_applies() -> None:
    assert check_amount(1000, maximum=1000) == 1000
    with pytest.raises(InvalidAmount, match="above the KES 1,000 limit"):
        check_amount("1000.5", maximum=1000)


def test_daraja_maximum_is_allowed_as_limit() -> None:
    assert check_amount(250_000, maximum=DARAJA_MAX_AMOUNT) == 250_000


@pytest.mark.parametrize("maximum", [150_000.0, Decimal(200000), "5000"])
def test_whole_limits_of_any_numeric_type_are_accepted(maximum: object) -> None:
    assert check_amount(10, maximum=maximum) == 10  # type: ignore[arg-type]


@pytest.mark.parametrize("maximum", [0, -5, 250_001, 1000.5, "abc", None, True, float("nan")])
def test_an_unusable_limit_is_a_configuration_error(maximum: object) -> None:
    with pytest.raises(InvalidConfiguration) as caught:
        check_amount(10, maximum=maximum)  # type: ignore[arg-type]
    assert caught.value.field == "max_amount"


def test_the_limit_is_checked_before_the_amount() -> None:
    with pytest.raises(InvalidConfiguration):
        check_amount("not a number", maximum=300_000)
