"""Phone numbers as distributors type them (0712 345 678, +254 712-345-678, 712345678...)."""

from __future__ import annotations

import pytest

from muchiri_mpesa.daraja import InvalidPhoneNumber, mask_msisdn, normalize_msisdn


@pytest.mark.parametrize(
    "raw",
    [
        "0712345678",
        "0712 345 678",
        "0712-345-678",
        "0712.345.678",
        "(0712) 345 678",
        " 0712345678 ",
        "\t0712345678\n",
        "+254712345678",
        "+254 712 345 678",
        "+254-712-345-678",
        "+254 (0) 712 345 678",
        "254712345678",
        "254 712 345678",
        "00254712345678",
        "712345678",
        "712 345 678",
        712345678,
        254712345678,
    ],
)
def test_every_accepted_format_gives_the_same_msisdn(raw: str | int) -> None:
    assert normalize_msisdn(raw) == "254712345678"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("0110123456", "254110123456"),
        ("0115 999 999", "254115999999"),
        ("+254 111 000 000", "254111000000"),
        ("111000000", "254111000000"),
        ("254112345678", "254112345678"),
    ],
)
def test_01_numbers_are_accepted(raw: str, expected: str) -> None:
    assert normalize_msisdn(raw) == expected


@pytest.mark.parametrize(
    "prefix",
    ["0700", "0729", "0740", "0743", "0745", "0746", "0748", "0757", "0758", "0759",
     "0768", "0769", "0790", "0799", "0110", "0115"],
)
def test_every_safaricom_range_boundary_is_accepted(prefix: str) -> None:
    assert normalize_msisdn(prefix + "123456") == "254" + prefix[1:] + "123456"


@pytest.mark.parametrize(
    "prefix",
    ["0730", "0739", "0744", "0747", "0749", "0750", "0756", "0760", "0767", "0770",
     "0780", "0789", "0100", "0102", "0109", "0116", "0119"],
)
def test_other_networks_are_refused_as_not_safaricom(prefix: str) -> None:
    with pytest.raises(InvalidPhoneNumber, match="is not a Safaricom number"):
        normalize_msisdn(prefix + "123456")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("0712 345 67", "has too few digits"),
        ("071234", "has too few digits"),
        ("25471234567", "has too few digits"),
        ("+25471234567", "has too few digits"),
        ("71234567", "has too few digits"),
        ("07123456789", "has too many digits"),
        ("2547123456789", "has too many digits"),
        ("7123456789", "has too many digits"),
        ("+447911123456", "is not a Kenyan number"),
        ("+1 202 555 0100", "is not a Kenyan number"),
        ("447911123456", "is not a Kenyan number"),
        ("0044 7911 123456", "is not a Kenyan number"),
        ("0201234567", "is not a Kenyan mobile number"),
        ("254201234567", "is not a Kenyan mobile number"),
        ("0733 123 456", "is not a Safaricom number"),
        ("0712abc678", "is not a phone number"),
        ("07+12345678", "is not a phone number"),
        ("\u0660\u0667\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668", "is not a phone number"),
        ("", "A phone number is required"),
        ("   ", "A phone number is required"),
    ],
)
def test_each_rejection_says_why(raw: str, message: str) -> None:
    with pytest.raises(InvalidPhoneNumber, match=message) as caught:
        normalize_msisdn(raw)
    assert caught.value.field == "phone"
    assert isinstance(caught.value, ValueError)


def test_the_message_quotes_the_number_as_typed() -> None:
    with pytest.raises(InvalidPhoneNumber) as caught:
        normalize_msisdn(" 0733 123 456 ")
    assert str(caught.value).startswith("0733 123 456 is not a Safaricom number")


def test_a_very_long_input_is_shortened_in_the_message() -> None:
    with pytest.raises(InvalidPhoneNumber) as caught:
        normalize_msisdn("0" * 500)
    assert len(str(caught.value)) < 120


@pytest.mark.parametrize("raw", [None, 712345678.0, True, ["0712345678"], b"0712345678", -712345678])
def test_values_that_are_not_phone_numbers_are_refused(raw: object) -> None:
    with pytest.raises(InvalidPhoneNumber, match="is not a phone number"):
        normalize_msisdn(raw)  # type: ignore[arg-type]


def test_mask_keeps_the_first_four_and_last_two_digits() -> None:
    assert mask_msisdn("254712345649") == "2547******49"
    assert mask_msisdn("254110123456") == "2541******56"


def test_mask_hides_short_values_completely() -> None:
    assert mask_msisdn("12345") == "*****"
    assert mask_msisdn("") == ""
