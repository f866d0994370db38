"""
What hammal remembers about clients' own upstream tokens (C{--auth
passthrough}).

In passthrough mode upstream decides who may read what. hammal only asks,
with the client's token, before it serves anything from its shared cache,
and remembers upstream's answer for a short time: per token, upstream,
repository and object (manifest reference or blob digest), for no longer
than the shorter of L{CONFIRMATION_TTL} and the token's own lifetime. A
confirmation for one object never vouches for another, so a client allowed
to read one repository cannot read another tenant's cached blob by naming
its digest under that repository.

Tokens are never stored: only their SHA-256 fingerprints (a bearer token is
a long random secret, so its hash reveals nothing usable).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections import OrderedDict

import attrs
from twisted.internet.interfaces import IReactorTime

from hammal.lru import remember, trim_oldest
from hammal.ttlstore import TtlStore

#: The longest upstream's word on one client's access to one object holds.
CONFIRMATION_TTL = 60.0

#: How long a token from a token endpoint lives when it does not say
#: (the Docker token specification's default).
DEFAULT_TOKEN_LIFETIME = 60.0

_MAX_ENTRIES = 10000


def fingerprint(authorization: bytes) -> str:
    """
    A stable, non-secret name for an C{Authorization} value (the same for
    every spelling of the C{Bearer} scheme).
    """
    scheme, _, token = authorization.strip().partition(b" ")
    if scheme.lower() == b"bearer":
        authorization = b"Bearer " + token.strip()
    return hashlib.sha256(authorization).hexdigest()


def bearer_fingerprint(token: str) -> str:
    """The L{fingerprint} of C{Authorization: Bearer <token>}."""
    return fingerprint(b"Bearer " + token.encode("latin-1", "replace"))


def claimed_expiry(authorization: bytes) -> float | None:
    """
    The C{exp} claim of a JWT bearer token, unverified; L{None} when the
    token is not a JWT or has no usable C{exp}.

    Unverified is enough here: the time only ever I{shortens} how long
    hammal trusts upstream's confirmation, and upstream itself checked the
    token.
    """
    scheme, _, token = authorization.partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    parts = token.strip().split(b".")
    if len(parts) != 3:
        return None
    try:
        padded = parts[1] + b"=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
    except (binascii.Error, ValueError):
        return None
    expires = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(expires, bool) or not isinstance(expires, (int, float)):
        return None
    return float(expires)


@attrs.frozen
class ConfirmationKey:
    """
    What one confirmation covers.

    @ivar token: the L{fingerprint} of the client's C{Authorization}.
    @ivar upstream: the upstream's base URL.
    @ivar repository: the repository name as upstream knows it.
    @ivar target: the object, as the upstream path below the repository
        (C{manifests/<reference>}, C{blobs/<digest>}, C{tags/list}).
    """

    token: str
    upstream: str
    repository: str
    target: str


class Confirmations:
    """
    Upstream's confirmations of clients' read access, each until its own
    expiry; bounded (the oldest go first).

    It also keeps the lifetimes of the tokens hammal's C{/v2/auth} handed
    out (L{note_token}), since an opaque token does not say when it ends.
    """

    def __init__(self, clock: IReactorTime, ttl: float = CONFIRMATION_TTL) -> None:
        self._clock = clock
        self._ttl = ttl
        self._confirmed: OrderedDict[ConfirmationKey, float] = OrderedDict()
        self._token_expiry: OrderedDict[str, float] = OrderedDict()

    def note_token(self, token: str, lifetime: float) -> None:
        """Remember that the bearer C{token} ends in C{lifetime} seconds."""
        key = bearer_fingerprint(token)
        self._token_expiry[key] = self._clock.seconds() + lifetime
        trim_oldest(self._token_expiry, _MAX_ENTRIES)

    def token_expiry(self, authorization: bytes) -> float | None:
        """When the token in C{authorization} ends, if known."""
        known = self._token_expiry.get(fingerprint(authorization))
        claimed = claimed_expiry(authorization)
        times = [t for t in (known, claimed) if t is not None]
        return min(times) if times else None

    def confirmed(self, key: ConfirmationKey) -> bool:
        """Whether upstream confirmed C{key} and that still holds."""
        expires = self._confirmed.get(key)
        if expires is None:
            return False
        if expires <= self._clock.seconds():
            del self._confirmed[key]
            return False
        return True

    def confirm(self, key: ConfirmationKey, authorization: bytes) -> None:
        """
        Record upstream's confirmation of C{key}, for the shorter of the
        TTL and the token's remaining lifetime.
        """
        now = self._clock.seconds()
        expires = now + self._ttl
        token_ends = self.token_expiry(authorization)
        if token_ends is not None:
            expires = min(expires, token_ends)
        if expires <= now:
            return
        remember(self._confirmed, key, expires, _MAX_ENTRIES)


class Logins:
    """
    Who logged in at hammal's C{/v2/auth} with which token, until the token
    ends: how C{--allow-users} applies in passthrough mode, where the
    tokens are upstream's and name no user hammal could check.

    A token that did not come through C{/v2/auth} (one the client fetched
    from upstream's realm itself) names nobody, and is refused.

    @param cache: where the names are kept: in memory, or shared through
        Redis so that every instance behind one name knows every login.
    """

    def __init__(self, cache: TtlStore) -> None:
        self._cache = cache

    async def remember(self, token: str, user: str, lifetime: float) -> None:
        """C{user} logged in and was given C{token} for C{lifetime} seconds."""
        key = "login:" + bearer_fingerprint(token)
        await self._cache.set(key, user, max(1.0, lifetime))

    async def user(self, authorization: bytes) -> str | None:
        """The user who was given the token in C{authorization}, if any."""
        if not authorization.lower().startswith(b"bearer "):
            return None
        return await self._cache.get("login:" + fingerprint(authorization))
