"""Result and error code catalogue: compared as text, unknown stays pending."""

from __future__ import annotations

import importlib
import pathlib
import re

import pytest

from muchiri_mpesa import daraja
from muchiri_mpesa.daraja import (
    ERROR_CODES,
    INVALID_TOKEN_CODES,
    RESULT_CODES,
    Outcome,
    ResultCode,
    classify_result,
    codes,
    describe_api_error,
    is_being_processed,
)

FAILED_CODES = ["1", "2", "3", "4", "8", "17", "26", "1001", "1019", "1025", "9999", "1037",
                "2001", "2028", "2029", "SFC_IC0003", "8006"]


def test_catalogue_covers_exactly_the_documented_codes() -> None:
    assert set(RESULT_CODES) == {"0", "1032", *FAILED_CODES}
    for code, entry in RESULT_CODES.items():
        assert entry.code == code


def test_outcomes() -> None:
    assert RESULT_CODES["0"].outcome is Outcome.SUCCESS
    assert RESULT_CODES["1032"].outcome is Outcome.CANCELED
    assert RESULT_CODES["1032"].message == "You cancelled the M-Pesa prompt."
    for code in FAILED_CODES:
        assert RESULT_CODES[code].outcome is Outcome.FAILED, code


def test_every_message_is_a_sentence() -> None:
    for entry in RESULT_CODES.values():
        assert entry.message and entry.message[0].isupper() and entry.message.endswith("."), entry


def test_outcome_values_are_plain_strings() -> None:
    assert [o.value for o in Outcome] == ["success", "canceled", "failed", "pending"]
    assert Outcome("pending") is Outcome.PENDING
    assert Outcome.SUCCESS == "success"


@pytest.mark.parametrize(("code", "expected"), [
    (0, "0"), ("0", "0"), (" 0 ", "0"), (1032, "1032"), ("1032", "1032"), ("1032\n", "1032"),
    (1037, "1037"), ("SFC_IC0003", "SFC_IC0003"), (" SFC_IC0003 ", "SFC_IC0003"), (2001, "2001"),
])
def test_codes_compare_as_text(code: object, expected: str) -> None:
    assert classify_result(code) is RESULT_CODES[expected]


@pytest.mark.parametrize(("code", "text"), [("1234", "1234"), (4999, "4999"), ("", ""),
                                             (None, ""), ("abc", "abc"), (0.5, "0.5")])
def test_unknown_codes_stay_pending(code: object, text: str) -> None:
    result = classify_result(code)
    assert result == ResultCode(text, Outcome.PENDING, "M-Pesa has not confirmed this payment yet.")


def test_api_error_catalogue() -> None:
    for code in ("400.002.02", "404.001.03", "404.001.04", "500.001.1001", "500.003.02",
                 "500.003.03", "401.002.01"):
        assert ERROR_CODES[code].code == code
    assert ERROR_CODES["400.002.02"].retryable is False
    assert ERROR_CODES["404.001.03"].retryable is True
    assert ERROR_CODES["500.003.02"].retryable is True
    assert ERROR_CODES["500.003.03"].retryable is True
    assert ERROR_CODES["500.001.1001"].retryable is False
    assert {"404.001.03", "401.002.01"} <= INVALID_TOKEN_CODES


@pytest.mark.parametrize(("code", "message", "expected"), [
    ("500.001.1001", "The transaction is being processed", True),
    ("500.001.1001", "THE TRANSACTION IS BEING PROCESSED", True),
    (" 500.001.1001 ", "being processed", True),
    ("500.001.1001", "Unable to lock subscriber, a transaction is already in process", False),
    ("500.001.1001", "Wrong credentials", False),
    ("500.001.1001", None, False),
    ("500.003.02", "The transaction is being processed", False),
    (None, "The transaction is being processed", False),
])
def test_is_being_processed(code: str | None, message: str | None, expected: bool) -> None:
    assert is_being_processed(code, message) is expected


def test_subscriber_locked_is_a_final_refusal_of_this_push() -> None:
    entry = describe_api_error(
        "500.001.1001",
        "Unable to lock subscriber, a transaction is already in process for the current subscriber",
    )
    assert entry is not None and entry.retryable is False
    assert entry.message == (
        "Another M-Pesa prompt is already waiting on this phone. Complete or cancel it, then try "
        "again."
    )


def test_describe_api_error_refines_500_001_1001_by_message() -> None:
    wrong = describe_api_error("500.001.1001", "Wrong credentials")
    assert wrong is not None and "passkey" in wrong.message
    missing = describe_api_error("500.001.1001", "Merchant does not exist")
    assert missing is not None and "shortcode" in missing.message
    assert describe_api_error("500.001.1001", "something new") is ERROR_CODES["500.001.1001"]
    assert describe_api_error("500.003.02", "Spike arrest violation") is ERROR_CODES["500.003.02"]
    assert describe_api_error("999.999.99", "what") is None
    assert describe_api_error(None, None) is None


# -- one catalogue ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("module", "names"), [
    ("initiator", ["ALREADY_REVERSED_CODE", "INITIATOR_INVALID_CODES", "INITIATOR_RESULT_CODES",
                   "UNKNOWN_TRANSACTION_CODES", "describe_initiator_result"]),
    ("c2b", ["C2B_INVALID_ACCOUNT", "C2B_INVALID_AMOUNT", "C2B_INVALID_KYC", "C2B_INVALID_MSISDN",
             "C2B_INVALID_SHORTCODE", "C2B_OTHER_ERROR", "C2B_REJECTION_CODES", "PRODUCT_MISMATCH_CODE"]),
    ("pull", ["PULL_NONE_FOUND", "PULL_SUCCESS"]),
])
def test_daraja_codes_live_in_codes_and_stay_importable_where_they_were(module: str, names: list[str]) -> None:
    where = importlib.import_module(f"muchiri_mpesa.daraja.{module}")
    for name in names:
        assert getattr(where, name) is getattr(codes, name), name
        assert name in codes.__all__ and name in where.__all__, name
        if hasattr(daraja, name):
            assert getattr(daraja, name) is getattr(codes, name), name


def test_no_daraja_code_is_written_outside_the_catalogue() -> None:
    """Outside codes.py (and the simulator, which plays Safaricom's side), the library names Daraja's codes."""
    root = pathlib.Path(__file__).resolve().parent.parent / "muchiri_mpesa" / "daraja"
    code = re.compile(r"""["'](?:R0000\d\d|C2B000\d\d|\d{3}\.\d{3}\.\d{2,4}|1000|1001)["']""")
    found = [
        f"{path.name}:{number}: {line.strip()}"
        for path in sorted(root.glob("*.py")) if path.name != "codes.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if code.search(line) and not line.lstrip().startswith("#")
    ]
    assert found == []


def test_initiator_codes_and_messages() -> None:
    assert codes.ALREADY_REVERSED_CODE in codes.INITIATOR_RESULT_CODES
    assert set(codes.UNKNOWN_TRANSACTION_CODES) | set(codes.INITIATOR_INVALID_CODES) <= set(
        codes.INITIATOR_RESULT_CODES)
    assert codes.describe_initiator_result(" R000001 ") == codes.INITIATOR_RESULT_CODES["R000001"]
    assert "code X9" in codes.describe_initiator_result("X9")
