"""The simulator's own "Safaricom certificate": an RSA key pair and a self-signed X.509 certificate.

Daraja's initiator APIs take a SecurityCredential: the initiator password encrypted (RSA, PKCS#1 v1.5) with the
public certificate of the environment.  The simulator makes its own key pair, hands out the certificate (printed
by the CLI, served at ``GET /__sim__/certificate``, ``sim.certificate_pem``) and decrypts what clients send.

This is the one part of the simulator that needs ``cryptography`` (a dependency of Odoo 18 itself); it is
imported when the identity is first needed, so OAuth, STK and C2B run on a bare Python.  Only APIs of
cryptography 3.4.8 and later are used.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

KEY_SIZE = 2048
CERTIFICATE_DAYS = 365


@dataclass(frozen=True)
class Identity:
    """The private key (never shown) and the certificate clients encrypt with."""

    certificate_pem: str
    private_key: Any = field(repr=False)


def new_identity(common_name: str) -> Identity:
    """A fresh RSA key pair and a self-signed certificate for ``common_name`` (valid from yesterday, a year)."""
    from cryptography import x509  # noqa: PLC0415 - see the module docstring
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_SIZE)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "KE"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Daraja Simulator"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    now = datetime.now(timezone.utc).replace(tzinfo=None)  # naive UTC: what every cryptography version takes
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=CERTIFICATE_DAYS))
        .sign(key, hashes.SHA256())
    )
    pem = certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
    return Identity(certificate_pem=pem, private_key=key)


def decrypt_credential(identity: Identity, credential: object) -> str | None:
    """The password inside a SecurityCredential, or None when it is not one made with this certificate."""
    from cryptography.hazmat.primitives.asymmetric import padding  # noqa: PLC0415

    if not isinstance(credential, str) or not credential.strip():
        return None
    try:
        encrypted = base64.b64decode(credential.strip(), validate=True)
        plain = identity.private_key.decrypt(encrypted, padding.PKCS1v15())
        return plain.decode("utf-8")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None


def encrypt_credential(identity: Identity, password: str) -> str:
    """A SecurityCredential for ``password`` made with this certificate (what a client does; for tests)."""
    from cryptography.hazmat.primitives.asymmetric import padding  # noqa: PLC0415

    encrypted = identity.private_key.public_key().encrypt(password.encode("utf-8"), padding.PKCS1v15())
    return base64.b64encode(encrypted).decode("ascii")


def identity_pems(identity: Identity) -> tuple[str, str]:
    """(certificate PEM, private key PEM, unencrypted PKCS#8): what the state file keeps across restarts."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    key = identity.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return identity.certificate_pem, key.decode("ascii")


def load_identity(certificate_pem: str, private_key_pem: str) -> Identity:
    """The identity saved by ``identity_pems``; ValueError when the key does not match the certificate."""
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    key = serialization.load_pem_private_key(private_key_pem.encode("ascii"), password=None)
    certificate = x509.load_pem_x509_certificate(certificate_pem.encode("ascii"))
    if certificate.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
        raise ValueError("the private key does not match the certificate")
    return Identity(certificate_pem=certificate_pem, private_key=key)
