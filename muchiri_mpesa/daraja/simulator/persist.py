"""The state file: what the simulator keeps across restarts (``--state-file PATH``, ``DARAJA_SIM_STATE_FILE``).

A Safaricom that forgot the merchant at each restart would break what a restart must not break: the registered
C2B URLs (a paybill payment would go through with no confirmation to anyone), the certificate (the initiator's
SecurityCredential would end in 2001) and the receipts (Transaction Status, Reversal, Pull and the statement
would not know them).  So the file holds the registered C2B and Pull URLs, the certificate with its private key,
the ledger of receipts (payments, reversals, failed payments, sweeps), the balances, the decided C2B payments and
the Dynamic QR codes.  Tokens, pending STK pushes, planned callbacks and injected errors are not kept: a restart
ends them, as a Daraja outage would.

Written atomically (a temporary file in the same folder, fsync, rename) when it changed, checked every
``SAVE_INTERVAL`` seconds and at stop.  A file that cannot be read as a state file stops the start with
``StateFileError`` naming the file (the CLI exits 2): a fresh start would overwrite it at the first save and lose
the receipts the merchant's books refer to; move the file away to start afresh, on purpose.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, fields
from datetime import datetime
from typing import Any

from .state import Payment, SimState, _monotonic

FORMAT = "daraja-simulator-state"
VERSION = 1
SAVE_INTERVAL = 0.5
ENV_VAR = "DARAJA_SIM_STATE_FILE"
_PAYMENT_FIELDS = {f.name for f in fields(Payment)}


class StateFileError(Exception):
    """The state file exists but is not a state file this simulator can load."""


def _payment_out(payment: Payment, now: float) -> dict[str, Any]:
    data = asdict(payment)
    data["at"] = payment.at.isoformat()
    data["visible_in"] = max(0.0, payment.visible_at - now)  # monotonic clocks do not survive a restart
    del data["visible_at"]
    return data


def _payment_in(data: dict[str, Any], now: float) -> Payment:
    values = {key: value for key, value in data.items() if key in _PAYMENT_FIELDS}
    values["at"] = datetime.fromisoformat(data["at"])
    values["visible_at"] = now + float(data.get("visible_in", 0.0))
    return Payment(**values)


def snapshot(state: SimState, identity: tuple[str, str] | None) -> dict[str, Any]:
    """What the file holds (JSON-able); ``identity`` is (certificate PEM, private key PEM) when made."""
    now = _monotonic()
    with state.lock:
        return {
            "format": FORMAT,
            "version": VERSION,
            "shortcode": state.settings.shortcode,
            "identity": {"certificate_pem": identity[0], "private_key_pem": identity[1]} if identity else None,
            "c2b_urls": state.c2b_urls,
            "pull_registrations": state.pull_registrations,
            "balances": state.balances,
            "receipts": sorted(state.receipts),
            "ledger": [_payment_out(p, now) for p in state.ledger.values()],
            "failures": [_payment_out(p, now) for p in state.failures.values()],
            "sweeps": state.sweeps,
            "c2b_attempts": [a for a in state.c2b_attempts.values() if a.get("state") != "pending"],
            "qr_codes": state.qr_codes,
        }


def restore(state: SimState, data: dict[str, Any]) -> tuple[str, str] | None:
    """Load ``data`` (from ``read``) into ``state``; return the identity PEMs it holds, if any."""
    now = _monotonic()
    with state.lock:
        state.c2b_urls = {str(k): dict(v) for k, v in data.get("c2b_urls", {}).items()}
        state.pull_registrations = {str(k): dict(v) for k, v in data.get("pull_registrations", {}).items()}
        state.balances = {str(k): int(v) for k, v in data.get("balances", {}).items()}
        state.ledger = {p.receipt: p for p in (_payment_in(d, now) for d in data.get("ledger", []))}
        state.failures = {p.receipt: p for p in (_payment_in(d, now) for d in data.get("failures", []))}
        state.sweeps = [dict(s) for s in data.get("sweeps", [])]
        state.c2b_attempts = {a["TransID"]: dict(a) for a in data.get("c2b_attempts", [])}
        state.qr_codes = {str(k): dict(v) for k, v in data.get("qr_codes", {}).items()}
        state.receipts = set(data.get("receipts", [])) | set(state.ledger) | set(state.failures)
        state.receipts |= {s["receipt"] for s in state.sweeps}
    identity = data.get("identity")
    return (identity["certificate_pem"], identity["private_key_pem"]) if identity else None


def read(path: str) -> dict[str, Any] | None:
    """The state in ``path``; None when there is no file yet; StateFileError when it is not a state file."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise StateFileError(f"cannot read the simulator state file {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise StateFileError(
            f"{path} is not a Daraja simulator state file (format {FORMAT!r}, version {VERSION}); "
            "move it away to start afresh"
        )
    return data


def check(state: SimState, data: dict[str, Any], path: str) -> None:
    """Load ``data`` into a scratch state first, so that a malformed file fails before anything is replaced."""
    try:
        restore(SimState(state.settings), data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StateFileError(f"the simulator state file {path} is malformed ({exc!r}); move it away to start "
                             "afresh") from None


def write(path: str, text: str) -> None:
    """Replace ``path`` by ``text`` atomically: a reader sees the old file or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".daraja-state-", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
