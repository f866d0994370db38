"""
TLS: the server's certificate chain and key from PEM files (TLS 1.2 or
newer only, reloaded on SIGHUP), and verification of upstreams against a
private CA.
"""

from __future__ import annotations

import re
import signal
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    KeyPair,
    TLSVersion,
)
from twisted.logger import Logger
from twisted.web.client import BrowserLikePolicyForHTTPS
from zope.interface import implementer

from hammal.config import ConfigError
from hammal.trust import SystemRootsAnd

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
    options = CertificateOptions(
        privateKey=key.original,
        certificate=certificates[0].original,
        extraCertChain=[c.original for c in certificates[1:]],
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )
    try:
        options.getContext()  # checks that the key belongs to the certificate
    except Exception as failure:
        raise ConfigError(f"--tls-key does not match --tls-cert: {failure}")
    return options


@implementer(IOpenSSLServerConnectionCreator)
class ReloadingServerTLS:
    """
    Server TLS whose certificate can be replaced while serving: new
    connections use the new certificate, open ones keep theirs.
    """

    log = Logger()

    def __init__(self, cert_path: str, key_path: str) -> None:
        self._cert_path = cert_path
        self._key_path = key_path
        self._options = server_tls_options(cert_path, key_path)

    def serverConnectionForTLS(self, protocol: object) -> Any:
        return self._options.serverConnectionForTLS(protocol)  # type: ignore[arg-type]

    def reload(self) -> bool:
        """Re-read the files; keep the current certificate if they are unusable."""
        try:
            self._options = server_tls_options(self._cert_path, self._key_path)
        except ConfigError as failure:
            self.log.warn("TLS certificate not reloaded: {error}", error=str(failure))
            return False
        self.log.info("TLS certificate reloaded from {path}", path=self._cert_path)
        return True


class ReloadOnHangup(Service):
    """Reloads a L{ReloadingServerTLS} on SIGHUP, in the reactor thread."""

    def __init__(self, tls: ReloadingServerTLS, reactor: Any) -> None:
        self._tls = tls
        self._reactor = reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._hangup)

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)

    def _hangup(self, signum: int, frame: object) -> None:
        self._reactor.callFromThread(self._tls.reload)


def upstream_tls_policy(ca_path: str) -> BrowserLikePolicyForHTTPS:
    """
    Verify upstream certificates against the system's roots and the CA(s)
    in C{ca_path}: a private CA for one registry must not make every public
    registry untrusted.
    """
    try:
        with open(ca_path, "rb") as ca_file:
            blocks = _PEM_CERTIFICATE.findall(ca_file.read())
    except OSError as failure:
        raise ConfigError(f"cannot read --upstream-ca {ca_path}: {failure.strerror}")
    if not blocks:
        raise ConfigError(f"--upstream-ca {ca_path} holds no PEM certificate")
    roots = SystemRootsAnd([Certificate.loadPEM(block) for block in blocks])
    return BrowserLikePolicyForHTTPS(trustRoot=roots)
