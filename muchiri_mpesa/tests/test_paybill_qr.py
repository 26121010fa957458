# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""Paybill details and the M-Pesa QR code on quotations, orders and invoices: the portal pages and
the PDFs show them, the QR code (Daraja's Dynamic QR, from the simulator over loopback) decodes to
what was asked, it is kept while the amount due is unchanged, and paying by it pays the document."""
import base64
import io
import re
import unittest

import polib

from odoo.tests import tagged
from odoo.tools.misc import file_open, format_amount
from odoo.tools.translate import trans_export

from odoo.addons.muchiri_mpesa.daraja.simulator import C2B_CONFIRMATION, read_qr_content

from .common import PHONE_SUCCESS, SIM_SHORTCODE, MpesaLedgerCommon

try:
    import zxingcpp
    from PIL import Image
except ImportError:  # requirements-dev.txt: a real decoder reads the code back, as a phone's camera does.
    zxingcpp = None

PLACEHOLDER = re.compile(r'%\(\w+\)s')
QR_SRC = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@tagged('post_install', '-at_install')
class TestPaybillQr(MpesaLedgerCommon):

    # === HELPERS === #

    def _paybill_block(self, html):
        """The paybill block of a rendered page or report, as text; fails when there is none."""
        html = html.decode() if isinstance(html, bytes) else html
        start = html.find('name="mpesa_paybill"')
        self.assertNotEqual(start, -1, "the paybill details are shown")
        return html[start:start + 6000]

    def _qr_content(self, block):
        """What the block's QR image decodes to (zxing-cpp reads it as a phone's camera does)."""
        if zxingcpp is None:
            raise unittest.SkipTest("zxing-cpp is not installed (requirements-dev.txt)")
        found = QR_SRC.search(block)
        self.assertTrue(found, "a QR image is shown")
        codes = zxingcpp.read_barcodes(Image.open(io.BytesIO(base64.b64decode(found.group(1)))))
        self.assertEqual(len(codes), 1)
        return read_qr_content(codes[0].text)

    def _invoice_html(self, invoice):
        return self.env['ir.actions.report']._render_qweb_html('account.account_invoices', invoice.ids)[0]

    def _qr_requests(self):
        return self.simulator.requests_for('qr_generate')

    # === TESTS === #

    def test_invoice_report_shows_paybill_details_and_a_qr_that_decodes(self):
        invoice = self._invoice(4500.0)
        block = self._paybill_block(self._invoice_html(invoice))
        self.assertIn(SIM_SHORTCODE, block)
        self.assertIn(invoice.name, block)
        self.assertIn('4,500.00', block)
        self.assertEqual(self._qr_content(block), {
            'Amount': 4500, 'CPI': SIM_SHORTCODE, 'MerchantName': invoice.company_id.name, 'RefNo': invoice.name,
            'TrxCode': 'PB',
        })
        self.assertEqual([r.request_body['RefNo'] for r in self._qr_requests()], [invoice.name])
        # Kept on the invoice while the amount due is unchanged: a second print asks Daraja nothing.
        self.assertEqual(invoice.mpesa_qr_for, f"PB:{SIM_SHORTCODE}:{invoice.name}:4500")
        self._invoice_html(invoice)
        self.assertEqual(len(self._qr_requests()), 1)

    def test_a_partial_payment_asks_a_new_qr_for_the_rest(self):
        invoice = self._invoice(4500.0)
        self._invoice_html(invoice)
        self._confirm(1000, invoice.name)
        invoice.invalidate_recordset()
        block = self._paybill_block(self._invoice_html(invoice))
        self.assertIn('3,500.00', block)
        self.assertEqual(self._qr_content(block)['Amount'], 3500)
        self.assertEqual(len(self._qr_requests()), 2)

    def test_the_amount_to_enter_is_whole_shillings(self):
        # A phone pays no cents: the block asks what the push form asks, the amount due rounded up.
        invoice = self._invoice(9658.30)
        block = self._paybill_block(self._invoice_html(invoice))
        self.assertIn('9,659.00', block)
        self.assertNotIn('9,658.30', block)
        self.assertEqual(self._qr_content(block)['Amount'], 9659)

    def test_paying_by_the_qr_code_pays_the_invoice(self):
        self.provider.action_mpesa_c2b_register()
        invoice = self._invoice(4500.0)
        content = self._qr_content(self._paybill_block(self._invoice_html(invoice)))
        self.env.flush_all()
        [code] = self.simulator.qr_codes
        self.assertEqual(read_qr_content(code['content']), content)
        trans_id = self.simulator.pay_qr(code['content'], PHONE_SUCCESS)
        self.simulator.wait_for_deliveries(C2B_CONFIRMATION, count=1, reference=trans_id, timeout=10)
        self._settle_callbacks()
        invoice.invalidate_recordset()
        self.assertIn(invoice.payment_state, ('paid', 'in_payment'))
        self.assertEqual(self._row(trans_id).state, 'matched')
        # Nothing is due any more: no paybill details, no QR code.
        self.assertNotIn('name="mpesa_paybill"', self._invoice_html(invoice).decode())

    def test_quotation_portal_page_and_pdf_show_the_paybill_details(self):
        quotation = self.quotation
        quotation.action_quotation_sent()
        self.authenticate('distributor', 'distributor')
        page = self.url_open(quotation.get_portal_url()).text
        block = self._paybill_block(page)
        self.assertIn(quotation.name, block)
        self.assertIn('4,500.00', block)
        self.assertEqual(self._qr_content(block)['RefNo'], quotation.name)
        report = self.env['ir.actions.report']._render_qweb_html('sale.action_report_saleorder', quotation.ids)[0]
        self.assertIn(quotation.name, self._paybill_block(report))
        self.assertEqual(len(self._qr_requests()), 1, "the page and the PDF share the kept code")

    def test_invoice_portal_page_shows_the_paybill_details(self):
        invoice = self._invoice(4500.0)
        self.authenticate('distributor', 'distributor')
        page = self.url_open(invoice.get_portal_url(report_type='html')).text
        self.assertIn(invoice.name, self._paybill_block(page))

    def test_odoo_invoice_qr_mechanism_offers_mpesa(self):
        methods = dict(self.env['res.partner.bank'].get_available_qr_methods_in_sequence())
        self.assertIn('mpesa', methods)
        invoice = self._invoice(4500.0)
        invoice.company_id.qr_code = True
        account = self.provider._mpesa_bank_account()
        self.assertEqual(account.acc_number, SIM_SHORTCODE)
        self.assertEqual(account.partner_id, invoice.company_id.partner_id)
        self.assertEqual(self.provider._mpesa_bank_account(), account, "made once")
        invoice.partner_bank_id = account
        self.assertEqual(invoice._generate_qr_code(silent_errors=False)[:22], 'data:image/png;base64,')
        self.assertEqual(invoice.qr_code_method, 'mpesa')
        self.assertEqual(invoice.mpesa_qr_for, f"PB:{SIM_SHORTCODE}:{invoice.payment_reference}:4500")
        usd = self.env.ref('base.USD')
        self.assertTrue(account._get_error_messages_for_qr('mpesa', self.distributor, usd))
        other = self.env['res.partner.bank'].create({
            'acc_number': '999111', 'partner_id': invoice.company_id.partner_id.id,
        })
        self.assertTrue(other._get_error_messages_for_qr('mpesa', self.distributor, self.currency_kes))

    def test_no_paybill_details_where_mpesa_does_not_take_the_document(self):
        stranger = self.env['res.partner'].create({'name': "Not a distributor"})
        self.provider.mpesa_distributors_only = True
        self.assertFalse(self._invoice(4500.0, partner=stranger)._mpesa_paybill_details())
        cancelled = self._invoice(4500.0)
        cancelled.button_draft()
        cancelled.button_cancel()
        self.assertFalse(cancelled._mpesa_paybill_details())
        self.assertNotIn('name="mpesa_paybill"', self._invoice_html(cancelled).decode())
        self.assertEqual(self._qr_requests(), [])

    def test_daraja_refusing_the_qr_still_shows_the_paybill_details(self):
        invoice = self._invoice(4500.0)
        self.simulator.fail_next(count=3, error='unavailable', operations=('qr_generate',))
        block = self._paybill_block(self._invoice_html(invoice))
        self.assertIn(invoice.name, block)
        self.assertNotIn('o_mpesa_qr', block)
        self.assertFalse(invoice.mpesa_qr_code, "nothing kept: the next print asks again")

    def test_above_one_payment_the_qr_asks_the_first_payment(self):
        invoice = self._invoice(600000.0)
        block = self._paybill_block(self._invoice_html(invoice))
        self.assertIn('600,000.00', block)
        self.assertIn('o_mpesa_paybill_limit', block)
        self.assertEqual(self._qr_content(block)['Amount'], 250000)

    def test_a_swahili_distributor_reads_the_paybill_details_in_swahili(self):
        self.env['res.lang']._activate_lang('sw')
        self.env['ir.module.module']._load_module_terms(['muchiri_mpesa'], ['sw'], overwrite=True)
        self.distributor.lang = 'sw'
        invoice = self._invoice(600000.0)
        block = self._paybill_block(self._invoice_html(invoice))
        most = format_amount(self.env(context={'lang': 'sw'}), 250000, self.currency_kes)
        for swahili in ("Lipa kwa M-Pesa", "Nambari ya akaunti:", "Kiasi:", "weka nambari ya biashara",
                        "Au changanua msimbo wa QR",
                        # One sentence, the amount where the translation puts it.
                        f"Malipo moja ya M-Pesa ni hadi {most}: lipa kiasi kilichobaki kwa malipo mengine"
                        " kwenye akaunti hiyo hiyo.",
                        "Msimbo wa QR unaomba malipo ya kwanza."):
            self.assertIn(swahili, block)
        self.assertNotIn("Account number:", block)
        self.assertNotIn("One M-Pesa payment", block)

    def test_a_swahili_distributor_logs_in_to_swahili_whatever_the_browser_said(self):
        # Odoo's login page sets the frontend_lang cookie (to an English browser's language), which then
        # wins over the user's own: her M-Pesa form and paybill details would be English.
        sw = self.env['res.lang']._activate_lang('sw')
        self.env['ir.module.module']._load_module_terms(['muchiri_mpesa'], ['sw'], overwrite=True)
        if 'website' in self.env:  # A shop's website serves only its own languages.
            self.env['website'].search([]).language_ids |= sw
        self.distributor.lang = 'sw'
        self.quotation.action_quotation_sent()
        page = self.url_open('/web/login').text
        self.opener.cookies.set('frontend_lang', 'en_US', domain='127.0.0.1', path='/')  # An English browser.
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
        self.url_open('/web/login', data={'login': 'distributor', 'password': 'distributor', 'csrf_token': csrf})
        self.assertEqual(self.opener.cookies.get('frontend_lang'), 'sw')
        block = self._paybill_block(self.url_open(self.quotation.get_portal_url()).text)
        self.assertIn("Lipa kwa M-Pesa", block)
        self.assertNotIn("Pay with M-Pesa", block)

    def test_the_pot_is_the_one_odoo_exports(self):
        """i18n/muchiri_mpesa.pot, the translators' template, cannot rot: it holds each term Odoo
        extracts from the module today, and no other.  The demo's records are not the addon's
        texts: they are left out (the pot is exported from a database without demo data)."""
        def foreign(place):
            """A demo record, or a field another app gives this addon's models (mail's messages,
            or the ratings 'rating' adds where it is installed): not the addon's text."""
            if 'muchiri_mpesa.demo_' in place:
                return True
            kind, _sep, xmlid = place.rpartition(':')
            field = kind.startswith('model:ir.model.fields,') and self.env.ref(xmlid, raise_if_not_found=False)
            return bool(field) and self.env[field.model]._fields[field.name]._module != 'muchiri_mpesa'

        def addon_terms(po):
            return {entry.msgid for entry in po if entry.msgid and not all(
                foreign(place) for place, _line in entry.occurrences)}
        exported = io.BytesIO()
        trans_export(False, ['muchiri_mpesa'], exported, 'po', self.env.cr)
        extracted = addon_terms(polib.pofile(exported.getvalue().decode()))
        with file_open('muchiri_mpesa/i18n/muchiri_mpesa.pot') as pot_file:
            shipped = addon_terms(polib.pofile(pot_file.read()))
        self.assertFalse(sorted(extracted - shipped)[:5], "terms missing from the pot: export it again")
        self.assertFalse(sorted(shipped - extracted)[:5], "terms the code no longer says: export the pot again")

    def test_the_swahili_terms_are_the_ones_the_code_says(self):
        """sw.po cannot rot: each of its terms is one Odoo extracts from the module today (views,
        records, Python, JavaScript), from the place and of the kind it says (a Python term
        without its `odoo-python` mark is never used); its placeholders are the term's own; it
        loads without a warning; and what distributors read is all in it."""
        exported = io.BytesIO()
        trans_export(False, ['muchiri_mpesa'], exported, 'po', self.env.cr)
        extracted = {entry.msgid: entry for entry in polib.pofile(exported.getvalue().decode())}
        with file_open('muchiri_mpesa/i18n/sw.po') as po_file:
            swahili = polib.pofile(po_file.read())
        self.assertTrue(swahili)
        stale = [entry.msgid for entry in swahili if entry.msgid not in extracted]
        self.assertFalse(stale, "terms the code no longer says: drop them from sw.po")
        for entry in swahili:
            with self.subTest(msgid=entry.msgid[:60]):
                source = extracted[entry.msgid]
                self.assertLessEqual(set(entry.occurrences), set(source.occurrences), "where the term is")
                self.assertEqual(entry.comment, source.comment, "the kind of the term")
                self.assertTrue(entry.msgstr)
                self.assertEqual(sorted(PLACEHOLDER.findall(entry.msgstr)), sorted(PLACEHOLDER.findall(entry.msgid)))
        # What distributors read: the payment form, the status page, the paybill details, the mails.
        read_by_distributors = re.compile(
            r'arch_db:muchiri_mpesa\.(inline_form|state_header|state_header_instalments|paybill_details)$'
            r'|^model:mail\.template,(subject|body_html):'
            r'|^model_terms:payment\.provider,(pending|done|cancel)_msg:'
            r'|^code:addons/muchiri_mpesa/static/src/js/payment_form\.js$'
            # M-Pesa's result codes in plain words (the status page, the mails).
            r'|^code:addons/muchiri_mpesa/daraja/codes\.py$')
        translated = {entry.msgid for entry in swahili}
        untranslated = [
            msgid for msgid, source in extracted.items()
            if msgid not in translated and re.search('[a-z]', msgid)
            and any(read_by_distributors.search(place) for place, _line in source.occurrences)
        ]
        self.assertFalse(untranslated, "texts distributors read, missing from sw.po")
        self.env['res.lang']._activate_lang('sw')
        with self.assertNoLogs('odoo.tools.translate', level='WARNING'):
            self.env['ir.module.module']._load_module_terms(['muchiri_mpesa'], ['sw'], overwrite=True)
