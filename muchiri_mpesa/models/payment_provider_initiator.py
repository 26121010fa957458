# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""The provider's Initiator (docs/design.md, 8. Reversal and Transaction Status)."""
import base64
import binascii
from datetime import datetime, timezone

from odoo import api, fields, models
from odoo.exceptions import UserError, ValidationError

from .. import daraja

INITIATOR_FIELDS = {'mpesa_initiator_name', 'mpesa_initiator_password', 'mpesa_initiator_certificate',
                    'mpesa_initiator_certificate_file'}


class PaymentProvider(models.Model):
    _inherit = 'payment.provider'

    # === INITIATOR (system administrators only) === #
    mpesa_initiator_name = fields.Char(
        string="Initiator Name", groups='base.group_system', copy=False,
        help="A web operator of the shortcode with the API role (M-Pesa org portal, Operators)."
             "  Sandbox: the initiator of the Daraja portal's test credentials.",
    )
    mpesa_initiator_password = fields.Char(
        string="Initiator Password", groups='base.group_system', copy=False,
        help="That operator's password.  It is sent encrypted with Safaricom's certificate, never"
             " logged, and cleared on copies of the database.",
    )
    mpesa_initiator_certificate = fields.Text(
        string="Safaricom Certificate", groups='base.group_system', copy=False,
        help="Safaricom's public certificate (PEM) of the environment: the sandbox one in test"
             " mode, the production one when enabled (Daraja portal, APIs > Security Credentials).",
    )
    mpesa_initiator_certificate_file = fields.Binary(
        string="Upload Certificate", groups='base.group_system', store=False,
        compute='_compute_mpesa_initiator_certificate_file',
        inverse='_inverse_mpesa_initiator_certificate_file',
        help="Upload the .cer file Safaricom gives, instead of pasting it.",
    )
    mpesa_initiator_certificate_filename = fields.Char(groups='base.group_system', store=False,
                                                        compute='_compute_mpesa_initiator_certificate_file')
    mpesa_initiator_certificate_info = fields.Char(
        string="Certificate", compute='_compute_mpesa_initiator_certificate_info', groups='base.group_system',
    )

    # === COMPUTE METHODS === #

    def _compute_feature_support_fields(self):
        """Override of `payment`: a Reversal gives back a whole M-Pesa payment, never part of it."""
        res = super()._compute_feature_support_fields()
        self.filtered(lambda p: p.code == 'mpesa').support_refund = 'full_only'
        return res

    def _compute_mpesa_initiator_certificate_file(self):
        for provider in self:
            provider.mpesa_initiator_certificate_file = False
            provider.mpesa_initiator_certificate_filename = False

    def _inverse_mpesa_initiator_certificate_file(self):
        for provider in self.filtered('mpesa_initiator_certificate_file'):
            try:
                content = base64.b64decode(provider.mpesa_initiator_certificate_file)
            except (binascii.Error, ValueError) as error:
                raise ValidationError(self.env._("The uploaded certificate cannot be read.")) from error
            provider.mpesa_initiator_certificate = _as_pem(content)

    @api.depends('mpesa_initiator_certificate')
    def _compute_mpesa_initiator_certificate_info(self):
        for provider in self:
            summary = provider._mpesa_certificate_summary()
            provider.mpesa_initiator_certificate_info = summary and self.env._(
                "%(subject)s, valid until %(date)s", subject=summary.subject,
                date=summary.not_after.strftime('%Y-%m-%d'),
            )

    # === CONSTRAINTS === #

    @api.constrains('mpesa_initiator_certificate')
    def _check_mpesa_initiator_certificate(self):
        """Checked when saved: a bad certificate would fail only at the first refund."""
        for provider in self.filtered(lambda p: p.sudo().mpesa_initiator_certificate):
            try:
                daraja.certificate_summary(provider.sudo().mpesa_initiator_certificate)
            except daraja.InvalidConfiguration as error:
                raise ValidationError(self.env._(
                    "This is not a usable Safaricom certificate: %s", error,
                )) from error

    # === CRUD METHODS === #

    def write(self, vals):
        res = super().write(vals)
        if INITIATOR_FIELDS & set(vals):
            self._mpesa_recheck_unverified_receipts()
        return res

    # === BUSINESS METHODS === #

    def _mpesa_recheck_unverified_receipts(self):
        """The initiator is set up (or fixed): the receipts that wait unverified are asked about."""
        for provider in self.filtered(lambda p: p.code == 'mpesa' and p._mpesa_has_initiator()):
            waiting = self.env['payment.transaction'].sudo().search([
                ('provider_id', '=', provider.id), ('mpesa_receipt_status', '=', 'unverified'),
                ('mpesa_status_next_at', '=', False),
            ])
            if waiting:
                waiting._mpesa_request_receipt_proof()
            # Paybill payments awaiting a confirmation that nothing could ask for: asked now.
            awaiting = self.env['muchiri.mpesa.ledger'].sudo().search([
                ('provider_id', '=', provider.id), ('state', '=', 'awaiting'), ('confirmation', '=', False),
                ('conflict', '=', False), ('status_next_at', '=', False),
            ])
            if awaiting:
                awaiting.write({'status_next_at': fields.Datetime.now(), 'status_count': 0})
                self.env['payment.transaction']._mpesa_trigger_initiator_job()

    def _mpesa_certificate_summary(self):
        """The certificate's subject and expiry, or None when there is none or it is unusable."""
        self.ensure_one()
        pem = self.sudo().mpesa_initiator_certificate
        if not pem:
            return None
        try:
            return daraja.certificate_summary(pem)
        except daraja.InvalidConfiguration:
            return None

    def _mpesa_initiator_missing(self):
        """What the initiator set-up lacks, in plain words (empty when it is complete)."""
        self.ensure_one()
        provider = self.sudo()
        missing = []
        if not (provider.mpesa_initiator_name or '').strip():
            missing.append(self.env._("the initiator name"))
        if not provider.mpesa_initiator_password:
            missing.append(self.env._("the initiator password"))
        if not provider.mpesa_initiator_certificate:
            missing.append(self.env._("Safaricom's certificate"))
        return missing

    def _mpesa_has_initiator(self):
        self.ensure_one()
        return not self._mpesa_initiator_missing()

    def _mpesa_initiator(self):
        """The Initiator and SecurityCredential of a Reversal or Transaction Status request.

        The credential is computed for each request (RSA PKCS#1 v1.5 is randomised) and never
        stored: only the password and the certificate are.

        :return: the initiator name and the SecurityCredential
        :rtype: tuple[str, str]
        :raise UserError: when the initiator is not set up
        """
        self.ensure_one()
        missing = self._mpesa_initiator_missing()
        if missing:
            raise UserError(self.env._(
                "Set %(missing)s on %(provider)s first (M-Pesa: initiator).",
                missing=', '.join(missing), provider=self.name,
            ))
        provider = self.sudo()
        try:
            credential = daraja.security_credential(
                provider.mpesa_initiator_password, provider.mpesa_initiator_certificate,
            )
        except daraja.InvalidConfiguration as error:
            raise UserError(self.env._("The initiator credential cannot be made: %s", error)) from error
        return provider.mpesa_initiator_name.strip(), credential

    def _mpesa_security_credential(self):
        """The SecurityCredential: the initiator password encrypted with Safaricom's certificate."""
        return self._mpesa_initiator()[1]

    def _mpesa_initiator_party(self):
        """Who received the money, as Reversal and Transaction Status name it: the paybill
        (identifier type 4, organisation shortcode), or the till (2)."""
        self.ensure_one()
        config = self._mpesa_shortcode_config()
        if config.till_number:
            return config.till_number, '2'
        return config.business_shortcode, '4'

    # === ACTIONS === #

    def action_mpesa_test_connection(self):
        """Override: say, after the consumer key check, whether refunds and receipt proofs can work."""
        action = super().action_mpesa_test_connection()
        params = action.get('params', {})
        missing = self._mpesa_initiator_missing()
        if missing:  # Optional: the consumer key works, and payments too.
            params['message'] = self.env._(
                "%(message)s  Refunds and receipt checks are off: set %(missing)s (M-Pesa: initiator).",
                message=params.get('message', ''), missing=', '.join(missing),
            )
            return action
        summary = self._mpesa_certificate_summary()
        if summary and _aware(summary.not_after) < datetime.now(timezone.utc):
            params['type'] = 'warning'
            params['message'] = self.env._(
                "%(message)s  Safaricom's certificate expired on %(date)s: upload the current one.",
                message=params.get('message', ''), date=summary.not_after.strftime('%Y-%m-%d'),
            )
            return action
        self._mpesa_initiator()  # Raises if the password cannot be encrypted with the certificate.
        params['message'] = self.env._(
            "%(message)s  The initiator %(name)s is set up (certificate: %(certificate)s); Daraja"
            " checks its password at the first refund or receipt check.",
            message=params.get('message', ''), name=self.sudo().mpesa_initiator_name,
            certificate=self.sudo().mpesa_initiator_certificate_info,
        )
        return action


def _aware(moment):
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _as_pem(content):
    """An uploaded certificate as PEM text: Safaricom ships PEM, some downloads are DER."""
    if b'-----BEGIN' in content:
        return content.decode('ascii', errors='replace').strip()
    body = base64.encodebytes(content).decode('ascii').replace('\n', '')
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return '\n'.join(['-----BEGIN CERTIFICATE-----', *lines, '-----END CERTIFICATE-----'])
