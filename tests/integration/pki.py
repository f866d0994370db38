"""Throwaway PKI for the integration upstream.

One self-signed CA signs two leaves:

* the token server's signing certificate (its public key verifies the RS256
  JWTs; the certificate goes into the JWT's ``x5c`` header and Distribution
  checks it against the CA in its ``rootcertbundle``);
* a TLS server certificate for ``127.0.0.1`` / ``localhost`` (not used by the
  current tests; there for HTTPS upstream tests).

Everything is RSA 2048 and written as PEM files into a directory the caller
owns (and removes).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["PKIFiles", "generate_pki"]


@dataclass(frozen=True)
class PKIFiles:
    """Paths of the PEM files written by :func:`generate_pki`."""

    directory: str
    ca_cert: str
    ca_key: str
    signing_cert: str
    signing_key: str
    tls_cert: str
    tls_key: str
    tls_chain: str


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hammal integration tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_key(path: str, key: rsa.RSAPrivateKey) -> None:
    with open(path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    os.chmod(path, 0o600)


def _write_certs(path: str, *certs: x509.Certificate) -> None:
    with open(path, "wb") as f:
        for cert in certs:
            f.write(cert.public_bytes(serialization.Encoding.PEM))


def generate_pki(directory: str) -> PKIFiles:
    """Create a CA, a JWT signing leaf and a TLS leaf as PEM files in *directory*.

    :param directory: an existing, writable directory.
    :return: the paths of the files written.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    not_before = now - datetime.timedelta(hours=1)
    not_after = now + datetime.timedelta(days=2)

    ca_key = _new_key()
    ca_name = _name("hammal test CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(key: rsa.RSAPrivateKey, common_name: str, server: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=server,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                    ]
                ),
                critical=False,
            ).add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                critical=False,
            )
        return builder.sign(ca_key, hashes.SHA256())

    signing_key = _new_key()
    signing_cert = leaf(signing_key, "hammal test token signer", server=False)
    tls_key = _new_key()
    tls_cert = leaf(tls_key, "127.0.0.1", server=True)

    pki = PKIFiles(
        directory=directory,
        ca_cert=os.path.join(directory, "ca.pem"),
        ca_key=os.path.join(directory, "ca.key"),
        signing_cert=os.path.join(directory, "signing.pem"),
        signing_key=os.path.join(directory, "signing.key"),
        tls_cert=os.path.join(directory, "tls.pem"),
        tls_key=os.path.join(directory, "tls.key"),
        tls_chain=os.path.join(directory, "tls-chain.pem"),
    )
    _write_certs(pki.ca_cert, ca_cert)
    _write_key(pki.ca_key, ca_key)
    _write_certs(pki.signing_cert, signing_cert)
    _write_key(pki.signing_key, signing_key)
    _write_certs(pki.tls_cert, tls_cert)
    _write_key(pki.tls_key, tls_key)
    _write_certs(pki.tls_chain, tls_cert, ca_cert)
    return pki
