"""A scratch Odoo database with muchiri_mpesa installed, for the scripts that need committed data
(tests/odoo_concurrency.py, benchmarks/bench_reconcile.py).  Not a pytest module.

The settings are those of scripts/odoo-tests: PGHOST, PGPORT, ODOO_DB_USER, ODOO_DB_PASSWORD.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


# PostgreSQL's own tools (dropdb) read the password from there.
os.environ.setdefault("PGPASSWORD", os.environ.get("ODOO_DB_PASSWORD", "odoo"))


def db_args() -> list[str]:
    """Odoo's command-line options for the database server and the addons path."""
    from odoo.addons import __path__ as odoo_addons_path  # noqa: PLC0415 - Odoo is optional elsewhere

    return [
        f"--db_host={os.environ.get('PGHOST', 'localhost')}", f"--db_port={os.environ.get('PGPORT', '5432')}",
        f"--db_user={os.environ.get('ODOO_DB_USER', 'odoo')}",
        f"--db_password={os.environ.get('ODOO_DB_PASSWORD', 'odoo')}",
        f"--addons-path={','.join(odoo_addons_path)},{REPO}",
    ]


def install(db: str) -> None:
    """Drop `db`, then install muchiri_mpesa in it afresh."""
    pg = ["-h", os.environ.get("PGHOST", "localhost"), "-p", os.environ.get("PGPORT", "5432"),
          "-U", os.environ.get("ODOO_DB_USER", "odoo")]
    subprocess.run(["dropdb", "--if-exists", *pg, db], check=True)
    subprocess.run(
        [sys.executable, "-m", "odoo", "-d", db, *db_args(), "-i", "muchiri_mpesa", "--without-demo=all",
         "--stop-after-init", "--log-level=warn", "--max-cron-threads=0", "--http-port=0"],
        check=True,
    )


def configure(db: str, *extra: str) -> None:
    """Point this process's Odoo at `db`."""
    import odoo  # noqa: PLC0415

    odoo.tools.config.parse_config(["-d", db, *db_args(), "--log-level=warn", *extra])


def simulator_provider(env, base_url: str, key: str, secret: str, shortcode: str, passkey: str, **values):
    """The addon's M-Pesa provider in test mode, pointed at a Daraja simulator, with KES active."""
    env.ref("base.KES").active = True
    provider = env.ref("muchiri_mpesa.payment_provider_mpesa")
    provider.write({
        "state": "test", "mpesa_consumer_key": key, "mpesa_consumer_secret": secret,
        "mpesa_shortcode": shortcode, "mpesa_passkey": passkey, "mpesa_api_url": base_url,
        "mpesa_confirm_by_query": True, **values,
    })
    return provider
