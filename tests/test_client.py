"""
Tests for L{hammal.upstream.client}: token auth, retries, redirects and
error mapping against an in-memory upstream world.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request

from hammal.errors import TooManyRequests, UpstreamUnavailable
from hammal.stream import read_body
from hammal.ttlstore import MemoryTtlStore
from hammal.upstream.auth import Credentials, UpstreamAuth
from hammal.upstream.client import Trace, Upstream, UpstreamClient
from hammal.upstream.credentials import CredentialPolicy
from hammal.upstream.retry import RetryPolicy
from hammal.upstream.warmup import UpstreamWarmUp
from tests.fakes import CDN, REALM, REGISTRY, FakeUpstream, stub_for

#: The fake world's realm (auth.test) is another site than registry.test:
#: tests that expect credentials there trust it, as --trusted-realm would.
TRUST_FAKE_REALM = CredentialPolicy(trusted_realms=frozenset({REALM}))


class ClientHarness:
    """An L{UpstreamClient} wired to a L{FakeUpstream} on a L{Clock}."""

    def __init__(
        self,
        world: FakeUpstream | None = None,
        credentials: Credentials | None = None,
        retries: int = 2,
        policy: CredentialPolicy | None = TRUST_FAKE_REALM,
        url: str = f"https://{REGISTRY}",
        mirror_of: str | None = None,
    ) -> None:
        self.world = world or FakeUpstream()
        self.stub = stub_for(self.world)
        self.clock = Clock()
        self.tokens = MemoryTtlStore(self.clock)
        self.client = UpstreamClient(
            Upstream(url, library_prefix=True, credentials=credentials, mirror_of=mirror_of),
            self.stub,  # type: ignore[arg-type]
            self.clock,
            self.tokens,
            RetryPolicy(retries=retries, base=1.0, random=lambda: 0.5),
            read_timeout=10,
            credential_policy=policy,
        )

    def get(
        self,
        path: str,
        name: str = "library/alpine",
        trace: Trace | None = None,
        headers: Headers | None = None,
    ) -> Deferred[Any]:
        return Deferred.fromCoroutine(
            self.client.request(b"GET", name, path, headers or Headers(), trace or Trace())
        )

    def warm_up(self) -> Deferred[Any]:
        return Deferred.fromCoroutine(self.client.warm_up())

    def settle(self, d: Deferred[Any]) -> Any:
        self.stub.flush()
        return d

    def body(self, response: Any) -> bytes:
        d = read_body(response, 1 << 20)
        self.stub.flush()
        return self.successResult(d)

    @staticmethod
    def successResult(d: Deferred[Any]) -> Any:
        results: list[Any] = []
        d.addBoth(results.append)
        assert results, "no result"
        return results[0]


class TokenAuthTests(SynchronousTestCase):
    """Bearer token flow against a Docker-Hub-like upstream."""

    def setUp(self) -> None:
        self.h = ClientHarness()
        self.digest = self.h.world.add_image("library/alpine", "3.20", b'{"schemaVersion":2}')

    def test_challenge_then_token(self) -> None:
        """A 401 challenge makes one token request and the retried request succeeds."""
        trace = Trace()
        response = self.successResultOf(self.h.settle(self.h.get("manifests/3.20", trace=trace)))
        self.assertEqual(response.code, 200)
        self.assertEqual(self.h.body(response), b'{"schemaVersion":2}')
        self.assertEqual(self.h.world.tokens_issued, 1)
        token_request = self.h.world.hits(REALM)[0]
        self.assertIn("scope=repository%3Alibrary%2Falpine%3Apull", token_request.path)
        self.assertIn(f"service={REGISTRY}", token_request.path)
        self.assertIsNone(token_request.header("authorization"))
        self.assertEqual(trace.attempts, 1)

    def test_token_reused(self) -> None:
        """A cached token is sent up front: no second challenge, no second token."""
        self.successResultOf(self.h.settle(self.h.get("manifests/3.20")))
        self.successResultOf(self.h.settle(self.h.get(f"manifests/{self.digest}")))
        self.assertEqual(self.h.world.tokens_issued, 1)
        registry_hits = self.h.world.hits(REGISTRY)
        self.assertEqual(len(registry_hits), 3)  # 401, 200, 200
        self.assertTrue(registry_hits[2].header("authorization").startswith("Bearer tok-1"))

    def test_new_scope_fetches_token_before_request(self) -> None:
        """Once the realm is known, a new repository's token comes first."""
        self.h.world.add_image("bitnami/redis", "7", b"{}")
        self.successResultOf(self.h.settle(self.h.get("manifests/3.20")))
        self.successResultOf(self.h.settle(self.h.get("manifests/7", name="bitnami/redis")))
        redis_hits = self.h.world.hits(REGISTRY, "bitnami/redis")
        self.assertEqual(len(redis_hits), 1)
        self.assertEqual(self.h.world.tokens_issued, 2)

    def test_warm_up_learns_challenge(self) -> None:
        """
        Warmed up (a ``/v2/`` ping at start, as Distribution does), the
        first pull asks the realm for its token at once: no 401 round trip.
        """
        self.assertIsNone(self.successResultOf(self.h.settle(self.h.warm_up())))
        self.assertEqual(len(self.h.world.hits(REGISTRY)), 1)  # the ping
        self.assertEqual(self.h.world.tokens_issued, 0)
        response = self.successResultOf(self.h.settle(self.h.get("manifests/3.20")))
        self.assertEqual(response.code, 200)
        self.assertEqual(self.h.world.tokens_issued, 1)
        pulls = self.h.world.hits(REGISTRY, "library/alpine")
        self.assertEqual(len(pulls), 1)
        self.assertTrue(pulls[0].header("authorization").startswith("Bearer tok-1"))

    def test_warm_up_never_fails(self) -> None:
        """An upstream down at start is only logged: the warm-up ends quietly."""
        self.h.world.faults = [503] * 10
        self.assertIsNone(self.successResultOf(self.h.settle(self.h.warm_up())))
        self.assertIsNone(self.h.client._auth._challenge)

    def test_token_expiry(self) -> None:
        """A token is dropped shortly before its expires_in."""
        self.successResultOf(self.h.settle(self.h.get("manifests/3.20")))
        self.h.clock.advance(269)
        self.successResultOf(self.h.settle(self.h.get("manifests/3.20")))
        self.assertEqual(self.h.world.tokens_issued, 1)
        self.h.clock.advance(2)
        self.successResultOf(self.h.settle(self.h.get("manifests/3.20")))
        self.assertEqual(self.h.world.tokens_issued, 2)

    def test_rejected_token_dropped_and_retried_once(self) -> None:
        """A 401 with a cached token drops it and retries once with a new one."""
        self.successResultOf(self.h.settle(self.h.get("manifests/3.20")))
        self.successResultOf(self.h.tokens.set(self._key(), "revoked", 100))
        response = self.successResultOf(self.h.settle(self.h.get("manifests/3.20")))
        self.assertEqual(response.code, 200)
        self.assertEqual(self.h.world.tokens_issued, 2)

    def _key(self) -> str:
        return self.h.client._auth._key("repository:library/alpine:pull")

    def test_concurrent_requests_share_one_token_request(self) -> None:
        """N concurrent requests needing the same token make one token request."""
        self.successResultOf(self.h.settle(self.h.get("manifests/3.20")))
        self.h.clock.advance(400)  # token expired; realm known
        pending = [self.h.get("manifests/3.20") for _ in range(5)]
        self.h.stub.flush()
        for d in pending:
            self.assertEqual(self.successResultOf(d).code, 200)
        self.assertEqual(self.h.world.tokens_issued, 2)

    def test_credentials_go_only_to_realm(self) -> None:
        """Configured credentials reach the token realm as Basic, never the registry."""
        world = FakeUpstream()
        world.users["ci"] = "s3cret"
        world.add_image("library/alpine", "3.20", b"{}")
        h = ClientHarness(world, credentials=Credentials("ci", "s3cret"))
        response = self.successResultOf(h.settle(h.get("manifests/3.20")))
        self.assertEqual(response.code, 200)
        realm_auth = [s.header("authorization") for s in world.hits(REALM)]
        self.assertEqual(len(realm_auth), 1)
        self.assertTrue(realm_auth[0].startswith("Basic "))
        for seen in world.hits(REGISTRY):
            self.assertFalse((seen.header("authorization") or "").startswith("Basic"))

    def test_default_lifetime_without_expires_in(self) -> None:
        """Without expires_in a token is kept for (a little under) 60 seconds."""
        self.h.world.expires_in = None
        self.successResultOf(self.h.settle(self.h.get("manifests/3.20")))
        self.h.clock.advance(50)
        self.successResultOf(self.h.settle(self.h.get("manifests/3.20")))
        self.assertEqual(self.h.world.tokens_issued, 1)
        self.h.clock.advance(11)
        self.successResultOf(self.h.settle(self.h.get("manifests/3.20")))
        self.assertEqual(self.h.world.tokens_issued, 2)

    def test_rate_limited_token_realm(self) -> None:
        """A 429 from the realm with a long Retry-After ends in TooManyRequests at once."""
        self.h.world.token_status = 429
        self.h.world.retry_after = "3600"
        failure = self.failureResultOf(self.h.settle(self.h.get("manifests/3.20")), TooManyRequests)
        self.assertIn("--upstream-username", failure.value.message)
        self.assertEqual(failure.value.headers["Retry-After"], "3600")
        self.assertEqual(len(self.h.world.hits(REALM)), 1)

    def test_wrong_credentials_fall_back_to_anonymous(self) -> None:
        """Rejected credentials do not take public pulls down: hammal asks anonymously."""
        world = FakeUpstream()
        world.users["ci"] = "right"
        world.add_image("library/alpine", "3.20", b"{}")
        h = ClientHarness(world, credentials=Credentials("ci", "wrong"))
        self.assertEqual(self.successResultOf(h.settle(h.get("manifests/3.20"))).code, 200)
        realm = world.hits(REALM)
        self.assertEqual(len(realm), 2)
        self.assertIsNotNone(realm[0].header("authorization"))
        self.assertIsNone(realm[1].header("authorization"))


class _BasicRegistry(Resource):
    """A registry that challenges for HTTP Basic and records what it gets."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.authorizations: list[str | None] = []

    def render(self, request: Request) -> bytes:
        value = request.getHeader(b"authorization")
        self.authorizations.append(value.decode() if value else None)
        if value is None:
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Basic realm="registry"')
            return b'{"errors":[{"code":"UNAUTHORIZED","message":"auth"}]}'
        return b"{}"


class CredentialDestinationTests(SynchronousTestCase):
    """Upstream credentials go only to the upstream's own site, never in clear."""

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.patch(UpstreamAuth, "log", Logger(observer=cast(ILogObserver, self.events.append)))

    def _world(self) -> FakeUpstream:
        world = FakeUpstream()
        world.users["ci"] = "s3cret"
        world.add_image("library/alpine", "3.20", b"{}")
        world.add_image("library/busybox", "1", b"{}")
        return world

    def _warned(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e["log_level"] == LogLevel.warn]

    def test_foreign_realm_is_asked_anonymously(self) -> None:
        """
        A realm on another site (auth.test for registry.test) gets no
        credentials; one warning says so however many tokens are asked.
        """
        world = self._world()
        h = ClientHarness(world, credentials=Credentials("ci", "s3cret"), policy=CredentialPolicy())
        self.assertEqual(self.successResultOf(h.settle(h.get("manifests/3.20"))).code, 200)
        self.assertEqual(
            self.successResultOf(h.settle(h.get("manifests/1", name="library/busybox"))).code, 200
        )
        realm = world.hits(REALM)
        self.assertEqual(len(realm), 2)
        self.assertEqual([s.header("authorization") for s in realm], [None, None])
        warnings = self._warned()
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("--trusted-realm auth.test", warnings[0])
        self.assertNotIn("s3cret", "".join(warnings))

    def test_trusted_realm_gets_credentials(self) -> None:
        """--trusted-realm auth.test: the realm gets Basic credentials."""
        world = self._world()
        policy = CredentialPolicy(trusted_realms=frozenset({"auth.test"}))
        h = ClientHarness(world, credentials=Credentials("ci", "s3cret"), policy=policy)
        self.assertEqual(self.successResultOf(h.settle(h.get("manifests/3.20"))).code, 200)
        self.assertEqual(
            world.hits(REALM)[0].header("authorization"),
            Credentials("ci", "s3cret").basic().decode(),
        )
        self.assertEqual(self._warned(), [])

    def test_plain_http_realm_gets_no_credentials(self) -> None:
        """Over plain HTTP to a non-loopback realm, credentials stay home unless opted in."""
        world = self._world()
        world.realm_url = f"http://{REALM}/token"
        trusted = frozenset({REALM})
        h = ClientHarness(
            world,
            credentials=Credentials("ci", "s3cret"),
            policy=CredentialPolicy(trusted_realms=trusted),
            url=f"http://{REGISTRY}",
        )
        self.assertEqual(self.successResultOf(h.settle(h.get("manifests/3.20"))).code, 200)
        self.assertIsNone(world.hits(REALM)[0].header("authorization"))
        self.assertIn("--plain-http-credentials", self._warned()[0])

        world = self._world()
        world.realm_url = f"http://{REALM}/token"
        h = ClientHarness(
            world,
            credentials=Credentials("ci", "s3cret"),
            policy=CredentialPolicy(trusted_realms=trusted, plain_http=True),
            url=f"http://{REGISTRY}",
        )
        self.assertEqual(self.successResultOf(h.settle(h.get("manifests/3.20"))).code, 200)
        self.assertIsNotNone(world.hits(REALM)[0].header("authorization"))

    def test_plain_http_realm_behind_https_upstream(self) -> None:
        """An HTTPS upstream's credentials never go to a plain-HTTP realm, even opted in."""
        world = self._world()
        world.realm_url = f"http://{REALM}/token"
        policy = CredentialPolicy(trusted_realms=frozenset({REALM}), plain_http=True)
        h = ClientHarness(world, credentials=Credentials("ci", "s3cret"), policy=policy)
        self.assertEqual(self.successResultOf(h.settle(h.get("manifests/3.20"))).code, 200)
        self.assertIsNone(world.hits(REALM)[0].header("authorization"))

    def test_mirror_never_gets_a_clients_token(self) -> None:
        """
        A passthrough client's token is for the upstream: a mirror gets the
        request anonymously, neither with that token nor with its own
        credentials (it cannot tell whether this client may read).
        """
        world = self._world()
        h = ClientHarness(
            world,
            credentials=Credentials("ci", "s3cret"),
            mirror_of="https://upstream.test",
        )
        client_token = Headers({b"authorization": [b"Bearer client-token-for-upstream"]})
        response = self.successResultOf(h.settle(h.get("manifests/3.20", headers=client_token)))
        self.assertEqual(response.code, 200)
        for seen in world.seen:
            self.assertNotIn("client-token", seen.header("authorization") or "", seen)
        self.assertEqual([s.header("authorization") for s in world.hits(REALM)], [None])
        self.assertIn("-anonymous-", world.hits(REGISTRY)[-1].header("authorization") or "")
        # Without a client token the mirror uses its own credentials.
        self.successResultOf(h.settle(h.get("manifests/1", name="library/busybox")))
        self.assertTrue((world.hits(REALM)[-1].header("authorization") or "").startswith("Basic "))

    def test_upstream_uses_a_clients_token(self) -> None:
        """The upstream itself (not a mirror) gets a passthrough client's token as it is."""
        world = self._world()
        h = ClientHarness(world)
        client_token = Headers({b"authorization": [b"Bearer tok-0-ci-x"]})
        self.successResultOf(h.settle(h.get("manifests/3.20", headers=client_token)))
        self.assertEqual(world.hits(REGISTRY)[0].header("authorization"), "Bearer tok-0-ci-x")
        self.assertEqual(world.hits(REALM), [])

    def test_basic_upstream_over_plain_http(self) -> None:
        """A Basic challenge from a plain-HTTP, non-loopback upstream gets nothing."""
        for url, opted_in, expected in (
            ("http://registry.test", False, [None]),
            ("http://registry.test", True, [None, Credentials("ci", "pw").basic().decode()]),
            ("https://registry.test", False, [None, Credentials("ci", "pw").basic().decode()]),
        ):
            registry = _BasicRegistry()
            h = ClientHarness(
                credentials=Credentials("ci", "pw"),
                policy=CredentialPolicy(plain_http=opted_in),
                url=url,
            )
            h.stub = stub_for(registry)
            h.client._http = h.stub  # type: ignore[assignment]
            self.successResultOf(h.settle(h.get("manifests/3.20")))
            self.assertEqual(registry.authorizations, expected, (url, opted_in))


class RetryTests(SynchronousTestCase):
    """Retries with backoff on the injected clock."""

    def setUp(self) -> None:
        self.h = ClientHarness(retries=2)
        self.h.world.add_image("library/alpine", "3.20", b"{}")

    def test_retries_5xx_then_succeeds(self) -> None:
        """503 then 502 then success: two retries after 0.5s and 1s (jitter fixed at 0.5)."""
        self.h.world.faults = [503, 502]
        trace = Trace()
        d = self.h.settle(self.h.get("manifests/3.20", trace=trace))
        self.assertNoResult(d)
        self.h.clock.advance(0.49)
        self.h.stub.flush()
        self.assertNoResult(d)
        self.h.clock.advance(0.01)
        self.h.stub.flush()
        self.assertNoResult(d)
        self.h.clock.advance(1.0)
        self.h.stub.flush()
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertEqual(trace.attempts, 3)

    def test_gives_up_after_retries(self) -> None:
        """After `retries` retries the last upstream answer is returned."""
        self.h.world.faults = [503, 503, 503, 503]
        d = self.h.settle(self.h.get("manifests/3.20"))
        self.h.clock.advance(10)
        self.h.stub.flush()
        self.h.clock.advance(10)
        self.h.stub.flush()
        self.assertEqual(self.successResultOf(d).code, 503)
        self.assertEqual(self.h.world.faults, [503])

    def test_honours_retry_after(self) -> None:
        """A 429 with Retry-After 3 waits 3 seconds, not the backoff."""
        self.h.world.faults = [429]
        self.h.world.retry_after = "3"
        d = self.h.settle(self.h.get("manifests/3.20"))
        self.h.clock.advance(2.9)
        self.h.stub.flush()
        self.assertNoResult(d)
        self.h.clock.advance(0.1)
        self.h.stub.flush()
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_not_found_is_not_retried(self) -> None:
        """A 404 is an answer, not a fault."""
        d = self.h.settle(self.h.get("manifests/nope"))
        self.assertEqual(self.successResultOf(d).code, 404)
        self.assertEqual(len(self.h.world.hits(REGISTRY, "nope")), 2)  # 401 + 404

    def test_timeout(self) -> None:
        """An upstream that never answers gives UpstreamTimeout after retries."""
        from hammal.errors import UpstreamTimeout

        h = ClientHarness(retries=1)
        never = Deferred()
        h.client._http = _NeverAnswers(never)  # type: ignore[assignment]
        d = h.get("manifests/3.20")
        h.clock.advance(10)
        self.assertNoResult(d)
        h.clock.advance(1)
        h.clock.advance(10)
        failure = self.failureResultOf(d, UpstreamTimeout)
        self.assertIn(REGISTRY, failure.value.message)


class _NeverAnswers:
    def __init__(self, never: Deferred[Any]) -> None:
        self.calls = 0

    def request(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        self.calls += 1
        return Deferred()


class RedirectTests(SynchronousTestCase):
    """Blob redirects to a CDN."""

    def setUp(self) -> None:
        self.h = ClientHarness()
        self.blob = b"layer bytes" * 100
        self.digest = self.h.world.add_blob(self.blob)

    def test_follow_without_authorization(self) -> None:
        """The CDN gets the signed URL intact and no Authorization header."""
        trace = Trace()
        response = self.successResultOf(
            self.h.settle(self.h.get(f"blobs/{self.digest}", trace=trace))
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(self.h.body(response), self.blob)
        cdn = self.h.world.hits(CDN)
        self.assertEqual(len(cdn), 1)
        self.assertEqual(cdn[0].path, f"/data/{self.digest}?sig=a%2Bb~c&exp=1")
        self.assertIsNone(cdn[0].header("authorization"))
        self.assertEqual(cdn[0].header("accept-encoding"), "identity")
        self.assertEqual(trace.redirects, 1)

    def test_pass_returns_redirect(self) -> None:
        """With follow_redirects off, the 307 comes back as it is."""
        d = Deferred.fromCoroutine(
            self.h.client.request(
                b"GET", "library/alpine", f"blobs/{self.digest}", Headers(), Trace(), False
            )
        )
        response = self.successResultOf(self.h.settle(d))
        self.assertEqual(response.code, 307)
        self.assertEqual(self.h.world.hits(CDN), [])

    def test_unreachable_upstream(self) -> None:
        """A connection failure becomes UpstreamUnavailable naming the upstream."""
        h = ClientHarness(retries=0)
        h.client._http = _Refuses()  # type: ignore[assignment]
        failure = self.failureResultOf(h.get("manifests/x"), UpstreamUnavailable)
        self.assertIn(REGISTRY, failure.value.message)


class _Refuses:
    def request(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        from twisted.internet.defer import fail
        from twisted.internet.error import ConnectionRefusedError

        return fail(ConnectionRefusedError())


class WarmUpServiceTests(SynchronousTestCase):
    """L{UpstreamWarmUp} pings every upstream once when hammal starts."""

    def test_pings_each_upstream_on_start(self) -> None:
        first, second = ClientHarness(), ClientHarness()
        service = UpstreamWarmUp([first.client, second.client])
        self.assertEqual(first.world.hits(REGISTRY), [])
        service.startService()
        first.stub.flush()
        second.stub.flush()
        for h in (first, second):
            self.assertEqual([seen.path for seen in h.world.hits(REGISTRY)], ["/v2/"])
            self.assertIsNotNone(h.client._auth._challenge)
        service.stopService()

    def test_stop_cancels_a_ping_in_flight(self) -> None:
        ended: list[object] = []

        class Hangs:
            async def warm_up(self) -> None:
                try:
                    await Deferred()
                except BaseException as reason:
                    ended.append(reason)
                    raise

        service = UpstreamWarmUp([Hangs()])
        service.startService()
        service.stopService()
        self.assertEqual(len(ended), 1)
