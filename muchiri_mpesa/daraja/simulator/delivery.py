"""POSTs to the merchant's URLs (STK callbacks, C2B validation and confirmation, initiator results), on time.

One scheduler thread pops due actions from a heap and hands them to a small thread pool; a delivery answered
5xx or not answered is retried after ``callback_retry_delays``; 3xx/4xx are answers (Safaricom does not retry).
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .state import CallbackAttempt, CallbackDelivery, SimState, _monotonic

_logger = logging.getLogger(__name__)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Safaricom does not follow redirects: a 3xx is an answer (not retried)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


# No proxies (a callback to 127.0.0.1 or a compose service must go straight there), no redirects.
_CALLBACK_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)


def _post_json(url: str, body: bytes, timeout: float) -> tuple[int | None, str | None, str]:
    """POST `body` to `url`: (HTTP status or None, error text or None, response text)."""
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "Daraja-Simulator/1.0"},
    )
    try:
        with _CALLBACK_OPENER.open(request, timeout=timeout) as response:
            return response.status, None, response.read(4096).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        try:
            text = exc.read(4096).decode("utf-8", "replace")
        except Exception:  # noqa: BLE001 - the body of an error answer is informative only
            text = ""
        return exc.code, None, text
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ConnectionRefusedError):
            return None, "connection refused", ""
        if isinstance(reason, TimeoutError):
            return None, "timed out", ""
        return None, str(reason), ""
    except TimeoutError:
        return None, "timed out", ""
    except OSError as exc:  # reset by peer, dropped connection, ...
        return None, f"{type(exc).__name__}: {exc}", ""


OnDone = Callable[[CallbackDelivery], None]


class Deliverer:
    """The scheduler thread, the sending pool and the retry rule, over the shared state."""

    def __init__(self, state: SimState) -> None:
        self.state = state
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._executor: ThreadPoolExecutor | None = None

    # -- life cycle (called by DarajaSimulator.start / stop, the scheduler loop runs in its own thread) --------
    def open(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="daraja-sim-callback")

    def clear(self) -> None:
        """Drop every scheduled action (stop, reset); callers hold the lock."""
        self._heap.clear()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        self._executor = None

    def run(self) -> None:
        state = self.state
        with state.cond:
            while not state.stopping:
                now = _monotonic()
                if self._heap and self._heap[0][0] <= now:
                    _, _, action = heapq.heappop(self._heap)
                    assert self._executor is not None
                    self._executor.submit(action)
                    continue
                state.cond.wait(self._heap[0][0] - now if self._heap else None)

    # -- scheduling ---------------------------------------------------------------------------------------------
    def schedule(self, at: float, action: Callable[[], None]) -> None:
        with self.state.cond:
            if self.state.stopping:
                return
            heapq.heappush(self._heap, (at, next(self._seq), action))
            self.state.cond.notify_all()

    def plan(self, delivery: CallbackDelivery, on_done: OnDone | None = None) -> CallbackDelivery:
        """Keep ``delivery`` (so the inspection helpers see it) and send it at its ``due_at``."""
        with self.state.cond:
            self.state.deliveries.append(delivery)
            self.state.cond.notify_all()
        self.schedule(delivery.due_at, lambda: self.start(delivery, on_done))
        return delivery

    def start(self, delivery: CallbackDelivery, on_done: OnDone | None = None) -> None:
        with self.state.lock:
            if self.state.stopping or delivery.state != "scheduled":
                return
            delivery.state = "sending"
        self.attempt(delivery, 1, on_done)

    def attempt(self, delivery: CallbackDelivery, number: int, on_done: OnDone | None = None) -> None:
        """One POST of ``delivery``; schedules the retry, or calls ``on_done`` once it is done."""
        state = self.state
        settings = state.settings
        body = json.dumps(delivery.body).encode("utf-8")
        started = _monotonic()
        timeout = delivery.timeout if delivery.timeout is not None else settings.callback_timeout
        status, error, text = _post_json(delivery.url, body, timeout)
        duration = _monotonic() - started
        retries = settings.callback_retry_delays if delivery.retries else ()
        retry_in: float | None = None
        with state.cond:
            delivery.attempts.append(CallbackAttempt(number, status, error, text, started, duration))
            if status is not None and status < 300:
                delivery.state = "delivered"
            elif status is not None and status < 500:
                delivery.state = "refused"  # 3xx/4xx: Safaricom does not retry
            elif number <= len(retries) and not state.stopping:
                retry_in = retries[number - 1]
                delivery.state = "sending"
            else:
                delivery.state = "failed"
            state.cond.notify_all()
        _logger.info(
            "%s %s (copy %s, attempt %s) to %s -> %s%s",
            delivery.kind,
            delivery.checkout_request_id or delivery.reference,
            delivery.copy_number,
            number,
            delivery.url,
            status if status is not None else error,
            f", retry in {retry_in} s" if retry_in is not None else "",
        )
        if retry_in is not None:
            self.schedule(_monotonic() + retry_in, lambda: self.attempt(delivery, number + 1, on_done))
            with state.lock:
                if state.stopping and delivery.state == "sending":
                    delivery.state = "cancelled"
                    state.cond.notify_all()
            return
        if on_done is not None and delivery.done:
            on_done(delivery)
