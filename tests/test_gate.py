"""
Tests for client access control through the ``/v2/`` resource: basic,
token and passthrough modes, and access rules.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hammal.access import AccessRules, SingleUser, TokenIssuer
from hammal.web.gate import Gate
from tests.fakes import MANIFEST_V2, REALM, REGISTRY
from tests.test_v2 import Mirror, header

ACCEPT = [MANIFEST_V2.encode()]


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def gated(test: SynchronousTestCase, mode: str, **kwargs: Any) -> Mirror:
    clock = Clock()
    users = SingleUser("alice", "wonderland")
    issuer = TokenIssuer(TokenIssuer.generate_key(), clock) if mode == "token" else None
    gate = Gate(mode, clock, None, kwargs.get("rules"), users, issuer, kwargs.get("allowed_users"))
    mirror = Mirror(cache_dir=test.mktemp(), gate=gate)
    mirror.gate_clock = clock  # type: ignore[attr-defined]
    return mirror


class BasicAuthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.mirror = gated(self, "basic")
        self.mirror.world.add_image("library/alpine", "3.20", b"{}")

    def test_challenge(self) -> None:
        response = self.mirror.request(b"GET", "/v2/")
        self.assertEqual(response.code, 401)
        self.assertEqual(header(response, b"www-authenticate"), 'Basic realm="hammal"')
        self.assertEqual(
            json.loads(self.mirror.body(response))["errors"][0]["code"], "UNAUTHORIZED"
        )

    def test_credentials(self) -> None:
        good = {b"authorization": [basic("alice", "wonderland")], b"accept": ACCEPT}
        self.assertEqual(self.mirror.request(b"GET", "/v2/", good).code, 200)
        self.assertEqual(self.mirror.request(b"GET", "/v2/alpine/manifests/3.20", good).code, 200)
        for wrong in (
            basic("alice", "nope"),
            basic("bob", "wonderland"),
            b"Basic !!!",
            b"Bearer x",
        ):
            response = self.mirror.request(
                b"GET", "/v2/alpine/manifests/3.20", {b"authorization": [wrong]}
            )
            self.assertEqual(response.code, 401)
        self.assertEqual(len(self.mirror.world.hits(REGISTRY, "manifests")), 2)  # 401 + 200, once

    def test_client_credentials_never_upstream(self) -> None:
        good = {b"authorization": [basic("alice", "wonderland")], b"accept": ACCEPT}
        self.mirror.request(b"GET", "/v2/alpine/manifests/3.20", good)
        for seen in self.mirror.world.seen:
            self.assertFalse((seen.header("authorization") or "").startswith("Basic"))


class TokenAuthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.mirror = gated(self, "token")
        self.mirror.world.add_image("library/alpine", "3.20", b"{}")

    def login(
        self,
        scope: str = "repository:alpine:pull",
        user: str = "alice",
        password: str = "wonderland",
    ) -> Any:
        return self.mirror.request(
            b"GET",
            f"/v2/auth?service=hammal&scope={scope}",
            {b"authorization": [basic(user, password)]},
        )

    def test_challenge_names_this_host(self) -> None:
        response = self.mirror.request(
            b"GET", "/v2/alpine/manifests/3.20", {b"host": [b"mirror.example.com"]}
        )
        self.assertEqual(response.code, 401)
        self.assertEqual(
            header(response, b"www-authenticate"),
            'Bearer realm="http://mirror.example.com/v2/auth",service="hammal",scope="repository:alpine:pull"',
        )

    def test_login_and_pull(self) -> None:
        response = self.login()
        self.assertEqual(response.code, 200)
        document = json.loads(self.mirror.body(response))
        self.assertEqual(set(document), {"token", "access_token", "expires_in", "issued_at"})
        bearer = {b"authorization": [b"Bearer " + document["token"].encode()], b"accept": ACCEPT}
        self.assertEqual(self.mirror.request(b"GET", "/v2/", bearer).code, 200)
        self.assertEqual(self.mirror.request(b"GET", "/v2/alpine/manifests/3.20", bearer).code, 200)
        other = self.mirror.request(b"GET", "/v2/other/manifests/1", bearer)
        self.assertEqual(other.code, 401)
        self.assertIn('error="insufficient_scope"', header(other, b"www-authenticate") or "")

    def test_bad_login(self) -> None:
        self.assertEqual(self.login(password="nope").code, 401)
        anonymous = self.mirror.request(b"GET", "/v2/auth?scope=repository:alpine:pull")
        self.assertEqual(anonymous.code, 401)

    def test_push_never_granted(self) -> None:
        token = json.loads(self.mirror.body(self.login("repository:alpine:push,pull")))["token"]
        payload = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
        for grant in payload["access"]:
            self.assertEqual(grant["actions"], ["pull"])

    def test_expired_token(self) -> None:
        token = json.loads(self.mirror.body(self.login()))["token"]
        self.mirror.gate_clock.advance(301)  # type: ignore[attr-defined]
        response = self.mirror.request(
            b"GET", "/v2/alpine/manifests/3.20", {b"authorization": [b"Bearer " + token.encode()]}
        )
        self.assertEqual(response.code, 401)
        challenge = header(response, b"www-authenticate") or ""
        self.assertIn('realm="http://mirror.test/v2/auth"', challenge)
        self.assertIn('error="invalid_token"', challenge)

    def test_forged_token(self) -> None:
        response = self.mirror.request(
            b"GET",
            "/v2/alpine/manifests/3.20",
            {b"authorization": [b"Bearer eyJhbGciOiJub25lIn0.e30."]},
        )
        self.assertEqual(response.code, 401)


class PassthroughTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.mirror = gated(self, "passthrough")
        self.mirror.world.users["alice"] = "wonderland"
        self.mirror.world.add_image("private/secret", "1", b'{"private":1}')

    def login(
        self, authorization: bytes | None, scope: str = "repository:private/secret:pull"
    ) -> str:
        headers = {b"authorization": [authorization]} if authorization else {}
        response = self.mirror.request(b"GET", f"/v2/auth?scope={scope}", headers)
        self.assertEqual(response.code, 200)
        return str(json.loads(self.mirror.body(response))["token"])

    def pull(self, token: str) -> Any:
        return self.mirror.request(
            b"GET",
            "/v2/private/secret/manifests/1",
            {b"authorization": [b"Bearer " + token.encode()], b"accept": ACCEPT},
        )

    def test_login_forwards_credentials_to_realm(self) -> None:
        token = self.login(basic("alice", "wonderland"), "repository:alpine:pull")
        self.assertIn("alice", token)
        realm = self.mirror.world.hits(REALM)[-1]
        self.assertIn("scope=repository%3Alibrary%2Falpine%3Apull", realm.path)
        self.assertTrue(realm.header("authorization").startswith("Basic "))

    def test_no_leak_through_cache(self) -> None:
        """Bob cannot read what Alice's pull cached."""
        alice = self.login(basic("alice", "wonderland"))
        first = self.pull(alice)
        self.assertEqual(first.code, 200)
        self.assertEqual(self.mirror.body(first), b'{"private":1}')
        self.assertEqual(header(self.pull(alice), b"cache-status"), "hammal; hit")
        bob = self.login(None)
        refused = self.pull(bob)
        self.assertEqual(refused.code, 401)
        self.assertIn('error="insufficient_scope"', header(refused, b"www-authenticate") or "")
        self.assertNotIn(b'{"private":1}', self.mirror.body(refused))

    def test_needs_a_token(self) -> None:
        response = self.mirror.request(b"GET", "/v2/private/secret/manifests/1")
        self.assertEqual(response.code, 401)
        self.assertIn("/v2/auth", header(response, b"www-authenticate"))


class RulesTests(SynchronousTestCase):
    def test_denied_ip(self) -> None:
        mirror = gated(self, "none", rules=AccessRules(deny_ip=["127.0.0.0/8"]))
        response = mirror.request(b"GET", "/v2/")
        self.assertEqual(response.code, 403)
        self.assertEqual(json.loads(mirror.body(response))["errors"][0]["code"], "DENIED")

    def test_user_agent(self) -> None:
        mirror = gated(self, "none", rules=AccessRules(deny_ua=["^curl/"]))
        self.assertEqual(mirror.request(b"GET", "/v2/", {b"user-agent": [b"curl/8.0"]}).code, 403)
        self.assertEqual(
            mirror.request(b"GET", "/v2/", {b"user-agent": [b"containerd/1.6"]}).code, 200
        )
