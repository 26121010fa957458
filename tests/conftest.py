# --- Daraja simulator fixtures (tests/test_simulator.py, tests/test_client_against_simulator.py) -------------
import threading

import pytest

from muchiri_mpesa.daraja.simulator import CallbackListener, DarajaSimulator

# Small delays keep the suite fast; the ordering between them is what the scenarios need.
FAST_SIMULATOR = {
    "callback_delay": 0.15,
    "prompt_timeout": 0.45,
    "late_callback_delay": 0.7,
    "callback_retry_delays": (0.05, 0.1, 0.2),
    "callback_timeout": 2.0,
}


def _live_threads(prefix):
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix) and t.is_alive()]


@pytest.fixture
def make_simulator():
    """Start DarajaSimulator(port=0, **FAST_SIMULATOR | overrides); stopped (and checked for leaks) after."""
    started = []

    def make(**overrides):
        simulator = DarajaSimulator(port=0, **{**FAST_SIMULATOR, **overrides})
        simulator.start()
        started.append(simulator)
        return simulator

    yield make
    for simulator in started:
        simulator.stop()
    assert _live_threads("daraja-sim") == [], "the Daraja simulator leaked threads"


@pytest.fixture
def daraja_sim(make_simulator):
    return make_simulator()


@pytest.fixture
def callback_listener():
    """A CallBackURL on loopback that records what it receives (answers 200 {"ResultCode": 0, ...})."""
    with CallbackListener() as listener:
        yield listener
    assert _live_threads("daraja-callback-listener") == [], "the callback listener leaked threads"
