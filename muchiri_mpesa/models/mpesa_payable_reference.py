# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""The reference a payer types as the paybill's account number, looked up by an index on the
normalised number of the documents it may name: matching a payment (and answering Daraja's
validation within its ~8 s) is one indexed lookup per kind of document, however many are open.

An expression index, not a stored computed field: invoice numbers are given by the sequence mixin
inside the computation of `name` (account/models/sequence_mixin.py: _set_next_sequence), after the
fields depending on `name` may already have been computed with the draft's empty number; an index
on the column itself is never stale.  The SQL expression and `reference_key` normalise alike.
"""
import re

from odoo import models

_NOT_KEY = re.compile(r'[^0-9a-z]+')
# The same normalisation, in SQL, over a column.
KEY_SQL = "regexp_replace(lower({column}), '[^0-9a-z]+', '', 'g')"


def reference_key(reference):
    """`reference` as the matching compares it: case, spaces, slashes, dashes and any other
    punctuation dropped (``INV/2026/00012`` and ``inv2026 00012`` give ``inv202600012``).

    :return: the key, or False when nothing is left of the reference
    """
    return _NOT_KEY.sub('', (reference or '').lower()) or False


def _create_index(model, where):
    model.env.cr.execute(
        f"CREATE INDEX IF NOT EXISTS {model._table}_mpesa_reference_idx"
        f" ON {model._table} (company_id, ({KEY_SQL.format(column='name')})) {where and 'WHERE ' + where}"
    )


def _search(model, company, key, where, fields, limit):
    if not key:
        return model.sudo().browse()
    model.flush_model(fields)  # The lookup reads the table itself.
    model.env.cr.execute(
        f"SELECT id FROM {model._table} WHERE company_id = %s AND {KEY_SQL.format(column='name')} = %s"
        f" {where and 'AND ' + where} ORDER BY id LIMIT %s",
        [company.id, key, limit],
    )
    return model.sudo().browse([row[0] for row in model.env.cr.fetchall()])


class SaleOrder(models.Model):
    _inherit = 'sale.order'

    def init(self):
        res = super().init()
        _create_index(self, '')
        return res

    def _mpesa_search_reference(self, company, key, limit=5):
        """The orders (sudo) of `company` whose number normalises to `key`: one indexed lookup."""
        return _search(self, company, key, '', ['name', 'company_id'], limit)


class AccountMove(models.Model):
    _inherit = 'account.move'

    def init(self):
        res = super().init()
        _create_index(self, "move_type = 'out_invoice'")
        return res

    def _mpesa_search_reference(self, company, key, limit=5):
        """The customer invoices (sudo) of `company` whose number normalises to `key`: one indexed
        lookup."""
        return _search(self, company, key, "move_type = 'out_invoice'", ['name', 'company_id', 'move_type'], limit)
