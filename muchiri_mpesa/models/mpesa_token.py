# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from datetime import datetime, timezone

from odoo import fields, models

from .. import daraja


class MpesaToken(models.Model):
    """The Daraja access token of each set of credentials, shared by every Odoo worker.

    Daraja may invalidate a token when another one is issued for the same app: workers must share
    one.  Its own table, without foreign keys, so that refreshing it never locks or changes a row
    that a payment's transaction reads or refers to.
    """

    _name = 'muchiri.mpesa.token'
    _description = "Daraja Access Token"

    key = fields.Char(required=True, readonly=True, help="A hash of the API URL and the credentials.")
    value = fields.Char(required=True, readonly=True)
    expires_at = fields.Datetime(required=True, readonly=True)

    _sql_constraints = [('key_unique', 'UNIQUE(key)', "One token per set of credentials.")]


class DatabaseTokenStore:
    """daraja.TokenStore on the muchiri_mpesa_token table.

    A refresh runs on its own cursor under an advisory lock on the key and commits at once: a
    second worker waits for the lock, then finds the fresh token instead of fetching another.
    """

    def __init__(self, env):
        self._env = env

    def load(self, key):
        # The caller's snapshot may be older than the stored token: refresh() reads it again.
        self._env.cr.execute("SELECT value, expires_at FROM muchiri_mpesa_token WHERE key = %s", [key])
        return self._to_token(self._env.cr.fetchone())

    def refresh(self, key, fetch, stale):
        with self._env.registry.cursor() as cr:
            if not self._env.registry.in_test_mode():  # A test cursor is a savepoint: too late.
                # See what the lock's previous holder committed, not a snapshot from before the
                # wait (Odoo's REPEATABLE READ): else every waiting worker fetches a token of its
                # own, and each new token revokes the previous one at Daraja.
                cr.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            cr.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f'muchiri_mpesa_token:{key}'])
            cr.execute("SELECT value, expires_at FROM muchiri_mpesa_token WHERE key = %s", [key])
            current = self._to_token(cr.fetchone())
            if current and current != stale and current.is_fresh(datetime.now(timezone.utc)):
                return current
            token = fetch()
            cr.execute(
                """INSERT INTO muchiri_mpesa_token (key, value, expires_at, create_date, write_date)
                   VALUES (%s, %s, %s, now() at time zone 'UTC', now() at time zone 'UTC')
                   ON CONFLICT (key) DO UPDATE
                   SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at,
                       write_date = EXCLUDED.write_date""",
                [key, token.value, token.expires_at.astimezone(timezone.utc).replace(tzinfo=None)],
            )
        return token

    @staticmethod
    def _to_token(row):
        if not row:
            return None
        return daraja.AccessToken(value=row[0], expires_at=row[1].replace(tzinfo=timezone.utc))
