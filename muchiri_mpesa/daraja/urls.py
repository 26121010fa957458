"""The rule for every URL we hand Daraja (docs/design.md, 6. URLs and callback sources).

Daraja refuses URLs containing certain words (M-Pesa in any case, Safaricom, exe, exec, cmd, sql, query) and
the usual URL testers and tunnels; it is documented for C2B registration, and a refused ResultURL or
CallBackURL fails silently later, so we check before sending.  The URL itself is never quoted back: it holds
the provider's secret path.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from .errors import InvalidConfiguration

__all__ = ["BANNED_URL_HOSTS", "BANNED_URL_WORDS", "check_daraja_url"]

# Looked for anywhere in the URL, case-insensitively ("exe" also catches "exec": both are listed for the message).
BANNED_URL_WORDS: tuple[str, ...] = ("m-pesa", "mpesa", "safaricom", "exec", "exe", "cmd", "sql", "query")
# Tunnels and request testers integrators report Daraja refusing (a host ending with one of these).
BANNED_URL_HOSTS: tuple[str, ...] = (
    "ngrok.io",
    "ngrok-free.app",
    "ngrok.app",
    "ngrok-free.dev",
    "loca.lt",
    "localtunnel.me",
    "serveo.net",
    "localhost.run",
    "lhr.life",
    "trycloudflare.com",
    "webhook.site",
    "requestbin.com",
    "requestbin.net",
    "pipedream.net",
    "mockbin.org",
    "beeceptor.com",
    "requestcatcher.com",
    "hookbin.com",
)


def check_daraja_url(url: object, field: str = "url") -> str:
    """The URL, stripped, if Daraja can be given it; else InvalidConfiguration naming the banned word or host."""
    text = url.strip() if isinstance(url, str) else ""
    refused = InvalidConfiguration(
        "A URL given to Daraja must be an absolute http:// or https:// address, in plain ASCII (an international "
        "domain name in its xn-- form).",
        field=field,
    )
    # Printable ASCII only: no spaces, NUL or soft hyphens, and no fullwidth "MPESA" (U+FF2D...) that IDNA turns back
    # into "mpesa" after our check.
    if not text or not text.isascii() or not text.isprintable() or " " in text:
        raise refused
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:  # "http://[abc/": an invalid IPv6 host
        raise refused from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise refused
    # Percent-encoding does not hide a word: "/%6Dpesa/" is "/mpesa/" to the server (and maybe to Daraja).
    lowered = unquote(unquote(text)).casefold()
    for word in BANNED_URL_WORDS:
        if word in lowered:
            raise InvalidConfiguration(
                f'Daraja refuses URLs that contain "{word}" (in any case); use a neutral path and host.',
                field=field,
            )
    host = parts.hostname.casefold().rstrip(".")
    for banned in BANNED_URL_HOSTS:
        if host == banned or host.endswith("." + banned):
            raise InvalidConfiguration(
                f"Daraja refuses URLs of tunnels and request testers ({banned}); use the public address of "
                "the server.",
                field=field,
            )
    return text
