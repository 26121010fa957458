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


# --- A DarajaClient on the simulator (tests/test_simulator_initiator.py, test_simulator_c2b.py, ...) -------
@pytest.fixture
def daraja_client(daraja_sim):
    """make(sim=daraja_sim, **client_kwargs): a DarajaClient with the simulator's default credentials."""
    from muchiri_mpesa.daraja import DarajaClient, DarajaCredentials, ShortcodeConfig  # noqa: PLC0415
    from muchiri_mpesa.daraja.simulator import (  # noqa: PLC0415
        DEFAULT_CONSUMER_KEY,
        DEFAULT_CONSUMER_SECRET,
        DEFAULT_SHORTCODE,
        SANDBOX_PASSKEY,
    )

    def make(sim=None, **kwargs):
        sim = sim or daraja_sim
        return DarajaClient(
            DarajaCredentials(DEFAULT_CONSUMER_KEY, DEFAULT_CONSUMER_SECRET, base_url=sim.base_url),
            ShortcodeConfig(DEFAULT_SHORTCODE, SANDBOX_PASSKEY),
            **{"timeout": (2.0, 5.0), **kwargs},
        )

    return make
