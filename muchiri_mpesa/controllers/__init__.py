# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
from . import main, portal
