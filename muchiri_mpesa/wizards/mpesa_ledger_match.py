# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from odoo import Command, api, fields, models

from .. import const

# How much each clue weighs in the proposals' order: the account number the payer typed names
# a document; the payer's customer owes it; it owes exactly this amount.
CLUE_ACCOUNT, CLUE_CUSTOMER, CLUE_AMOUNT = 4, 2, 1


class MpesaLedgerMatch(models.TransientModel):
    """Place a payment of the exceptions queue on one or several orders and invoices.

    The wizard proposes the open documents the payment may be for, best guess first, with their
    customer, date and amount due, as Odoo's reconciliation proposals do; the accountant ticks
    them, or picks others.  Invoices are paid first, then orders, each in the order shown, up to
    what it owes; what is left over is the last document's customer credit, flagged for refund.
    The ledger row's chatter records who matched it.
    """

    _name = 'muchiri.mpesa.ledger.match'
    _description = "Match an M-Pesa payment with orders and invoices"

    ledger_id = fields.Many2one('muchiri.mpesa.ledger', required=True, readonly=True, ondelete='cascade')
    company_id = fields.Many2one(related='ledger_id.company_id')
    currency_id = fields.Many2one(related='ledger_id.currency_id')
    amount = fields.Monetary(related='ledger_id.amount')
    trans_time = fields.Datetime(related='ledger_id.trans_time')
    payer_name = fields.Char(related='ledger_id.payer_name')
    bill_ref = fields.Char(related='ledger_id.bill_ref')
    note = fields.Char(related='ledger_id.note', string="Why It Waits")
    partner_id = fields.Many2one(
        'res.partner', string="Customer", domain="[('parent_id', '=', False)]",
        help="Proposes this customer's open documents below.",
    )
    line_ids = fields.One2many(
        'muchiri.mpesa.ledger.match.line', 'wizard_id', string="Proposals",
        compute='_compute_line_ids', store=True, readonly=False,
    )
    invoice_ids = fields.Many2many(
        'account.move', string="Other Invoices",
        domain="[('company_id', '=', company_id), ('move_type', '=', 'out_invoice'), ('state', '=', 'posted'),"
               " ('payment_state', 'not in', ('paid', 'in_payment', 'reversed')), ('currency_id', '=', currency_id)]",
    )
    sale_order_ids = fields.Many2many(
        'sale.order', string="Other Orders",
        domain="[('company_id', '=', company_id), ('state', 'in', ('draft', 'sent', 'sale')),"
               " ('currency_id', '=', currency_id)]",
    )

    @api.model
    def default_get(self, fields_list):
        values = super().default_get(fields_list)
        row = self.env['muchiri.mpesa.ledger'].browse(self.env.context.get('active_id')).exists()
        if row:
            values['ledger_id'] = row.id
            values['partner_id'] = (
                row.partner_id or self.env['muchiri.mpesa.matching']._mpesa_match_partner(row)
            ).id
        return values

    # === COMPUTE METHODS === #

    @api.depends('ledger_id', 'partner_id')
    def _compute_line_ids(self):
        for wizard in self:
            chosen = {line._document() for line in wizard.line_ids if line.selected}
            commands = [Command.clear()]
            for sequence, (document, reasons) in enumerate(wizard._proposals()):
                commands.append(Command.create({
                    'sequence': sequence,
                    'selected': document in chosen,
                    'invoice_id': document.id if document._name == 'account.move' else False,
                    'sale_order_id': document.id if document._name == 'sale.order' else False,
                    'partner_id': document.partner_id.commercial_partner_id.id,
                    'date': fields.Date.to_date(
                        document.invoice_date if document._name == 'account.move' else document.date_order),
                    'amount_due': document._mpesa_amount_due(),
                    'reason': ', '.join(reasons),
                }))
            wizard.line_ids = commands

    # === BUSINESS METHODS === #

    def _proposals(self):
        """The open documents this payment may be for, best guess first.

        :return: (document, reasons) pairs, at most const.MATCH_PROPOSALS_LIMIT
        """
        self.ensure_one()
        row = self.ledger_id
        if not row:
            return []
        Matching = self.env['muchiri.mpesa.matching']
        company, currency = row.company_id, row.currency_id
        found = {}  # document: [weight, reasons]; a dict keeps the order found on equal weights.

        def propose(documents, weight, reason):
            for document in documents:
                if document.currency_id == currency and document._mpesa_is_due():
                    entry = found.setdefault(document, [0, []])
                    entry[0] += weight
                    entry[1].append(reason)

        if row.bill_ref_key:
            propose(Matching._mpesa_find_documents(company, row.bill_ref_key), CLUE_ACCOUNT,
                    self.env._("account %s", row.bill_ref))
        invoice_domain = [
            ('company_id', '=', company.id), ('move_type', '=', 'out_invoice'), ('state', '=', 'posted'),
            ('payment_state', 'not in', ('paid', 'in_payment', 'reversed')), ('currency_id', '=', currency.id),
        ]
        # An order with an open invoice is paid through that invoice (as the matching does).
        order_domain = [
            ('company_id', '=', company.id), ('state', 'in', ('draft', 'sent', 'sale')),
            ('currency_id', '=', currency.id), ('invoice_status', '!=', 'invoiced'),
        ]
        limit = const.MATCH_PROPOSALS_LIMIT
        Move, Order = self.env['account.move'], self.env['sale.order']
        if self.partner_id:
            customer = [('commercial_partner_id', '=', self.partner_id.commercial_partner_id.id)]
            reason = self.env._("customer %s", self.partner_id.commercial_partner_id.name)
            propose(Move.search([*invoice_domain, *customer], order='invoice_date_due, id', limit=limit),
                    CLUE_CUSTOMER, reason)
            propose(Order.search([*order_domain, ('partner_id.commercial_partner_id', '=', customer[0][2])],
                                 order='date_order, id', limit=limit), CLUE_CUSTOMER, reason)
        reason = self.env._("owes this amount")
        propose(Move.search([*invoice_domain, ('amount_residual', '=', row.amount)], limit=limit), CLUE_AMOUNT, reason)
        propose(Order.search([*order_domain, ('amount_total', '=', row.amount)], limit=limit), CLUE_AMOUNT, reason)
        ranked = sorted(found.items(), key=lambda item: -item[1][0])  # Stable: found order on ties.
        return [(document, reasons) for document, (_weight, reasons) in ranked[:limit]]

    def _chosen_documents(self):
        """The ticked proposals in their order, then the other documents picked: invoices first,
        then orders."""
        documents = [line._document() for line in self.line_ids.sorted('sequence') if line.selected]
        documents += [document for document in [*self.invoice_ids, *self.sale_order_ids] if document not in documents]
        return sorted(documents, key=lambda document: document._name != 'account.move')

    def action_match(self):
        self.ensure_one()
        self.env['payment.provider']._mpesa_check_group('account.group_account_invoice')
        documents = self._chosen_documents()
        row = self.ledger_id
        row._mpesa_match_by_hand(documents)
        state = dict(row._fields['state']._description_selection(self.env))[row.sudo().state]
        message = self.env._("%(receipt)s: %(state)s, on %(documents)s.", receipt=row.name, state=state,
                             documents=', '.join(document.display_name for document in documents))
        # Odoo confirms a quotation once its prepayment is paid (Odoo's own rule, not the amount due).
        quotations = self.env['sale.order'].concat(*(
            document for document in documents if document._name == 'sale.order' and document.state in ('draft', 'sent')
        ))
        quotations.invalidate_recordset(['amount_paid'])
        reached = quotations.filtered(lambda order: order._is_confirmation_amount_reached())
        if reached:
            message += ' ' + self.env._("%(orders)s: confirmed in the background, in a few seconds.",
                                        orders=', '.join(reached.mapped('name')))
        if quotations - reached:
            message += ' ' + self.env._("Not paid enough to be confirmed yet: %(orders)s.",
                                        orders=', '.join((quotations - reached).mapped('name')))
        return {
            'type': 'ir.actions.client',
            'tag': 'display_notification',
            'params': {
                'type': 'success', 'message': message, 'sticky': False,
                'next': {'type': 'ir.actions.act_window_close'},
            },
        }


class MpesaLedgerMatchLine(models.TransientModel):
    """A document the wizard proposes, with what makes it a candidate."""

    _name = 'muchiri.mpesa.ledger.match.line'
    _description = "A document an M-Pesa payment may be for"
    _order = 'sequence, id'

    wizard_id = fields.Many2one('muchiri.mpesa.ledger.match', required=True, ondelete='cascade')
    sequence = fields.Integer()
    selected = fields.Boolean(string="Pay")
    invoice_id = fields.Many2one('account.move', readonly=True)
    sale_order_id = fields.Many2one('sale.order', string="Order", readonly=True)
    document = fields.Char(compute='_compute_document')
    partner_id = fields.Many2one('res.partner', string="Customer", readonly=True)
    date = fields.Date(readonly=True)
    currency_id = fields.Many2one(related='wizard_id.currency_id')
    amount_due = fields.Monetary(readonly=True)
    reason = fields.Char(string="Why", readonly=True)

    @api.depends('invoice_id', 'sale_order_id')
    def _compute_document(self):
        for line in self:
            line.document = line._document().display_name

    def _document(self):
        return self.invoice_id or self.sale_order_id
