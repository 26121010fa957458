"""Kenyan phone numbers as people type them, turned into the MSISDN Daraja expects.

Distributors type 0712 345 678, +254 712-345-678, 712345678 or 254712345678.
Daraja wants ``2547XXXXXXXX`` / ``2541XXXXXXXX``, and only Safaricom lines can get an STK prompt,
so other networks are refused here with a sentence the distributor can act on, instead of an
opaque Daraja error or a prompt that never arrives.
"""

from __future__ import annotations

import re

from .errors import InvalidPhoneNumber

__all__ = ["mask_msisdn", "normalize_msisdn"]

_SEPARATORS = re.compile(r"[\s\-.()]+")
_DIGITS = re.compile(r"[0-9]+")

# Safaricom ranges, as the first three digits of the 9-digit subscriber number (0700-0729,
# 0740-0743, 0745, 0746, 0748, 0757-0759, 0768, 0769, 0790-0799, 0110-0115).
_SAFARICOM_PREFIXES: tuple[str, ...] = tuple(
    [f"7{n:02d}" for n in range(30)]
    + [f"7{n:02d}" for n in range(40, 44)]
    + ["745", "746", "748", "757", "758", "759", "768", "769"]
    + [f"7{n:02d}" for n in range(90, 100)]
    + [f"1{n:02d}" for n in range(10, 16)]
)


def _shown(raw: object) -> str:
    """The input as the person typed it, shortened so a message stays readable."""
    text = str(raw).strip()
    return text if len(text) <= 30 else text[:27] + "..."


def normalize_msisdn(raw: str | int, *, safaricom_only: bool = True) -> str:
    """Return ``254`` + 9 digits for a Safaricom number, or raise InvalidPhoneNumber saying why.

    ``safaricom_only=False`` takes any Kenyan mobile number (2547XXXXXXXX / 2541XXXXXXXX): a payer's number,
    where a line ported to Safaricom (or a range newer than this list) still pays with M-Pesa.
    """
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise InvalidPhoneNumber(f"{_shown(raw)!r} is not a phone number.")
    if isinstance(raw, int) and raw < 0:
        raise InvalidPhoneNumber(f"{raw} is not a phone number.")
    text = str(raw).strip()
    if not text:
        raise InvalidPhoneNumber("A phone number is required.")
    shown = _shown(text)
    compact = _SEPARATORS.sub("", text)
    international = compact.startswith("+")
    digits = compact[1:] if international else compact
    if not _DIGITS.fullmatch(digits):
        raise InvalidPhoneNumber(
            f"{shown} is not a phone number: use digits only, for example 0712 345 678."
        )

    if not international and digits.startswith("00"):  # international dialling prefix
        digits, international = digits[2:], True
    not_kenyan = InvalidPhoneNumber(f"{shown} is not a Kenyan number (it must start with +254).")
    if digits.startswith("254"):
        subscriber = digits[3:]
        if len(subscriber) == 10 and subscriber.startswith("0"):
            subscriber = subscriber[1:]  # "+254 (0)712 345 678"
    elif international:
        raise not_kenyan
    elif digits.startswith("0"):
        subscriber = digits[1:]
    elif len(digits) > 10:
        raise not_kenyan
    else:
        subscriber = digits

    if len(subscriber) < 9:
        raise InvalidPhoneNumber(f"{shown} has too few digits for a Kenyan mobile number.")
    if len(subscriber) > 9:
        raise InvalidPhoneNumber(f"{shown} has too many digits for a Kenyan mobile number.")
    if subscriber[0] not in "71":
        raise InvalidPhoneNumber(f"{shown} is not a Kenyan mobile number.")
    if safaricom_only and not subscriber.startswith(_SAFARICOM_PREFIXES):
        raise InvalidPhoneNumber(
            f"{shown} is not a Safaricom number: M-Pesa prompts can only be sent to Safaricom lines."
        )
    return "254" + subscriber


def mask_msisdn(msisdn: str) -> str:
    """``2547******49``: enough to recognise a number in logs without exposing it."""
    text = str(msisdn)
    if len(text) <= 6:
        return "*" * len(text)
    return text[:4] + "*" * (len(text) - 6) + text[-2:]


def phones_may_match(reported: str | int, msisdn: str) -> bool:
    """Whether a payer's number as Daraja reported it may be ``msisdn``.

    Daraja reports numbers in full, masked (``2547******49``) or hashed: a full number must be the
    same line, a masked one must agree on every digit it shows, a hash cannot be compared here.
    """
    text = _SEPARATORS.sub("", str(reported).strip())
    if "*" in text:
        head, tail = text.split("*", 1)[0], text.rsplit("*", 1)[1]
        for candidate in (msisdn, "0" + msisdn[3:]):  # 2547... or 07...
            if len(candidate) == len(text) and candidate.startswith(head) and candidate.endswith(tail):
                return True
        return False
    try:
        return normalize_msisdn(text) == normalize_msisdn(msisdn)
    except InvalidPhoneNumber:
        return not _DIGITS.fullmatch(text.lstrip("+"))  # A hash or other opaque form: not comparable.
