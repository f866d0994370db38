"""
A self-signed certificate for ``--tls`` without ``--tls-cert``/``--tls-key``.

``twistd hammal --port 443 --tls`` should just work: the first start makes
an ECDSA P-256 key and a certificate for the host name, ``localhost`` and
the listening addresses, and keeps them (``var/tls/`` next to the cache
directory) so that clients that trusted it once keep trusting it after a
restart. The log says where it is, its SHA-256 fingerprint, and the one
command a client host needs to trust it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import socket
from typing import Sequence

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: File names inside the TLS directory.
CERT_NAME = "hammal.crt"
KEY_NAME = "hammal.key"

#: Long enough not to expire under a running mirror; clients pin it anyway.
VALIDITY = datetime.timedelta(days=3650)


@attrs.frozen
class SelfSigned:
    """The certificate and key files, and what a client needs to trust them."""

    cert_path: str
    key_path: str
    fingerprint: str
    created: bool

    def trust_command(self, host_port: str) -> str:
        """The one line that makes Docker (and containerd's docker-style dir) trust it."""
        return f"sudo install -D -m 644 {self.cert_path} /etc/docker/certs.d/{host_port}/ca.crt"


def tls_directory(cache_dir: str | None) -> str:
    """``var/tls`` for ``var/cache``: the cache directory's sibling."""
    parent = os.path.dirname(os.path.abspath(cache_dir or "var/cache"))
    return os.path.join(parent, "tls")


_INTERFACE = re.compile(r"(?:^|:)interface=((?:\\.|[^:\\])+)")
_PORT = re.compile(r"^(?:tcp6?|ssl):(\d+)(?::|$)")


def listening_port(description: str) -> str | None:
    """The port of a TCP endpoint description, if it has one."""
    match = _PORT.match(description)
    return match.group(1) if match else None


def listening_names(description: str) -> tuple[list[str], list[str]]:
    """
    The DNS names and IP addresses a certificate for the endpoint
    C{description} should cover: the host name, ``localhost``, and the
    interface (or loopback and the host's addresses when on all interfaces).
    """
    hostname = socket.gethostname()
    names = [
        n
        for n in dict.fromkeys([hostname.lower(), socket.getfqdn().lower(), "localhost"])
        if n and n.isascii() and not n.startswith(".")
    ]
    addresses = ["127.0.0.1", "::1"]
    match = _INTERFACE.search(description)
    interface = match.group(1).replace("\\", "") if match else ""
    if interface and interface not in ("0.0.0.0", "::"):
        addresses.append(interface)
    else:
        try:
            infos = socket.getaddrinfo(hostname, None)
        except OSError:
            infos = []
        addresses += [str(info[4][0]) for info in infos]
    valid = []
    for address in dict.fromkeys(addresses):
        try:
            valid.append(str(ipaddress.ip_address(address.split("%", 1)[0])))
        except ValueError:
            names.append(address)
    return names, list(dict.fromkeys(valid))


def fingerprint_of(cert_pem: bytes) -> str:
    """``AB:CD:...``: the SHA-256 fingerprint that ``openssl x509 -fingerprint -sha256`` shows."""
    certificate = x509.load_pem_x509_certificate(cert_pem)
    return certificate.fingerprint(hashes.SHA256()).hex(":").upper()


def ensure_self_signed(
    directory: str,
    names: Sequence[str],
    addresses: Sequence[str],
    now: datetime.datetime | None = None,
) -> SelfSigned:
    """
    The certificate in C{directory}, made first if missing.

    @raise OSError: when the directory cannot be made or written.
    """
    cert_path = os.path.join(os.path.abspath(directory), CERT_NAME)
    key_path = os.path.join(os.path.abspath(directory), KEY_NAME)
    if os.path.exists(cert_path) and os.path.exists(key_path):
        with open(cert_path, "rb") as cert_file:
            return SelfSigned(cert_path, key_path, fingerprint_of(cert_file.read()), created=False)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = now or datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hammal registry mirror (self-signed)"),
            x509.NameAttribute(NameOID.COMMON_NAME, (list(names) or ["localhost"])[0][:64]),
        ]
    )
    alternative: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    alternative += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(alternative), critical=False)
        # A CA for itself: clients given it as "ca.crt" accept it as a root.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    _write(key_path, key_pem, 0o600)
    _write(cert_path, cert_pem, 0o644)
    return SelfSigned(cert_path, key_path, fingerprint_of(cert_pem), created=True)


def _write(path: str, data: bytes, mode: int) -> None:
    """Written whole or not at all (a crash mid-write leaves no half file)."""
    partial = f"{path}.{os.getpid()}.tmp"
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(descriptor, "wb") as output:
        output.write(data)
    os.replace(partial, path)
