"""
The upstream registry client: one logical request, made reliable.

A call to L{UpstreamClient.request} authorises itself (L{UpstreamAuth}),
follows blob redirects to CDNs without credentials, retries connection
errors, timeouts, 429 and 502/503/504 with backoff and jitter, and maps what
cannot be retried to hammal's error types. Bodies are never buffered here:
the caller gets the live response.
"""

from __future__ import annotations

import json
from http.cookiejar import DefaultCookiePolicy
from typing import Any, Protocol
from urllib.parse import urljoin, urlsplit

import attrs
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
    _HTTP11ClientFactory,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from hammal import __version__, metrics
from hammal.errors import (
    Denied,
    RegistryError,
    TooManyRequests,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from hammal.reference import pull_scope
from hammal.stream import ReadBounds, discard_body, read_body
from hammal.ttlstore import TtlStore
from hammal.upstream.addresses import (
    AddressPolicy,
    CheckedEndpointFactory,
    InternalAddressRefused,
    PeerZones,
)
from hammal.upstream.auth import Credentials, CredentialSource, UpstreamAuth
from hammal.upstream.challenge import select_challenge
from hammal.upstream.credentials import CredentialPolicy
from hammal.upstream.forward_proxy import ProxyingAgent
from hammal.upstream.proxy_rules import ProxyRules
from hammal.upstream.quota import QUOTAS, QuotaBoard
from hammal.upstream.retry import RetryPolicy, parse_retry_after, sleep


def default_deadline(read_timeout: float) -> float:
    """The overall deadline of an upstream exchange when none is configured."""
    return 4 * read_timeout


RETRIABLE_STATUSES = frozenset({429, 502, 503, 504})
#: Most immediate retries as another pooled account after a 429.
_MAX_ACCOUNT_SWITCHES = 16
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
USER_AGENT = f"hammal/{__version__}".encode()

_CONNECTION_ERRORS = (
    error.ConnectError,
    error.DNSLookupError,
    error.ConnectionLost,
    error.ConnectionDone,
    ResponseNeverReceived,
    RequestTransmissionFailed,
    ResponseFailed,
    OSError,
)


@attrs.frozen
class Upstream:
    """
    A registry hammal mirrors.

    @ivar url: base URL without a trailing slash, e.g.
        ``https://registry-1.docker.io``.
    @ivar library_prefix: whether one-part names live under ``library/``.
    @ivar credentials: hammal's own credentials for this registry.
    @ivar mirror_of: for a failover mirror, the URL of the upstream it
        mirrors: a client's token for that upstream is never sent here.
    """

    url: str
    library_prefix: bool = False
    credentials: Credentials | None = None
    mirror_of: str | None = None

    @property
    def host(self) -> str:
        """``host[:port]``, for messages and logs."""
        return urlsplit(self.url).netloc


@attrs.define
class Trace:
    """What one client request cost upstream, for the access log."""

    attempts: int = 0
    redirects: int = 0


@implementer(IAgent)
class _IdentityEncodingAgent:
    """
    Asks upstream for bytes exactly as stored (``Accept-Encoding:
    identity``), overriding the gzip that treq would request, so that
    lengths and digests stay those of the content.
    """

    def __init__(self, agent: IAgent) -> None:
        self._agent = agent

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> defer.Deferred[IResponse]:
        headers = headers.copy() if headers is not None else Headers()
        headers.setRawHeaders(b"accept-encoding", [b"identity"])
        return self._agent.request(method, uri, headers, bodyProducer)


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False


class _QuietPool(HTTPConnectionPool):
    """A pool whose connections do not log each start and stop."""

    _factory = _QuietFactory


def make_http_client(
    reactor: Any,
    connect_timeout: float,
    max_per_host: int = 64,
    tls_policy: IPolicyForHTTPS | None = None,
    zones: PeerZones | None = None,
    refuse_internal: bool = False,
    address_policy: AddressPolicy | None = None,
    pool: HTTPConnectionPool | None = None,
    proxies: ProxyRules | None = None,
) -> HTTPClient:
    """
    A treq client with a large persistent pool (the default of 2 per host
    halves the request rate) and no cookie storage; through the forward
    proxies C{proxies} names, if any.

    Every direct connection it opens is checked on its peer address:
    recorded in C{zones}, and with C{refuse_internal} refused when internal
    (see L{hammal.upstream.addresses}). C{pool} is made here unless given.
    """

    def make_pool() -> HTTPConnectionPool:
        made = _QuietPool(reactor, persistent=True)
        made.maxPersistentPerHost = max_per_host
        made.cachedConnectionTimeout = 120
        return made

    if pool is None:
        pool = make_pool()
    else:
        pool.maxPersistentPerHost = max_per_host
        pool.cachedConnectionTimeout = 120
    endpoints = CheckedEndpointFactory(
        reactor, tls_policy, connect_timeout, address_policy, refuse_internal, zones
    )
    agent: IAgent = Agent.usingEndpointFactory(reactor, endpoints, pool)
    if proxies is not None and proxies.active:
        agent = ProxyingAgent(reactor, proxies, agent, make_pool, connect_timeout, tls_policy)
    return http_client_over(agent)


def http_client_over(agent: IAgent) -> HTTPClient:
    """
    The treq client hammal uses over C{agent}: identity encoding, no
    cookies.
    """
    no_cookies = IndexableCookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
    return HTTPClient(_IdentityEncodingAgent(agent), cookiejar=no_cookies)


def upstream_error(response: IResponse, body: bytes, where: str) -> RegistryError:
    """
    The error to report for a non-success upstream response: upstream's own
    OCI error code and message where it sent one.
    """
    code, message, detail = "UNKNOWN", f"{where} answered HTTP {response.code}", None
    try:
        errors = json.loads(body).get("errors") or []
        first = errors[0]
        code = str(first.get("code") or code)
        message = str(first.get("message") or message)
        detail = first.get("detail")
    except (ValueError, AttributeError, IndexError, TypeError):
        pass
    if response.code == 429:
        retry_after = response.headers.getRawHeaders(b"retry-after", [b""])[0]
        headers = {"Retry-After": retry_after.decode("latin-1")} if retry_after else {}
        return TooManyRequests(
            f"{where} rate limit reached ({message}); configure --upstream-username"
            " and --upstream-password for a higher pull limit",
            headers=headers,
        )
    if response.code in (401, 403):
        return Denied(f"{where} refused access: {message}", detail)
    if response.code >= 500:
        return UpstreamUnavailable(f"{where} failed: HTTP {response.code} {message}")
    if response.code < 400:
        return UpstreamBadResponse(f"{where} answered unexpectedly: HTTP {response.code}")
    return UpstreamError(response.code, code, message, detail)


async def read_upstream_error(client: "RegistryClient", response: IResponse) -> RegistryError:
    """
    L{upstream_error} for C{response}, its body read through C{client}'s
    bounded reads (an unreadable body counts as empty).
    """
    try:
        body = await client.fetch_document(response, 64 * 1024)
    except RegistryError:
        body = b""
    return upstream_error(response, body, client.upstream.host)


class RegistryClient(Protocol):
    """What the pull logic needs of an upstream: one registry or a failover set."""

    @property
    def upstream(self) -> Upstream: ...

    @property
    def read_timeout(self) -> float: ...

    @property
    def deadline(self) -> float: ...

    async def request(
        self,
        method: bytes,
        name: str,
        path: str,
        headers: Headers,
        trace: Trace,
        follow_redirects: bool = True,
    ) -> IResponse: ...

    async def fetch_document(self, response: IResponse, limit: int) -> bytes: ...

    async def discard(self, response: IResponse) -> None: ...

    async def reachable(self, within: float) -> str | None: ...

    async def send_direct(self, method: bytes, url: str, headers: Headers) -> IResponse: ...


class UpstreamClient:
    """
    Requests to one upstream registry, authorised and retried.

    @param redirect_http: the client that follows redirects when the
        upstream was reached on a public address: it refuses internal
        addresses. L{None} follows them with C{http} (tests).
    @param zones: the zones C{http} saw the upstream in.
    """

    log = Logger()
    #: Where upstream's ``ratelimit-*`` answers are recorded (the status page).
    quotas: QuotaBoard = QUOTAS

    def __init__(
        self,
        upstream: Upstream,
        http: HTTPClient,
        clock: IReactorTime,
        tokens: TtlStore,
        policy: RetryPolicy,
        read_timeout: float,
        credential_policy: CredentialPolicy | None = None,
        redirect_http: HTTPClient | None = None,
        zones: PeerZones | None = None,
        accounts: CredentialSource | None = None,
        deadline: float | None = None,
    ) -> None:
        self.upstream = upstream
        self._http = http
        self._redirect_http = redirect_http
        self._zones = zones
        self._clock = clock
        self._policy = policy
        self.read_timeout = read_timeout
        self.deadline = deadline if deadline is not None else default_deadline(read_timeout)
        self.bounds = ReadBounds(clock, read_timeout, self.deadline, upstream.host)
        self.last_reached: float | None = None
        self._auth = UpstreamAuth(
            upstream.url,
            tokens,
            self._send_to_realm,
            upstream_error,
            upstream.credentials,
            clock,
            credential_policy,
            accounts,
            self.bounds,
        )
        # For a mirror asked on behalf of a passthrough client: only what
        # anyone may read, since the client's identity cannot be checked here.
        self._anonymous_auth = UpstreamAuth(
            upstream.url,
            tokens,
            self._send_to_realm,
            upstream_error,
            None,
            clock,
            credential_policy,
            None,
            self.bounds,
        )

    async def request(
        self,
        method: bytes,
        name: str,
        path: str,
        headers: Headers,
        trace: Trace,
        follow_redirects: bool = True,
    ) -> IResponse:
        """
        Send C{method} for C{/v2/<name>/<path>} upstream and return the
        response, whose body is still to be read.

        Redirects are followed when C{follow_redirects}; C{headers} must
        hold only what may go upstream (see L{hammal.headers}).

        @raise RegistryError: when upstream could not give an answer worth
            relaying after every retry.
        """
        url = f"{self.upstream.url}/v2/{name}/{path}"
        scope = pull_scope(name)
        retry = 0
        switches = 0
        while True:
            trace.attempts += 1
            retry_after: float | None = None
            try:
                response, switched = await self._attempt(
                    method, url, headers, scope, follow_redirects, trace
                )
            except (UpstreamUnavailable, UpstreamTimeout, TooManyRequests) as failure:
                if isinstance(failure, TooManyRequests):
                    retry_after = parse_retry_after(
                        failure.headers.get("Retry-After"), self._clock.seconds()
                    )
                delay = self._policy.delay(retry, retry_after)
                if delay is None:
                    raise
                reason = failure.message
            else:
                if response.code not in RETRIABLE_STATUSES:
                    return response
                if switched and switches < _MAX_ACCOUNT_SWITCHES:
                    # That account's pull limit is spent: the next one goes at once.
                    switches += 1
                    await discard_body(response)
                    continue
                retry_after = parse_retry_after(
                    _header(response, b"retry-after"), self._clock.seconds()
                )
                delay = self._policy.delay(retry, retry_after)
                if delay is None:
                    return response
                reason = f"HTTP {response.code}"
                await discard_body(response, self.bounds)
            self.log.info(
                "retrying {method} {url} in {delay:.2f}s after {reason}",
                method=method.decode(),
                url=_without_query(url),
                delay=delay,
                reason=reason,
            )
            metrics.upstream_retries.labels(self.upstream.host).inc()
            await sleep(self._clock, delay)
            retry += 1

    async def _attempt(
        self,
        method: bytes,
        url: str,
        headers: Headers,
        scope: str,
        follow_redirects: bool,
        trace: Trace,
    ) -> tuple[IResponse, bool]:
        """
        One authorised exchange (and its redirects). The flag says whether
        the pooled account it used now rests, so a retry goes as another.
        """
        given = headers.getRawHeaders(b"authorization")
        auth = self._auth
        if given and self.upstream.mirror_of is not None:
            # A client's token is for the upstream, never for its mirror.
            headers = _with_authorization(headers, None)
            auth = self._anonymous_auth
        elif given:
            # A client's own upstream token (passthrough): used as it is.
            response = await self._send(method, url, headers.copy())
            if follow_redirects and response.code in REDIRECT_STATUSES:
                response = await self._follow(method, url, headers, given[0], response, trace)
            return response, False
        authorization = await auth.authorization(scope)
        response = await self._send(method, url, _with_authorization(headers, authorization))
        if response.code == 401:
            challenge = select_challenge(
                value.decode("latin-1")
                for value in response.headers.getRawHeaders(b"www-authenticate", [])
            )
            if challenge is not None:
                answer = await auth.answer(challenge, scope, authorization)
                if answer is not None:
                    await discard_body(response, self.bounds)
                    authorization = answer
                    response = await self._send(method, url, _with_authorization(headers, answer))
        switched = auth.observe(authorization, response)
        if follow_redirects and response.code in REDIRECT_STATUSES:
            response = await self._follow(method, url, headers, authorization, response, trace)
        return response, switched

    async def _follow(
        self,
        method: bytes,
        url: str,
        headers: Headers,
        authorization: bytes | None,
        response: IResponse,
        trace: Trace,
    ) -> IResponse:
        """
        Follow redirects. Credentials go only to the origin they were meant
        for; a CDN gets the signed URL and nothing else. From an upstream on
        a public address, only public addresses are followed to.
        """
        origin = _origin(url)
        http = self._redirect_client(origin)
        for _ in range(MAX_REDIRECTS):
            location = _header(response, b"location")
            if location is None:
                return response
            await discard_body(response, self.bounds)
            url = urljoin(url, location)
            if urlsplit(url).scheme not in ("http", "https"):
                raise UpstreamBadResponse(f"{self.upstream.host} redirected to a non-HTTP URL")
            trace.redirects += 1
            same_origin = _origin(url) == origin
            response = await self._send(
                method,
                url,
                _with_authorization(headers, authorization if same_origin else None),
                http,
            )
            if response.code not in REDIRECT_STATUSES:
                return response
        raise UpstreamBadResponse(
            f"{self.upstream.host} redirected more than {MAX_REDIRECTS} times"
        )

    def _redirect_client(self, origin: tuple[str, str | None, int | None]) -> HTTPClient:
        """
        The client to follow the upstream at C{origin}'s redirects with:
        the guarded one unless upstream was last reached on an internal
        address itself (same trust zone).
        """
        if self._redirect_http is None:
            return self._http
        scheme, host, port = origin
        if self._zones is not None and self._zones.internal((scheme, host or "", port or 0)):
            return self._http
        return self._redirect_http

    async def _send_to_realm(self, method: bytes, url: str, headers: Headers) -> IResponse:
        """
        A request to the token realm upstream's challenge named: like a
        redirect, it may lead to an internal address only from an upstream
        that is itself on one.
        """
        http = self._redirect_client(_origin(self.upstream.url))
        return await self._send(method, url, headers, http)

    async def _send(
        self, method: bytes, url: str, headers: Headers, http: HTTPClient | None = None
    ) -> IResponse:
        """One HTTP exchange, with hammal's errors for what went wrong."""
        headers.setRawHeaders(b"user-agent", [USER_AGENT])
        host = urlsplit(url).netloc
        started = self._clock.seconds()
        d = (http or self._http).request(
            method.decode("ascii"),
            url,
            headers=headers,
            allow_redirects=False,
            unbuffered=True,
        )

        def timed_out(result: object, timeout: float) -> None:
            # treq reports the cancellation as ResponseNeverReceived: replace it.
            raise UpstreamTimeout(f"{host} did not answer within {timeout:g} seconds")

        d.addTimeout(self.read_timeout, self._clock, onTimeoutCancel=timed_out)
        try:
            response: IResponse = await d
        except UpstreamTimeout:
            metrics.upstream_errors.labels(host, "timeout").inc()
            raise
        except InternalAddressRefused as refused:
            metrics.upstream_errors.labels(self.upstream.host, "redirect-refused").inc()
            self.log.warn(
                "refused to follow {upstream} to {host}: it is at {address}, an internal address",
                upstream=self.upstream.host,
                host=refused.host,
                address=refused.address,
            )
            raise UpstreamBadResponse(
                f"{self.upstream.host} sent hammal to an internal address; refused"
            )
        except (error.ConnectingCancelledError, error.TimeoutError):
            metrics.upstream_errors.labels(host, "connect-timeout").inc()
            raise UpstreamTimeout(f"connecting to {host} timed out")
        except _CONNECTION_ERRORS as failure:
            metrics.upstream_errors.labels(host, "connection").inc()
            raise UpstreamUnavailable(f"cannot reach {host}: {_describe(failure)}")
        if host == self.upstream.host and response.code < 500:
            self.last_reached = self._clock.seconds()
        metrics.upstream_latency.labels(host).observe(self._clock.seconds() - started)
        self.log.debug(
            "upstream {method} {where} -> {status} in {ms:.1f}ms",
            method=method.decode("ascii"),
            where=_without_query(url),
            status=response.code,
            ms=(self._clock.seconds() - started) * 1000,
        )
        metrics.upstream_requests.labels(host, str(response.code)).inc()
        self._note_rate_limit(response)
        return response

    def _note_rate_limit(self, response: IResponse) -> None:
        """Docker Hub's ``ratelimit-remaining: 76;w=21600``, as a gauge."""
        value = _header(response, b"ratelimit-remaining")
        if value is None:
            return
        self.quotas.observe_headers(
            self.upstream.host,
            self.account,
            [
                ("ratelimit-remaining", value),
                ("ratelimit-limit", _header(response, b"ratelimit-limit") or ""),
            ],
            self._clock.seconds(),
        )
        count = value.split(";", 1)[0].strip()
        if count.isdigit():
            metrics.upstream_ratelimit_remaining.labels(
                self.upstream.host, self._auth.identity
            ).set(int(count))

    @property
    def account(self) -> str:
        """The non-secret name of hammal's upstream identity (``anonymous``, ``user-<hash>``)."""
        return self._auth.identity

    async def send_direct(self, method: bytes, url: str, headers: Headers) -> IResponse:
        """
        One exchange with C{url}, without hammal's own credentials or
        retries. A URL off the upstream (a token realm its challenge named)
        is held to the redirect rule.
        """
        upstream = _origin(self.upstream.url)
        http = self._http if _origin(url) == upstream else self._redirect_client(upstream)
        return await self._send(method, url, headers.copy(), http)

    async def reachable(self, within: float) -> str | None:
        """
        L{None} if upstream answered within the last C{within} seconds or
        answers a probe of ``/v2/`` now (any HTTP answer counts), else the
        problem.
        """
        if self.last_reached is not None and self._clock.seconds() - self.last_reached < within:
            return None
        try:
            response = await self._send(b"GET", f"{self.upstream.url}/v2/", Headers())
        except RegistryError as failure:
            return failure.message
        await discard_body(response, self.bounds)
        if response.code >= 500:
            return f"{self.upstream.host} answers HTTP {response.code}"
        return None

    async def warm_up(self) -> None:
        """
        Ask ``/v2/`` once, as Distribution does when it starts: the first
        pull then finds upstream's challenge known (its token is asked for
        at once, no 401 round trip first) and a connection to upstream in
        the pool. Never fails: a problem is only logged, and the first pull
        meets the challenge as before.
        """
        try:
            response = await self._send(b"GET", f"{self.upstream.url}/v2/", Headers())
            await discard_body(response, self.bounds)
        except RegistryError as failure:
            self.log.info(
                "could not reach {upstream} at start: {reason}",
                upstream=self.upstream.host,
                reason=failure.message,
            )
            return
        if response.code != 401:
            return
        challenge = select_challenge(
            value.decode("latin-1")
            for value in response.headers.getRawHeaders(b"www-authenticate", [])
        )
        if challenge is not None:
            self._auth.learn(challenge)

    async def fetch_document(self, response: IResponse, limit: int) -> bytes:
        """
        Read a small body (manifest, tag list, error) with C{read_timeout}
        as its idle limit and C{deadline} as its overall one.
        """
        return await read_body(response, limit, self.bounds)

    async def discard(self, response: IResponse) -> None:
        """Drop a body hammal does not need, within the same bounds; never fails."""
        await discard_body(response, self.bounds)


def _describe(failure: BaseException) -> str:
    if isinstance(failure, (ResponseFailed, ResponseNeverReceived, RequestTransmissionFailed)):
        reasons = getattr(failure, "reasons", None) or []
        if reasons:
            return reasons[0].getErrorMessage()
    text = str(failure) or type(failure).__name__
    return text[:200]


def _without_query(url: str) -> str:
    """A URL fit for logs: signed query strings are credentials."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _header(response: IResponse, name: bytes) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[0].decode("latin-1") if values else None


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return (parts.scheme, parts.hostname, port)


def _with_authorization(headers: Headers, authorization: bytes | None) -> Headers:
    headers = headers.copy()
    if authorization is None:
        headers.removeHeader(b"authorization")
    else:
        headers.setRawHeaders(b"authorization", [authorization])
    return headers
