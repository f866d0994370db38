"""
Tests for the status page's data: ring buffers, top repositories, quotas,
and ``/status`` + ``/status.json`` over hammal's resource tree in memory.
"""

from __future__ import annotations

import json
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from hammal.access.rules import AccessRules
from hammal.errors import UpstreamUnavailable
from hammal.pull.upstreams import FailoverClient
from hammal.status.charts import (
    Line,
    _corners,
    bar_chart,
    format_bytes,
    format_count,
    line_chart,
    ratio_chart,
)
from hammal.status.recorder import StatusRecorder
from hammal.status.report import RouteSource, StatusReport, mask_address
from hammal.status.ring import MinuteRing
from hammal.status.top import OTHERS, TopRepositories
from hammal.upstream.auth import Credentials
from hammal.upstream.client import Trace
from hammal.upstream.quota import ANONYMOUS, QuotaBoard, parse_ratelimit
from hammal.web.status import add_status
from tests.fakes import MANIFEST_V2, REGISTRY, FakeUpstream
from tests.test_client import ClientHarness
from tests.test_config import settings
from tests.test_upstreams import FakeMember, FakeResponse
from tests.test_v2 import Mirror, header

ACCEPT = {b"accept": [MANIFEST_V2.encode()]}


class MinuteRingTests(SynchronousTestCase):
    def test_sums_per_minute(self) -> None:
        """Amounts in one minute add up; the series ends with the current minute."""
        ring = MinuteRing(("a", "b"), size=10)
        ring.add(120.0, a=1)
        ring.add(150.0, a=2, b=5)
        ring.add(185.0, a=4)
        series = ring.series(185.0, 3)
        self.assertEqual(series["a"], [0.0, 3.0, 4.0])
        self.assertEqual(series["b"], [0.0, 5.0, 0.0])

    def test_old_laps_read_as_zero(self) -> None:
        """A slot from a previous lap of the ring is not counted again."""
        ring = MinuteRing(("a",), size=5)
        ring.add(0.0, a=7)
        self.assertEqual(ring.totals(4 * 60.0, 5)["a"], 7.0)
        self.assertEqual(ring.totals(5 * 60.0, 5)["a"], 0.0)
        ring.add(5 * 60.0, a=1)  # reuses slot 0
        self.assertEqual(ring.series(5 * 60.0, 5)["a"], [0.0, 0.0, 0.0, 0.0, 1.0])

    def test_fixed_size(self) -> None:
        """Asking for more minutes than the ring holds gives the ring's size."""
        ring = MinuteRing(("a",), size=4)
        self.assertEqual(len(ring.series(10_000.0, 100)["a"]), 4)


class TopRepositoriesTests(SynchronousTestCase):
    def test_orders_by_pulls_and_bytes(self) -> None:
        top = TopRepositories()
        top.add(0, "r", "library/alpine", 1, 100)
        top.add(10, "r", "library/alpine", 1, 100)
        top.add(20, "r", "library/nginx", 1, 5000)
        by_pulls, by_bytes = top.top(30)
        self.assertEqual([u.repository for u in by_pulls], ["library/alpine", "library/nginx"])
        self.assertEqual([u.repository for u in by_bytes], ["library/nginx", "library/alpine"])
        self.assertEqual((by_pulls[0].pulls, by_pulls[0].bytes), (2, 200))

    def test_forgets_after_a_day(self) -> None:
        top = TopRepositories()
        top.add(0, "r", "old", 1, 1)
        top.add(23 * 3600, "r", "new", 1, 1)
        self.assertEqual({u.repository for u in top.top(23 * 3600 + 1)[0]}, {"old", "new"})
        self.assertEqual([u.repository for u in top.top(24 * 3600 + 1)[0]], ["new"])

    def test_bounded(self) -> None:
        """Past a bucket's capacity, new names are counted together."""
        top = TopRepositories(max_per_bucket=3)
        for i in range(10):
            top.add(0, "r", f"repo{i}", 1, 1)
        by_pulls, _ = top.top(1, n=10)
        self.assertEqual(len(by_pulls), 4)
        self.assertEqual(by_pulls[0].repository, OTHERS)
        self.assertEqual(by_pulls[0].pulls, 7)

    def test_ten_at_most(self) -> None:
        top = TopRepositories()
        for i in range(15):
            top.add(0, "r", f"repo{i}", i + 1, i)
        by_pulls, by_bytes = top.top(1)
        self.assertEqual(len(by_pulls), 10)
        self.assertEqual(by_pulls[0].repository, "repo14")
        self.assertEqual(len(by_bytes), 10)


class QuotaTests(SynchronousTestCase):
    def test_parse(self) -> None:
        self.assertEqual(parse_ratelimit("76;w=21600"), (76, 21600.0))
        self.assertEqual(parse_ratelimit(" 100 "), (100, None))
        self.assertIsNone(parse_ratelimit("lots"))
        self.assertIsNone(parse_ratelimit(None))

    def test_board(self) -> None:
        """Registered accounts show unknown until observed; anonymous sorts last."""
        board = QuotaBoard()
        board.register("hub")
        board.register("hub", "team-a")
        self.assertEqual([q.account for q in board.quotas()], ["team-a", ANONYMOUS])
        self.assertIsNone(board.quotas()[1].remaining)
        self.assertTrue(
            board.observe_headers(
                "hub",
                ANONYMOUS,
                [("RateLimit-Limit", "100;w=21600"), ("ratelimit-remaining", "76;w=21600")],
                at=5.0,
            )
        )
        anonymous = board.quotas()[1]
        self.assertEqual(
            (anonymous.remaining, anonymous.limit, anonymous.window), (76, 100, 21600.0)
        )
        self.assertEqual(anonymous.observed_at, 5.0)
        board.rest("hub", "team-a", until=99.0)
        self.assertEqual(board.quotas()[0].resting_until, 99.0)
        self.assertFalse(board.observe_headers("hub", "x", [("ratelimit-limit", "1")], at=1))

    def test_bounded(self) -> None:
        board = QuotaBoard(max_entries=2)
        for i in range(5):
            board.observe("hub", f"a{i}", 1, at=0)
        self.assertEqual(len(board.quotas()), 2)


class _LimitedUpstream(FakeUpstream):
    """Docker Hub's ``ratelimit-*`` headers on every manifest answer."""

    remaining = 42

    def _registry(self, request: Request) -> Any:
        if "/manifests/" in request.path.decode():
            request.setHeader(b"ratelimit-limit", b"100;w=21600")
            request.setHeader(b"ratelimit-remaining", b"%d;w=21600" % self.remaining)
        return super()._registry(request)


class ClientQuotaTests(SynchronousTestCase):
    """The upstream client feeds what upstream says into its quota board."""

    def _pull(self, credentials: Credentials | None) -> QuotaBoard:
        world = _LimitedUpstream()
        world.add_image("library/alpine", "3.20", b"{}")
        harness = ClientHarness(world, credentials=credentials)
        if credentials is not None:
            world.users[credentials.username] = credentials.password
        board = harness.client.quotas = QuotaBoard()
        harness.clock.advance(1000)
        response = self.successResultOf(harness.settle(harness.get("manifests/3.20")))
        self.assertEqual(response.code, 200)
        return board

    def test_anonymous(self) -> None:
        (quota,) = self._pull(None).quotas()
        self.assertEqual((quota.upstream, quota.account), (REGISTRY, ANONYMOUS))
        self.assertEqual((quota.remaining, quota.limit, quota.window), (42, 100, 21600.0))
        self.assertEqual(quota.observed_at, 1000.0)

    def test_account_never_secret(self) -> None:
        """With credentials the account is a hash: neither name nor password shows."""
        (quota,) = self._pull(Credentials("alice", "s3cret-pw")).quotas()
        self.assertTrue(quota.account.startswith("user-"))
        self.assertNotIn("alice", quota.account)
        self.assertNotIn("s3cret", quota.account)
        self.assertEqual(quota.remaining, 42)


class StatusMirror(Mirror):
    """L{Mirror} with the status recorder and ``/status`` wired in."""

    def __init__(
        self,
        cache_dir: str,
        rules: AccessRules | None = None,
        show_clients: bool = False,
        show_repositories: bool = True,
    ) -> None:
        super().__init__(cache_dir=cache_dir)
        self.recorder = StatusRecorder(self.clock)
        self.quotas = QuotaBoard()
        self.quotas.register(REGISTRY)
        self.proxy.client.quotas = self.quotas  # type: ignore[attr-defined]
        self.report = StatusReport(
            self.recorder,
            self.quotas,
            [RouteSource("default", f"https://{REGISTRY}", self.proxy.client)],
            self.blobs,
            cache_max_size=10 * 1024 * 1024,
            show_clients=show_clients,
            show_repositories=show_repositories,
        )
        add_status(self.agent._rootResource, self.report, rules)  # type: ignore[attr-defined]
        self.agent._serverFactory.status = self.recorder  # type: ignore[attr-defined]

    def status(self) -> dict[str, Any]:
        response = self.request(b"GET", "/status.json")
        assert response.code == 200, response.code
        return dict(json.loads(self.body(response)))


class StatusReportTests(SynchronousTestCase):
    """Real requests through the resource tree show up in /status.json."""

    def setUp(self) -> None:
        self.mirror = StatusMirror(self.mktemp())
        self.blob = b"layer" * 1000
        world = self.mirror.world
        self.digest = world.add_blob(self.blob)
        world.add_image("library/alpine", "3.20", b'{"a":1}')
        world.add_image("library/nginx", "1.27", b'{"n":1}')
        self.mirror.clock.advance(3600 * 100)

    def get(self, path: str, headers: dict[bytes, list[bytes]] | None = None) -> Any:
        response = self.mirror.request(b"GET", path, headers)
        self.mirror.body(response)
        return response

    def test_pulls_bytes_and_cache(self) -> None:
        """Pulls, bytes, hits and top repositories follow the requests made."""
        for _ in range(3):
            self.get("/v2/alpine/manifests/3.20", ACCEPT)
        self.get("/v2/nginx/manifests/1.27", ACCEPT)
        first = self.get(f"/v2/nginx/blobs/{self.digest}")
        self.assertEqual(header(first, b"cache-status"), "hammal; fwd=miss")
        self.mirror.clock.advance(61)
        self.get(f"/v2/nginx/blobs/{self.digest}")
        report = self.mirror.status()

        day = report["totals"]["day"]
        self.assertEqual(day["requests"], 6)
        self.assertEqual(day["pulls"], 4)
        self.assertEqual(day["bytes_from_cache"] >= len(self.blob), True)
        self.assertEqual(day["bytes_from_upstream"], len(self.blob))
        hour = report["series"]["hour"]
        self.assertEqual(len(hour["requests"]), 60)
        self.assertEqual(len(report["series"]["day"]["requests"]), 24 * 60)
        self.assertEqual(hour["bytes_from_upstream"][-2], len(self.blob))
        self.assertEqual(hour["bytes_from_cache"][-1], len(self.blob))
        self.assertEqual(sum(hour["requests"]), 6)

        top = report["top_repositories"]
        self.assertEqual(
            [(u["repository"], u["pulls"]) for u in top["by_pulls"]],
            [("library/alpine", 3), ("library/nginx", 1)],
        )
        self.assertEqual(top["by_bytes"][0]["repository"], "library/nginx")
        self.assertEqual(top["by_bytes"][0]["upstream"], REGISTRY)
        self.assertGreaterEqual(top["by_bytes"][0]["bytes"], 2 * len(self.blob))

        cache = report["cache"]
        self.assertEqual(cache["blobs"], 1)
        self.assertEqual(cache["size_bytes"], len(self.blob))
        self.assertEqual(cache["max_size_bytes"], 10 * 1024 * 1024)
        self.assertIsNotNone(cache["day"]["hit_ratio"])
        self.assertGreater(cache["day"]["hit_ratio"], 0)

        (route,) = report["upstreams"]
        (member,) = route["members"]
        self.assertEqual((member["host"], member["state"]), (REGISTRY, "ok"))
        self.assertLess(member["last_success_seconds_ago"], 120)
        self.assertEqual(report["uptime_seconds"], 3600 * 100 + 61)

    def test_status_requests_not_counted(self) -> None:
        """Looking at the page is not traffic."""
        self.mirror.status()
        self.mirror.status()
        self.assertEqual(self.mirror.status()["totals"]["day"]["requests"], 0)

    def test_old_activity_leaves_the_charts(self) -> None:
        self.get("/v2/alpine/manifests/3.20", ACCEPT)
        self.mirror.clock.advance(3601)
        report = self.mirror.status()
        self.assertEqual(report["totals"]["hour"]["requests"], 0)
        self.assertEqual(report["totals"]["day"]["requests"], 1)
        self.mirror.clock.advance(24 * 3600)
        report = self.mirror.status()
        self.assertEqual(report["totals"]["day"]["requests"], 0)
        self.assertEqual(report["top_repositories"]["by_pulls"], [])

    def test_transfers_in_flight(self) -> None:
        """A transfer in flight shows its repository, bytes so far and clients."""
        self.mirror.world.hold_blobs = True
        path = f"http://mirror.test/v2/nginx/blobs/{self.digest}".encode()
        pending = [self.mirror.agent.request(b"GET", path) for _ in range(2)]
        self.mirror.flush()
        responses = [self.successResultOf(d) for d in pending]
        report = self.mirror.status()
        (transfer,) = report["transfers"]
        self.assertEqual(transfer["digest"], self.digest)
        self.assertEqual(transfer["repository"], "library/nginx")
        self.assertEqual(transfer["upstream"], REGISTRY)
        self.assertEqual(transfer["bytes"], len(self.blob) // 2)
        self.assertEqual(transfer["size"], len(self.blob))
        self.assertEqual(transfer["clients"], 2)
        self.assertEqual(transfer["client_addresses"], ["127.0.0.0/24"])
        self.mirror.world.release()
        for response in responses:
            self.assertEqual(self.mirror.body(response), self.blob)
        self.assertEqual(self.mirror.status()["transfers"], [])

    def test_show_clients(self) -> None:
        """--status-show-clients shows whole addresses."""
        mirror = StatusMirror(self.mktemp(), show_clients=True)
        digest = mirror.world.add_blob(self.blob)
        mirror.world.hold_blobs = True
        mirror.agent.request(b"GET", f"http://mirror.test/v2/nginx/blobs/{digest}".encode())
        mirror.flush()
        (transfer,) = mirror.status()["transfers"]
        self.assertEqual(transfer["client_addresses"], ["127.0.0.1"])
        mirror.world.release()
        mirror.flush()

    def test_hidden_repositories(self) -> None:
        """
        Without show_repositories (--auth passthrough's default) no
        repository name appears on the page or in the document: each is a
        keyed digest, the same for one repository, different between two.
        """
        mirror = StatusMirror(self.mktemp(), show_repositories=False)
        world = mirror.world
        digest = world.add_blob(self.blob)
        world.add_image("library/alpine", "3.20", b'{"a":1}')
        world.add_image("team/secret-app", "1.0", b'{"s":1}')
        for path in ["/v2/alpine/manifests/3.20"] * 2 + ["/v2/team/secret-app/manifests/1.0"]:
            mirror.body(mirror.request(b"GET", path, ACCEPT))
        world.hold_blobs = True
        mirror.agent.request(
            b"GET", f"http://mirror.test/v2/team/secret-app/blobs/{digest}".encode()
        )
        mirror.flush()
        report = mirror.status()
        page = mirror.body(mirror.request(b"GET", "/status")).decode()
        for text in (json.dumps(report), page):
            self.assertNotIn("secret-app", text)
            self.assertNotIn("alpine", text)
        top = [u["repository"] for u in report["top_repositories"]["by_pulls"]]
        self.assertEqual(len(top), 2)
        self.assertNotEqual(top[0], top[1])
        (transfer,) = report["transfers"]
        self.assertEqual(transfer["repository"], top[1])
        self.assertTrue(all(name.startswith("hidden:") for name in top))
        world.release()
        mirror.flush()

    def test_quota(self) -> None:
        """The board lists the registered account until upstream reports its quota."""
        (quota,) = self.mirror.status()["quota"]
        self.assertEqual((quota["account"], quota["remaining"]), (ANONYMOUS, None))

    def test_nothing_secret(self) -> None:
        """Neither hammal's upstream password nor tokens appear in the report."""
        self.get("/v2/alpine/manifests/3.20", ACCEPT)
        text = json.dumps(self.mirror.status())
        self.assertNotIn("Bearer", text)
        self.assertNotIn("token", text.lower())
        self.assertNotIn("127.0.0.1", text)


class MaskTests(SynchronousTestCase):
    def test_mask(self) -> None:
        self.assertEqual(mask_address("192.0.2.77"), "192.0.2.0/24")
        self.assertEqual(mask_address("2001:db8:1:2::9"), "2001:db8:1::/48")
        self.assertEqual(mask_address("not an address"), "-")


class StatusPageTests(SynchronousTestCase):
    """``/status`` over the resource tree."""

    def test_page(self) -> None:
        """One self-contained HTML page: charts, tables, no external assets."""
        mirror = StatusMirror(self.mktemp())
        mirror.world.add_image("library/alpine", "3.20", b'{"a":1}')
        mirror.body(mirror.request(b"GET", "/v2/alpine/manifests/3.20", ACCEPT))
        response = mirror.request(b"GET", "/status")
        self.assertEqual(response.code, 200)
        self.assertEqual(header(response, b"content-type"), "text/html; charset=utf-8")
        self.assertIn("default-src 'none'", header(response, b"content-security-policy") or "")
        page = mirror.body(response).decode()
        for chart in (
            "requests-hour",
            "hit-ratio-hour",
            "bytes-hour",
            "requests-day",
            "hit-ratio-day",
            "bytes-day",
            "top-pulls",
            "top-bytes",
        ):
            self.assertIn(f'data-chart="{chart}"', page)
        self.assertIn('data-label="library/alpine" data-value="1"', page)
        self.assertIn("<td>library/alpine</td>", page)
        self.assertNotIn("http://", page.replace('xmlns="http://www.w3.org/2000/svg"', ""))
        self.assertNotIn("<script", page)
        self.assertNotIn("src=", page)

    def test_head_and_other_methods(self) -> None:
        mirror = StatusMirror(self.mktemp())
        head = mirror.request(b"HEAD", "/status.json")
        self.assertEqual(head.code, 200)
        post = mirror.request(b"POST", "/status")
        self.assertEqual(post.code, 405)
        self.assertEqual(header(post, b"allow"), "GET, HEAD")
        self.assertEqual(json.loads(mirror.body(post))["errors"][0]["code"], "UNSUPPORTED")

    def test_address_rules(self) -> None:
        """--allow-ip keeps other addresses away, with an OCI error."""
        refused = StatusMirror(self.mktemp(), rules=AccessRules(allow_ip=["10.0.0.0/8"]))
        for path in ("/status", "/status.json"):
            response = refused.request(b"GET", path)
            self.assertEqual(response.code, 403)
            self.assertEqual(json.loads(refused.body(response))["errors"][0]["code"], "DENIED")
        allowed = StatusMirror(self.mktemp(), rules=AccessRules(allow_ip=["127.0.0.0/8"]))
        self.assertEqual(allowed.request(b"GET", "/status").code, 200)
        denied = StatusMirror(self.mktemp(), rules=AccessRules(deny_ip=["127.0.0.1/32"]))
        self.assertEqual(denied.request(b"GET", "/status.json").code, 403)

    def test_escapes_names(self) -> None:
        """Names from requests are escaped in the page."""
        mirror = StatusMirror(self.mktemp())
        mirror.recorder.repositories.add(mirror.clock.seconds(), "<b>", "x/<script>", 1, 10)
        page = mirror.body(mirror.request(b"GET", "/status")).decode()
        self.assertNotIn("<script>", page)
        self.assertIn("x/&lt;script&gt;", page)


class OptionTests(SynchronousTestCase):
    def test_show_repositories(self) -> None:
        """
        Repository names are shown unless --auth passthrough (tenants' own
        repositories) without --status-show-repositories.
        """
        self.assertTrue(settings().status_repositories_shown)
        passthrough = ["--auth", "passthrough"]
        self.assertFalse(settings(passthrough).status_repositories_shown)
        self.assertTrue(
            settings([*passthrough, "--status-show-repositories"]).status_repositories_shown
        )
        self.assertTrue(
            settings(
                passthrough, environ={"HAMMAL_STATUS_SHOW_REPOSITORIES": "true"}
            ).status_repositories_shown
        )

    def test_show_clients_flag(self) -> None:
        """--status-show-clients, or HAMMAL_STATUS_SHOW_CLIENTS; off by default."""
        self.assertFalse(settings().status_show_clients)
        self.assertTrue(settings(["--status-show-clients"]).status_show_clients)
        self.assertTrue(
            settings(environ={"HAMMAL_STATUS_SHOW_CLIENTS": "true"}).status_show_clients
        )


class UpstreamHealthTests(SynchronousTestCase):
    """Failover state in the report: who rests, for how long, failovers counted."""

    def test_failover_members(self) -> None:
        clock = Clock()
        clock.advance(1000)
        primary = FakeMember("primary.status.test", [UpstreamUnavailable("down")])
        mirror = FakeMember("mirror.status.test", [FakeResponse(200)])
        primary.last_reached = None  # type: ignore[attr-defined]
        mirror.last_reached = 990.0  # type: ignore[attr-defined]
        client = FailoverClient(cast(Any, [primary, mirror]), clock, cooldown=30)
        request = client.request(b"GET", "a", "manifests/1", Headers(), Trace())
        self.successResultOf(Deferred.fromCoroutine(request))
        clock.advance(10)
        report = StatusReport(
            StatusRecorder(clock),
            QuotaBoard(),
            [RouteSource("hub.example.com", "https://user:pw@primary.status.test", client)],
        ).build()
        (route,) = report["upstreams"]
        self.assertEqual(
            (route["route"], route["url"]), ("hub.example.com", "https://primary.status.test")
        )
        first, second = route["members"]
        self.assertEqual(first["state"], "cooling down")
        self.assertEqual(first["cooldown_seconds_left"], 20)
        self.assertEqual(first["failovers"], 1)
        self.assertIsNone(first["last_success_seconds_ago"])
        self.assertEqual((second["state"], second["last_success_seconds_ago"]), ("ok", 20))
        self.assertIsNone(second["cooldown_seconds_left"])
        clock.advance(21)
        report = StatusReport(
            StatusRecorder(clock), QuotaBoard(), [RouteSource("h", "https://x", client)]
        ).build()
        self.assertEqual(report["upstreams"][0]["members"][0]["state"], "unknown")


class ChartTests(SynchronousTestCase):
    def test_line_chart(self) -> None:
        """Flat runs collapse to their ends; sums and point counts are announced."""
        values = [0.0] * 1000 + [3.0, 3.0, 3.0] + [0.0] * 437
        svg = line_chart("c", "<t>", [Line("k", "label", values, "#000")], "−24 h")
        self.assertIn('data-points="1440"', svg)
        self.assertIn('data-series="k" data-sum="9"', svg)
        self.assertIn('<title id="c-title">&lt;t&gt;</title>', svg)
        polyline = svg.split("<polyline", 1)[1].split('points="', 1)[1].split('"', 1)[0]
        self.assertEqual(len(polyline.split()), 6)
        self.assertEqual(_corners([1.0, 2.0, 2.0, 2.0]), [(0, 1.0), (1, 2.0), (3, 2.0)])

    def test_ratio_chart(self) -> None:
        """Minutes without lookups leave gaps; lone minutes are dots."""
        svg = ratio_chart("r", "t", [1, 0, 0, 3, 3, 0], [2, 0, 0, 4, 4, 0], "#000", "−60 min")
        self.assertIn('data-points="6"', svg)
        self.assertIn('data-defined="3" data-ratio="0.7000"', svg)
        self.assertEqual(svg.count("<circle"), 1)
        self.assertEqual(svg.count("<polyline"), 1)
        self.assertIn('data-defined="0"', ratio_chart("e", "t", [0, 0], [0, 0], "#000", "x"))

    def test_bar_chart(self) -> None:
        long_name = "org/" + "x" * 60
        svg = bar_chart("b", "t", [(long_name, 5.0), ("a", 1.0)], "#000")
        self.assertIn(f'data-label="{long_name}" data-value="5"', svg)
        self.assertIn("…" + long_name[-37:], svg)
        self.assertIn('data-rows="2"', svg)
        self.assertIn("nothing yet", bar_chart("e", "t", [], "#000"))

    def test_formats(self) -> None:
        self.assertEqual(format_bytes(1536), "1.5 KiB")
        self.assertEqual(format_bytes(12), "12 B")
        self.assertEqual(format_count(12345), "12.3k")
