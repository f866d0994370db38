"""
Who may pull: access rules and client authentication, per request.

Modes (``--auth``):

- C{none}: everyone (after the access rules).
- C{basic}: HTTP Basic against a single user or an htpasswd file.
- C{token}: Docker's token flow against hammal's own ``/v2/auth``, which
  checks Basic credentials and issues short-lived pull-only tokens.
- C{passthrough}: clients log in to the upstream registry through
  hammal's ``/v2/auth``; hammal uses each client's own token upstream, and
  serves cached content only after upstream confirmed that client's access
  to that very object (see L{hammal.access.passthrough}).

Refusals follow Distribution: a missing, expired or rejected token is
``401`` with hammal's challenge (clients log in again only on a 401); a
token that does not cover the repository is ``401`` with
``error="insufficient_scope"``. The challenge's realm carries the route
(``?ns=``, ``?upstream=``, or the registry of a path prefix), so a client
logs in to the registry it pulls from.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

import attrs
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from hammal.access.checks import CredentialChecker
from hammal.access.passthrough import (
    DEFAULT_TOKEN_LIFETIME,
    ConfirmationKey,
    Confirmations,
    Logins,
    fingerprint,
)
from hammal.access.rules import AccessRules
from hammal.access.throttle import LoginThrottle
from hammal.access.tokens import TokenIssuer, parse_scopes
from hammal.access.users import UserDirectory, parse_basic
from hammal.errors import Denied, RegistryError, Unauthorized, UpstreamError
from hammal.pull.passthrough import forward_login, probe_access
from hammal.pull.service import PullService
from hammal.replies import Document
from hammal.ttlstore import MemoryTtlStore
from hammal.upstream.client import upstream_error
from hammal.web.forwarded import forwarding_headers

AUTH_MODES = ("none", "basic", "token", "passthrough")


@attrs.frozen
class Admission:
    """
    What the gate decided for a request.

    @ivar user: the authenticated user name, if any (in passthrough mode,
        only known with C{--allow-users}).
    @ivar upstream_authorization: in passthrough mode, the client's own
        ``Authorization`` value, to be used upstream instead of hammal's.
    """

    user: str | None = None
    upstream_authorization: bytes | None = None


class Gate:
    """
    Applies access rules and the configured authentication mode.

    @param allowed_users: C{--allow-users} in passthrough mode: only tokens
        handed to these users by hammal's C{/v2/auth} are accepted. (In the
        other modes the L{UserDirectory} applies the list.)
    @param logins: where passthrough logins are remembered for
        C{allowed_users}; in memory unless given (give a shared cache when
        several instances serve one name).
    @param checker: checks Basic credentials against C{users} (by default
        on the reactor's thread pool; hammal gives it a pool of its own).
    @param throttle: refuses addresses after repeated failed logins.
    """

    log = Logger()

    def __init__(
        self,
        mode: str,
        clock: IReactorTime,
        reactor: IReactorThreads | None = None,
        rules: AccessRules | None = None,
        users: UserDirectory | None = None,
        issuer: TokenIssuer | None = None,
        allowed_users: Iterable[str] | None = None,
        logins: Logins | None = None,
        checker: CredentialChecker | None = None,
        throttle: LoginThrottle | None = None,
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
        self._allowed_users = None if allowed_users is None else frozenset(allowed_users)
        if self._allowed_users is not None and not self._allowed_users:
            raise ValueError("the list of allowed users is empty")
        self._logins = logins or Logins(MemoryTtlStore(clock))
        self._confirmations = Confirmations(clock)
        if checker is None and users is not None:
            checker = CredentialChecker(users, clock, reactor)
        self._checker = checker
        self._throttle = throttle or LoginThrottle(clock)

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

    async def admit(
        self, request: Request, repository: str | None, realm_query: str = ""
    ) -> Admission:
        """
        Authenticate C{request} for pulling C{repository} (L{None}: the
        ``/v2/`` base check). C{realm_query} (``?ns=...`` or empty) routes
        the client's login to the registry it is pulling from.

        @raise Unauthorized: with the challenge the client should answer.
        @raise Denied: when authenticated but not allowed.
        """
        if self.mode == "none":
            return Admission()
        authorization = request.getHeader(b"authorization")
        if self.mode == "basic":
            return Admission(user=await self._basic(request, authorization))
        if self.mode == "token":
            return Admission(user=self._bearer(request, authorization, repository, realm_query))
        if authorization is None or not authorization.lower().startswith(b"bearer "):
            raise self.challenge(request, repository, realm_query)
        user = None
        if self._allowed_users is not None:
            user = await self._logins.user(authorization)
            if user is None or user not in self._allowed_users:
                raise self.challenge(
                    request,
                    repository,
                    realm_query,
                    "invalid_token",
                    "log in through this mirror as one of its allowed users",
                )
        return Admission(user=user, upstream_authorization=authorization)

    def client_address(self, request: Request) -> str:
        """The client's address, as the access rules see it."""
        peer = str(getattr(request.getClientAddress(), "host", ""))
        if self._rules is None:
            return peer
        return self._rules.client_of(peer, forwarding_headers(request))

    async def _basic(self, request: Request, authorization: bytes | None) -> str:
        credentials = parse_basic(authorization)
        if credentials is not None:
            if self._checker is None:
                raise RuntimeError("hammal bug: expected self._checker is not None")
            address = self.client_address(request)
            self._throttle.check(address)
            if await self._checker.check(*credentials):
                return credentials[0]
            self._throttle.failed(address)
            self.log.info(
                "refused credentials for user {user} from {client}",
                user=printable(credentials[0]),
                client=address,
            )
        raise Unauthorized(
            "authentication required",
            headers={"WWW-Authenticate": 'Basic realm="hammal"'},
        )

    def _bearer(
        self,
        request: Request,
        authorization: bytes | None,
        repository: str | None,
        realm_query: str,
    ) -> str:
        if self._issuer is None:
            raise RuntimeError("hammal bug: expected self._issuer is not None")
        if authorization is None or not authorization.lower().startswith(b"bearer "):
            raise self.challenge(request, repository, realm_query)
        token = authorization[7:].strip().decode("latin-1")
        try:
            if repository is None:
                return self._issuer.verify_any(token)
            return self._issuer.verify(token, repository)
        except Unauthorized as failure:
            raise self.challenge(
                request, repository, realm_query, "invalid_token", failure.message
            ) from None
        except Denied as failure:
            raise self.challenge(
                request, repository, realm_query, "insufficient_scope", failure.message
            ) from None

    def challenge(
        self,
        request: Request,
        repository: str | None,
        realm_query: str = "",
        error: str | None = None,
        message: str = "authentication required",
    ) -> Unauthorized:
        """
        The C{401} that sends a client to hammal's token endpoint, as
        Distribution words it (C{error} is C{invalid_token} or
        C{insufficient_scope}).
        """
        host = (request.getHeader(b"host") or b"localhost").decode("latin-1")
        scheme = "https" if request.isSecure() else "http"
        realm = f"{scheme}://{_safe_host(host)}/v2/auth{realm_query}"
        value = f'Bearer realm="{realm}",service="hammal"'
        if repository is not None:
            value += f',scope="repository:{repository}:pull"'
        if error is not None:
            value += f',error="{error}"'
        return Unauthorized(message, headers={"WWW-Authenticate": value})

    # The token endpoint.

    async def token_response(self, request: Request, proxy: PullService | None) -> Document:
        """Answer ``/v2/auth`` for the configured mode."""
        if self.mode == "token":
            return await self._issue(request)
        if self.mode == "passthrough":
            if proxy is None:
                raise RuntimeError("hammal bug: expected proxy is not None")
            return await self._forward_login(request, proxy)
        raise Denied(f"this mirror does not issue tokens (--auth {self.mode})")

    async def _issue(self, request: Request) -> Document:
        if self._issuer is None:
            raise RuntimeError("hammal bug: expected self._issuer is not None")
        user = await self._basic(request, request.getHeader(b"authorization"))
        args = request.args or {}
        scopes = parse_scopes([v.decode("latin-1") for v in args.get(b"scope", [])])
        document = self._issuer.issue(user, scopes)
        return _json_document(200, document)

    async def _forward_login(self, request: Request, proxy: PullService) -> Document:
        """
        Passthrough: ask upstream's token realm for a token with the
        client's own credentials (scopes rewritten like names).
        """
        authorization = request.getHeader(b"authorization")
        credentials = parse_basic(authorization)
        address = self.client_address(request)
        if credentials is not None:
            self._throttle.check(address)
        if self._allowed_users is not None and (
            credentials is None or credentials[0] not in self._allowed_users
        ):
            if credentials is not None:
                self._throttle.failed(address)
                self.log.info(
                    "user {user} from {client} is not in the allowed users; login refused",
                    user=printable(credentials[0]),
                    client=address,
                )
            raise Unauthorized(
                "log in as one of this mirror's allowed users",
                headers={"WWW-Authenticate": 'Basic realm="hammal"'},
            )
        args = request.args or {}
        prefix = _query_text(args, b"ns") or ""
        scopes = parse_scopes([v.decode("latin-1") for v in args.get(b"scope", [])])
        answer = await forward_login(
            proxy, authorization, [_without_registry(s, prefix) for s in scopes]
        )
        body = answer.body
        if answer.status == 401:
            if credentials is not None:
                self._throttle.failed(address)
                self.log.info(
                    "upstream refused the login of user {user} from {client}",
                    user=printable(credentials[0]),
                    client=address,
                )
            raise Unauthorized(
                "upstream refused these credentials",
                headers={"WWW-Authenticate": 'Basic realm="hammal"'},
            )
        if answer.status != 200:
            raise upstream_error(answer.response, body, answer.where)
        token, lifetime = _token_of(body)
        if token is not None:
            self._confirmations.note_token(token, lifetime)
            if self._allowed_users is not None and credentials is not None:
                await self._logins.remember(token, credentials[0], lifetime)
        return Document(200, [(b"content-type", [b"application/json"])], body)

    async def confirm_access(
        self,
        request: Request,
        proxy: PullService,
        authorization: bytes,
        name: str,
        path: str,
        headers: Headers,
        repository: str,
        realm_query: str = "",
    ) -> None:
        """
        Passthrough: make sure upstream lets this client's token read the
        object at C{path} (``manifests/<ref>``, ``blobs/<digest>``,
        ``tags/list``) of C{name} on C{proxy}'s upstream before anything
        cached is served to it. C{headers} are the ones going upstream
        (their ``Accept`` matters: Distribution hides OCI manifests from
        clients that do not accept them). C{repository} and C{realm_query}
        are the name as the client wrote it and its route, for the
        challenge.

        @raise Unauthorized: upstream did not take the token (expired,
            invalid: log in again) or it lacks the scope.
        @raise Denied: when upstream forbids it.
        @raise RegistryError: upstream's own answer otherwise (404, 429...).
        """
        upstream_name = proxy.upstream_name(name)
        key = ConfirmationKey(
            fingerprint(authorization), proxy.client.upstream.url, upstream_name, path
        )
        if self._confirmations.confirmed(key):
            return
        answer = await probe_access(proxy, upstream_name, path, headers, authorization)
        if answer.status == 401:
            if answer.insufficient_scope:
                raise self.challenge(
                    request,
                    repository,
                    realm_query,
                    "insufficient_scope",
                    f"this token does not grant pull on {repository[:255]}",
                )
            raise self.challenge(
                request,
                repository,
                realm_query,
                "invalid_token",
                "upstream did not accept this token; log in again",
            )
        if answer.status == 403:
            raise Denied(f"upstream refused this client access to {repository[:255]}")
        if answer.status == 405 and path == "tags/list":
            # Distribution has no HEAD for tag lists, but checks the token
            # first; tag lists are never cached, and the GET that follows
            # carries the token, so upstream has the last word anyway.
            pass
        elif answer.status >= 400:
            raise _refusal(answer.status, answer.body, path, answer.where, answer.response)
        self._confirmations.confirm(key, authorization)


def _refusal(status: int, body: bytes, path: str, where: str, response: Any) -> RegistryError:
    """
    Upstream's error for a probe. A HEAD has no body, so a 404 gets the
    code Distribution would have sent with a GET.
    """
    if status == 404 and not body:
        code = (
            "BLOB_UNKNOWN"
            if path.startswith("blobs/")
            else "MANIFEST_UNKNOWN"
            if path.startswith("manifests/")
            else "NAME_UNKNOWN"
        )
        return UpstreamError(404, code, f"{where} does not have {path[:300]}")
    return upstream_error(response, body, where)


def _token_of(body: bytes) -> tuple[str | None, float]:
    """The token in a token response and its lifetime in seconds."""
    try:
        document = json.loads(body)
        token = document.get("token") or document.get("access_token")
        lifetime = float(document.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
    except (ValueError, AttributeError, TypeError):
        return None, DEFAULT_TOKEN_LIFETIME
    if not isinstance(token, str) or not token:
        return None, DEFAULT_TOKEN_LIFETIME
    return token, lifetime if lifetime > 0 else DEFAULT_TOKEN_LIFETIME


def _query_text(args: dict[bytes, list[bytes]], name: bytes) -> str | None:
    values = args.get(name)
    return values[0].decode("latin-1") if values else None


def _without_registry(scope: str, registry: str) -> str:
    """
    C{repository:ghcr.io/owner/repo:pull} as C{repository:owner/repo:pull}
    when the login is for C{ghcr.io} (the realm of a path-prefixed pull
    carries ``?ns=ghcr.io``, and clients ask for the name they pulled).
    """
    head = f"repository:{registry}/"
    if registry and scope.lower().startswith(head.lower()):
        return "repository:" + scope[len(head) :]
    return scope


def printable(text: str, limit: int = 64) -> str:
    """
    A client-supplied name fit for a log line: cut to C{limit} characters,
    control and other unprintable characters escaped, so that it cannot
    forge or hide log lines.
    """
    cut = text[:limit]
    if cut.isprintable():
        return cut
    return cut.encode("unicode_escape").decode("ascii")


def _json_document(status: int, document: object) -> Document:
    return Document(
        status, [(b"content-type", [b"application/json"])], json.dumps(document).encode()
    )


def _safe_host(host: str) -> str:
    """A Host header fit to be quoted in a challenge."""
    return "".join(c for c in host if c.isalnum() or c in ".-:[]")[:260] or "localhost"
