"""The HTTP plumbing: a threading server whose every handler thread ``stop()`` can join, and the handler.

The handler reads one request (Content-Length only, at most 1 MiB), hands it to the simulator's ``_dispatch``
and writes the answer in one write, keeping the connection alive as Daraja's gateway does.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .state import _Response

_logger = logging.getLogger(__name__)

_MAX_BODY = 1 << 20


class _HttpServer(ThreadingHTTPServer):
    """One daemon thread per connection, tracked here so that stop() joins every one of them.

    (socketserver's own bookkeeping skips daemon threads, and non-daemon ones would keep a process whose
    simulator was never stopped alive while a client holds a keep-alive connection.)
    """

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], simulator: Any) -> None:
        self.simulator = simulator
        self._live: set[socket.socket] = set()
        self._handler_threads: set[threading.Thread] = set()
        self._live_lock = threading.Lock()
        self.connections_opened = 0
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name="daraja-sim-request",
            daemon=True,
        )
        with self._live_lock:
            self._live.add(request)
            self._handler_threads.add(thread)
            self.connections_opened += 1
        thread.start()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._live_lock:
                self._handler_threads.discard(threading.current_thread())

    def shutdown_request(self, request: Any) -> None:
        with self._live_lock:
            self._live.discard(request)
        super().shutdown_request(request)

    def close_live_connections(self) -> None:
        """Wake the threads waiting on idle keep-alive connections so that they end."""
        with self._live_lock:
            live = list(self._live)
        for sock in live:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def join_handler_threads(self) -> None:
        while True:
            with self._live_lock:
                threads = list(self._handler_threads)
            if not threads:
                return
            for thread in threads:
                thread.join()
                with self._live_lock:
                    self._handler_threads.discard(thread)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Daraja's gateway
    server_version = "Daraja-Simulator/1.0"
    sys_version = ""
    timeout = 120  # an idle keep-alive connection is closed after this many seconds
    disable_nagle_algorithm = True
    server: _HttpServer

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        length_text = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or (
            length_text is not None and not length_text.strip().isdigit()
        ):
            self._write(_Response(400, {"errorMessage": "Content-Length required"}, close=True))
            return
        length = int(length_text or 0)
        if length > _MAX_BODY:
            self._write(_Response(413, {"errorMessage": "Request too large"}, close=True))
            return
        raw = self.rfile.read(length) if length else b""
        try:
            response = self.server.simulator._dispatch(method, self.path, self.headers, raw)
        except Exception:  # a bug must answer 500, not hang the client
            _logger.exception("Daraja simulator: error while answering %s %s", method, self.path)
            response = _Response(500, {"errorCode": "500.000.00", "errorMessage": "Internal Server Error"})
        self._write(response)

    def _write(self, response: _Response) -> None:
        if isinstance(response.body, bytes):
            payload = response.body
        else:
            payload = json.dumps(response.body).encode("utf-8")
        head = [
            f"{self.protocol_version} {response.status} {self.responses.get(response.status, ('',))[0]}",
            f"Server: {self.server_version}",
            f"Date: {self.date_time_string()}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(payload)}",
        ]
        if response.close:
            head.append("Connection: close")
            self.close_connection = True
        # One write for headers and body: no Nagle / delayed-ACK stall on keep-alive connections.
        try:
            self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)
        except OSError:
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        _logger.debug("%s - %s", self.address_string(), format % args)
