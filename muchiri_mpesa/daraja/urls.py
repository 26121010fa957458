"""The rule for every URL we hand Daraja (DESIGN.md section 6).

Daraja refuses URLs containing certain words (M-Pesa in any case, Safaricom, exe, exec, cmd, sql, query) and
the usual URL testers and tunnels; it is documented for C2B registration, and a refused ResultURL or
CallBackURL fails silently later, so we check before sending.  The URL itself is never quoted back: it holds
the provider's secret path.
"""

from __future__ import annotations

from urllib.parse import urlsplit

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
    parts = urlsplit(text) if text and not any(c.isspace() for c in text) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidConfiguration(
            "A URL given to Daraja must be an absolute http:// or https:// address.", field=field
        )
    lowered = text.casefold()
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
