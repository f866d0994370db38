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
from collections import OrderedDict
from typing import Awaitable, Callable, Protocol
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
from hammal.stream import ReadBounds, read_body
from hammal.ttlstore import TtlStore
from hammal.upstream.challenge import Challenge
from hammal.upstream.credentials import CredentialPolicy

#: Lifetime assumed for a token whose response gives no ``expires_in``.
DEFAULT_TOKEN_LIFETIME = 60.0

Send = Callable[[bytes, str, Headers], Awaitable[IResponse]]
"""Sends one request (method, URL, headers) and returns the response."""

ErrorForResponse = Callable[[IResponse, bytes, str], RegistryError]
"""Turns a failed token response into the error to report."""


class CredentialSource(Protocol):
    """
    Where upstream credentials come from when there are several to choose
    from (L{hammal.upstream.accounts}): asked before every token request.
    """

    def current(self) -> "Credentials | None":
        """The credentials to use now; L{None} for anonymous."""

    def observe(self, account: "Credentials", status: int, headers: Headers) -> bool:
        """Learn from a response to C{account}; whether it now rests."""


#: Authorization values remembered with the account that obtained them.
_ISSUED_MAX = 4096

#: Most accounts tried for one token (each 429 rests one account).
_MAX_ACCOUNT_SWITCHES = 100


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

    @param upstream_url: the registry's base URL.
    @param policy: where the credentials may go: a token realm on another
        site is asked anonymously, plain HTTP to a non-loopback host gets no
        credentials (see L{CredentialPolicy}); each refusal is logged once.
    @param bounds: how long a token response may take; a token request
        shared by many waiters gives up after C{bounds.deadline}.
    """

    log = Logger()

    def __init__(
        self,
        upstream_url: str,
        cache: TtlStore,
        send: Send,
        error_for: ErrorForResponse,
        credentials: Credentials | None = None,
        clock: IReactorTime | None = None,
        policy: CredentialPolicy | None = None,
        accounts: CredentialSource | None = None,
        bounds: ReadBounds | None = None,
    ) -> None:
        self._upstream_url = upstream_url
        self._upstream_host = urlsplit(upstream_url).hostname or ""
        self._policy = policy if policy is not None else CredentialPolicy()
        self._withheld: set[tuple[str, str]] = set()
        self._cache = cache
        self._send = send
        self._error_for = error_for
        self._credentials = credentials
        self._accounts = accounts
        self._issued: OrderedDict[bytes, Credentials] = OrderedDict()
        self._clock = clock
        self._challenge: Challenge | None = None
        self._bounds = bounds
        # A token fetch is shared by every request for its scope: it must end.
        self._fetches: Coalescer[bytes] = (
            Coalescer(bounds.clock, bounds.deadline, "the token request", name="token")
            if bounds is not None
            else Coalescer(name="token")
        )

    def _credentials_now(self) -> Credentials | None:
        """The credentials to use now: the pool's choice, else the configured pair."""
        if self._accounts is not None:
            return self._accounts.current()
        return self._credentials

    @property
    def identity(self) -> str:
        credentials = self._credentials_now()
        return credentials.identity if credentials else "anonymous"

    def _key(self, scope: str, credentials: Credentials | None = None) -> str:
        upstream = hashlib.sha256(self._upstream_url.encode()).hexdigest()[:16]
        identity = credentials.identity if credentials else "anonymous"
        return f"{upstream}:{identity}:{scope}"

    def _issue(self, authorization: bytes, credentials: Credentials | None) -> bytes:
        """Remember which pooled account C{authorization} speaks for."""
        if self._accounts is not None and credentials is not None:
            self._issued[authorization] = credentials
            self._issued.move_to_end(authorization)
            while len(self._issued) > _ISSUED_MAX:
                self._issued.popitem(last=False)
        return authorization

    def observe(self, authorization: bytes | None, response: IResponse) -> bool:
        """
        Tell the account pool how upstream answered a request made with
        C{authorization}. Returns whether that account now rests, so that a
        retry goes out as another account (or anonymously).
        """
        if self._accounts is None or authorization is None:
            return False
        account = self._issued.get(authorization)
        if account is None:
            return False
        return self._accounts.observe(account, response.code, response.headers)

    async def authorization(self, scope: str) -> bytes | None:
        """
        The ``Authorization`` value to send for C{scope} before any
        challenge: a cached token, a fresh one if the realm is known, or
        L{None}.
        """
        challenge = self._challenge
        if challenge is None:
            return None
        credentials = self._credentials_now()
        if challenge.scheme == "basic":
            return self._upstream_basic(credentials)
        token = await self._cache.get(self._key(scope, credentials))
        metrics.token_cache.labels("miss" if token is None else "hit").inc()
        if token is None:
            return await self._fetch(challenge, scope, credentials)
        return self._issue(b"Bearer " + token.encode(), credentials)

    def learn(self, challenge: Challenge) -> None:
        """
        Take upstream's challenge from the ping at start (see
        L{hammal.upstream.client.UpstreamClient.warm_up}) unless a request
        met one already: the first pull then asks the realm at once.
        """
        if self._challenge is None:
            self._challenge = challenge

    async def answer(
        self, challenge: Challenge, scope: str, rejected: bytes | None
    ) -> bytes | None:
        """
        Answer a 401 C{challenge} for C{scope}. C{rejected} is the
        ``Authorization`` value upstream just refused, if any: its token is
        dropped. L{None} means hammal has nothing to answer with.
        """
        self._challenge = challenge
        credentials = self._credentials_now()
        if challenge.scheme == "basic":
            if rejected is not None:
                return None
            return self._upstream_basic(credentials)
        key = self._key(scope, credentials)
        if rejected is not None:
            cached = await self._cache.get(key)
            if cached is not None and rejected == b"Bearer " + cached.encode():
                await self._cache.delete(key)
        return await self._fetch(challenge, scope, credentials)

    def _upstream_basic(self, credentials: Credentials | None) -> bytes | None:
        """Basic credentials for the upstream itself, if they may go there."""
        if credentials is None:
            return None
        if not self._policy.transport_allowed(self._upstream_url):
            self._withhold(
                self._upstream_host,
                "it is plain HTTP; use https:// or --plain-http-credentials",
            )
            return None
        return self._issue(credentials.basic(), credentials)

    def _realm_may_have_credentials(self, realm: str, credentials: Credentials | None) -> bool:
        """Whether C{credentials} may go to the token realm C{realm}."""
        if credentials is None:
            return False
        parts = urlsplit(realm)
        realm_host = parts.hostname or ""
        if not self._policy.realm_trusted(self._upstream_host, realm_host):
            self._withhold(
                realm_host,
                f"it is neither {self._upstream_host} nor in its registrable domain;"
                f" add --trusted-realm {realm_host} to trust it",
            )
            return False
        if parts.scheme != "https" and urlsplit(self._upstream_url).scheme == "https":
            self._withhold(realm_host, "it is plain HTTP behind an HTTPS upstream")
            return False
        if not self._policy.transport_allowed(realm):
            self._withhold(realm_host, "it is plain HTTP; use https:// or --plain-http-credentials")
            return False
        return True

    def _withhold(self, host: str, reason: str) -> None:
        """Log, once per host and reason, that credentials were kept back."""
        if (host, reason) in self._withheld or len(self._withheld) >= 100:
            return
        self._withheld.add((host, reason))
        self.log.warn(
            "not sending the upstream credentials for {upstream} to {host}: {reason};"
            " asking anonymously",
            upstream=self._upstream_host,
            host=host,
            reason=reason,
        )

    def _fetch(
        self, challenge: Challenge, scope: str, credentials: Credentials | None
    ) -> Deferred[bytes]:
        """A token for C{scope}: one request however many callers need it."""
        key = self._key(scope, credentials)
        return self._fetches.run(
            key,
            lambda: self._token_as(challenge, scope, credentials),
        )

    async def _token_as(
        self, challenge: Challenge, scope: str, credentials: Credentials | None
    ) -> bytes:
        """
        The ``Authorization`` value for C{scope}, starting as C{credentials};
        a pooled account whose token request gets 429 rests and the pool's
        next choice (in the end: anonymous) asks instead.
        """
        for _ in range(_MAX_ACCOUNT_SWITCHES):
            key = self._key(scope, credentials)
            token, response = await self._request_token(challenge, scope, key, credentials)
            if token is not None:
                return self._issue(b"Bearer " + token.encode(), credentials)
            if credentials is None or self._accounts is None:
                raise RuntimeError(
                    "hammal bug: expected credentials is not None and self._accounts is not None"
                )
            self._accounts.observe(credentials, response.code, response.headers)
            following = self._accounts.current()
            if following == credentials:
                break
            credentials = following
        raise self._error_for(response, b"", urlsplit(challenge.realm or "").hostname or "")

    async def _request_token(
        self, challenge: Challenge, scope: str, key: str, credentials: Credentials | None
    ) -> tuple[str | None, IResponse]:
        """
        Ask the realm for a token as C{credentials}. A pooled account's 429
        gives C{(None, response)}: the caller moves to the next account.
        """
        realm = challenge.realm or ""
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamBadResponse(
                f"upstream challenged with an unusable token realm: {realm!r}"
            )
        query = [("scope", scope)]
        if challenge.service:
            query.insert(0, ("service", challenge.service))
        separator = "&" if parts.query else "?"
        url = realm + separator + urlencode(query)
        headers = Headers({b"accept": [b"application/json"]})
        with_credentials = self._realm_may_have_credentials(realm, credentials)
        if with_credentials:
            if credentials is None:
                raise RuntimeError("hammal bug: expected credentials is not None")
            headers.setRawHeaders(b"authorization", [credentials.basic()])
        response = await self._send(b"GET", url, headers)
        body = await read_body(response, 1024 * 1024, self._bounds)
        if response.code == 429 and with_credentials and self._accounts is not None:
            return None, response
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
        if with_credentials and self._accounts is not None:
            if credentials is None:
                raise RuntimeError("hammal bug: expected credentials is not None")
            self._accounts.observe(credentials, response.code, response.headers)
        lifetime = token_lifetime(document.get("expires_in"))
        await self._cache.set(key, token, lifetime)
        self.log.debug(
            "token for {scope} from {realm_host}, kept {lifetime:.0f}s",
            scope=scope,
            realm_host=parts.hostname,
            lifetime=lifetime,
        )
        return token, response
