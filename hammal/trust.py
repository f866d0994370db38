"""
Which certificate authorities upstream connections trust.

``--upstream-ca`` names a private CA (a registry inside the company); it
adds to the system's trusted roots instead of replacing them, so that the
public registries routed beside it stay verifiable.
"""

from __future__ import annotations

from OpenSSL import SSL

# Twisted exports no public name for the trust-root interface that
# CertificateOptions adapts its trustRoot to.
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.ssl import Certificate
from zope.interface import implementer


@implementer(IOpenSSLTrustRoot)
class SystemRootsAnd:
    """
    The system's trusted roots (what Twisted's C{platformTrust} uses:
    OpenSSL's default paths, or ``SSL_CERT_FILE``/``SSL_CERT_DIR``) plus
    C{extra} certificate authorities.
    """

    def __init__(self, extra: list[Certificate]) -> None:
        self._extra = [certificate.original for certificate in extra]

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        context.set_default_verify_paths()
        store = context.get_cert_store()
        if store is None:
            raise RuntimeError("hammal bug: expected store is not None")
        for certificate in self._extra:
            store.add_cert(certificate)
