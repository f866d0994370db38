"""
hammal's own bearer tokens (C{--auth token}).

Clients that speak the Docker token protocol log in once at hammal's token
endpoint with Basic credentials and then send a short-lived JWT with every
request, so a slow password check (bcrypt) runs once per token, not once per
blob. hammal is a pull-only mirror: a token never grants more than C{pull},
whatever the client asks for.

Tokens are HS256 JWTs signed with a key only hammal holds; every hammal
instance behind one name must share it. All times come from the injected
clock, so expiry is testable and consistent with the rest of hammal.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timezone
from typing import Any, Iterable

import jwt
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from hammal.errors import Denied, NameInvalid, Unauthorized
from hammal.reference import validate_name

#: The shortest signing key accepted, in bytes (RFC 7518 section 3.2).
MIN_KEY_BYTES = 32

_ALGORITHM = "HS256"
_REQUIRED_CLAIMS = ["iss", "aud", "sub", "iat", "nbf", "exp", "jti"]

# pyjwt would check the time claims against the wall clock; hammal checks
# them against its own clock instead (see TokenIssuer._decode).
_DECODE_OPTIONS: Any = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": True,
    "verify_iss": True,
    "strict_aud": True,
    "require": _REQUIRED_CLAIMS,
}

# Client-facing reasons for pyjwt's errors. The errors' own messages are not
# passed on, so nothing of the token can leak into a response or a log.
_REASONS: list[tuple[type[Exception], str]] = [
    (jwt.InvalidSignatureError, "token signature is invalid"),
    (jwt.InvalidAudienceError, "token is for another service"),
    (jwt.InvalidIssuerError, "token is from another issuer"),
    (jwt.MissingRequiredClaimError, "token lacks a required claim"),
    (jwt.InvalidAlgorithmError, "token uses an unexpected algorithm"),
]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_scopes(query_values: list[str]) -> list[str]:
    """
    The scopes in a token request's C{scope} query parameters.

    Docker sends one C{scope=} parameter per scope; other clients put
    several in one, separated by spaces (the OAuth 2 way). Both are
    accepted; duplicates are dropped and the order kept.
    """
    scopes: list[str] = []
    for value in query_values:
        for scope in value.split():
            if scope not in scopes:
                scopes.append(scope)
    return scopes


def _pull_grants(scopes: Iterable[str]) -> list[dict[str, Any]]:
    """
    The C{access} claim for C{scopes}: C{pull} on every valid repository
    whose scope asks for it, and nothing else. Other actions (C{push},
    C{delete}, C{*}), other resource types and invalid names are dropped.
    """
    names: list[str] = []
    for scope in scopes:
        parts = scope.split(":")
        if len(parts) < 3 or parts[0] != "repository":
            continue
        if "pull" not in parts[-1].split(","):
            continue
        name = ":".join(parts[1:-1])
        try:
            validate_name(name)
        except NameInvalid:
            continue
        if name not in names:
            names.append(name)
    return [{"type": "repository", "name": name, "actions": ["pull"]} for name in names]


def _grants_pull(claims: dict[str, Any], repository: str) -> bool:
    access = claims.get("access")
    if not isinstance(access, list):
        return False
    for entry in access:
        if (
            isinstance(entry, dict)
            and entry.get("type") == "repository"
            and entry.get("name") == repository
            and isinstance(entry.get("actions"), list)
            and "pull" in entry["actions"]
        ):
            return True
    return False


class TokenIssuer:
    """
    Issues and verifies hammal's bearer tokens.

    @param key: the HMAC key, at least L{MIN_KEY_BYTES} random bytes (see
        L{generate_key}).
    @param clock: the source of every time in a token and of "now" when one
        is checked.
    @param lifetime: seconds a token stays valid, at least 1.
    @param service: the audience (C{aud}): the C{service} hammal names in
        its C{WWW-Authenticate} challenge.
    @param issuer: the C{iss} claim.
    @raise ValueError: for a short key or a lifetime under one second.
    """

    log = Logger()

    def __init__(
        self,
        key: bytes,
        clock: IReactorTime,
        lifetime: float = 300,
        service: str = "hammal",
        issuer: str = "hammal",
    ) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"the token signing key must be at least {MIN_KEY_BYTES} bytes")
        if lifetime < 1:
            raise ValueError("the token lifetime must be at least one second")
        self._key = key
        self._clock = clock
        self._lifetime = int(lifetime)
        self._service = service
        self._issuer = issuer

    @staticmethod
    def generate_key() -> bytes:
        """A fresh random signing key of L{MIN_KEY_BYTES} bytes."""
        return secrets.token_bytes(MIN_KEY_BYTES)

    def issue(self, username: str, scopes: list[str]) -> dict[str, Any]:
        """
        A token for C{username}, in the token endpoint's JSON shape
        (C{token} and its OAuth 2 alias C{access_token}, C{expires_in},
        C{issued_at}).

        C{username} must already be authenticated: this only signs.
        """
        issued = int(self._clock.seconds())
        expires = issued + self._lifetime
        grants = _pull_grants(scopes)
        claims = {
            "iss": self._issuer,
            "aud": self._service,
            "sub": username,
            "iat": issued,
            "nbf": issued,
            "exp": expires,
            "jti": secrets.token_urlsafe(16),
            "access": grants,
        }
        token = jwt.encode(claims, self._key, algorithm=_ALGORITHM)
        self.log.debug(
            "issued a token to {user!r} for {repositories}",
            user=username,
            repositories=[grant["name"] for grant in grants],
        )
        return {
            "token": token,
            "access_token": token,
            "expires_in": self._lifetime,
            "issued_at": _rfc3339(issued),
        }

    def _decode(self, token: str) -> dict[str, Any]:
        """
        The claims of C{token} if hammal signed it for this service and it
        is valid now on the clock (no leeway).

        @raise Unauthorized: otherwise; the message never quotes the token.
        """
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._key,
                algorithms=[_ALGORITHM],
                audience=self._service,
                issuer=self._issuer,
                options=_DECODE_OPTIONS,
            )
        except jwt.InvalidTokenError as failure:
            reason = next(
                (text for kind, text in _REASONS if isinstance(failure, kind)),
                "token is malformed",
            )
            raise Unauthorized(reason) from None
        now = self._clock.seconds()
        expires, not_before = claims["exp"], claims["nbf"]
        if not (_is_number(expires) and _is_number(not_before) and _is_number(claims["iat"])):
            raise Unauthorized("token is malformed")
        if not isinstance(claims["sub"], str):
            raise Unauthorized("token is malformed")
        if now >= expires:
            raise Unauthorized("token has expired")
        if now < not_before:
            raise Unauthorized("token is not valid yet")
        return claims

    def verify(self, token: str, repository: str) -> str:
        """
        The user a token was issued to, if it is valid and grants C{pull} on
        exactly C{repository}.

        @raise Unauthorized: the token is malformed, forged, expired or for
            another service: the client should get a new one.
        @raise Denied: the token is good but does not cover C{repository}.
        """
        claims = self._decode(token)
        if not _grants_pull(claims, repository):
            raise Denied(f"token does not grant pull on {repository[:255]}")
        username: str = claims["sub"]
        return username

    def verify_any(self, token: str) -> str:
        """
        The user a valid token was issued to, whatever its scope: for the
        C{/v2/} base endpoint, which only asks "are you logged in?".

        @raise Unauthorized: as for L{verify}.
        """
        username: str = self._decode(token)["sub"]
        return username
