"""
Tests for L{hammal.access.tokens}: hammal's pull-only bearer tokens, on a
L{Clock}.
"""

from __future__ import annotations

import base64
import json
import warnings
from typing import Any

import jwt
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hammal.access.tokens import MIN_KEY_BYTES, TokenIssuer, parse_scopes
from hammal.errors import Denied, Unauthorized

KEY = b"k" * 32
NOW = 1_700_000_000.0


def claims_of(token: str) -> dict[str, Any]:
    """A token's claims, unverified (to look at what was issued)."""
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class TokenIssuerTests(SynchronousTestCase):
    """L{TokenIssuer.issue} and L{TokenIssuer.verify}."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.issuer = TokenIssuer(KEY, self.clock)

    def sign(self, claims: dict[str, Any], key: bytes = KEY, algorithm: str = "HS256") -> str:
        return jwt.encode(claims, key, algorithm=algorithm)

    def good_claims(self, **changes: Any) -> dict[str, Any]:
        claims: dict[str, Any] = {
            "iss": "hammal",
            "aud": "hammal",
            "sub": "alice",
            "iat": int(NOW),
            "nbf": int(NOW),
            "exp": int(NOW) + 300,
            "jti": "x",
            "access": [{"type": "repository", "name": "library/alpine", "actions": ["pull"]}],
        }
        claims.update(changes)
        return {key: value for key, value in claims.items() if value is not None}

    def assertUnauthorized(self, token: str, repository: str = "library/alpine") -> str:
        error = self.assertRaises(Unauthorized, self.issuer.verify, token, repository)
        self.assertEqual(error.status, 401)
        if len(token) > 3:
            self.assertNotIn(token, error.message)
        self.assertRaises(Unauthorized, self.issuer.verify_any, token)
        return error.message

    def test_response_shape(self) -> None:
        response = self.issuer.issue("alice", ["repository:library/alpine:pull"])
        self.assertEqual(set(response), {"token", "access_token", "expires_in", "issued_at"})
        self.assertEqual(response["token"], response["access_token"])
        self.assertEqual(response["expires_in"], 300)
        self.assertEqual(response["issued_at"], "2023-11-14T22:13:20Z")

    def test_claims(self) -> None:
        token = self.issuer.issue("alice", ["repository:library/alpine:pull"])["token"]
        claims = claims_of(token)
        self.assertEqual(claims["iss"], "hammal")
        self.assertEqual(claims["aud"], "hammal")
        self.assertEqual(claims["sub"], "alice")
        self.assertEqual(claims["iat"], int(NOW))
        self.assertEqual(claims["nbf"], int(NOW))
        self.assertEqual(claims["exp"], int(NOW) + 300)
        self.assertIsInstance(claims["jti"], str)
        self.assertEqual(
            claims["access"],
            [{"type": "repository", "name": "library/alpine", "actions": ["pull"]}],
        )
        self.assertEqual(jwt.get_unverified_header(token)["alg"], "HS256")

    def test_unique_token_ids(self) -> None:
        first = claims_of(self.issuer.issue("alice", [])["token"])
        second = claims_of(self.issuer.issue("alice", [])["token"])
        self.assertNotEqual(first["jti"], second["jti"])

    def test_service_issuer_and_lifetime(self) -> None:
        issuer = TokenIssuer(KEY, self.clock, lifetime=60, service="mirror.example", issuer="me")
        response = issuer.issue("bob", ["repository:x:pull"])
        claims = claims_of(response["token"])
        self.assertEqual((claims["aud"], claims["iss"]), ("mirror.example", "me"))
        self.assertEqual(claims["exp"] - claims["iat"], 60)
        self.assertEqual(response["expires_in"], 60)
        self.assertEqual(issuer.verify(response["token"], "x"), "bob")

    def test_round_trip(self) -> None:
        token = self.issuer.issue(
            "alice", ["repository:library/alpine:pull", "repository:team/app:pull"]
        )["token"]
        self.assertEqual(self.issuer.verify(token, "library/alpine"), "alice")
        self.assertEqual(self.issuer.verify(token, "team/app"), "alice")
        self.assertEqual(self.issuer.verify_any(token), "alice")

    def test_only_pull_is_granted(self) -> None:
        """
        push, delete and C{*} are dropped; a scope asking for no pull gets
        nothing.
        """
        token = self.issuer.issue(
            "alice",
            [
                "repository:a:pull,push",
                "repository:b:push",
                "repository:c:*",
                "repository:d:delete",
                "repository:e:push,pull,delete,*",
            ],
        )["token"]
        self.assertEqual(
            claims_of(token)["access"],
            [
                {"type": "repository", "name": "a", "actions": ["pull"]},
                {"type": "repository", "name": "e", "actions": ["pull"]},
            ],
        )
        self.assertEqual(self.issuer.verify(token, "a"), "alice")
        self.assertEqual(self.issuer.verify(token, "e"), "alice")
        for name in ["b", "c", "d"]:
            self.assertRaises(Denied, self.issuer.verify, token, name)

    def test_invalid_and_foreign_scopes_dropped(self) -> None:
        token = self.issuer.issue(
            "alice",
            [
                "registry:catalog:*",
                "repository(plugin):a:pull",
                "repository:UPPER:pull",
                "repository:../etc:pull",
                "repository::pull",
                "repository:localhost:5000/x:pull",
                "repository:a",
                "garbage",
                "repository:ok/name:pull",
                "repository:ok/name:pull",
            ],
        )["token"]
        self.assertEqual(
            claims_of(token)["access"],
            [{"type": "repository", "name": "ok/name", "actions": ["pull"]}],
        )

    def test_no_scopes(self) -> None:
        token = self.issuer.issue("alice", [])["token"]
        self.assertEqual(claims_of(token)["access"], [])
        self.assertEqual(self.issuer.verify_any(token), "alice")
        self.assertRaises(Denied, self.issuer.verify, token, "library/alpine")

    def test_other_repository_denied(self) -> None:
        token = self.issuer.issue("alice", ["repository:library/alpine:pull"])["token"]
        error = self.assertRaises(Denied, self.issuer.verify, token, "library/ubuntu")
        self.assertEqual(error.status, 403)
        self.assertIn("library/ubuntu", error.message)
        self.assertNotIn(token, error.message)
        # Exact names only: no prefixes, no library/ rewriting.
        self.assertRaises(Denied, self.issuer.verify, token, "library")
        self.assertRaises(Denied, self.issuer.verify, token, "alpine")
        self.assertRaises(Denied, self.issuer.verify, token, "library/alpine/x")

    def test_expiry_on_clock(self) -> None:
        token = self.issuer.issue("alice", ["repository:library/alpine:pull"])["token"]
        self.clock.advance(299.9)
        self.assertEqual(self.issuer.verify(token, "library/alpine"), "alice")
        self.clock.advance(0.1)
        message = self.assertUnauthorized(token)
        self.assertIn("expired", message)

    def test_times_come_from_the_clock_not_the_wall(self) -> None:
        """
        A token from a clock at 1970 verifies on that clock (pyjwt's own
        wall-clock checks would call it expired), and one from the far
        future is not valid on today's clock.
        """
        past = Clock()
        issuer = TokenIssuer(KEY, past)
        token = issuer.issue("alice", ["repository:a:pull"])["token"]
        self.assertEqual(issuer.verify(token, "a"), "alice")
        future = Clock()
        future.advance(NOW * 2)
        token = TokenIssuer(KEY, future).issue("alice", ["repository:a:pull"])["token"]
        message = self.assertUnauthorized(token, "a")
        self.assertIn("not valid yet", message)

    def test_tampered_signature(self) -> None:
        token = self.issuer.issue("alice", ["repository:library/alpine:pull"])["token"]
        header, payload, signature = token.split(".")
        raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
        raw[0] ^= 1
        tampered = f"{header}.{payload}.{b64url(bytes(raw))}"
        self.assertIn("signature", self.assertUnauthorized(tampered))

    def test_tampered_payload(self) -> None:
        """Granting oneself another repository breaks the signature."""
        token = self.issuer.issue("alice", ["repository:library/alpine:pull"])["token"]
        header, payload, signature = token.split(".")
        claims = claims_of(token)
        claims["access"].append({"type": "repository", "name": "secret", "actions": ["pull"]})
        forged = f"{header}.{b64url(json.dumps(claims).encode())}.{signature}"
        self.assertUnauthorized(forged, "secret")

    def test_other_key(self) -> None:
        token = TokenIssuer(b"o" * 32, self.clock).issue("alice", ["repository:a:pull"])["token"]
        self.assertUnauthorized(token, "a")

    def test_wrong_audience(self) -> None:
        other = TokenIssuer(KEY, self.clock, service="elsewhere")
        token = other.issue("alice", ["repository:library/alpine:pull"])["token"]
        self.assertIn("another service", self.assertUnauthorized(token))
        token = self.sign(self.good_claims(aud=["hammal", "elsewhere"]))
        self.assertUnauthorized(token)

    def test_wrong_issuer(self) -> None:
        other = TokenIssuer(KEY, self.clock, issuer="someone")
        token = other.issue("alice", ["repository:library/alpine:pull"])["token"]
        self.assertIn("another issuer", self.assertUnauthorized(token))

    def test_hand_made_good_token(self) -> None:
        """The checks below fail for the claim they change, not otherwise."""
        self.assertEqual(
            self.issuer.verify(self.sign(self.good_claims()), "library/alpine"), "alice"
        )

    def test_missing_claims(self) -> None:
        for claim in ["iss", "aud", "sub", "iat", "nbf", "exp", "jti"]:
            token = self.sign(self.good_claims(**{claim: None}))
            self.assertUnauthorized(token)

    def test_malformed_claims(self) -> None:
        malformed: list[dict[str, Any]] = [
            {"exp": "tomorrow"},
            {"nbf": "now"},
            {"iat": True},
            {"sub": 7},
        ]
        for changes in malformed:
            self.assertUnauthorized(self.sign(self.good_claims(**changes)))

    def test_malformed_access_is_denied(self) -> None:
        for access in [
            "everything",
            [{"type": "repository", "name": "library/alpine", "actions": "pull"}],
            [{"type": "registry", "name": "library/alpine", "actions": ["pull"]}],
            ["library/alpine"],
        ]:
            token = self.sign(self.good_claims(access=access))
            self.assertRaises(Denied, self.issuer.verify, token, "library/alpine")
            self.assertEqual(self.issuer.verify_any(token), "alice")

    def test_other_algorithms_refused(self) -> None:
        unsigned = jwt.encode(self.good_claims(), "", algorithm="none")
        self.assertIn("algorithm", self.assertUnauthorized(unsigned))
        with warnings.catch_warnings():
            # pyjwt rightly says 32 bytes is short for HS512.
            warnings.simplefilter("ignore")
            hs512 = self.sign(self.good_claims(), algorithm="HS512")
        self.assertUnauthorized(hs512)

    def test_garbage(self) -> None:
        for token in ["", "x", "a.b.c", "...", "Bearer abc", "!!.??.**"]:
            message = self.assertUnauthorized(token)
            self.assertEqual(message, "token is malformed")
        # Well-formed but unsigned.
        self.assertUnauthorized("eyJhbGciOiJIUzI1NiJ9.e30.")

    def test_generate_key(self) -> None:
        key = TokenIssuer.generate_key()
        self.assertIsInstance(key, bytes)
        self.assertEqual(len(key), MIN_KEY_BYTES)
        self.assertNotEqual(key, TokenIssuer.generate_key())
        TokenIssuer(key, self.clock)

    def test_short_key_refused(self) -> None:
        self.assertRaises(ValueError, TokenIssuer, b"k" * 31, self.clock)
        self.assertRaises(ValueError, TokenIssuer, b"", self.clock)

    def test_lifetime_at_least_one_second(self) -> None:
        self.assertRaises(ValueError, TokenIssuer, KEY, self.clock, lifetime=0.5)


class ParseScopesTests(SynchronousTestCase):
    """L{parse_scopes} reads the C{scope} parameters of a token request."""

    def test_one_per_parameter(self) -> None:
        self.assertEqual(
            parse_scopes(["repository:a:pull", "repository:b:pull,push"]),
            ["repository:a:pull", "repository:b:pull,push"],
        )

    def test_space_separated(self) -> None:
        self.assertEqual(
            parse_scopes(["repository:a:pull repository:b:pull", "repository:c:pull"]),
            ["repository:a:pull", "repository:b:pull", "repository:c:pull"],
        )

    def test_blanks_and_duplicates(self) -> None:
        self.assertEqual(
            parse_scopes(["", "  ", " repository:a:pull  repository:a:pull ", "repository:a:pull"]),
            ["repository:a:pull"],
        )

    def test_none(self) -> None:
        self.assertEqual(parse_scopes([]), [])
