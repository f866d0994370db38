"""
Tests for L{hammal.pull.upstreams}: choosing the upstream of a request, and
failing over between an upstream and its mirrors; plus the options that
configure them.
"""

from __future__ import annotations

import json
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from hammal.errors import Denied, NotFound, UpstreamUnavailable
from hammal.pull.service import PullService
from hammal.pull.upstreams import FailoverClient, UpstreamSelector
from hammal.stream import BodyTooLarge
from hammal.tap import Options
from hammal.upstream.client import Trace, Upstream
from tests.test_v2 import Mirror


class FakeProxy:
    def __init__(self, label: str) -> None:
        self.label = label


def proxies(*labels: str) -> dict[str, PullService]:
    return {label: cast(PullService, FakeProxy(label)) for label in labels}


class SelectorTests(SynchronousTestCase):
    def setUp(self) -> None:
        p = proxies("hub", "quay", "ghcr", "adhoc")
        self.p = p
        self.built: list[str] = []

        def adhoc(host: str) -> PullService:
            self.built.append(host)
            return p["adhoc"]

        self.selector = UpstreamSelector(
            p["hub"],
            {"quay.example.com": p["quay"], "ghcr.example.com": p["ghcr"]},
            [
                ("https://registry-1.docker.io", p["hub"]),
                ("https://quay.io", p["quay"]),
                ("https://ghcr.io", p["ghcr"]),
            ],
            frozenset({"mirror.gcr.io"}),
            adhoc,
        )

    def pick(
        self,
        host: str | None = None,
        ns: str | None = None,
        upstream: str | None = None,
        name: str = "a/b",
    ) -> tuple[str, str]:
        selection = self.selector.select(host, ns, upstream, name)
        return cast(FakeProxy, selection.proxy).label, selection.name

    def test_host_header(self) -> None:
        self.assertEqual(self.pick("quay.example.com"), ("quay", "a/b"))
        self.assertEqual(self.pick("QUAY.example.com:443"), ("quay", "a/b"))
        self.assertEqual(self.pick("other.example.com"), ("hub", "a/b"))

    def test_ns(self) -> None:
        """containerd's ?ns= picks a configured registry; docker.io means the Hub."""
        self.assertEqual(self.pick("quay.example.com", ns="docker.io"), ("hub", "a/b"))
        self.assertEqual(self.pick(ns="ghcr.io"), ("ghcr", "a/b"))
        self.assertRaises(Denied, self.pick, ns="evil.example.com")
        self.assertRaises(Denied, self.pick, ns="127.0.0.1:6379")

    def test_path_prefix(self) -> None:
        self.assertEqual(self.pick(name="ghcr.io/owner/repo"), ("ghcr", "owner/repo"))
        self.assertEqual(self.pick(name="quay.io/x"), ("quay", "x"))
        self.assertEqual(self.pick(name="unknown.io/x"), ("hub", "unknown.io/x"))

    def test_upstream_parameter_allowlist(self) -> None:
        """?upstream= works only for listed hosts; nothing else is ever contacted."""
        self.assertEqual(self.pick(upstream="mirror.gcr.io"), ("adhoc", "a/b"))
        self.assertEqual(self.built, ["mirror.gcr.io"])
        for host in ("evil.example.com", "127.0.0.1", "169.254.169.254", "localhost", "10.0.0.1"):
            self.assertRaises(Denied, self.pick, upstream=host)
        self.assertEqual(self.built, ["mirror.gcr.io"])

    def test_unknown_host_without_default(self) -> None:
        p = proxies("quay")
        selector = UpstreamSelector(
            None, {"quay.example.com": p["quay"]}, [("https://quay.io", p["quay"])]
        )
        error = self.assertRaises(NotFound, selector.select, "other.example.com", None, None, "a")
        self.assertEqual(error.detail, {"hosts": ["quay.example.com"]})
        self.assertFalse(selector.base_allowed("other.example.com"))
        self.assertTrue(selector.base_allowed("quay.example.com"))


class SelectionThroughResourceTests(SynchronousTestCase):
    def test_ns_refused_with_json(self) -> None:
        mirror = Mirror()
        response = mirror.request(b"GET", "/v2/alpine/manifests/1?ns=evil.example.com")
        self.assertEqual(response.code, 403)
        self.assertEqual(json.loads(mirror.body(response))["errors"][0]["code"], "DENIED")
        self.assertEqual(mirror.world.seen, [])

    def test_upstream_param_refused(self) -> None:
        mirror = Mirror()
        response = mirror.request(b"GET", "/v2/?upstream=169.254.169.254")
        self.assertEqual(response.code, 403)
        self.assertEqual(mirror.world.seen, [])


class FakeMember:
    def __init__(self, host: str, answers: list[Any]) -> None:
        self.upstream = Upstream(f"https://{host}")
        self.read_timeout = 1.0
        self.answers = answers
        self.calls = 0

    async def request(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def fetch_document(self, response: Any, limit: int) -> bytes:
        return b""

    async def discard(self, response: Any) -> None:
        pass


class _PageMember(FakeMember):
    """A member whose error bodies are too large to read as a document."""

    discarded = 0

    async def fetch_document(self, response: Any, limit: int) -> bytes:
        raise BodyTooLarge(f"upstream response exceeds {limit} bytes")

    async def discard(self, response: Any) -> None:
        self.discarded += 1


class FakeResponse:
    def __init__(self, code: int) -> None:
        self.code = code


class FailoverTests(SynchronousTestCase):
    def request(self, client: FailoverClient) -> Deferred[Any]:
        return Deferred.fromCoroutine(
            client.request(b"GET", "a", "manifests/1", Headers(), Trace())
        )

    def test_next_mirror_on_failure_then_cooldown(self) -> None:
        clock = Clock()
        primary = FakeMember("primary", [UpstreamUnavailable("down"), FakeResponse(200)])
        mirror = FakeMember("mirror", [FakeResponse(200), FakeResponse(200)])
        client = FailoverClient(cast(Any, [primary, mirror]), clock, cooldown=30)
        self.assertEqual(self.successResultOf(self.request(client)).code, 200)
        self.assertEqual((primary.calls, mirror.calls), (1, 1))
        clock.advance(10)
        self.successResultOf(self.request(client))
        self.assertEqual((primary.calls, mirror.calls), (1, 2), "primary is cooling down")
        clock.advance(21)
        self.successResultOf(self.request(client))
        self.assertEqual(primary.calls, 2, "primary is tried again after the cool-down")

    def test_5xx_fails_over(self) -> None:
        primary = FakeMember("primary", [FakeResponse(503)])
        mirror = FakeMember("mirror", [FakeResponse(200)])
        client = FailoverClient(cast(Any, [primary, mirror]), Clock())
        self.assertEqual(self.successResultOf(self.request(client)).code, 200)

    def test_5xx_with_an_unreadable_body_fails_over(self) -> None:
        """
        A 5xx whose error page is too large (or stalls) is dropped, not
        read as a document: the next mirror answers.
        """
        primary = _PageMember("primary", [FakeResponse(503)])
        mirror = FakeMember("mirror", [FakeResponse(200)])
        client = FailoverClient(cast(Any, [primary, mirror]), Clock())
        self.assertEqual(self.successResultOf(self.request(client)).code, 200)
        self.assertEqual(primary.discarded, 1)

    def test_all_down(self) -> None:
        members = [FakeMember(h, [UpstreamUnavailable(f"{h} down")]) for h in ("a", "b")]
        client = FailoverClient(cast(Any, members), Clock())
        failure = self.failureResultOf(self.request(client), UpstreamUnavailable)
        self.assertIn("b down", failure.value.message)


class RouteOptionsTests(SynchronousTestCase):
    def parse(self, argv: list[str], environ: dict[str, str] | None = None) -> Any:
        options = Options(environ=environ or {})
        options.parseOptions(argv)
        return options.settings

    def test_routes(self) -> None:
        settings = self.parse(
            [
                "--route",
                "quay.example.com=https://quay.io",
                "--route",
                "Hub.example.com=https://registry-1.docker.io",
            ]
        )
        self.assertEqual(
            settings.routes,
            (
                ("quay.example.com", "https://quay.io"),
                ("hub.example.com", "https://registry-1.docker.io"),
            ),
        )
        self.assertIsNone(settings.upstream, "with routes and no --upstream there is no fallback")
        self.assertTrue(settings.library_prefix_for("https://registry-1.docker.io"))
        self.assertFalse(settings.library_prefix_for("https://quay.io"))

    def test_routes_from_environment_replaced_by_command_line(self) -> None:
        environ = {"HAMMAL_ROUTE": "a.example.com=https://quay.io b.example.com=https://ghcr.io"}
        self.assertEqual(len(self.parse([], environ).routes), 2)
        self.assertEqual(
            self.parse(["--route", "c.example.com=https://gcr.io"], environ).routes,
            (("c.example.com", "https://gcr.io"),),
        )

    def test_route_credentials(self) -> None:
        secret = self.mktemp()
        with open(secret, "w") as f:
            f.write("s3cret\n")
        settings = self.parse(
            [
                "--route",
                "q.example.com=https://quay.io",
                "--route-credentials",
                f"q.example.com=robot:{secret}",
            ]
        )
        ((host, credentials),) = settings.route_credentials
        self.assertEqual(
            (host, credentials.username, credentials.password), ("q.example.com", "robot", "s3cret")
        )
        self.assertNotIn("s3cret", repr(settings))

    def test_bad_values(self) -> None:
        for argv in (
            ["--route", "no-equals"],
            ["--route", "a.example.com=ftp://quay.io"],
            ["--route", "a.example.com=https://quay.io/path"],
            ["--route-credentials", "a.example.com=u:/nonexistent"],
            ["--mirror", "nohost.example.com=https://m.example.com"],
        ):
            self.assertRaises(UsageError, self.parse, argv)

    def test_mirrors(self) -> None:
        settings = self.parse(
            [
                "--mirror",
                "https://m1.example.com",
                "--route",
                "q.example.com=https://quay.io",
                "--mirror",
                "q.example.com=https://m2.example.com",
            ]
        )
        self.assertEqual(
            settings.mirrors,
            ((None, "https://m1.example.com"), ("q.example.com", "https://m2.example.com")),
        )

    def test_mirror_credentials(self) -> None:
        """Each mirror's own credentials, keyed by its host[:port]; never shown."""
        secret = self.mktemp()
        with open(secret, "w") as f:
            f.write("mirror-pw\n")
        settings = self.parse(
            [
                "--mirror",
                "https://M1.example.com:8443",
                "--mirror-credentials",
                f"m1.example.com:8443=robot:{secret}",
            ]
        )
        ((host, credentials),) = settings.mirror_credentials
        self.assertEqual(
            (host, credentials.username, credentials.password),
            ("m1.example.com:8443", "robot", "mirror-pw"),
        )
        self.assertNotIn("mirror-pw", repr(settings))
        for argv in (
            ["--mirror-credentials", f"m1.example.com=robot:{secret}"],
            [
                "--mirror",
                "https://m1.example.com:8443",
                "--mirror-credentials",
                f"m1.example.com=robot:{secret}",
            ],
            ["--mirror", "https://m1.example.com", "--mirror-credentials", "m1.example.com=robot"],
        ):
            self.assertRaises(UsageError, self.parse, argv)

    def test_trusted_realms(self) -> None:
        settings = self.parse(["--trusted-realm", "Auth.Example.com.", "--trusted-realm", "[::1]"])
        self.assertEqual(settings.trusted_realms, frozenset({"auth.example.com", "::1"}))
        self.assertEqual(
            self.parse([], {"HAMMAL_TRUSTED_REALM": "a.example.com b.example.com"}).trusted_realms,
            frozenset({"a.example.com", "b.example.com"}),
        )
        self.assertEqual(self.parse([]).trusted_realms, frozenset())
        for bad in ("https://auth.example.com", "auth.example.com:443", "a/b"):
            self.assertRaises(UsageError, self.parse, ["--trusted-realm", bad])

    def test_plain_http_credentials_flag(self) -> None:
        self.assertFalse(self.parse([]).plain_http_credentials)
        self.assertTrue(self.parse(["--plain-http-credentials"]).plain_http_credentials)
        self.assertTrue(
            self.parse([], {"HAMMAL_PLAIN_HTTP_CREDENTIALS": "1"}).plain_http_credentials
        )


class MirrorOfAMirrorTests(SynchronousTestCase):
    """
    C{REGISTRY=URL}: an upstream that stands for another registry (a Docker
    Hub cache such as mirror.gcr.io) is chosen by that registry's names.
    """

    def parse(self, argv: list[str], environ: dict[str, str] | None = None) -> Any:
        options = Options(environ=environ or {})
        options.parseOptions(argv)
        return options.settings

    def test_upstream_stands_for_docker_hub(self) -> None:
        settings = self.parse(["--upstream", "docker.io=https://mirror.gcr.io"])
        self.assertEqual(settings.upstream, "https://mirror.gcr.io")
        self.assertEqual(settings.registry_for("https://mirror.gcr.io"), "docker.io")
        self.assertTrue(settings.library_prefix, "docker.io's library/ rule applies")
        self.assertTrue(settings.library_prefix_for("https://mirror.gcr.io"))
        plain = self.parse(["--upstream", "https://mirror.gcr.io"])
        self.assertFalse(plain.library_prefix)
        self.assertIsNone(plain.registry_for("https://mirror.gcr.io"))

    def test_upstream_from_environment(self) -> None:
        settings = self.parse([], {"HAMMAL_UPSTREAM": "docker.io=http://127.0.0.1:5001"})
        self.assertEqual(settings.upstream, "http://127.0.0.1:5001")
        self.assertEqual(settings.stands_for, (("http://127.0.0.1:5001", "docker.io"),))

    def test_no_library_prefix_still_wins(self) -> None:
        settings = self.parse(
            ["--upstream", "docker.io=https://mirror.gcr.io", "--no-library-prefix"]
        )
        self.assertFalse(settings.library_prefix_for("https://mirror.gcr.io"))

    def test_route_stands_for(self) -> None:
        settings = self.parse(
            [
                "--route",
                "hub.example.com=docker.io=https://hub-cache.corp",
                "--route",
                "q.example.com=https://quay.io",
            ]
        )
        self.assertEqual(
            settings.routes,
            (("hub.example.com", "https://hub-cache.corp"), ("q.example.com", "https://quay.io")),
        )
        self.assertTrue(settings.library_prefix_for("https://hub-cache.corp"))
        self.assertFalse(settings.library_prefix_for("https://quay.io"))

    def test_mirror_by_registry(self) -> None:
        """C{--mirror docker.io=URL} backs whichever upstream serves docker.io."""
        settings = self.parse(
            [
                "--route",
                "q.example.com=https://quay.io",
                "--route",
                "hub.example.com=https://registry-1.docker.io",
                "--mirror",
                "docker.io=https://mirror.gcr.io",
                "--mirror",
                "quay.io=https://quay-cache.corp",
            ]
        )
        self.assertEqual(
            settings.mirrors,
            (
                ("hub.example.com", "https://mirror.gcr.io"),
                ("q.example.com", "https://quay-cache.corp"),
            ),
        )
        default = self.parse(["--mirror", "docker.io=https://mirror.gcr.io"])
        self.assertEqual(default.mirrors, ((None, "https://mirror.gcr.io"),))

    def test_bad_values(self) -> None:
        for argv in (
            ["--upstream", "docker.io=ftp://mirror.gcr.io"],
            ["--upstream", "Bad Name=https://mirror.gcr.io"],
            ["--upstream", "docker.io=https://mirror.gcr.io/v2"],
            ["--route", "a.example.com=docker.io="],
            ["--mirror", "ghcr.io=https://m.example.com"],
        ):
            self.assertRaises(UsageError, self.parse, argv)

    def test_selector_ns_and_prefix(self) -> None:
        """ns=docker.io and docker.io/ prefixes reach the upstream standing for the Hub."""
        p = proxies("cache", "quay")
        selector = UpstreamSelector(
            None,
            {"q.example.com": p["quay"]},
            [("https://mirror.gcr.io", p["cache"]), ("https://quay.io", p["quay"])],
            stands_for={"https://mirror.gcr.io": "docker.io"},
        )

        def pick(ns: str | None = None, name: str = "library/alpine") -> tuple[str, str]:
            selection = selector.select("q.example.com", ns, None, name)
            return cast(FakeProxy, selection.proxy).label, selection.name

        for hub in ("docker.io", "registry-1.docker.io", "index.docker.io", "mirror.gcr.io"):
            self.assertEqual(pick(ns=hub), ("cache", "library/alpine"), hub)
        self.assertEqual(pick(name="docker.io/library/alpine"), ("cache", "library/alpine"))
        self.assertEqual(pick(name="index.docker.io/library/alpine"), ("cache", "library/alpine"))
        self.assertEqual(pick(ns="quay.io", name="a/b"), ("quay", "a/b"))
        without = UpstreamSelector(None, {}, [("https://mirror.gcr.io", p["cache"])])
        self.assertRaises(Denied, without.select, None, "docker.io", None, "library/alpine")
