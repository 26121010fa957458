"""A tiny local CallBackURL: records every POST it receives and answers like a Daraja integrator.

Used by the demo and the tests, and handy to look at the simulator's callbacks without any web framework::

    with CallbackListener() as listener:
        ...  # push with CallBackURL=listener.url
        received = listener.wait_for(1, timeout=5)
        print(received[0].json())
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .state import _monotonic

ACCEPTED = {"ResultCode": 0, "ResultDesc": "Accepted"}


@dataclass(frozen=True)
class ReceivedCallback:
    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float  # time.monotonic() (the real one, even under freezegun)
    answered_status: int

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))


class _ListenerServer(ThreadingHTTPServer):
    daemon_threads = False  # joined by server_close(): one request per connection, nothing waits idle
    block_on_close = True

    def __init__(self, address: tuple[str, int], listener: CallbackListener) -> None:
        self.listener = listener
        super().__init__(address, _ListenerHandler)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        threading.current_thread().name = "daraja-callback-listener-request"
        super().process_request_thread(request, client_address)


class _ListenerHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection, as the simulator posts them
    server: _ListenerServer

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        status, delay = self.server.listener._answer()
        if delay:
            threading.Event().wait(delay)
        self.server.listener._store(
            ReceivedCallback(self.path, dict(self.headers.items()), body, _monotonic(), status)
        )
        payload = json.dumps(ACCEPTED if status < 300 else {"error": "refused by the test listener"}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class CallbackListener:
    """An HTTP server on loopback that plays the merchant's CallBackURL.

    :param statuses: HTTP statuses for the first requests, in order (e.g. ``[500]``: the first callback gets a
        500, the following ones 200)
    :param delay: seconds to wait before answering each request
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        path: str = "/callback",
        statuses: Sequence[int] = (),
        delay: float = 0.0,
    ) -> None:
        self.host = host
        self.path = path if path.startswith("/") else f"/{path}"
        self._requested_port = port
        self._statuses = list(statuses)
        self.delay = delay
        self._received: list[ReceivedCallback] = []
        self._cond = threading.Condition()
        self._server: _ListenerServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> CallbackListener:
        self._server = _ListenerServer((self.host, self._requested_port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="daraja-callback-listener",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = None
        self._thread = None

    def __enter__(self) -> CallbackListener:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the callback listener is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"

    @property
    def received(self) -> list[ReceivedCallback]:
        with self._cond:
            return list(self._received)

    def answer_next(self, *statuses: int) -> None:
        """Answer the next requests with these HTTP statuses (then 200 again)."""
        with self._cond:
            self._statuses.extend(statuses)

    def wait_for(self, count: int = 1, timeout: float = 5.0) -> list[ReceivedCallback]:
        """Wait until at least `count` requests were received; raise TimeoutError otherwise."""
        deadline = _monotonic() + timeout
        with self._cond:
            while len(self._received) < count:
                remaining = deadline - _monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{len(self._received)} of {count} callback(s) received after {timeout} s")
                self._cond.wait(remaining)
            return list(self._received)

    def _answer(self) -> tuple[int, float]:
        with self._cond:
            status = self._statuses.pop(0) if self._statuses else 200
        return status, self.delay

    def _store(self, received: ReceivedCallback) -> None:
        with self._cond:
            self._received.append(received)
            self._cond.notify_all()
