# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from odoo import fields, models

from .mpesa_alert import AlertCondition, _listed


class MpesaAlert(models.Model):
    _inherit = 'muchiri.mpesa.alert'

    def _check_receipt_conflicts(self, provider, now):
        """Override: receipts that M-Pesa's Transaction Status contradicts are conflicts too, one
        alert that stays open while any of them is unresolved."""
        return [*super()._check_receipt_conflicts(provider, now), *self._check_receipt_proof_conflicts(provider)]

    def _check_receipt_proof_conflicts(self, provider):
        txs = self.env['payment.transaction'].search([
            ('provider_id', '=', provider.id), ('mpesa_receipt_status', '=', 'conflict'),
        ], order='id')
        # Paybill payments awaiting confirmation that M-Pesa contradicted (forged, most likely).
        rows = self.env['muchiri.mpesa.ledger'].search([
            ('provider_id', '=', provider.id), ('state', '=', 'awaiting'), ('conflict', '=', True),
        ], order='id')
        if not (txs or rows):
            return []
        lines = [
            self.env._("- %(reference)s, receipt %(receipt)s: %(proof)s", reference=tx.reference,
                       receipt=tx.mpesa_receipt_number or '-', proof=tx.mpesa_receipt_proof or '-')
            for tx in txs
        ] + [
            self.env._("- paybill payment %(receipt)s of %(amount)s: %(proof)s", receipt=row.name,
                       amount=row._mpesa_format(row.amount), proof=row.confirmation_note or row.note or '-')
            for row in rows
        ]
        return [AlertCondition(
            kind='receipt_conflict',
            key=f'receipt_proof_conflict:{provider.id}',
            name=self.env._("%(provider)s: %(count)s M-Pesa receipts contradicted by M-Pesa",
                            provider=provider.name, count=len(txs) + len(rows)),
            message=self.env._(
                "M-Pesa's Transaction Status contradicts these receipts, recorded after the payment"
                " was settled.  Nothing was changed: check each on the M-Pesa statement and correct"
                " the payment.\n%(lines)s", lines=_listed(self.env, lines),
            ),
            transactions=txs,
            orders=txs.sale_order_ids,
        )]

    def _mpesa_raise_receipt_proof_alert(self, provider):
        """Raise the conflict now, not at the next monitoring run: accountants must hear of it."""
        for condition in self._check_receipt_proof_conflicts(provider):
            self._raise_condition(provider, condition, fields.Datetime.now())
