"""
Tests for tenant isolation in C{--auth passthrough}: what a client may read
from the shared cache, how long upstream's word holds, how refusals are
worded, where logins go, and C{--allow-users}.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyRequest

from hammal.access.passthrough import (
    ConfirmationKey,
    Confirmations,
    claimed_expiry,
    fingerprint,
)
from hammal.pull.service import PullService
from hammal.ttlstore import MemoryTtlStore
from hammal.upstream.client import Upstream, UpstreamClient
from hammal.upstream.retry import RetryPolicy
from hammal.web.gate import Gate, printable
from tests.fakes import MANIFEST_V2, REALM, REGISTRY, FakeUpstream, stub_for
from tests.test_gate import basic, gated
from tests.test_v2 import Mirror, header

ACCEPT = [MANIFEST_V2.encode()]


def jwt_with(claims: dict[str, Any]) -> bytes:
    def part(document: dict[str, Any]) -> bytes:
        return base64.urlsafe_b64encode(json.dumps(document).encode()).rstrip(b"=")

    return b"Bearer " + part({"alg": "RS256"}) + b"." + part(claims) + b".c2ln"


class _Tenants:
    """Alice owns private/secret; anyone may read alpine."""

    mirror: Mirror

    def setUp(self) -> None:
        self.mirror = gated(self, "passthrough")  # type: ignore[arg-type]
        world = self.mirror.world
        world.users["alice"] = "wonderland"
        world.users["bob"] = "builder"
        world.grants["private/secret"] = {"alice"}
        self.secret_layer = world.add_blob(b"alice's layer" * 100, "private/secret")
        self.public_layer = world.add_blob(b"a public layer" * 100, "library/alpine")
        self.secret_manifest = world.add_image("private/secret", "1", b'{"private":1}')
        world.add_image("library/alpine", "3.20", b'{"public":1}')

    def login(
        self,
        authorization: bytes | None,
        scope: str = "repository:private/secret:pull",
        query: str = "",
    ) -> str:
        headers = {b"authorization": [authorization]} if authorization else {}
        response = self.mirror.request(b"GET", f"/v2/auth?scope={scope}{query}", headers)
        assert response.code == 200, response.code
        return str(json.loads(self.mirror.body(response))["token"])

    def get(self, token: str | None, path: str, method: bytes = b"GET") -> Any:
        headers = {b"accept": ACCEPT}
        if token is not None:
            headers[b"authorization"] = [b"Bearer " + token.encode()]
        return self.mirror.request(method, path, headers)

    def heads(self, part: str) -> int:
        return len([s for s in self.mirror.world.hits(REGISTRY, part) if s.method == "HEAD"])

    def advance(self, seconds: float) -> None:
        self.mirror.gate_clock.advance(seconds)  # type: ignore[attr-defined]


class CrossTenantTests(_Tenants, SynchronousTestCase):
    """Nothing cached for one tenant is served to another."""

    def fill_cache(self) -> str:
        alice = self.login(basic("alice", "wonderland"))
        blob = self.get(alice, f"/v2/private/secret/blobs/{self.secret_layer}")
        self.assertEqual(blob.code, 200)
        self.assertEqual(self.mirror.body(blob), b"alice's layer" * 100)
        manifest = self.get(alice, f"/v2/private/secret/manifests/{self.secret_manifest}")
        self.assertEqual(self.mirror.body(manifest), b'{"private":1}')
        return alice

    def test_owner_served_from_cache(self) -> None:
        alice = self.fill_cache()
        again = self.get(alice, f"/v2/private/secret/blobs/{self.secret_layer}")
        self.assertEqual(header(again, b"cache-status"), "hammal; hit")
        self.assertEqual(self.mirror.body(again), b"alice's layer" * 100)

    def test_private_blob_under_a_readable_repository(self) -> None:
        """A token for a public repository does not unlock a cached digest
        named under that repository."""
        self.fill_cache()
        for who in (None, basic("bob", "builder")):
            token = self.login(who, "repository:alpine:pull")
            # Upstream confirms this token may read alpine...
            self.assertEqual(self.get(token, "/v2/alpine/manifests/3.20").code, 200)
            # ...which says nothing about a digest named under it.
            for method in (b"GET", b"HEAD"):
                response = self.get(token, f"/v2/alpine/blobs/{self.secret_layer}", method)
                self.assertEqual(response.code, 404)
                self.assertIsNone(header(response, b"cache-status"))
            body = self.mirror.body(self.get(token, f"/v2/alpine/blobs/{self.secret_layer}"))
            self.assertEqual(json.loads(body)["errors"][0]["code"], "BLOB_UNKNOWN")
            # Its own blob is served.
            self.assertEqual(self.get(token, f"/v2/alpine/blobs/{self.public_layer}").code, 200)

    def test_private_manifest_by_digest_under_a_readable_repository(self) -> None:
        self.fill_cache()
        token = self.login(None, "repository:alpine:pull")
        self.assertEqual(self.get(token, "/v2/alpine/manifests/3.20").code, 200)
        response = self.get(token, f"/v2/alpine/manifests/{self.secret_manifest}")
        self.assertEqual(response.code, 404)
        self.assertNotIn(b"private", self.mirror.body(response))

    def test_private_repository_itself(self) -> None:
        self.fill_cache()
        token = self.login(basic("bob", "builder"), "repository:alpine:pull")
        for path in (
            f"/v2/private/secret/blobs/{self.secret_layer}",
            f"/v2/private/secret/manifests/{self.secret_manifest}",
            "/v2/private/secret/manifests/1",
        ):
            self.assertNotEqual(self.get(token, path).code, 200, path)

    def test_each_object_is_confirmed(self) -> None:
        """A confirmation for one blob does not vouch for another."""
        alice = self.login(basic("alice", "wonderland"))
        other = self.mirror.world.add_blob(b"second" * 50, "private/secret")
        self.get(alice, f"/v2/private/secret/blobs/{self.secret_layer}")
        self.get(alice, f"/v2/private/secret/blobs/{self.secret_layer}")
        self.assertEqual(self.heads(f"/blobs/{self.secret_layer}"), 1)
        self.get(alice, f"/v2/private/secret/blobs/{other}")
        self.assertEqual(self.heads(f"/blobs/{other}"), 1)


class TagListTests(_Tenants, SynchronousTestCase):
    def test_tag_list(self) -> None:
        """Distribution has no HEAD for tag lists (405 once the token is
        checked): the GET goes upstream with the client's token."""
        alice = self.login(basic("alice", "wonderland"))
        original = self.mirror.world._registry

        def no_head(request: Any) -> Any:
            if request.method == b"HEAD" and request.path.endswith(b"/tags/list"):
                if not self.mirror.world._authorised(request):
                    return original(request)
                request.setResponseCode(405)
                return b""
            return original(request)

        self.mirror.world._registry = no_head  # type: ignore[method-assign]
        response = self.get(alice, "/v2/private/secret/tags/list")
        self.assertEqual(response.code, 200)
        seen = [s for s in self.mirror.world.hits(REGISTRY, "/tags/list") if s.method == "GET"]
        self.assertEqual(seen[0].header("authorization"), f"Bearer {alice}")
        anonymous = self.login(None)
        refused = self.get(anonymous, "/v2/private/secret/tags/list")
        self.assertEqual(refused.code, 401)
        self.assertIn('error="insufficient_scope"', header(refused, b"www-authenticate") or "")


class ConfirmationLifetimeTests(_Tenants, SynchronousTestCase):
    def test_at_most_sixty_seconds(self) -> None:
        alice = self.login(basic("alice", "wonderland"))  # expires_in 300
        path = f"/v2/private/secret/blobs/{self.secret_layer}"
        self.get(alice, path)
        self.advance(59)
        self.get(alice, path)
        self.assertEqual(self.heads("/blobs/"), 1)
        self.advance(2)
        self.get(alice, path)
        self.assertEqual(self.heads("/blobs/"), 2)

    def test_no_longer_than_the_token(self) -> None:
        self.mirror.world.expires_in = 20
        alice = self.login(basic("alice", "wonderland"))
        path = f"/v2/private/secret/blobs/{self.secret_layer}"
        self.get(alice, path)
        self.advance(21)
        self.get(alice, path)
        self.assertEqual(self.heads("/blobs/"), 2)

    def test_expired_token_must_log_in_again(self) -> None:
        alice = self.login(basic("alice", "wonderland"))
        path = f"/v2/private/secret/blobs/{self.secret_layer}"
        self.assertEqual(self.get(alice, path).code, 200)
        self.advance(61)
        self.mirror.world.revoked.add(alice)
        response = self.get(alice, path)
        self.assertEqual(response.code, 401)
        challenge = header(response, b"www-authenticate") or ""
        self.assertTrue(
            challenge.startswith('Bearer realm="http://mirror.test/v2/auth"'), challenge
        )
        self.assertIn('error="invalid_token"', challenge)
        body = json.loads(self.mirror.body(response))
        self.assertEqual(body["errors"][0]["code"], "UNAUTHORIZED")

    def test_missing_scope_is_insufficient_scope(self) -> None:
        anonymous = self.login(None)
        response = self.get(anonymous, "/v2/private/secret/manifests/1")
        self.assertEqual(response.code, 401)
        challenge = header(response, b"www-authenticate") or ""
        self.assertIn('scope="repository:private/secret:pull"', challenge)
        self.assertIn('error="insufficient_scope"', challenge)


class ConfirmationsTests(SynchronousTestCase):
    """The record itself: keys, expiry."""

    def test_upstream_is_part_of_the_key(self) -> None:
        clock = Clock()
        confirmations = Confirmations(clock)
        token = b"Bearer abc"
        one = ConfirmationKey(fingerprint(token), "https://a.test", "org/app", "blobs/sha256:1")
        confirmations.confirm(one, token)
        self.assertTrue(confirmations.confirmed(one))
        for other in (
            ConfirmationKey(fingerprint(token), "https://b.test", "org/app", "blobs/sha256:1"),
            ConfirmationKey(fingerprint(token), "https://a.test", "org/other", "blobs/sha256:1"),
            ConfirmationKey(fingerprint(token), "https://a.test", "org/app", "blobs/sha256:2"),
            ConfirmationKey(
                fingerprint(b"Bearer xyz"), "https://a.test", "org/app", "blobs/sha256:1"
            ),
        ):
            self.assertFalse(confirmations.confirmed(other))

    def test_jwt_expiry_shortens(self) -> None:
        clock = Clock()
        clock.advance(1000)
        confirmations = Confirmations(clock)
        token = jwt_with({"exp": 1010})
        key = ConfirmationKey(fingerprint(token), "u", "r", "t")
        confirmations.confirm(key, token)
        clock.advance(9)
        self.assertTrue(confirmations.confirmed(key))
        clock.advance(1)
        self.assertFalse(confirmations.confirmed(key))
        expired = jwt_with({"exp": 900})
        confirmations.confirm(ConfirmationKey(fingerprint(expired), "u", "r", "t"), expired)
        self.assertFalse(
            confirmations.confirmed(ConfirmationKey(fingerprint(expired), "u", "r", "t"))
        )

    def test_claimed_expiry(self) -> None:
        self.assertEqual(claimed_expiry(jwt_with({"exp": 5})), 5.0)
        for value in (b"Bearer opaque", b"Basic eA==", jwt_with({"exp": "soon"}), jwt_with({})):
            self.assertIsNone(claimed_expiry(value))
        self.assertIsNone(claimed_expiry(b"Bearer a.!!!.c"))

    def test_fingerprint_ignores_scheme_spelling(self) -> None:
        self.assertEqual(fingerprint(b"Bearer t"), fingerprint(b"bearer  t"))
        self.assertNotEqual(fingerprint(b"Bearer t"), fingerprint(b"Bearer u"))


class TwoUpstreamsTests(SynchronousTestCase):
    """Access to org/app on one registry does not unlock org/app on another."""

    def test_each_upstream_asked(self) -> None:
        world = FakeUpstream()
        http = stub_for(world)
        clock = Clock()
        gate = Gate("passthrough", clock)

        def proxy(url: str) -> PullService:
            client = UpstreamClient(
                Upstream(url),
                http,  # type: ignore[arg-type]
                clock,
                MemoryTtlStore(clock),
                RetryPolicy(retries=0),
                read_timeout=10,
            )
            return PullService(client, False, "follow", clock)

        world.add_image("org/app", "1", b"{}")
        token = b"Bearer tok-1-alice-x"
        for url, host in (
            ("https://registry.test", REGISTRY),
            ("https://other.test", "other.test"),
        ):
            for _ in range(2):
                d = Deferred.fromCoroutine(
                    gate.confirm_access(
                        DummyRequest([b""]),
                        proxy(url),
                        token,
                        "org/app",
                        "manifests/1",
                        Headers({b"accept": ACCEPT}),
                        "org/app",
                    )
                )
                http.flush()
                self.successResultOf(d)
            self.assertEqual(len([s for s in world.hits(host) if s.method == "HEAD"]), 1, host)


class RealmRouteTests(_Tenants, SynchronousTestCase):
    """The challenge sends the login to the registry being pulled from."""

    def test_ns(self) -> None:
        response = self.get(None, f"/v2/alpine/manifests/3.20?ns={REGISTRY}")
        self.assertEqual(response.code, 401)
        self.assertIn(
            f'realm="http://mirror.test/v2/auth?ns={REGISTRY}"',
            header(response, b"www-authenticate") or "",
        )

    def test_path_prefix(self) -> None:
        response = self.get(None, f"/v2/{REGISTRY}/private/secret/manifests/1")
        challenge = header(response, b"www-authenticate") or ""
        self.assertIn(f'realm="http://mirror.test/v2/auth?ns={REGISTRY}"', challenge)
        self.assertIn(f'scope="repository:{REGISTRY}/private/secret:pull"', challenge)

    def test_no_route(self) -> None:
        response = self.get(None, "/v2/alpine/manifests/3.20")
        self.assertIn(
            'realm="http://mirror.test/v2/auth"', header(response, b"www-authenticate") or ""
        )

    def test_login_through_prefixed_realm(self) -> None:
        """The scope the client asks for names the prefixed repository;
        upstream's realm is asked for the repository it knows."""
        token = self.login(
            basic("alice", "wonderland"),
            f"repository:{REGISTRY}/private/secret:pull",
            f"&ns={REGISTRY}",
        )
        realm = self.mirror.world.hits(REALM)[-1]
        self.assertIn("scope=repository%3Aprivate%2Fsecret%3Apull", realm.path)
        response = self.get(token, f"/v2/{REGISTRY}/private/secret/manifests/1")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.mirror.body(response), b'{"private":1}')

    def test_unknown_ns_refused(self) -> None:
        response = self.mirror.request(b"GET", "/v2/auth?ns=elsewhere.test&scope=repository:x:pull")
        self.assertEqual(response.code, 403)
        self.assertEqual(self.mirror.world.hits(REALM), [])


class AllowUsersTests(_Tenants, SynchronousTestCase):
    """--allow-users in passthrough: the name given at hammal's /v2/auth."""

    def setUp(self) -> None:
        super().setUp()
        self.mirror = gated(self, "passthrough", allowed_users=["alice"])
        self.mirror.world.users.update(alice="wonderland", bob="builder")
        self.mirror.world.add_image("library/alpine", "3.20", b'{"public":1}')

    def test_allowed_user(self) -> None:
        alice = self.login(basic("alice", "wonderland"), "repository:alpine:pull")
        self.assertEqual(self.get(alice, "/v2/alpine/manifests/3.20").code, 200)

    def test_other_user_and_anonymous_refused_at_login(self) -> None:
        for who in (basic("bob", "builder"), None):
            headers = {b"authorization": [who]} if who else {}
            response = self.mirror.request(b"GET", "/v2/auth?scope=repository:alpine:pull", headers)
            self.assertEqual(response.code, 401)
        self.assertEqual(self.mirror.world.hits(REALM), [])

    def test_token_from_elsewhere_refused(self) -> None:
        """A token fetched from upstream's realm directly names no user."""
        response = self.get("tok-7-bob-repository:library/alpine:pull", "/v2/alpine/manifests/3.20")
        self.assertEqual(response.code, 401)
        self.assertIn('error="invalid_token"', header(response, b"www-authenticate") or "")
        self.assertEqual(self.mirror.world.hits(REGISTRY, "/manifests/"), [])


class PrintableTests(SynchronousTestCase):
    def test_escaped(self) -> None:
        self.assertEqual(printable("alice"), "alice")
        self.assertEqual(printable("a\nb\x1b[31m"), "a\\nb\\x1b[31m")
        self.assertEqual(len(printable("x" * 500)), 64)
