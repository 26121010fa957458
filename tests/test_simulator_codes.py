"""The simulator and the library agree on Daraja's codes.

The simulator writes Safaricom's codes itself, on purpose (a code mistyped in daraja/codes.py must fail the tests
against the simulator, not be echoed by it): these checks compare the two copies, typed apart.
"""

from __future__ import annotations

import pytest

from muchiri_mpesa.daraja import codes
from muchiri_mpesa.daraja.c2b import is_already_registered
from muchiri_mpesa.daraja.simulator import c2b as sim_c2b
from muchiri_mpesa.daraja.simulator import initiator as sim_initiator
from muchiri_mpesa.daraja.simulator import pull as sim_pull
from muchiri_mpesa.daraja.simulator import scenarios as sim_scenarios
from muchiri_mpesa.daraja.simulator import server as sim_server
from muchiri_mpesa.daraja.simulator import state as sim_state
from muchiri_mpesa.daraja.simulator import stk as sim_stk


def test_initiator_result_codes() -> None:
    assert sim_initiator.ALREADY_REVERSED[0] == codes.ALREADY_REVERSED_CODE
    assert sim_initiator.INVALID_ORIGINAL[0] == codes.UNKNOWN_TRANSACTION_CODE
    assert sim_initiator.INVALID_ORIGINAL[0] in codes.UNKNOWN_TRANSACTION_CODES
    assert str(sim_initiator.INVALID_INITIATOR[0]) in codes.INITIATOR_INVALID_CODES
    for code, _desc in (sim_initiator.ALREADY_REVERSED, sim_initiator.INVALID_ORIGINAL,
                        sim_initiator.INVALID_INITIATOR):
        assert str(code) in codes.INITIATOR_RESULT_CODES


def test_c2b_registration_codes() -> None:
    assert sim_c2b.NO_PRODUCT[1] == codes.PRODUCT_MISMATCH_CODE
    assert sim_c2b.ALREADY_REGISTERED[1] == codes.URLS_ALREADY_REGISTERED_CODE
    assert is_already_registered(sim_c2b.ALREADY_REGISTERED[1], sim_c2b.ALREADY_REGISTERED[2])


def test_pull_response_codes() -> None:
    assert (sim_pull.RECORDS_FOUND, sim_pull.NO_RECORDS) == (codes.PULL_SUCCESS, codes.PULL_NONE_FOUND)


def test_api_error_codes() -> None:
    assert sim_state._INVALID_TOKEN[1] in codes.INVALID_TOKEN_CODES
    for name in ("spike_arrest", "quota"):
        _status, code, _message = sim_server.INJECTABLE_ERRORS[name]
        assert codes.ERROR_CODES[code].retryable, name
    _status, code, _message = sim_server.INJECTABLE_ERRORS["invalid"]
    assert not codes.ERROR_CODES[code].retryable
    for code in (sim_state._INVALID_AUTH[1], sim_state._INVALID_GRANT[1], sim_state._NOT_FOUND[1],
                 sim_state._WRONG_CREDENTIALS[1], sim_c2b.ALREADY_REGISTERED[1]):
        assert code in codes.ERROR_CODES
    assert codes.is_being_processed("500.001.1001", sim_stk.BEING_PROCESSED_MESSAGE)
    locked = codes.describe_api_error("500.001.1001", sim_scenarios.LOCKED_SUBSCRIBER_MESSAGE)
    assert locked is not None and locked.message == codes.SUBSCRIBER_LOCKED_MESSAGE
    wrong = codes.describe_api_error(*sim_state._WRONG_CREDENTIALS[1:])
    assert wrong is not None and not wrong.retryable and "shortcode and passkey" in wrong.message


@pytest.mark.parametrize("scenario", [
    sim_scenarios.DEFAULT_SCENARIO, sim_scenarios.ABOVE_MAXIMUM_SCENARIO, *sim_scenarios.MAGIC_NUMBERS.values(),
], ids=lambda scenario: scenario.summary[:30])
def test_stk_scenarios_end_as_their_summary_says(scenario: sim_scenarios.Scenario) -> None:
    if scenario.refuses_push:
        return
    outcome = codes.classify_result(scenario.result_code).outcome
    expected = (codes.Outcome.SUCCESS if scenario.is_success
                else codes.Outcome.CANCELED if "cancelled" in scenario.summary else codes.Outcome.FAILED)
    assert outcome is expected
