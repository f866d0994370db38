"""
Who may call an instance's internal peer endpoint: whoever holds the
cluster key (C{--cluster-key-file}, the same file on every instance).

A signed request carries C{Authorization: Hammal-Peer EXPIRES:SIGNATURE}
where C{SIGNATURE} is the hex HMAC-SHA256, under the cluster key, of
C{METHOD "\\n" REQUEST-TARGET "\\n" EXPIRES} and C{EXPIRES} is a Unix time a
few seconds ahead. A captured header is good for that one method and path
only, and only until it expires; the check is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from twisted.internet.interfaces import IReactorTime

from hammal.keyfile import MIN_KEY_BYTES, ClusterKeyError, load_cluster_key

__all__ = ["MIN_KEY_BYTES", "ClusterKeyError", "load_cluster_key", "PeerAuth"]

SCHEME = b"Hammal-Peer"

#: How long a signature a client makes is valid.
DEFAULT_LIFETIME = 30.0

#: The furthest in the future a server accepts an expiry: a signature
#: cannot be made to last (and clocks may differ by this much).
MAX_LIFETIME = 120.0


def _signature(key: bytes, method: bytes, target: bytes, expires: int) -> bytes:
    message = b"\n".join([method.upper(), target, str(expires).encode()])
    return hmac.new(key, message, hashlib.sha256).hexdigest().encode()


class PeerAuth:
    """
    Signs and checks peer requests with one cluster key.

    @param clock: the time source (signatures carry an absolute expiry).
    @param lifetime: seconds a signature made by L{sign} stays valid.
    """

    def __init__(self, key: bytes, clock: IReactorTime, lifetime: float = DEFAULT_LIFETIME) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ClusterKeyError(f"cluster key must be at least {MIN_KEY_BYTES} bytes")
        if not 0 < lifetime <= MAX_LIFETIME:
            raise ValueError(f"signature lifetime must be in (0, {MAX_LIFETIME:g}] seconds")
        self._key = key
        self._clock = clock
        self.lifetime = lifetime

    @classmethod
    def from_file(cls, path: str, clock: IReactorTime) -> "PeerAuth":
        """A L{PeerAuth} with the key in C{path} (see L{load_cluster_key})."""
        return cls(load_cluster_key(path), clock)

    def __repr__(self) -> str:
        return f"<PeerAuth lifetime={self.lifetime:g}s>"

    def sign(self, method: bytes, target: bytes) -> bytes:
        """
        The C{Authorization} value for C{method} on C{target} (the
        request-target: path and query, exactly as sent).
        """
        expires = int(self._clock.seconds() + self.lifetime)
        signature = _signature(self._key, method, target, expires)
        return SCHEME + b" " + str(expires).encode() + b":" + signature

    def check(self, method: bytes, target: bytes, authorization: bytes | None) -> bool:
        """Whether C{authorization} is a current signature of this request."""
        if not authorization:
            return False
        scheme, _, credentials = authorization.strip().partition(b" ")
        if scheme.lower() != SCHEME.lower():
            return False
        expires_text, _, signature = credentials.strip().partition(b":")
        if not expires_text.isdigit() or len(expires_text) > 12:
            return False
        expires = int(expires_text)
        now = self._clock.seconds()
        if not now <= expires <= now + MAX_LIFETIME:
            return False
        expected = _signature(self._key, method, target, expires)
        return hmac.compare_digest(expected, signature)


def generate_key() -> bytes:
    """A fresh random cluster key (64 hex characters)."""
    return os.urandom(32).hex().encode()
