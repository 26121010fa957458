# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""The catalogue of the provider's codes, limits and defaults (Daraja's own codes live in daraja/)."""

PROVIDER_CODE = 'mpesa'

# The route Daraja posts STK callbacks to; the secret authenticates the provider.
# The STK callback's first path: kept for the prompts sent before the neutral prefix (below).
CALLBACK_ROUTE = '/payment/mpesa/callback/<string:secret>'

# Every URL handed to Daraja lives under this neutral prefix: Daraja refuses URLs that hold "M-Pesa",
# "Safaricom", "exe", "exec", "cmd", "sql" or "query" (docs/design.md, 6. URLs and callback sources).  The provider's
# callback secret names the provider; the last part names what Daraja is telling us.
LNM_PREFIX = '/payment/lnm'
LNM_ROUTES = {
    'stk': LNM_PREFIX + '/<string:secret>/stk',
    'c2b_validation': LNM_PREFIX + '/<string:secret>/c2b/validation',
    'c2b_confirmation': LNM_PREFIX + '/<string:secret>/c2b/confirmation',
    'pull': LNM_PREFIX + '/<string:secret>/pull',
    'reversal_result': LNM_PREFIX + '/<string:secret>/reversal/result',
    'reversal_timeout': LNM_PREFIX + '/<string:secret>/reversal/timeout',
    'status_result': LNM_PREFIX + '/<string:secret>/status/result',
    'status_timeout': LNM_PREFIX + '/<string:secret>/status/timeout',
    'b2b_result': LNM_PREFIX + '/<string:secret>/b2b/result',
}
# What each inbound route receives: the kept event's kind, and the Daraja API whose result it is.
# One controller method serves them all (controllers/main.py).
INBOUND_ROUTE_KINDS = {
    CALLBACK_ROUTE: ('stk_callback', False),
    LNM_ROUTES['stk']: ('stk_callback', False),
    LNM_ROUTES['c2b_validation']: ('c2b_validation', False),
    LNM_ROUTES['c2b_confirmation']: ('c2b_confirmation', False),
    LNM_ROUTES['pull']: ('pull_callback', False),
    LNM_ROUTES['reversal_result']: ('initiator_result', 'reversal'),
    LNM_ROUTES['reversal_timeout']: ('initiator_timeout', 'reversal'),
    LNM_ROUTES['status_result']: ('initiator_result', 'status'),
    LNM_ROUTES['status_timeout']: ('initiator_timeout', 'status'),
    LNM_ROUTES['b2b_result']: ('b2b_result', False),
}
# Routes whose raw body is kept before Odoo's form parser may read it (models/ir_http.py).
INBOUND_ROUTES = frozenset(INBOUND_ROUTE_KINDS)

# M-Pesa takes Kenyan shillings only.
SUPPORTED_CURRENCIES = ['KES']

# Odoo's own payment method (payment.payment_method_mpesa), activated with the provider.
DEFAULT_PAYMENT_METHOD_CODES = {'mpesa'}

# Safaricom's published callback source addresses (docs/design.md, 3. Daraja facts); some lists add the last two.
SAFARICOM_CALLBACK_IPS = [
    '196.201.214.200', '196.201.214.206', '196.201.213.114', '196.201.214.207',
    '196.201.214.208', '196.201.213.44', '196.201.212.127', '196.201.212.138',
    '196.201.212.129', '196.201.212.136', '196.201.212.74', '196.201.212.69',
    '196.201.212.128', '196.201.212.132',
]

IP_CHECK_MODES = [
    ('off', "Off"),
    ('log', "Log unknown addresses"),
    ('enforce', "Refuse unknown addresses"),
]

SHORTCODE_TYPES = [
    ('paybill', "Paybill"),
    ('till', "Buy Goods (till)"),
]

# Seconds during which a second prompt for the same order is refused: a phone's prompt expires after
# about a minute, and Safaricom refuses the same amount to the same customer within two (code 17).
DEFAULT_PUSH_COOLDOWN = 120

# Less than this over what a document owes is M-Pesa's whole-shilling rounding (a fraction of a
# shilling is asked as a whole one), not an overpayment.
ROUNDING_TOLERANCE = 1.0

# Payment status shown on a sale order, computed from its M-Pesa transactions.
# Empty on orders without any M-Pesa transaction.  A customer's cancellation is no failure.
ORDER_PAYMENT_STATUSES = [
    ('unpaid', "Unpaid"),
    ('pending', "Pending"),
    ('partial', "Partially paid"),
    ('paid', "Paid"),
    ('refunded', "Refunded"),
    ('cancelled', "Cancelled by the customer"),
    ('failed', "Failed"),
]

# What a kept Daraja exchange is (the audit log and the callback inbox).
EVENT_KINDS = [
    ('token', "Access token"),
    ('stk_push', "STK Push"),
    ('stk_query', "STK Query"),
    ('stk_callback', "STK callback"),
    ('c2b_register', "C2B URL registration"),
    ('c2b_validation', "C2B validation"),
    ('c2b_confirmation', "C2B confirmation"),
    ('pull_register', "Pull registration"),
    ('pull_query', "Pull query"),
    ('pull_callback', "Pull callback"),
    ('reversal', "Reversal request"),
    ('transaction_status', "Transaction Status request"),
    ('initiator_result', "Reversal / Transaction Status result"),
    ('initiator_timeout', "Reversal / Transaction Status timeout"),
    ('qr_generate', "Dynamic QR request"),
    ('b2b_checkout', "B2B Express Checkout request"),
    ('b2b_result', "B2B Express Checkout result"),
]

# What became of a received callback: kept, queued by the request, settled by the job (docs/design.md, 2. Prompts and
# callbacks).  'unmatched' callbacks wait for their transaction's CheckoutRequestID.
CALLBACK_STATES = [
    ('received', "Received"),
    ('queued', "Waiting for settlement"),
    ('unmatched', "Waiting for its transaction"),
    ('error', "Error, retried"),
    ('processed', "Processed"),
    ('ignored', "Ignored (already final)"),
    ('rejected', "Rejected"),
    ('conflict', "Conflicting receipt"),
]
# The states the settlement job takes a callback from, and those it leaves alone.
CALLBACK_WAITING_STATES = ('received', 'queued', 'unmatched', 'error')
CALLBACK_FINAL_STATES = ('processed', 'ignored', 'rejected', 'conflict')
# A callback that cannot be settled now is tried again after this, doubling up to the maximum.
SETTLE_RETRY_FIRST = 5
SETTLE_RETRY_MAX = 30 * 60
# One run of the settlement job works at most this long (seconds), well within Odoo's time limit of
# a cron worker (limit_time_real_cron, 120 s by default); Odoo runs it again at once when callbacks
# are still due.
SETTLE_RUN_SECONDS = 45

# How far a transaction's M-Pesa receipt is proven.
RECEIPT_STATUSES = [
    ('pending', "Receipt pending"),
    ('confirmed', "Confirmed"),
    ('unverified', "Unverified"),
]

# Where a transaction's final M-Pesa answer came from (monitoring: callbacks versus reconciliation).
SETTLEMENT_SOURCES = [
    ('callback', "Callback"),
    ('query', "STK Query"),
    ('cutoff', "No answer by the cut-off"),
    ('status', "Transaction Status"),
]

# Reconciliation by STK Query (docs/design.md, 2. Prompts and callbacks): the first check once the customer has had time
# to answer, then about every minute for five minutes, then rarely until the cut-off.
RECONCILE_FIRST_CHECK = 35
RECONCILE_FAST_INTERVAL = 45
RECONCILE_FAST_PERIOD = 5 * 60
RECONCILE_SLOW_INTERVAL = 30 * 60
DEFAULT_RECONCILE_CUTOFF_HOURS = 24
# Transactions (and kept callbacks) handled by one cron run; the rest wait for the next run.
RECONCILE_BATCH_SIZE = 200
# After Daraja's spike arrest or quota errors, or when it cannot be reached, the run stops and the
# transaction is checked again after this many seconds.
RECONCILE_THROTTLE_DELAY = 60
THROTTLE_ERROR_CODES = ('500.003.02', '500.003.03')

# While the distributor's status page polls a prompt older than this (seconds) whose callback has not
# come, its status is asked of Daraja at most once per interval (the distributor's request, never
# Daraja's callback, waits on that query).
STATUS_POLL_EXPEDITE_AFTER = 20
STATUS_POLL_EXPEDITE_INTERVAL = 10

# Initiator APIs (docs/design.md, 8. Reversal and Transaction Status).  A result that has not come
# this many seconds after the request is asked again by Transaction Status (never a second
# reversal), at most INITIATOR_MAX_CHECKS times; then the transaction waits for an accountant.
INITIATOR_RESULT_WAIT = 10 * 60
INITIATOR_MAX_CHECKS = 6

# The one retention window: the jobs keep working on what is not settled (a kept body retried, a
# ledger row matched again, a result waiting for its request, a condition watched) this many days;
# past it, an accountant looks at it in the log (docs/design.md).
KEEP_WORKING_DAYS = 7

# An STK prompt's money is reported by Pull at most this many days after the prompt was sent: the
# matching looks that far back for the prompt a reported payment may be (not a retention window).
PROMPT_REPORTED_WITHIN_DAYS = 2

# The match wizard of the exceptions queue proposes at most this many documents, best guess first.
MATCH_PROPOSALS_LIMIT = 20

# The STK ResultCodes of M-Pesa's own limits (4: the phone's daily limit, 8: an account's balance
# limit): the status page says where the rest can be paid instead (docs/design.md, 5. Money rules).
LIMIT_RESULT_CODES = ('4', '8')

# B2B Express Checkout (docs/design.md, 15. Pay from the till): a till prompt whose result has not come this many
# seconds after it was started is asked about by Transaction Status (by its RequestRefID).
B2B_RESULT_WAIT = 3 * 60

# The M-Pesa organisation statement (docs/design.md, 16. The M-Pesa statement): what its Details
# and Reason Type say of a row, compared in lower case as substrings.  Money out that is M-Pesa's
# charge goes to the bank fees account; a sweep to the business's bank account to the liquidity
# transfer account; a reversal to the refund it belongs to.
STATEMENT_CHARGE_WORDINGS = (
    'charge',  # "Pay Bill Charge", "Business Pay Bill Charge", "Business Buy Goods Charge", "Withdrawal Charge"
    'transaction fee',
    'tariff',
)
STATEMENT_SWEEP_WORDINGS = (
    'organization settlement account to organization bank account',
    'organisation settlement account to organisation bank account',
    'funds transfer to',  # "Funds Transfer to Equity Bank"
    'transfer to bank',
    'withdraw funds to bank',
    'withdrawal to bank',
    'to organization bank account',
    'settlement',  # Reason Type "Settlement", "Merchant to Organization Settlement"
    'auto sweep',
)
STATEMENT_REVERSAL_WORDINGS = (
    'reversal',  # "Reversal", "Pay Bill Reversal", "Reversal of ..."
    'reverse',
)
