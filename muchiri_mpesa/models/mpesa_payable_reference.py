# Part of muchiri_mpesa. See LICENSE file for full copyright and licensing details.
"""Kept for the modules that still import the reference keys from here: they live in utils.py."""
from ..utils import KEY_SQL, reference_key

__all__ = ['KEY_SQL', 'reference_key']
