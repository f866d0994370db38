"""
Who may pull: access rules and client authentication, per request.

Modes (``--auth``):

- C{none}: everyone (after the access rules).
- C{basic}: HTTP Basic against a single user or an htpasswd file.
- C{token}: Docker's token flow against hammal's own ``/v2/auth``, which
  checks Basic credentials and issues short-lived pull-only tokens.
- C{passthrough}: clients log in to the upstream registry through
  hammal's ``/v2/auth``; hammal uses each client's own token upstream, and
  serves cached content of a repository only after upstream confirmed that
  client's access to it (cached briefly per token and repository).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Any, cast
from urllib.parse import urlencode, urlsplit

import attrs
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from hammal.access.rules import AccessRules
from hammal.access.tokens import TokenIssuer, parse_scopes
from hammal.access.users import UserDirectory, check_in_thread, parse_basic
from hammal.errors import Denied, Unauthorized, UpstreamBadResponse
from hammal.proxy import PullProxy
from hammal.registry.challenge import select_challenge
from hammal.registry.client import Trace, upstream_error
from hammal.registry.reference import rewrite_scope
from hammal.replies import Document

AUTH_MODES = ("none", "basic", "token", "passthrough")

#: How long upstream's word on a client's access to a repository holds.
PASSTHROUGH_ACCESS_TTL = 60.0


@attrs.frozen
class Admission:
    """
    What the gate decided for a request.

    @ivar user: the authenticated user name, if any.
    @ivar upstream_authorization: in passthrough mode, the client's own
        ``Authorization`` value, to be used upstream instead of hammal's.
    """

    user: str | None = None
    upstream_authorization: bytes | None = None


class Gate:
    """Applies access rules and the configured authentication mode."""

    log = Logger()

    def __init__(
        self,
        mode: str,
        clock: IReactorTime,
        reactor: IReactorThreads | None = None,
        rules: AccessRules | None = None,
        users: UserDirectory | None = None,
        issuer: TokenIssuer | None = None,
    ) -> None:
        if mode not in AUTH_MODES:
            raise ValueError(f"--auth must be one of {', '.join(AUTH_MODES)}")
        if mode in ("basic", "token") and users is None:
            raise ValueError(f"--auth {mode} needs --auth-user/--auth-password or --htpasswd")
        if mode == "token" and issuer is None:
            raise ValueError("--auth token needs a token issuer")
        self.mode = mode
        self._clock = clock
        self._reactor = reactor
        self._rules = rules
        self._users = users
        self._issuer = issuer
        self._confirmed: OrderedDict[tuple[str, str], float] = OrderedDict()

    # Every request.

    def check_rules(self, request: Request) -> None:
        """The IP/UA/path/region rules. @raise Denied: when one refuses."""
        if self._rules is None:
            return
        address = request.getClientAddress()
        peer = str(getattr(address, "host", ""))
        headers = {
            name.decode("latin-1").lower(): [v.decode("latin-1") for v in values]
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        self._rules.check(peer, headers, request.path.decode("latin-1"))

    async def admit(self, request: Request, repository: str | None) -> Admission:
        """
        Authenticate C{request} for pulling C{repository} (L{None}: the
        ``/v2/`` base check).

        @raise Unauthorized: with the challenge the client should answer.
        @raise Denied: when authenticated but not allowed.
        """
        if self.mode == "none":
            return Admission()
        authorization = request.getHeader(b"authorization")
        if self.mode == "basic":
            return Admission(user=await self._basic(authorization))
        if self.mode == "token":
            return Admission(user=self._bearer(request, authorization, repository))
        if authorization is None or not authorization.lower().startswith(b"bearer "):
            raise self._challenge(request, repository)
        return Admission(upstream_authorization=authorization)

    async def _basic(self, authorization: bytes | None) -> str:
        credentials = parse_basic(authorization)
        if credentials is not None:
            assert self._users is not None
            reactor = cast(IReactorThreads, self._reactor)  # unused by SingleUser
            if await check_in_thread(self._users, *credentials, reactor):
                return credentials[0]
            self.log.info("refused credentials for user {user}", user=credentials[0][:64])
        raise Unauthorized(
            "authentication required",
            headers={"WWW-Authenticate": 'Basic realm="hammal"'},
        )

    def _bearer(self, request: Request, authorization: bytes | None, repository: str | None) -> str:
        assert self._issuer is not None
        if authorization is None or not authorization.lower().startswith(b"bearer "):
            raise self._challenge(request, repository)
        token = authorization[7:].strip().decode("latin-1")
        try:
            if repository is None:
                return self._issuer.verify_any(token)
            return self._issuer.verify(token, repository)
        except Unauthorized as failure:
            failure.headers.update(self._challenge(request, repository).headers)
            raise

    def _challenge(self, request: Request, repository: str | None) -> Unauthorized:
        host = (request.getHeader(b"host") or b"localhost").decode("latin-1")
        scheme = "https" if request.isSecure() else "http"
        value = f'Bearer realm="{scheme}://{_safe_host(host)}/v2/auth",service="hammal"'
        if repository is not None:
            value += f',scope="repository:{repository}:pull"'
        return Unauthorized("authentication required", headers={"WWW-Authenticate": value})

    # The token endpoint.

    async def token_response(self, request: Request, proxy: PullProxy | None) -> Document:
        """Answer ``/v2/auth`` for the configured mode."""
        if self.mode == "token":
            return await self._issue(request)
        if self.mode == "passthrough":
            assert proxy is not None
            return await self._forward_login(request, proxy)
        raise Denied(f"this mirror does not issue tokens (--auth {self.mode})")

    async def _issue(self, request: Request) -> Document:
        assert self._issuer is not None
        user = await self._basic(request.getHeader(b"authorization"))
        args = request.args or {}
        scopes = parse_scopes([v.decode("latin-1") for v in args.get(b"scope", [])])
        document = self._issuer.issue(user, scopes)
        return _json_document(200, document)

    async def _forward_login(self, request: Request, proxy: PullProxy) -> Document:
        """
        Passthrough: ask upstream's token realm for a token with the
        client's own credentials (scopes rewritten like names).
        """
        challenge = await self._upstream_challenge(proxy)
        realm = challenge.realm or ""
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamBadResponse("upstream offers no token realm to log in to")
        args = request.args or {}
        scopes = parse_scopes([v.decode("latin-1") for v in args.get(b"scope", [])])
        query = [("service", challenge.service or "")] if challenge.service else []
        query += [("scope", rewrite_scope(s, proxy.library_prefix)) for s in scopes]
        headers = Headers({b"accept": [b"application/json"]})
        authorization = request.getHeader(b"authorization")
        if authorization is not None:
            headers.setRawHeaders(b"authorization", [authorization])
        separator = "&" if parts.query else "?"
        response = await proxy.client.send_direct(
            b"GET", realm + (separator + urlencode(query) if query else ""), headers
        )
        body = await proxy.client.fetch_document(response, 1024 * 1024)
        if response.code != 200:
            raise Unauthorized(
                "upstream refused these credentials",
                headers={"WWW-Authenticate": 'Basic realm="hammal"'},
            )
        return Document(200, [(b"content-type", [b"application/json"])], body)

    async def _upstream_challenge(self, proxy: PullProxy) -> Any:
        response = await proxy.client.send_direct(
            b"GET", f"{proxy.client.upstream.url}/v2/", Headers()
        )
        await proxy.client.discard(response)
        challenge = select_challenge(
            v.decode("latin-1") for v in response.headers.getRawHeaders(b"www-authenticate", [])
        )
        if challenge is None or challenge.scheme != "bearer":
            raise UpstreamBadResponse("upstream does not use token authentication")
        return challenge

    async def confirm_access(
        self, proxy: PullProxy, authorization: bytes, name: str, path: str, headers: Headers
    ) -> None:
        """
        Passthrough: make sure upstream lets this client's token read
        C{name} before anything cached is served to it. C{headers} are the
        ones going upstream (their ``Accept`` matters: Distribution hides
        OCI manifests from clients that do not accept them).

        @raise Denied: when upstream refuses.
        @raise RegistryError: upstream's own answer otherwise (404, 429...).
        """
        key = (hashlib.sha256(authorization).hexdigest(), proxy.upstream_name(name))
        now = self._clock.seconds()
        expires = self._confirmed.get(key)
        if expires is not None and expires > now:
            return
        probe = headers.copy()
        probe.removeHeader(b"range")
        probe.setRawHeaders(b"authorization", [authorization])
        response = await proxy.client.request(
            b"HEAD", proxy.upstream_name(name), path, probe, Trace(), follow_redirects=False
        )
        body = await proxy.client.fetch_document(response, 64 * 1024)
        if response.code in (401, 403):
            raise Denied(f"upstream refused this client access to {name}")
        if response.code >= 400:
            raise upstream_error(response, body, proxy.upstream_host)
        self._confirmed[key] = now + PASSTHROUGH_ACCESS_TTL
        while len(self._confirmed) > 10000:
            self._confirmed.popitem(last=False)


def _json_document(status: int, document: object) -> Document:
    return Document(status, [(b"content-type", [b"application/json"])], json.dumps(document).encode())


def _safe_host(host: str) -> str:
    """A Host header fit to be quoted in a challenge."""
    return "".join(c for c in host if c.isalnum() or c in ".-:[]")[:260] or "localhost"

