# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""The state of a kept body is `state` for every kind (it was `callback_state`), and an STK
callback's kind is 'stk_callback' (it was 'callback'): renamed in place, before the registry
loads, so that no value, index or filter is lost."""


def _column_exists(cr, table, column):
    cr.execute("SELECT 1 FROM information_schema.columns WHERE table_name = %s AND column_name = %s",
               [table, column])
    return bool(cr.fetchone())


def migrate(cr, version):
    if not version:
        return
    if _column_exists(cr, 'muchiri_mpesa_event', 'callback_state') \
            and not _column_exists(cr, 'muchiri_mpesa_event', 'state'):
        cr.execute('ALTER TABLE muchiri_mpesa_event RENAME COLUMN callback_state TO state')
        cr.execute('ALTER INDEX IF EXISTS muchiri_mpesa_event__callback_state_index'
                   ' RENAME TO muchiri_mpesa_event__state_index')
        cr.execute("UPDATE ir_model_fields SET name = 'state'"
                   " WHERE model = 'muchiri.mpesa.event' AND name = 'callback_state'")
        cr.execute("""
            UPDATE ir_model_data
               SET name = replace(name, '_muchiri_mpesa_event__callback_state', '_muchiri_mpesa_event__state')
             WHERE module = 'muchiri_mpesa'
               AND (name = 'field_muchiri_mpesa_event__callback_state'
                    OR name LIKE 'selection__muchiri_mpesa_event__callback_state__%%')
        """)
    cr.execute("UPDATE muchiri_mpesa_event SET kind = 'stk_callback' WHERE kind = 'callback'")
    cr.execute("""
        UPDATE ir_model_fields_selection SET value = 'stk_callback'
         WHERE value = 'callback' AND field_id IN (
             SELECT id FROM ir_model_fields WHERE model = 'muchiri.mpesa.event' AND name = 'kind')
    """)
    cr.execute("""
        UPDATE ir_model_data SET name = 'selection__muchiri_mpesa_event__kind__stk_callback'
         WHERE module = 'muchiri_mpesa' AND name = 'selection__muchiri_mpesa_event__kind__callback'
    """)
