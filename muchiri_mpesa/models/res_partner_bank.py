# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""'M-Pesa' as one of Odoo's QR code methods, as account_qr_code_emv and account_qr_code_sepa add
theirs: the company's paybill (or till) is a bank account of the company, and its QR code is the one
Daraja's Dynamic QR API draws, which the M-Pesa app scans.  A payment made by scanning it is a C2B
payment with the document's reference, matched as one."""
import logging

from odoo import api, models
from odoo.tools.image import image_data_uri

from .. import const, daraja

_logger = logging.getLogger(__name__)

QR_METHOD = 'mpesa'


class ResPartnerBank(models.Model):
    _inherit = 'res.partner.bank'

    # === BUSINESS METHODS - QR CODES === #

    @api.model
    def _get_available_qr_methods(self):
        rslt = super()._get_available_qr_methods()
        rslt.append((QR_METHOD, self.env._("M-Pesa"), 5))
        return rslt

    def _mpesa_qr_provider(self):
        """The M-Pesa provider (sudo) whose paybill or till this account of its company is."""
        self.ensure_one()
        Provider = self.env['payment.provider'].sudo()
        providers = Provider.search([
            ('code', '=', const.PROVIDER_CODE), ('state', 'in', ('enabled', 'test')),
            ('company_id.partner_id', '=', self.partner_id.id),
        ], order='state, sequence, id')
        return providers.filtered(lambda p: p._mpesa_business_number() == self.sanitized_acc_number)[:1]

    def _get_error_messages_for_qr(self, qr_method, debtor_partner, currency):
        if qr_method != QR_METHOD:
            return super()._get_error_messages_for_qr(qr_method, debtor_partner, currency)
        if currency.name not in const.SUPPORTED_CURRENCIES:
            return self.env._("M-Pesa QR codes are in Kenyan shillings (KES) only.")
        if not self._mpesa_qr_provider():
            return self.env._("This account is not the paybill or till of an M-Pesa payment provider.")
        return None

    def _check_for_qr_code_errors(self, qr_method, amount, currency, debtor_partner, free_communication,
                                  structured_communication):
        if qr_method != QR_METHOD:
            return super()._check_for_qr_code_errors(
                qr_method, amount, currency, debtor_partner, free_communication, structured_communication)
        try:
            daraja.build_qr_payload(
                self.env.company.name or "M-Pesa", structured_communication or free_communication or '', amount,
                'PB', self.sanitized_acc_number,
            )
        except daraja.DarajaValidationError as error:
            return str(error)
        return None

    def _get_qr_code_base64(self, qr_method, amount, currency, debtor_partner, free_communication,
                            structured_communication):
        if qr_method != QR_METHOD:
            return super()._get_qr_code_base64(
                qr_method, amount, currency, debtor_partner, free_communication, structured_communication)
        provider = self._mpesa_qr_provider()
        reference = structured_communication or free_communication
        shillings = daraja.to_whole_shillings(str(amount))
        trx_code = 'BG' if provider.mpesa_shortcode_type == 'till' else 'PB'
        key = f"{trx_code}:{self.sanitized_acc_number}:{reference}:{shillings}"

        def make():
            try:
                code = provider._mpesa_client().generate_qr(
                    provider.company_id.name, reference, shillings, self.sanitized_acc_number, trx_code=trx_code,
                )
            except daraja.DarajaError as error:
                # The paybill details are still shown: a QR code is a convenience, never a blocker.
                _logger.warning("M-Pesa: no QR code for %s: %s", reference, error)
                return None
            return code.base64

        model, document_id = self.env.context.get('mpesa_qr_document') or (None, None)
        document = self.env[model].browse(document_id) if model else None
        image = document._mpesa_kept_qr_code(key, make) if document else make()
        if not image:
            return None
        return image_data_uri(image if isinstance(image, bytes) else image.encode())
