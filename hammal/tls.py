"""
Server-side TLS: certificate chain and key from PEM files, TLS 1.2 or
newer only.
"""

from __future__ import annotations

import re

from twisted.internet.ssl import Certificate, CertificateOptions, KeyPair, TLSVersion

from hammal.config import ConfigError

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


def server_tls_options(cert_path: str, key_path: str) -> CertificateOptions:
    """
    TLS options serving the chain in C{cert_path} (leaf first) with the key
    in C{key_path}.

    @raise ConfigError: when the files are missing or unusable.
    """
    try:
        with open(cert_path, "rb") as cert_file:
            chain_pem = cert_file.read()
        with open(key_path, "rb") as key_file:
            key_pem = key_file.read()
    except OSError as failure:
        raise ConfigError(f"cannot read TLS files: {failure.strerror}: {failure.filename}")
    blocks = _PEM_CERTIFICATE.findall(chain_pem)
    if not blocks:
        raise ConfigError(f"--tls-cert {cert_path} holds no PEM certificate")
    try:
        certificates = [Certificate.loadPEM(block) for block in blocks]
        key = KeyPair.load(key_pem, 1)  # 1 is FILETYPE_PEM
    except Exception as failure:  # pyOpenSSL raises its own error types
        raise ConfigError(f"unusable TLS certificate or key: {failure}")
    return CertificateOptions(
        privateKey=key.original,
        certificate=certificates[0].original,
        extraCertChain=[c.original for c in certificates[1:]],
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )
