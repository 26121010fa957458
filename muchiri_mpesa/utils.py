# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""Helpers that are not ORM code: times, certificates, JSON for reading, reference keys, row locks,
the commit between units of work and the alert recipients.  One place each (docs/design.md)."""
import base64
import json
import re
import threading
from datetime import timezone

from markupsafe import Markup

from odoo import modules
from odoo.tools.misc import format_amount

from . import const, daraja

# === MONEY === #


def is_material(amount):
    """Whether `amount` (KES, whole shillings) is worth acting on: the one tolerance of the addon.

    Less than `const.ROUNDING_TOLERANCE` is rounding, never money due, extra or owed back.
    """
    return amount >= const.ROUNDING_TOLERANCE


# === TIMES === #


def aware(moment):
    """An Odoo datetime (naive UTC) as the aware datetime the Daraja layer takes."""
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment


def naive_utc(value):
    """An aware datetime of the Daraja layer as Odoo stores it (naive UTC); False for none."""
    return value.astimezone(timezone.utc).replace(tzinfo=None) if value else False


def kenya_time(value):
    """An Odoo datetime (naive UTC) as Kenya's wall-clock time."""
    return aware(value).astimezone(daraja.KENYA_TZ)


def kenya_text(moment):
    """A datetime as Kenya's wall-clock time, to the second."""
    return kenya_time(moment).strftime('%Y-%m-%d %H:%M:%S')


# === CERTIFICATES === #


def as_pem(content):
    """An uploaded certificate as PEM text: Safaricom ships PEM, some downloads are DER."""
    if b'-----BEGIN' in content:
        return content.decode('ascii', errors='replace').strip()
    body = base64.encodebytes(content).decode('ascii').replace('\n', '')
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return '\n'.join(['-----BEGIN CERTIFICATE-----', *lines, '-----END CERTIFICATE-----'])


# === BODIES FOR READING === #


def as_text(body):
    if body is None:
        return False
    if isinstance(body, (dict, list)):
        return json.dumps(body, indent=2, sort_keys=True, default=str)
    return str(body)


def readable(raw_body):
    """The raw bytes of a body as text a person (and PostgreSQL) can read: what is not UTF-8, and
    NUL, shown as U+FFFD.  The exact bytes are kept beside it."""
    return raw_body.decode('utf-8', errors='replace').replace('\x00', '\ufffd')


def indent_json(text):
    """`text` indented for reading if it is JSON, else as it is.  Only the whitespace between
    tokens changes: keys keep their order, and duplicate keys and numbers stay as they came."""
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return text
    out, depth, in_string, escaped = [], 0, False, False
    for char in text:
        if in_string:
            out.append(char)
            if escaped:
                escaped = False
            elif char == '\\':
                escaped = True
            elif char == '"':
                in_string = False
        elif char in ' \t\r\n':
            continue
        elif char in '{[':
            depth += 1
            out.extend((char, '\n' + '  ' * depth))
        elif char in '}]':
            depth -= 1
            if out[-2] in '{[' and out[-1].startswith('\n'):  # Empty: {} and [] stay folded.
                out[-1] = char
            else:
                out.append('\n' + '  ' * depth + char)
        elif char == ',':
            out.append(',\n' + '  ' * depth)
        elif char == ':':
            out.append(': ')
        else:
            in_string = char == '"'
            out.append(char)
    return ''.join(out)


# === REFERENCES === #

_NOT_KEY = re.compile(r'[^0-9a-z]+')
# The same normalisation, in SQL, over a column.
KEY_SQL = "regexp_replace(lower({column}), '[^0-9a-z]+', '', 'g')"


def reference_key(reference):
    """`reference` as the matching compares it: case, spaces, slashes, dashes and any other
    punctuation dropped (``INV/2026/00012`` and ``inv2026 00012`` give ``inv202600012``).

    :return: the key, or False when nothing is left of the reference
    """
    return _NOT_KEY.sub('', (reference or '').lower()) or False


# === LOCKS AND COMMITS === #

_LOCK_WAITS = {'wait': '', 'nowait': ' NOWAIT', 'skip': ' SKIP LOCKED'}


def lock_rows(records, how='wait', strength='NO KEY UPDATE'):
    """Hold the rows of `records` locked until the end of the database transaction.

    FOR NO KEY UPDATE by default: the exchange log, written on its own cursor meanwhile, still
    references the rows (a foreign key takes FOR KEY SHARE, which FOR UPDATE would block: a
    deadlock).  FOR UPDATE only where a concurrent writer must fail with a serialization error.

    :param str how: 'wait' for the locks, 'nowait' (raise LockNotAvailable at once) or 'skip'
    :param str strength: 'NO KEY UPDATE' or 'UPDATE'
    :return: the records whose lock is held ('skip': without those another worker holds)
    """
    if not records:
        return records
    assert strength in ('NO KEY UPDATE', 'UPDATE')
    records.env.cr.execute(
        f'SELECT id FROM "{records._table}" WHERE id IN %s ORDER BY id FOR {strength}{_LOCK_WAITS[how]}',
        [tuple(records.ids)], log_exceptions=False,  # A lock refused on purpose is no ERROR.
    )
    held = records.browse([row[0] for row in records.env.cr.fetchall()])
    records.invalidate_recordset()
    return held


def in_test():
    """Whether a test owns the database transaction, whichever runner runs it: every test runs on a
    thread marked `testing` (Odoo's run_suite and pytest-odoo's registry fixture both mark it), and
    HttpCase puts the registry in test mode (the requests it serves, on other threads, share the
    test's cursor).  modules.module.current_test is set by Odoo's own runner only."""
    return bool(modules.module.current_test or getattr(threading.current_thread(), 'testing', False))


def commit(env):
    """Keep one unit of work (a transaction settled, a row matched): a later crash must not lose
    it.  Never inside a test, which owns the database transaction."""
    if in_test() or env.registry.in_test_mode():
        return
    env.cr.commit()  # pylint: disable=invalid-commit


# === PEOPLE === #


def alert_recipients(provider):
    """Active internal users of the provider's alert group: who gets M-Pesa's alerts and to-dos."""
    return provider.sudo().mpesa_alert_group_id.users.filtered(lambda user: user.active and not user.share)


# === SENTENCES DISTRIBUTORS READ === #


def strong(value):
    """`value` in bold, escaped, as an argument of `env._()`: a Markup argument makes Odoo escape
    the translation and the other arguments, so that the whole sentence is safe to t-out."""
    return Markup('<strong>%s</strong>') % value


def strong_amount(env, amount, currency):
    """`amount` as Odoo's monetary widget writes it (in `env`'s language), in bold."""
    return strong(format_amount(env, amount, currency))
