"""An auth.docker.io look-alike: a token server for Distribution's token auth.

Run it as a script::

    python tests/integration/tokenserver.py --port 5001 \\
        --key signing.key --cert signing.pem \\
        --issuer hammal-test-issuer --service registry.test \\
        --users '{"alice": "wonderland", "admin": "secret"}'

Endpoints:

``GET /token?service=S&scope=repository:NAME:pull[&scope=...]``
    Issues ``{"token", "access_token", "expires_in", "issued_at"}`` holding an
    RS256 JWT with an ``x5c`` header (the signing certificate, base64 DER) and
    the claims Distribution 2.8 checks (``iss``, ``aud``, ``sub``, ``exp``,
    ``nbf``, ``iat``, ``jti``, ``access``).  Anonymous callers get ``pull`` on
    every repository except those under ``private/``; those need HTTP Basic
    credentials of a configured user.  A repository nobody may read still gets
    a token, with empty ``actions`` (Docker Hub does the same; the registry
    then refuses the token).  ``push`` (and ``delete``/``*``) are granted to
    the ``admin`` user only.  A Basic header with an unknown user or a wrong
    password gets ``401``.
``POST /token``
    The OAuth2 form Docker Hub also accepts (``grant_type=password`` with
    ``username``/``password``, or ``grant_type=refresh_token``), same grants.
``GET /_admin/log``
    JSON list of every ``/token`` request seen: method, path, query,
    ``authorization`` (the scheme, lower case, or ``null``), ``user`` (the
    Basic user name, or ``null``), ``scopes`` and the response ``status``.
``POST /_admin/reset``
    Clears the log and switches rate limiting off.
``POST /_admin/ratelimit?on=1|0[&user=NAME]``
    While on, ``/token`` answers ``429`` with
    ``{"errors":[{"code":"TOOMANYREQUESTS",...}]}`` and ``Retry-After: 60``;
    with ``user=``, only to that Basic user's requests (an account whose pull
    limit is spent), the others still get tokens.

``users`` maps a user name to a password, or to
``{"password": P, "private": [REPO, ...]}`` to limit which ``private/``
repositories that user may pull (default: all of them).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import sys
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import endpoints, reactor
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.web import resource, server
from twisted.web.server import Request

__all__ = ["TokenServer", "TokenServerResource", "parse_scope", "main"]

PRIVATE_PREFIX = "private/"
ADMIN_USER = "admin"


def parse_scope(scope: str) -> Optional[Tuple[str, str, List[str]]]:
    """Split ``TYPE:NAME:ACTION[,ACTION]`` into its parts.

    The name may itself hold a ``:`` (``repository:host:5000/x:pull``), so the
    actions are what follows the last colon.  Returns ``None`` when malformed.
    """
    head, sep, actions = scope.rpartition(":")
    if not sep:
        return None
    rtype, sep, name = head.partition(":")
    if not sep or not rtype or not name:
        return None
    return rtype, name, [a for a in actions.split(",") if a]


class TokenServer:
    """Issues the tokens and keeps the request log (all state lives here)."""

    def __init__(
        self,
        key_pem: bytes,
        cert_pem: bytes,
        issuer: str,
        service: str,
        users: Dict[str, Any],
        expires_in: int = 300,
    ) -> None:
        self.key = serialization.load_pem_private_key(key_pem, password=None)
        cert = x509.load_pem_x509_certificate(cert_pem)
        self.x5c = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
        self.issuer = issuer
        self.service = service
        self.expires_in = expires_in
        self.users: Dict[str, Dict[str, Any]] = {}
        for name, spec in users.items():
            if isinstance(spec, str):
                self.users[name] = {"password": spec, "private": None}
            else:
                self.users[name] = {
                    "password": spec["password"],
                    "private": spec.get("private"),
                }
        self.refresh_tokens: Dict[str, str] = {}
        self.log: List[Dict[str, Any]] = []
        self.ratelimited = False
        self.ratelimited_users: set = set()
        self._lock = threading.Lock()

    # -- decisions ---------------------------------------------------------

    def check_password(self, user: str, password: str) -> bool:
        """True when *user* is configured with *password*."""
        spec = self.users.get(user)
        return spec is not None and spec["password"] == password

    def granted(self, user: Optional[str], rtype: str, name: str, actions: List[str]) -> List[str]:
        """The subset of *actions* that *user* (``None``: anonymous) gets."""
        if rtype != "repository":
            return []
        out = []
        for action in actions:
            if user == ADMIN_USER:
                out.append(action)
            elif action == "pull":
                if not name.startswith(PRIVATE_PREFIX):
                    out.append(action)
                elif user is not None:
                    allowed = self.users[user]["private"]
                    if allowed is None or name in allowed:
                        out.append(action)
        return out

    def issue(
        self, user: Optional[str], scopes: List[str], service: Optional[str]
    ) -> Dict[str, Any]:
        """Build the token response body for *user* and *scopes*."""
        access: List[Dict[str, Any]] = []
        for scope in scopes:
            for one in scope.split(" "):
                parsed = parse_scope(one)
                if parsed is None:
                    continue
                rtype, name, actions = parsed
                access.append(
                    {
                        "type": rtype,
                        "name": name,
                        "actions": self.granted(user, rtype, name, actions),
                    }
                )
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": service or self.service,
            "exp": now + self.expires_in,
            "nbf": now - 5,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        token = jwt.encode(
            claims,
            self.key,
            algorithm="RS256",  # type: ignore[arg-type]
            headers={"x5c": self.x5c, "typ": "JWT"},
        )
        issued = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        return {
            "token": token,
            "access_token": token,
            "expires_in": self.expires_in,
            "issued_at": issued,
        }

    def record(self, entry: Dict[str, Any]) -> None:
        """Append one entry to the request log."""
        with self._lock:
            self.log.append(entry)

    def reset(self) -> None:
        """Clear the log and switch rate limiting off."""
        with self._lock:
            self.log = []
            self.ratelimited = False
            self.ratelimited_users = set()


def _json(request: Request, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(body).encode()


def _qs(request: Request) -> Dict[str, List[str]]:
    args = request.args or {}
    return {k.decode(): [v.decode() for v in vs] for k, vs in args.items()}


class TokenServerResource(resource.Resource):
    """The whole HTTP surface (a leaf: it dispatches on the path itself)."""

    isLeaf = True

    def __init__(self, state: TokenServer) -> None:
        super().__init__()
        self.state = state

    def render(self, request: Request) -> bytes:
        path = (request.path or b"/").decode()
        method = (request.method or b"GET").decode()
        if path.startswith("/_admin/"):
            return self._admin(request, method, path)
        if path.rstrip("/") == "/token" and method in ("GET", "POST"):
            return self._token(request, method, path)
        return _json(request, 404, {"details": "not found"})

    # -- admin -------------------------------------------------------------

    def _admin(self, request: Request, method: str, path: str) -> bytes:
        if path == "/_admin/log" and method == "GET":
            with self.state._lock:
                return _json(request, 200, list(self.state.log))
        if path == "/_admin/reset" and method == "POST":
            self.state.reset()
            return _json(request, 200, {"ok": True})
        if path == "/_admin/ratelimit" and method == "POST":
            on = _qs(request).get("on", ["1"])[0] not in ("0", "false", "off", "")
            user = _qs(request).get("user", [None])[0]
            if user is None:
                self.state.ratelimited = on
            elif on:
                self.state.ratelimited_users.add(user)
            else:
                self.state.ratelimited_users.discard(user)
            return _json(request, 200, {"ratelimit": self.state.ratelimited})
        return _json(request, 404, {"details": "no such admin endpoint"})

    # -- tokens ------------------------------------------------------------

    def _token(self, request: Request, method: str, path: str) -> bytes:
        query = _qs(request)
        form: Dict[str, List[str]] = {}
        if method == "POST":
            # request.args already merges a urlencoded body into the query.
            form = query
        raw_header = request.getHeader(b"authorization")
        header = raw_header.decode("latin-1") if raw_header else None
        agent = request.getHeader(b"user-agent")
        scheme: Optional[str] = None
        basic_user: Optional[str] = None
        basic_password: Optional[str] = None
        if header:
            scheme_raw, _, value = header.partition(" ")
            scheme = scheme_raw.lower()
            if scheme == "basic":
                try:
                    decoded = base64.b64decode(value.strip(), validate=True).decode()
                except (binascii.Error, UnicodeDecodeError):
                    decoded = ""
                basic_user, _, basic_password = decoded.partition(":")
        entry: Dict[str, Any] = {
            "time": time.time(),
            "method": method,
            "path": path,
            "query": query,
            "authorization": scheme,
            "user": basic_user,
            "scopes": query.get("scope", []),
            "user_agent": agent.decode("latin-1") if agent else "",
        }

        def done(status: int, body: Any) -> bytes:
            entry["status"] = status
            self.state.record(entry)
            return _json(request, status, body)

        if self.state.ratelimited or (
            basic_user is not None and basic_user in self.state.ratelimited_users
        ):
            request.setHeader(b"Retry-After", b"60")
            return done(
                429,
                {
                    "errors": [
                        {
                            "code": "TOOMANYREQUESTS",
                            "message": "You have reached your pull rate limit. "
                            "(emulated by the hammal test token server)",
                        }
                    ]
                },
            )

        user: Optional[str] = None
        if scheme == "basic":
            if basic_user is None or not self.state.check_password(
                basic_user, basic_password or ""
            ):
                request.setHeader(b"WWW-Authenticate", b'Basic realm="token"')
                return done(401, {"details": "incorrect username or password"})
            user = basic_user

        scopes = list(query.get("scope", []))
        service: Optional[str] = (query.get("service") or [""])[0] or None
        refresh: Optional[str] = None
        if method == "POST":
            grant = (form.get("grant_type") or [""])[0]
            if grant == "password":
                name = (form.get("username") or [""])[0]
                if not self.state.check_password(name, (form.get("password") or [""])[0]):
                    return done(401, {"details": "incorrect username or password"})
                user = name
                entry["user"] = name
            elif grant == "refresh_token":
                token = (form.get("refresh_token") or [""])[0]
                if token not in self.state.refresh_tokens:
                    return done(401, {"details": "invalid refresh token"})
                user = self.state.refresh_tokens[token]
                entry["user"] = user
            else:
                return done(400, {"details": "unsupported grant_type"})
            # OAuth2 puts several scopes in one space-separated value.
            scopes = [s for value in scopes for s in value.split(" ") if s]
            if (form.get("access_type") or [""])[0] == "offline" and user:
                refresh = uuid.uuid4().hex
                self.state.refresh_tokens[refresh] = user
        body = self.state.issue(user, scopes, service)
        if method == "POST":
            body.pop("token", None)
            body["scope"] = " ".join(scopes)
            if refresh:
                body["refresh_token"] = refresh
        return done(200, body)


def main(argv: Optional[List[str]] = None) -> None:
    """Parse the command line and serve until killed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--key", required=True, help="PEM signing key")
    parser.add_argument("--cert", required=True, help="PEM signing certificate")
    parser.add_argument("--issuer", required=True)
    parser.add_argument("--service", required=True)
    parser.add_argument(
        "--users",
        default="{}",
        help="JSON object user -> password, or @FILE holding it",
    )
    parser.add_argument("--expires-in", type=int, default=300)
    args = parser.parse_args(argv)

    users_text = args.users
    if users_text.startswith("@"):
        with open(users_text[1:]) as f:
            users_text = f.read()
    with open(args.key, "rb") as f:
        key_pem = f.read()
    with open(args.cert, "rb") as f:
        cert_pem = f.read()
    state = TokenServer(
        key_pem,
        cert_pem,
        args.issuer,
        args.service,
        json.loads(users_text),
        args.expires_in,
    )
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    site = server.Site(TokenServerResource(state))
    endpoint = endpoints.TCP4ServerEndpoint(reactor, args.port, interface=args.interface)
    endpoint.listen(site)
    reactor.run()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
