"""A real prefork Odoo 18 (``--workers``) as a subprocess, for the scripts that need real workers: HTTP worker
processes behind one listening socket, a cron worker woken by ``ir.cron._trigger()``, and a master that
respawns a worker killed with ``kill -9`` (tests/odoo_concurrency.py, benchmarks/bench_callbacks.py).  Not a
pytest module.

    with PreforkOdoo("my_db") as odoo:            # waits until /web/health?db_server_status=1 answers
        odoo.url("/web/health")                   # http://127.0.0.1:<free port>/web/health
        odoo.http_workers(), odoo.cron_workers()  # PIDs of the live workers, from the master's children
        odoo.kill_worker(pid)                     # kill -9; odoo.wait_workers(http=2) for the respawn
        odoo.kill_server(); odoo.start(keep_log=True)  # kill -9 of the whole server, then a restart
        parse_cron_log(odoo.log_since(mark))      # which worker ran which cron job, and what it processed
        parse_access_log(odoo.log_since(mark))    # SQL queries and times per request (Odoo's perf figures)
    # stopped: SIGTERM, then SIGKILL of its process group after a timeout

The command is Odoo's own ``odoo.cli.main()`` with ``odoo_scratch_db.db_args()``, started through this very file
(see the end): Odoo's master re-executes ``sys.argv[0]`` to run its long-polling (gevent) process, and with
``python3 -m odoo`` that is ``odoo/__main__.py``, which fails as a script (a relative import) and makes the master
respawn it in a busy loop.  Nothing here uses long polling (the bus, websockets): unless ``longpolling=True`` the
process the master starts for it only waits for its parent to go, so that a gevent installation that cannot start
(as it can be: gevent's plugin loading fails when pkg_resources cannot resolve zope.interface) costs no CPU.  On
Linux the master also stops when the script that started it dies without stopping it (a hard timeout).  The
database must exist with muchiri_mpesa installed (odoo_scratch_db.install).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import odoo_scratch_db  # this file's folder, tests/, is on sys.path wherever it is used

HERE = Path(__file__).resolve().parent
# Set by PreforkOdoo for the launcher at the end of this file.
_IDLE_LONGPOLLING = "MUCHIRI_PREFORK_IDLE_LONGPOLLING"
_PARENT = "MUCHIRI_PREFORK_PARENT"

# "2025-05-06 09:24:48,592 13312 INFO db werkzeug: 127.0.0.1 - - [06/May/2025 09:24:48] "GET /web/health HTTP/1.1"
#  200 - 5 0.010 0.095": Odoo's PerfFilter (odoo/netsvc.py) appends the request thread's SQL query count, the time
# spent in SQL and the remaining (Python) time, or "- - -" when the request ran no query on a cursor.
_ACCESS_LINE = re.compile(
    r"^(?P<logged_at>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (?P<pid>\d+) \w+ \S+ werkzeug: (?P<addr>\S+) - - "
    r'\[[^\]]*\] "(?P<method>[A-Z]+) (?P<path>\S+) [^"]*" (?P<status>\d{3}) \S+ '
    r"(?P<queries>\d+|-) (?P<query_time>[\d.]+|-) (?P<remaining>[\d.]+|-)\s*$"
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # werkzeug colours the request line of some statuses
_WORKER_ALIVE = re.compile(r" (?P<pid>\d+) INFO \S+ odoo\.service\.server: Worker (?P<kind>WorkerHTTP|WorkerCron) "
                           r"\((?P=pid)\) alive")
# "... 13181 INFO db odoo.addons.base.models.ir_cron: Job 'M-Pesa: settle received callbacks' (12) starting":
# ir.cron logs each run of a job (starting, done in N s) and its progress (processed N records, M remaining).
_CRON_LINE = re.compile(
    r"^(?P<logged_at>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (?P<pid>\d+) INFO \S+ odoo\.addons\.base\.models\.ir_cron: "
    r"Job .* \((?P<cron_id>\d+)\) (?P<what>starting|done in [\d.]+s|processed (?P<done>\d+) records, "
    r"(?P<remaining>\d+) records remaining)\s*$"
)
_LOG_LEVEL = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \d+ (?P<level>[A-Z]+) ")


@dataclass(frozen=True)
class AccessLogLine:
    """One request of Odoo's werkzeug access log, with Odoo's three perf figures."""

    logged_at: str  # the log's own timestamp (server time, millisecond resolution)
    pid: int  # the worker that served it
    method: str
    path: str  # as logged: the callback secret is masked ("/payment/lnm/***/stk")
    status: int
    queries: int | None  # SQL queries of the request's thread; None when Odoo logged "-"
    query_time: float | None  # seconds in SQL
    remaining_time: float | None  # seconds outside SQL


def parse_access_line(line: str) -> AccessLogLine | None:
    """The request of one log line, or None when the line is not a werkzeug access line."""
    match = _ACCESS_LINE.match(_ANSI.sub("", line.rstrip("\n")))
    if not match:
        return None

    def number(name: str, kind: type) -> Any:
        value = match[name]
        return None if value == "-" else kind(value)

    return AccessLogLine(
        logged_at=match["logged_at"], pid=int(match["pid"]), method=match["method"], path=match["path"],
        status=int(match["status"]), queries=number("queries", int), query_time=number("query_time", float),
        remaining_time=number("remaining", float),
    )


def parse_access_log(text: str) -> list[AccessLogLine]:
    """Every access line of a piece of Odoo's log, in order."""
    return [entry for entry in map(parse_access_line, text.splitlines()) if entry is not None]


@dataclass(frozen=True)
class CronLogLine:
    """One line of ir.cron about a job: a run starting, ending, or its progress."""

    logged_at: str
    pid: int  # the cron worker that ran it
    cron_id: int
    event: str  # "starting" | "done" | "processed"
    done: int | None  # records processed (the "processed" lines, from ir.cron._notify_progress)
    remaining: int | None


def parse_cron_log(text: str) -> list[CronLogLine]:
    """Every ir.cron job line of a piece of Odoo's log, in order."""
    lines = []
    for line in text.splitlines():
        match = _CRON_LINE.match(line.rstrip("\n"))
        if match:
            event = match["what"].split(" ", 1)[0]
            lines.append(CronLogLine(
                logged_at=match["logged_at"], pid=int(match["pid"]), cron_id=int(match["cron_id"]),
                event=event, done=int(match["done"]) if match["done"] else None,
                remaining=int(match["remaining"]) if match["remaining"] else None,
            ))
    return lines


def free_port() -> int:
    """A TCP port free on loopback now (another process may take it before Odoo binds it: unlikely)."""
    with contextlib.closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _is_addons_dir(path: str) -> bool:
    """Odoo's own test of an addons path entry: a folder holding at least one module."""
    with contextlib.suppress(OSError):
        return any((entry / "__manifest__.py").is_file() for entry in Path(path).iterdir() if entry.is_dir())
    return False


def _db_args() -> list[str]:
    """odoo_scratch_db.db_args(), minus what the calling process's own Odoo configuration added to the addons
    path (its data folder's addons, often empty: the subprocess would refuse it)."""
    args = []
    for arg in odoo_scratch_db.db_args():
        if arg.startswith("--addons-path="):
            arg = "--addons-path=" + ",".join(p for p in arg.split("=", 1)[1].split(",") if _is_addons_dir(p))
        args.append(arg)
    return args


def _psutil() -> Any:
    import psutil  # noqa: PLC0415 - one of Odoo's own requirements: there wherever Odoo is

    return psutil


class PreforkOdoo:
    """``odoo -d DB --workers W --max-cron-threads C`` on loopback, its log in a file."""

    def __init__(self, db: str, *, workers: int = 2, max_cron_threads: int = 1, log_path: Path | str | None = None,
                 extra_args: Sequence[str] = (), log_level: str = "info", longpolling: bool = False) -> None:
        """
        :param extra_args: more Odoo options (e.g. ``--limit-time-real=30``)
        :param longpolling: run Odoo's own long-polling (gevent) process, else an idle stand-in (see above)
        :param log_level: ``info`` at least: the access log lines and the workers' "alive" lines are INFO
        """
        self.db = db
        self.workers = workers
        self.max_cron_threads = max_cron_threads
        self.port = free_port()
        self.gevent_port = free_port()  # The long-polling process binds one too (8072 by default).
        if log_path is None:
            handle, name = tempfile.mkstemp(prefix=f"odoo-prefork-{db}-", suffix=".log")
            os.close(handle)
            log_path = name
        self.log_path = Path(log_path)
        self.extra_args = list(extra_args)
        self.log_level = log_level
        self.longpolling = longpolling
        self.process: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self.killed: list[int] = []  # workers this object killed with SIGKILL
        # Worker PID -> "WorkerHTTP" | "WorkerCron", read from the log up to _announced_upto (complete lines).
        self._announced_kinds: dict[int, str] = {}
        self._announced_upto = 0

    # -- life cycle ----------------------------------------------------------------------------------------
    def command(self) -> list[str]:
        return [
            sys.executable, str(Path(__file__).resolve()),
            "-d", self.db, f"--db-filter=^{re.escape(self.db)}$", *_db_args(),
            f"--workers={self.workers}", f"--max-cron-threads={self.max_cron_threads}",
            "--http-interface=127.0.0.1", f"--http-port={self.port}", f"--gevent-port={self.gevent_port}",
            f"--logfile={self.log_path}", f"--log-level={self.log_level}", *self.extra_args,
        ]

    def start(self, timeout: float = 90.0, keep_log: bool = False) -> PreforkOdoo:
        """Start Odoo and wait until it serves /web/health?db_server_status=1 with all its workers alive.

        Call it from a thread that outlives the server (the main thread): Odoo is stopped when that thread dies.

        :param keep_log: append to the log of an earlier run (a restart after kill_server), else empty it
        """
        if self.process is not None:
            raise RuntimeError("this Odoo is already started")
        if not keep_log:
            self.log_path.write_text("")
        self._announced_kinds, self._announced_upto = {}, 0
        # What Odoo prints before its logging is set up, or outside it (a crash of the interpreter).
        self._stderr = open(self.log_path.with_suffix(".stderr"), "ab" if keep_log else "wb")
        # Its own session: stop() can then kill the master and every worker it forked, and nothing else.
        # TZ=UTC as odoo-bin sets it.
        self.process = subprocess.Popen(
            self.command(), cwd=str(HERE.parent), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=self._stderr, start_new_session=True,
            env={**os.environ, "TZ": "UTC", _IDLE_LONGPOLLING: "" if self.longpolling else "1",
                 _PARENT: str(os.getpid())},
        )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.health():
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"Odoo exited with {self.process and self.process.returncode} before it "
                                   f"served requests; the end of its log:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Odoo did not answer /web/health within {timeout:.0f} s; the end of its "
                                   f"log:\n{self.log_tail()}")
            time.sleep(0.2)
        self.wait_workers(http=self.workers, cron=self.max_cron_threads, timeout=max(5.0, deadline - time.monotonic()))

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM to the master (it stops its workers gracefully); past `timeout`, SIGKILL to its process group.

        :return: the master's exit status (negative: killed by that signal), None when it was not started
        """
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # The workers leave when they see their parent gone, at their next beat; a worker stuck in a request
        # (or the long-polling process, which the master SIGKILLs anyway) must not outlive this call.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        self.process = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        return process.returncode

    def kill_server(self) -> list[int]:
        """kill -9 of the whole server at once: its process group (the master, every worker, the long-polling
        process), as a machine that loses power or an OOM killer that takes the container.  start() again to
        restart it (on the same port).

        :return: the PIDs that were alive, the master first
        """
        process = self.process
        if process is None or process.poll() is not None:
            raise RuntimeError("this Odoo is not running")
        psutil = _psutil()
        try:
            pids = [process.pid] + [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            pids = [process.pid]
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        self.killed.extend(pids)
        self.process = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        return pids

    def __enter__(self) -> PreforkOdoo:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # -- HTTP ----------------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def health(self, timeout: float = 2.0) -> bool:
        """Whether Odoo answers /web/health?db_server_status=1 with a pass (its database server reachable)."""
        import urllib.request  # noqa: PLC0415 - not before odoo in the launcher below (it imports ssl, see there)

        try:
            with urllib.request.urlopen(self.url("/web/health?db_server_status=1"), timeout=timeout) as response:
                return response.status == 200 and json.loads(response.read()).get("db_server_status") is True
        except (OSError, ValueError):  # refused, reset, timeout, HTTP error, not JSON
            return False

    # -- workers -------------------------------------------------------------------------------------------
    def _announced(self) -> dict[int, str]:
        """Worker PID -> "WorkerHTTP" | "WorkerCron", from the "Worker ... alive" lines of the log (read on
        from where the last call stopped: callers poll this often, and the access log grows fast)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._announced_upto)
                chunk = log.read()
        except FileNotFoundError:
            return self._announced_kinds
        complete = chunk[:chunk.rfind(b"\n") + 1]
        self._announced_upto += len(complete)
        for match in _WORKER_ALIVE.finditer(complete.decode("utf-8", errors="replace")):
            self._announced_kinds[int(match["pid"])] = match["kind"]
        return self._announced_kinds

    def _live_children(self) -> list[Any]:
        if not self.running:
            return []
        psutil = _psutil()
        try:
            children = psutil.Process(self.process.pid).children()
        except psutil.NoSuchProcess:
            return []
        live = []
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.status() != psutil.STATUS_ZOMBIE:
                    live.append(child)
        return live

    def _workers(self, kind: str) -> list[int]:
        announced = self._announced()
        return sorted(child.pid for child in self._live_children() if announced.get(child.pid) == kind)

    def http_workers(self) -> list[int]:
        """PIDs of the live HTTP workers (children of the master that said they are alive)."""
        return self._workers("WorkerHTTP")

    def cron_workers(self) -> list[int]:
        """PIDs of the live cron workers."""
        return self._workers("WorkerCron")

    def wait_workers(self, http: int | None = None, cron: int | None = None, timeout: float = 30.0,
                     exclude: Sequence[int] = ()) -> tuple[list[int], list[int]]:
        """Wait until `http` HTTP and `cron` cron workers are alive, none of them in `exclude` (e.g. the one just
        killed, until the master has reaped and replaced it).  Returns both lists of PIDs."""
        deadline = time.monotonic() + timeout
        while True:
            http_pids, cron_pids = self.http_workers(), self.cron_workers()
            if (http is None or len(http_pids) == http) and (cron is None or len(cron_pids) == cron) \
                    and not set(exclude) & set(http_pids + cron_pids):
                return http_pids, cron_pids
            if not self.running or time.monotonic() > deadline:
                raise RuntimeError(f"expected {http} HTTP / {cron} cron workers without {list(exclude)}, have "
                                   f"{http_pids} / {cron_pids}; the end of the log:\n{self.log_tail()}")
            time.sleep(0.1)

    def kill_worker(self, pid: int) -> None:
        """kill -9 one of this Odoo's workers (refuses any other process)."""
        if pid not in self.http_workers() + self.cron_workers():
            raise ValueError(f"{pid} is not a live worker of this Odoo")
        os.kill(pid, signal.SIGKILL)
        self.killed.append(pid)

    def connections(self, pid: int, remote_port: int) -> list[int]:
        """The local ports of the worker's established TCP connections to 127.0.0.1:`remote_port` (e.g. the
        PostgreSQL backends it holds, or a request it has in flight at a server)."""
        psutil = _psutil()
        try:
            process = psutil.Process(pid)
            # psutil 6 renamed connections() to net_connections().
            listing = getattr(process, "net_connections", process.connections)(kind="tcp")
        except psutil.Error:
            return []
        return [c.laddr.port for c in listing
                if c.raddr and c.raddr.port == remote_port and c.status == psutil.CONN_ESTABLISHED]

    # -- log -----------------------------------------------------------------------------------------------
    def log_mark(self) -> int:
        """The log's current size: log_since(mark) reads what was logged after this point."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, mark: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(mark)
                return log.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def access_log(self, mark: int = 0) -> list[AccessLogLine]:
        return parse_access_log(self.log_since(mark))

    def error_records(self, mark: int = 0) -> list[str]:
        """The ERROR and CRITICAL records logged after `mark`, each with its following lines (the database's
        message under Odoo's "bad query" line, a traceback)."""
        records: list[list[str]] = []
        inside = False
        for line in self.log_since(mark).splitlines():
            match = _LOG_LEVEL.match(line)
            if match:
                inside = match["level"] in ("ERROR", "CRITICAL")
                if inside:
                    records.append([line])
            elif inside:
                records[-1].append(line)
        return ["\n".join(record) for record in records]

    def error_lines(self, mark: int = 0) -> list[str]:
        """The ERROR and CRITICAL records logged after `mark` (their first line each)."""
        lines = []
        for line in self.log_since(mark).splitlines():
            match = _LOG_LEVEL.match(line)
            if match and match["level"] in ("ERROR", "CRITICAL"):
                lines.append(line)
        return lines

    def cron_log(self, mark: int = 0) -> list[CronLogLine]:
        return parse_cron_log(self.log_since(mark))

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_since(0).splitlines()[-lines:]
        stderr = self.log_path.with_suffix(".stderr")
        if stderr.exists():
            text += stderr.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(text)


if __name__ == "__main__":
    # PreforkOdoo runs Odoo through this file: odoo.cli.main() as odoo-bin does, which the master re-executes with
    # "gevent" as first argument for its long-polling process.  `import odoo` then monkey-patches the standard
    # library for gevent: nothing above imports ssl or starts a thread.
    if sys.argv[1:2] == ["gevent"] and os.environ.get(_IDLE_LONGPOLLING) == "1":
        # The stand-in: alive while the master is (it SIGKILLs it when it stops), serving nothing.
        parent = os.getppid()
        while os.getppid() == parent:
            time.sleep(1.0)
        sys.exit(0)
    if sys.argv[1:2] != ["gevent"] and os.environ.get(_PARENT):
        # The master stops (SIGTERM: gracefully, with its workers) when the script that started it dies without
        # stopping it, e.g. on a hard timeout: no orphaned Odoo keeps the database busy.  Linux only; the workers
        # leave by themselves once their master is gone.
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != int(os.environ[_PARENT]):
            sys.exit(1)  # It died before the line above.
    import odoo

    odoo.cli.main()
