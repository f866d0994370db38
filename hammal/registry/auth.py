"""
Authorisation of hammal's own requests to an upstream registry.

Upstream challenges with ``WWW-Authenticate``; for ``Bearer`` hammal asks
the challenge's realm for a token (anonymously, or with the configured
credentials), caches it per (upstream, identity, scope) until shortly
before it expires, and makes one token request however many requests need
the same token at once. Once a realm is known, new scopes get their token
before the first request, saving upstream a 401 round trip.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Awaitable, Callable
from urllib.parse import urlencode, urlsplit

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from hammal import metrics
from hammal.coalesce import Coalescer
from hammal.errors import RegistryError, UpstreamBadResponse
from hammal.registry.challenge import Challenge
from hammal.registry.tokens import TokenCache
from hammal.stream import ReadBounds, read_body

#: Lifetime assumed for a token whose response gives no ``expires_in``.
DEFAULT_TOKEN_LIFETIME = 60.0

Send = Callable[[bytes, str, Headers], Awaitable[IResponse]]
"""Sends one request (method, URL, headers) and returns the response."""

ErrorForResponse = Callable[[IResponse, bytes, str], RegistryError]
"""Turns a failed token response into the error to report."""


@attrs.frozen
class Credentials:
    """A user name and password for upstream; the password is never shown."""

    username: str
    password: str = attrs.field(repr=False)

    def basic(self) -> bytes:
        """The ``Authorization`` value for HTTP Basic."""
        pair = f"{self.username}:{self.password}".encode()
        return b"Basic " + base64.b64encode(pair)

    @property
    def identity(self) -> str:
        """A stable, non-secret name for cache keys."""
        return "user-" + hashlib.sha256(self.username.encode()).hexdigest()[:16]


def token_lifetime(expires_in: object) -> float:
    """
    How long to keep a token: shortly less than C{expires_in} so it is
    never used right at its expiry.
    """
    try:
        seconds = float(expires_in)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        seconds = DEFAULT_TOKEN_LIFETIME
    if seconds <= 0:
        seconds = DEFAULT_TOKEN_LIFETIME
    return max(1.0, seconds - min(30.0, seconds / 10))


class UpstreamAuth:
    """
    Supplies ``Authorization`` values for requests to one upstream.

    @param upstream_url: the registry's base URL; credentials travel over
        plain HTTP only if it is itself plain HTTP.
    @param bounds: how long a token response may take; a token request
        shared by many waiters gives up after C{bounds.deadline}.
    """

    log = Logger()

    def __init__(
        self,
        upstream_url: str,
        cache: TokenCache,
        send: Send,
        error_for: ErrorForResponse,
        credentials: Credentials | None = None,
        clock: IReactorTime | None = None,
        bounds: ReadBounds | None = None,
    ) -> None:
        self._upstream_url = upstream_url
        self._upstream_secure = urlsplit(upstream_url).scheme == "https"
        self._cache = cache
        self._send = send
        self._error_for = error_for
        self._credentials = credentials
        self._clock = clock
        self._challenge: Challenge | None = None
        self._bounds = bounds
        # A token fetch is shared by every request for its scope: it must end.
        self._fetches: Coalescer[str] = (
            Coalescer(bounds.clock, bounds.deadline, "the token request")
            if bounds is not None
            else Coalescer()
        )

    @property
    def identity(self) -> str:
        return self._credentials.identity if self._credentials else "anonymous"

    def _key(self, scope: str) -> str:
        upstream = hashlib.sha256(self._upstream_url.encode()).hexdigest()[:16]
        return f"{upstream}:{self.identity}:{scope}"

    async def authorization(self, scope: str) -> bytes | None:
        """
        The ``Authorization`` value to send for C{scope} before any
        challenge: a cached token, a fresh one if the realm is known, or
        L{None}.
        """
        challenge = self._challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            return self._credentials.basic() if self._credentials else None
        token = await self._cache.get(self._key(scope))
        metrics.token_cache.labels("miss" if token is None else "hit").inc()
        if token is None:
            token = await self._fetch(challenge, scope)
        return b"Bearer " + token.encode()

    async def answer(self, challenge: Challenge, scope: str, rejected: bytes | None) -> bytes | None:
        """
        Answer a 401 C{challenge} for C{scope}. C{rejected} is the
        ``Authorization`` value upstream just refused, if any: its token is
        dropped. L{None} means hammal has nothing to answer with.
        """
        self._challenge = challenge
        if challenge.scheme == "basic":
            if self._credentials is None or rejected is not None:
                return None
            return self._credentials.basic()
        key = self._key(scope)
        if rejected is not None:
            cached = await self._cache.get(key)
            if cached is not None and rejected == b"Bearer " + cached.encode():
                await self._cache.delete(key)
        token = await self._fetch(challenge, scope)
        return b"Bearer " + token.encode()

    def _fetch(self, challenge: Challenge, scope: str) -> Deferred[str]:
        key = self._key(scope)
        return self._fetches.run(
            key, lambda: Deferred.fromCoroutine(self._request_token(challenge, scope, key))
        )

    async def _request_token(self, challenge: Challenge, scope: str, key: str) -> str:
        realm = challenge.realm or ""
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamBadResponse(f"upstream challenged with an unusable token realm: {realm!r}")
        query = [("scope", scope)]
        if challenge.service:
            query.insert(0, ("service", challenge.service))
        separator = "&" if parts.query else "?"
        url = realm + separator + urlencode(query)
        headers = Headers({b"accept": [b"application/json"]})
        with_credentials = self._credentials is not None and (
            parts.scheme == "https" or not self._upstream_secure
        )
        if with_credentials:
            assert self._credentials is not None
            headers.setRawHeaders(b"authorization", [self._credentials.basic()])
        response = await self._send(b"GET", url, headers)
        body = await read_body(response, 1024 * 1024, self._bounds)
        if response.code == 401 and with_credentials:
            # Wrong or revoked credentials must not take public pulls down.
            self.log.warn(
                "{realm_host} rejected the configured upstream credentials;"
                " asking for an anonymous token",
                realm_host=parts.hostname,
            )
            metrics.upstream_errors.labels(parts.hostname, "credentials-rejected").inc()
            headers.removeHeader(b"authorization")
            response = await self._send(b"GET", url, headers)
            body = await read_body(response, 1024 * 1024, self._bounds)
        if response.code != 200:
            raise self._error_for(response, body, parts.hostname)
        try:
            document = json.loads(body)
            token = document.get("token") or document.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise UpstreamBadResponse(f"token realm {parts.hostname} sent no token")
        lifetime = token_lifetime(document.get("expires_in"))
        await self._cache.set(key, token, lifetime)
        self.log.debug(
            "token for {scope} from {realm_host}, kept {lifetime:.0f}s",
            scope=scope,
            realm_host=parts.hostname,
            lifetime=lifetime,
        )
        return token
