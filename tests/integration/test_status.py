"""``/status`` and ``/status.json`` of a hammal that served real skopeo
pulls from the token-auth Distribution upstream, looked at in Debian's
headless Chromium; and their access rules over real TCP.

The browser test keeps its screenshots (wide and phone-sized) and the
rendered DOM under ``_trial_temp/status-artifacts/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import unittest
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List

from tests.integration.browser import Browser, missing_browser
from tests.integration.environment import free_port, port_open, wait_until
from tests.integration.support import IntegrationTestCase
from tests.integration.test_access import fetch, launch_hammal

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"

#: Where the browser test leaves its screenshots, relative to the directory
#: tests run in (trial's ``_trial_temp``).
ARTIFACTS = "status-artifacts"

_PAGE_FACTS = """
const charts = {};
for (const svg of document.querySelectorAll('svg[data-chart]')) {
  const lines = {};
  for (const line of svg.querySelectorAll('polyline[data-series]')) {
    lines[line.dataset.series] = Number(line.dataset.sum);
  }
  const bars = [...svg.querySelectorAll('g[data-label]')].map(g => g.dataset.label);
  const ratio = svg.querySelector('g[data-series="ratio"]');
  if (ratio) {
    lines.ratio = Number(ratio.dataset.ratio);
    lines.ratio_points = Number(ratio.dataset.defined);
  }
  const box = svg.getBoundingClientRect();
  charts[svg.dataset.chart] = {
    points: Number(svg.dataset.points || 0), lines, bars,
    width: box.width, height: box.height,
  };
}
const table = id => [...document.querySelectorAll('#' + id + ' tbody tr')]
  .map(tr => [...tr.cells].map(td => td.textContent.trim()));
return {
  title: document.title,
  charts,
  topByPulls: table('top-by-pulls'),
  topByBytes: table('top-by-bytes'),
  upstreams: table('upstreams'),
  quota: table('quota'),
  scrollWidth: document.documentElement.scrollWidth,
  innerWidth: window.innerWidth,
  height: document.documentElement.scrollHeight,
  resources: performance.getEntriesByType('resource').map(e => e.name),
};
"""


class StatusPageBrowserTests(IntegrationTestCase):
    def setUp(self) -> None:
        super().setUp()
        missing = missing_browser()
        if missing:
            if os.environ.get("CI"):
                self.fail(f"browser binaries not installed: {missing}")
            raise unittest.SkipTest(f"browser binaries not installed: {missing}")

    def _browser(self, **size: int) -> Browser:
        browser = Browser(**size)
        self.addCleanup(browser.close)
        return browser

    def test_status_page_after_real_pulls(self) -> None:
        hammal = self.start_hammal()
        alpine = self.env.image("library/alpine:3.20")
        oci = self.env.image("library/ociimg:1")
        self.pull(hammal.host, "alpine", alpine)
        self.pull(hammal.host, "alpine", alpine)  # warm: from the cache
        self.pull(hammal.host, "library/ociimg", oci)

        report = json.loads(fetch(hammal.url + "/status.json").body)
        pulled = {u["repository"] for u in report["top_repositories"]["by_pulls"]}
        self.assertEqual(pulled, {"library/alpine", "library/ociimg"}, report["top_repositories"])
        self.assertGreater(report["totals"]["hour"]["bytes_from_cache"], 0, report["totals"])
        self.assertGreater(report["totals"]["hour"]["bytes_from_upstream"], 0, report["totals"])

        artifacts = os.path.abspath(ARTIFACTS)
        os.makedirs(artifacts, exist_ok=True)
        browser = self._browser(width=1280, height=900)
        browser.open(hammal.url + "/status")
        facts: Dict[str, Any] = browser.run(_PAGE_FACTS)
        console = browser.console()
        browser.resize(1280, min(max(int(facts["height"]) + 40, 900), 6000))
        browser.screenshot(os.path.join(artifacts, "status-wide.png"))
        with open(os.path.join(artifacts, "status.html"), "w", encoding="utf-8") as f:
            f.write(browser.run("return document.documentElement.outerHTML;"))
        context = f"\n{json.dumps(facts, indent=1)[:6000]}\n{self.diagnostics()}"

        errors = [m for m in console if m.get("level") == "SEVERE"]
        self.assertEqual(errors, [], f"console messages: {errors}{context}")
        self.assertEqual(facts["title"], "hammal status")
        self.assertEqual(facts["resources"], [], f"the page fetched something{context}")

        charts = facts["charts"]
        for name in (
            "requests-hour",
            "hit-ratio-hour",
            "bytes-hour",
            "requests-day",
            "hit-ratio-day",
            "bytes-day",
        ):
            self.assertIn(name, charts, context)
            self.assertGreater(charts[name]["width"], 300, f"{name} not laid out{context}")
        self.assertEqual(charts["requests-hour"]["points"], 60)
        self.assertEqual(charts["requests-day"]["points"], 24 * 60)
        self.assertGreater(charts["requests-hour"]["lines"]["requests"], 0, context)
        self.assertGreater(charts["requests-hour"]["lines"]["cache_hits"], 0, context)
        self.assertGreater(charts["bytes-hour"]["lines"]["bytes_from_cache"], 0, context)
        self.assertGreater(charts["hit-ratio-hour"]["lines"]["ratio"], 0, context)
        self.assertGreaterEqual(charts["hit-ratio-day"]["lines"]["ratio_points"], 1, context)
        self.assertGreater(charts["bytes-hour"]["lines"]["bytes_from_upstream"], 0, context)
        for name in ("top-pulls", "top-bytes"):
            self.assertEqual(
                set(charts[name]["bars"]), {"library/alpine", "library/ociimg"}, f"{name}{context}"
            )
        self.assertEqual(charts["top-pulls"]["bars"][0], "library/alpine", context)

        def repositories(rows: List[List[str]]) -> List[str]:
            return [row[0] for row in rows]

        self.assertEqual(
            repositories(facts["topByPulls"]), ["library/alpine", "library/ociimg"], context
        )
        self.assertEqual(
            set(repositories(facts["topByBytes"])), {"library/alpine", "library/ociimg"}, context
        )
        (upstream,) = facts["upstreams"]
        self.assertEqual(upstream[0], "default", context)
        self.assertIn(self.env.registry_host, upstream[1], context)
        self.assertTrue(upstream[2].startswith("ok"), context)

        # A phone: everything fits the width, nothing scrolls sideways.
        phone = self._browser(width=390, height=844)
        phone.open(hammal.url + "/status")
        narrow: Dict[str, Any] = phone.run(_PAGE_FACTS)
        self.assertLessEqual(
            narrow["scrollWidth"],
            narrow["innerWidth"],
            f"the page scrolls sideways on a phone{context}",
        )
        phone.resize(390, min(max(int(narrow["height"]) + 40, 844), 8000))
        phone.screenshot(os.path.join(artifacts, "status-phone.png"))
        self.assertEqual([m for m in phone.console() if m.get("level") == "SEVERE"], [])


class StatusAccessTests(IntegrationTestCase):
    """The same access rules as ``/metrics``, over real TCP."""

    def test_metrics_port_only(self) -> None:
        metrics_port = free_port()
        hammal = launch_hammal(self, ["--metrics-port", f"tcp:{metrics_port}:interface=127.0.0.1"])
        for path in ("/status", "/status.json"):
            response = hammal.request("GET", path)
            self.assertEqual(
                response.status, 404, f"{path} on the main port: {response.describe()}"
            )
        wait_until(lambda: port_open(metrics_port), "the metrics port", 10)
        page = fetch(f"http://127.0.0.1:{metrics_port}/status")
        self.assertEqual(page.status, 200, page.describe())
        self.assertIn("text/html", page.header("Content-Type") or "")
        document = fetch(f"http://127.0.0.1:{metrics_port}/status.json")
        self.assertEqual(document.status, 200, document.describe())
        self.assertEqual(json.loads(document.body)["upstreams"][0]["route"], "default")

    def test_allow_ip(self) -> None:
        hammal = launch_hammal(self, ["--allow-ip", "10.0.0.0/8"])
        for path in ("/status", "/status.json"):
            response = hammal.request("GET", path)
            self.assertOCIError(response, 403, "DENIED", ["not allowed"])
        open_to_us = launch_hammal(self, ["--allow-ip", "127.0.0.0/8"])
        self.assertEqual(open_to_us.request("GET", "/status").status, 200)


class _QuotaHandler(BaseHTTPRequestHandler):
    """Docker Hub's manners: every manifest GET costs a pull and says how
    many are left in ``ratelimit-remaining``."""

    server: "QuotaUpstream"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: Dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/v2/":
            self._send(200, b"{}", {"Content-Type": "application/json"})
            return
        if "/manifests/" not in self.path:
            self._send(
                404,
                b'{"errors":[{"code":"NAME_UNKNOWN","message":"?"}]}',
                {"Content-Type": "application/json"},
            )
            return
        body = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": "sha256:" + "0" * 64,
                    "size": 2,
                },
                "layers": [],
                "annotations": {"path": self.path},
            }
        ).encode()
        with self.server.lock:
            if self.command == "GET":
                self.server.remaining -= 1
            remaining = self.server.remaining
        self._send(
            200,
            body,
            {
                "Content-Type": OCI_MANIFEST,
                "Docker-Content-Digest": "sha256:" + hashlib.sha256(body).hexdigest(),
                "RateLimit-Limit": "100;w=21600",
                "RateLimit-Remaining": f"{remaining};w=21600",
            },
        )

    do_HEAD = do_GET


class QuotaUpstream(ThreadingHTTPServer):
    """A registry on 127.0.0.1 (port chosen by the kernel) in a thread."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _QuotaHandler)
        self.remaining = 100
        self.lock = threading.Lock()
        self.thread = threading.Thread(
            target=self.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="quota-upstream",
            daemon=True,
        )
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(5)


class QuotaTests(IntegrationTestCase):
    """Upstream's ``ratelimit-remaining`` reaches /status over real TCP."""

    def test_remaining_pulls(self) -> None:
        upstream = QuotaUpstream()
        self.addCleanup(upstream.close)
        hammal = launch_hammal(self, upstream=upstream.url, library_prefix=False)
        host = upstream.url.split("//", 1)[1]

        def quota() -> Dict[str, Any]:
            entries = json.loads(fetch(hammal.url + "/status.json").body)["quota"]
            (entry,) = [e for e in entries if e["upstream"] == host]
            return dict(entry)

        before = quota()
        self.assertEqual((before["account"], before["remaining"]), ("anonymous", None))
        for tag in ("1", "2"):
            response = hammal.request(
                "GET", f"/v2/team/app/manifests/{tag}", [("Accept", OCI_MANIFEST)]
            )
            self.assertEqual(response.status, 200, response.describe())
        after = quota()
        self.assertEqual(
            (after["remaining"], after["limit"], after["window_seconds"]),
            (98, 100, 21600),
            f"{after}\n{self.diagnostics()}",
        )
        self.assertLess(after["observed_seconds_ago"], 60)
        page = fetch(hammal.url + "/status").body.decode()
        self.assertIn("<td>98 of 100</td>", page)
