"""Access token freshness and the shared-token store (docs/design.md, 3. Daraja facts)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import pytest

from muchiri_mpesa.daraja import (
    AccessToken,
    DarajaClient,
    DarajaCredentials,
    InvalidConfiguration,
    MemoryTokenStore,
    ShortcodeConfig,
    token_cache_key,
)

UTC = timezone.utc
T0 = datetime(2025, 11, 26, 12, 0, 0, tzinfo=UTC)
SECRET = "consumer-secret-value-9f8e7d"
PASSKEY = "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919"


class Clock:
    """A settable clock shared by the store and the client."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _token(value: str, seconds: int = 3599, start: datetime = T0) -> AccessToken:
    return AccessToken(value, start + timedelta(seconds=seconds))


# -- AccessToken -------------------------------------------------------------------------------

def test_freshness_keeps_a_margin() -> None:
    token = _token("abc", 3599)
    assert token.is_fresh(T0)
    assert token.is_fresh(T0 + timedelta(seconds=3538))
    assert not token.is_fresh(T0 + timedelta(seconds=3539))  # 60 s margin reached
    assert not token.is_fresh(T0 + timedelta(seconds=3600))
    assert token.is_fresh(T0 + timedelta(seconds=3590), margin=timedelta(seconds=5))
    assert not token.is_fresh(T0, margin=timedelta(hours=1))


def test_naive_datetimes_are_utc() -> None:
    token = AccessToken("abc", datetime(2025, 11, 26, 13, 0, 0))
    assert token.expires_at == datetime(2025, 11, 26, 13, 0, 0, tzinfo=UTC)
    assert token.is_fresh(datetime(2025, 11, 26, 12, 0, 0))
    assert not token.is_fresh(datetime(2025, 11, 26, 12, 59, 30))


def test_expiry_in_another_zone_is_stored_as_utc() -> None:
    nairobi = timezone(timedelta(hours=3))
    token = AccessToken("abc", datetime(2025, 11, 26, 16, 0, 0, tzinfo=nairobi))
    assert token.expires_at.utcoffset() == timedelta(0)
    assert token.expires_at == T0 + timedelta(hours=1)


def test_the_value_never_shows() -> None:
    token = _token("very-secret-token-value")
    assert "very-secret-token-value" not in repr(token)
    assert "very-secret-token-value" not in str(token)
    assert repr(token).startswith("AccessToken(expires_at=datetime.datetime(2025, 11, 26,")


@pytest.mark.parametrize("value", ["", None, 42])
def test_a_token_needs_a_value(value: object) -> None:
    with pytest.raises(ValueError, match="non-empty value"):
        AccessToken(value, T0)  # type: ignore[arg-type]


# -- MemoryTokenStore --------------------------------------------------------------------------

def test_empty_store_fetches() -> None:
    store = MemoryTokenStore(clock=Clock())
    assert store.load("k") is None
    token = store.refresh("k", lambda: _token("one"), None)
    assert token.value == "one"
    assert store.load("k") == token


def test_a_fresh_token_that_is_not_stale_is_returned_without_fetching() -> None:
    """Another worker already refreshed: the caller's stale token differs from the stored one."""
    store = MemoryTokenStore(clock=Clock())
    store.refresh("k", lambda: _token("new"), None)
    calls: list[int] = []

    def fetch() -> AccessToken:
        calls.append(1)
        return _token("newer")

    assert store.refresh("k", fetch, stale=_token("old")).value == "new"
    assert store.refresh("k", fetch, stale=None).value == "new"
    assert calls == []


def test_the_stale_token_itself_is_replaced_even_if_it_looks_fresh() -> None:
    """Daraja refused it (401 / 404.001.03): its expiry time no longer matters."""
    store = MemoryTokenStore(clock=Clock())
    rejected = store.refresh("k", lambda: _token("rejected"), None)
    assert store.refresh("k", lambda: _token("replacement"), stale=rejected).value == "replacement"
    assert store.load("k").value == "replacement"  # type: ignore[union-attr]


def test_an_equal_copy_of_the_stale_token_counts_as_stale() -> None:
    """A database store hands out copies, so staleness compares by value, not identity."""
    store = MemoryTokenStore(clock=Clock())
    store.refresh("k", lambda: AccessToken("rejected", T0 + timedelta(seconds=3599.123456)), None)
    copy = AccessToken("rejected", T0 + timedelta(seconds=3599))  # microseconds lost on the way
    assert store.refresh("k", lambda: _token("replacement"), stale=copy).value == "replacement"


def test_an_expired_or_nearly_expired_token_is_refreshed() -> None:
    clock = Clock()
    store = MemoryTokenStore(clock=clock)
    store.refresh("k", lambda: _token("first", 3599), None)
    clock.now = T0 + timedelta(seconds=3545)  # inside the 60 s margin
    assert store.refresh("k", lambda: _token("second", 7200), None).value == "second"


def test_the_store_margin_is_configurable() -> None:
    clock = Clock(T0 + timedelta(seconds=3545))
    store = MemoryTokenStore(clock=clock, margin=timedelta(seconds=10))
    store.refresh("k", lambda: _token("first", 3599), None)
    assert store.refresh("k", lambda: _token("second"), None).value == "first"


def test_a_failed_fetch_keeps_the_previous_token() -> None:
    clock = Clock()
    store = MemoryTokenStore(clock=clock)
    store.refresh("k", lambda: _token("first", 100), None)
    clock.now = T0 + timedelta(seconds=90)

    def failing() -> AccessToken:
        raise RuntimeError("Daraja is down")

    with pytest.raises(RuntimeError):
        store.refresh("k", failing, None)
    assert store.load("k").value == "first"  # type: ignore[union-attr]


def test_keys_are_independent() -> None:
    store = MemoryTokenStore(clock=Clock())
    store.refresh("a", lambda: _token("for-a"), None)
    assert store.refresh("b", lambda: _token("for-b"), None).value == "for-b"
    assert store.load("a").value == "for-a"  # type: ignore[union-attr]


def _run_together(worker: Callable[[], None], count: int) -> None:
    threads = [threading.Thread(target=worker) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert not any(thread.is_alive() for thread in threads)


def test_concurrent_refreshes_fetch_exactly_once() -> None:
    store = MemoryTokenStore(clock=Clock())
    workers = 16
    barrier = threading.Barrier(workers)
    fetches: list[int] = []
    results: list[AccessToken] = []

    def fetch() -> AccessToken:
        fetches.append(1)
        time.sleep(0.05)  # a slow Daraja: every other worker arrives meanwhile
        return _token(f"token-{len(fetches)}")

    def worker() -> None:
        barrier.wait()
        results.append(store.refresh("k", fetch, None))

    _run_together(worker, workers)
    assert len(fetches) == 1
    assert len(results) == workers
    assert {token.value for token in results} == {"token-1"}


def test_concurrent_workers_holding_the_same_rejected_token_fetch_once() -> None:
    store = MemoryTokenStore(clock=Clock())
    rejected = store.refresh("k", lambda: _token("rejected"), None)
    workers = 8
    barrier = threading.Barrier(workers)
    fetches: list[int] = []

    def fetch() -> AccessToken:
        fetches.append(1)
        time.sleep(0.05)
        return _token("replacement")

    def worker() -> None:
        barrier.wait()
        store.refresh("k", fetch, rejected)

    _run_together(worker, workers)
    assert len(fetches) == 1
    assert store.load("k").value == "replacement"  # type: ignore[union-attr]


# -- cache key and credentials -----------------------------------------------------------------

def test_cache_key_changes_with_any_credential_and_hides_the_secret() -> None:
    key = token_cache_key("https://sandbox.safaricom.co.ke", "ck", SECRET)
    assert key == token_cache_key("https://sandbox.safaricom.co.ke/", "ck", SECRET)
    assert key != token_cache_key("https://api.safaricom.co.ke", "ck", SECRET)
    assert key != token_cache_key("https://sandbox.safaricom.co.ke", "ck2", SECRET)
    assert key != token_cache_key("https://sandbox.safaricom.co.ke", "ck", SECRET + "x")
    assert SECRET not in key
    assert len(key) < 100


def test_credentials_hide_the_secret_and_normalise_the_url() -> None:
    credentials = DarajaCredentials(" ck ", f" {SECRET} ", "https://sandbox.safaricom.co.ke/ ")
    assert SECRET not in repr(credentials)
    assert credentials.base_url == "https://sandbox.safaricom.co.ke"
    assert (credentials.consumer_key, credentials.consumer_secret) == ("ck", SECRET)
    assert credentials.cache_key == token_cache_key(credentials.base_url, "ck", SECRET)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"consumer_key": ""}, "consumer_key"),
    ({"consumer_secret": "  "}, "consumer_secret"),
    ({"consumer_secret": None}, "consumer_secret"),
    ({"base_url": "sandbox.safaricom.co.ke"}, "base_url"),
    ({"base_url": "ftp://sandbox.safaricom.co.ke"}, "base_url"),
    ({"base_url": "https://sandbox.safaricom.co.ke?x=1"}, "base_url"),
])
def test_bad_credentials_are_configuration_errors(kwargs: dict, field: str) -> None:
    settings = {"consumer_key": "ck", "consumer_secret": SECRET, **kwargs}
    with pytest.raises(InvalidConfiguration) as caught:
        DarajaCredentials(**settings)
    assert caught.value.field == field
    assert SECRET not in str(caught.value)


# -- the client's use of the store (no network: fetch_token is replaced) ------------------------

def _client(clock: Clock, store: MemoryTokenStore | None = None) -> tuple[DarajaClient, list[int]]:
    client = DarajaClient(
        DarajaCredentials("ck", SECRET, "http://127.0.0.1:9"),
        ShortcodeConfig("174379", PASSKEY),
        token_store=store,
        clock=clock,
    )
    fetches: list[int] = []

    def fetch_token(report: object = None) -> AccessToken:
        fetches.append(1)
        return _token(f"fetched-{len(fetches)}", 3599, clock.now)

    client.fetch_token = fetch_token  # type: ignore[method-assign]
    return client, fetches


def test_tokens_are_equal_by_value() -> None:
    assert _token("a", 10) == _token("a", 20)
    assert _token("a") != _token("b")
    assert len({_token("a", 10), _token("a", 20)}) == 1


def test_client_reuses_a_fresh_token_and_refreshes_near_expiry() -> None:
    clock = Clock()
    client, fetches = _client(clock)
    first = client.access_token()
    assert client.access_token() is first
    assert len(fetches) == 1
    clock.now = T0 + timedelta(seconds=3545)
    assert client.access_token().value == "fetched-2"
    assert len(fetches) == 2


def test_client_replaces_a_rejected_token() -> None:
    clock = Clock()
    client, fetches = _client(clock)
    rejected = client.access_token()
    assert client.access_token(stale=rejected).value == "fetched-2"
    assert client.access_token().value == "fetched-2"
    assert len(fetches) == 2


def test_clients_sharing_a_store_share_the_token() -> None:
    clock = Clock()
    store = MemoryTokenStore(clock=clock)
    one, fetches_one = _client(clock, store)
    two, fetches_two = _client(clock, store)
    assert one.access_token() == two.access_token()
    assert len(fetches_one) + len(fetches_two) == 1


def test_client_token_margin_is_used() -> None:
    clock = Clock()
    client = DarajaClient(
        DarajaCredentials("ck", SECRET, "http://127.0.0.1:9"),
        ShortcodeConfig("174379", PASSKEY),
        clock=clock,
        token_margin=timedelta(minutes=10),
    )
    fetches: list[int] = []

    def fetch_token(report: object = None) -> AccessToken:
        fetches.append(1)
        return _token("t", 3599, clock.now)

    client.fetch_token = fetch_token  # type: ignore[method-assign]
    client.access_token()
    clock.now = T0 + timedelta(seconds=3599 - 599)
    client.access_token()
    assert len(fetches) == 2


def test_client_repr_hides_secrets() -> None:
    client, _ = _client(Clock())
    text = repr(client)
    assert SECRET not in text and PASSKEY not in text


def test_client_refuses_an_unusable_limit_at_once() -> None:
    with pytest.raises(InvalidConfiguration):
        DarajaClient(DarajaCredentials("ck", SECRET), ShortcodeConfig("174379", PASSKEY),
                     max_amount=300_000)
