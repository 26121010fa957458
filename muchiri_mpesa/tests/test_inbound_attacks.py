# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""Hostile requests on every inbound route Daraja calls (const.LNM_ROUTES), over real HTTP.

Each route gets the same catalogue: the wrong method, bodies no Daraja would send (empty, a form,
2 MB, invalid UTF-8, a JSON array, a JSON string), wrong or mangled secrets, and one body posted
twice at once.  Whatever comes: never a 5xx; on a wrong secret nothing is kept; on the right one
the exact bytes are kept (muchiri.mpesa.event.raw_body) and no money moves.
"""
import base64
import json
import threading

from odoo.tests import tagged
from odoo.tools import mute_logger

from odoo.addons.muchiri_mpesa import const

from .common import MpesaCommon

# The event kind each route keeps its body as.
ROUTE_KINDS = {
    'stk': 'stk_callback',
    'c2b_validation': 'c2b_validation',
    'c2b_confirmation': 'c2b_confirmation',
    'pull': 'pull_callback',
    'reversal_result': 'initiator_result',
    'reversal_timeout': 'initiator_timeout',
    'status_result': 'initiator_result',
    'status_timeout': 'initiator_timeout',
}
JSON = {'Content-Type': 'application/json'}
FORM = {'Content-Type': 'application/x-www-form-urlencoded'}
# (name, body, headers): bodies that must be kept exactly on the right secret.
BODIES = [
    ('empty', b'', JSON),
    ('form', b'TransID=ATK0000001&TransAmount=100&BillRefNumber=INV%2F1&Result=1', FORM),
    ('form_as_json', b'TransID=ATK0000002&TransAmount=100', JSON),
    ('two_megabytes', b'{"TransID": "ATK0000003", "pad": "' + b'x' * (2 * 1024 * 1024) + b'"}', JSON),
    ('invalid_utf8', b'{"TransID": "\xff\xfe\xc3\x28", "TransAmount": "1\x00"}', JSON),
    ('json_array', json.dumps([{'TransID': 'ATK0000004', 'TransAmount': '100'}]).encode(), JSON),
    ('json_string', json.dumps('{"TransID": "ATK0000005"}').encode(), JSON),
    ('no_content_type', b'{"TransID": "ATK0000006", "TransAmount": "100"}', {}),
]


@tagged('post_install', '-at_install')
class TestInboundAttacks(MpesaCommon):

    def _url(self, route, secret):
        return self._build_url(const.LNM_ROUTES[route].replace('<string:secret>', secret))

    def _snapshot(self):
        """What money looks like: ledger rows, payments, and every transaction's state."""
        with self.registry.test_lock:
            self.env.invalidate_all()
            return (
                self.env['muchiri.mpesa.ledger'].sudo().search_count([]),
                self.env['account.payment'].sudo().search_count([]),
                {tx.id: (tx.state, tx.amount) for tx in self.env['payment.transaction'].sudo().search([])},
            )

    def _event_ids(self):
        with self.registry.test_lock:
            return set(self.env['muchiri.mpesa.event'].sudo().search([]).ids)

    def _new_events(self, before):
        with self.registry.test_lock:
            self.env.invalidate_all()
            Event = self.env['muchiri.mpesa.event'].sudo().with_context(bin_size=False)
            return Event.browse(sorted(set(Event.search([]).ids) - before))

    def _run_jobs(self):
        """Every job an inbound body wakes, as Odoo's crons would."""
        self._settle_callbacks()
        with self.registry.test_lock:
            self.env['payment.transaction'].sudo()._cron_mpesa_initiator()
            self.env['muchiri.mpesa.event'].sudo()._cron_mpesa_settle_callbacks()
            self.env.invalidate_all()

    def _post(self, route, body, headers, secret=None, method='post'):
        url = self._url(route, secret if secret is not None else self.provider.mpesa_callback_secret)
        return getattr(self.opener, method)(url, data=body, headers=headers, timeout=30, allow_redirects=False)

    def _assert_kept(self, events, route, bodies):
        self.assertEqual(len(events), len(bodies), f"{route}: one event per body")
        for event, body in zip(events, bodies, strict=True):
            self.assertEqual(event.kind, ROUTE_KINDS[route])
            self.assertEqual(event.provider_id, self.provider)
            self.assertEqual(base64.b64decode(event.raw_body or b''), body, f"{route}: kept exactly")

    @mute_logger('odoo.addons.muchiri_mpesa.controllers.main', 'odoo.addons.muchiri_mpesa.controllers.main',
                 'odoo.addons.muchiri_mpesa.controllers.main', 'odoo.addons.muchiri_mpesa.models.mpesa_event',
                 'odoo.addons.muchiri_mpesa.models.mpesa_event',
                 'odoo.addons.muchiri_mpesa.models.mpesa_event', 'odoo.http', 'werkzeug')
    def test_hostile_requests_on_every_inbound_route(self):
        self.env['payment.transaction'].sudo().create({
            'provider_id': self.provider.id, 'payment_method_id': self.payment_method_id,
            'reference': 'ATK-PENDING', 'amount': 100.0, 'currency_id': self.currency_kes.id,
            'partner_id': self.distributor.id, 'operation': 'online_direct', 'state': 'pending',
        })
        self.env.flush_all()
        secret = self.provider.mpesa_callback_secret
        money = self._snapshot()
        for route in const.LNM_ROUTES:
            # The right secret: every body kept exactly, whatever it is.
            for name, body, headers in BODIES:
                with self.subTest(route=route, attack=name):
                    before = self._event_ids()
                    response = self._post(route, body, headers)
                    self.assertLess(response.status_code, 500, response.text[:300])
                    self._assert_kept(self._new_events(before), route, [body])
            # Not a POST: refused before anything is read, nothing kept.
            for method in ('get', 'put', 'delete'):
                with self.subTest(route=route, attack=method):
                    before = self._event_ids()
                    response = self._post(route, b'{}', JSON, method=method)
                    self.assertLess(response.status_code, 500)
                    self.assertGreaterEqual(response.status_code, 400)
                    self.assertFalse(self._new_events(before), "nothing kept")
            # Wrong and mangled secrets: never the provider's, nothing kept.
            for name, wrong in (
                ('wrong', 'not-the-secret'), ('prefix', secret[:-1]), ('longer', secret + 'x'),
                ('trailing_slash', secret + '/'), ('encoded_slash', secret + '%2F'),
                ('encoded_slash_lower', secret + '%2f'), ('leading_slash', '%2F' + secret),
                ('invalid_utf8', '%FF%FE' + secret), ('nul', secret + '%00'), ('empty', ''),
                ('dotdot', '..%2F' + secret), ('upper', secret.upper() if secret.upper() != secret else secret + 'A'),
            ):
                with self.subTest(route=route, attack=f'secret_{name}'):
                    before = self._event_ids()
                    response = self._post(route, b'{"TransID": "ATK0000099"}', JSON, secret=wrong)
                    self.assertLess(response.status_code, 500, response.text[:300])
                    self.assertNotIn(response.status_code, (200, 201, 202), "not accepted")
                    self.assertFalse(self._new_events(before), "nothing kept on a wrong secret")
            # The same body twice at once: both kept, neither a 5xx.
            with self.subTest(route=route, attack='twice_at_once'):
                before = self._event_ids()
                body = json.dumps({'TransID': 'ATK0000100', 'TransAmount': 'abc', 'Result': 'x'}).encode()
                statuses, barrier = [], threading.Barrier(2)

                def post(body=body, route=route, statuses=statuses, barrier=barrier, secret=secret):
                    barrier.wait()
                    statuses.append(self._post(route, body, JSON, secret=secret).status_code)

                threads = [threading.Thread(target=post) for _i in range(2)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(timeout=60)
                self.assertEqual(len(statuses), 2)
                self.assertTrue(all(status < 500 for status in statuses), statuses)
                self._assert_kept(self._new_events(before), route, [body, body])
        self._run_jobs()
        self.assertEqual(self._snapshot(), money, "no money moved")
