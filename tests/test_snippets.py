"""
Tests for the front page's client configuration (L{hammal.web.snippets},
L{hammal.web.front}): a snippet for every registry served, and the
insecure lines only without TLS.
"""

from __future__ import annotations

import html
import re

from twisted.trial.unittest import SynchronousTestCase

from hammal.app import _served_registries
from hammal.tap import Options
from hammal.web.front import front_page
from hammal.web.snippets import ServedRegistry, hosts_toml, mirror_location, registries_conf


def served(argv: list[str]) -> list[ServedRegistry]:
    options = Options(environ={})
    options.parseOptions(argv)
    assert options.settings is not None
    return _served_registries(options.settings)


def pre_blocks(page: bytes) -> dict[str, str]:
    """Each <pre> of the page, unescaped, by the file named just before it."""
    text = page.decode()
    found: dict[str, str] = {}
    for path, body in re.findall(r"<code>([^<]+)</code>[^<]*</p>\s*<pre>(.*?)</pre>", text, re.S):
        found[path] = html.unescape(body)
    return found


class ServedRegistriesTests(SynchronousTestCase):
    def test_default_hub(self) -> None:
        self.assertEqual(served([]), [ServedRegistry("docker.io")])

    def test_routes_and_stand_ins(self) -> None:
        self.assertEqual(
            served(
                [
                    "--upstream",
                    "docker.io=https://mirror.gcr.io",
                    "--route",
                    "q.example.com=https://quay.io",
                    "--route",
                    "g.example.com=ghcr.io=https://ghcr-cache.corp",
                    "--route",
                    "l.example.com=http://127.0.0.1:5001",
                ]
            ),
            [
                ServedRegistry("docker.io"),
                ServedRegistry("quay.io", "q.example.com"),
                ServedRegistry("ghcr.io", "g.example.com"),
                ServedRegistry("127.0.0.1:5001", "l.example.com"),
            ],
        )


class SnippetTests(SynchronousTestCase):
    def test_hosts_toml(self) -> None:
        hub = ServedRegistry("docker.io")
        plain = hosts_toml(hub, "mirror.test:5000", secure=False)
        self.assertEqual(
            plain,
            'server = "https://registry-1.docker.io"\n\n'
            '[host."http://mirror.test:5000"]\n'
            '  capabilities = ["pull", "resolve"]\n'
            "  skip_verify = true\n",
        )
        secure = hosts_toml(ServedRegistry("quay.io"), "mirror.test", secure=True)
        self.assertIn('server = "https://quay.io"', secure)
        self.assertIn('[host."https://mirror.test"]', secure)
        self.assertNotIn("skip_verify", secure)

    def test_mirror_locations(self) -> None:
        self.assertEqual(mirror_location(ServedRegistry("docker.io"), "m.test:5000"), "m.test:5000")
        self.assertEqual(
            mirror_location(ServedRegistry("quay.io", "q.test"), "m.test:5000"),
            "m.test:5000/quay.io",
        )
        # A registry with a port cannot be a path prefix: its route host serves it.
        self.assertEqual(
            mirror_location(ServedRegistry("10.0.0.1:5001", "l.test"), "m.test:5000"), "l.test:5000"
        )
        self.assertEqual(
            mirror_location(ServedRegistry("10.0.0.1:5001", "l.test"), "m.test"), "l.test"
        )

    def test_registries_conf(self) -> None:
        text = registries_conf(
            [ServedRegistry("docker.io"), ServedRegistry("ghcr.io")], "m.test", secure=False
        )
        self.assertEqual(text.count("insecure = true"), 2)
        self.assertIn(
            'location = "ghcr.io"\n[[registry.mirror]]\nlocation = "m.test/ghcr.io"', text
        )
        self.assertNotIn(
            "insecure", registries_conf([ServedRegistry("docker.io")], "m.test", secure=True)
        )


class FrontPageTests(SynchronousTestCase):
    def page(self, secure: bool) -> dict[str, str]:
        registries = [ServedRegistry("docker.io"), ServedRegistry("quay.io", "q.example.com")]
        return pre_blocks(front_page("mirror.example.com:5000", secure, registries))

    def test_every_registry_has_a_snippet(self) -> None:
        blocks = self.page(secure=False)
        self.assertIn("/etc/containerd/certs.d/docker.io/hosts.toml", blocks)
        self.assertIn("/etc/containerd/certs.d/quay.io/hosts.toml", blocks)
        self.assertIn(
            'server = "https://quay.io"', blocks["/etc/containerd/certs.d/quay.io/hosts.toml"]
        )
        conf = blocks["/etc/containers/registries.conf"]
        self.assertIn('location = "mirror.example.com:5000/quay.io"', conf)
        self.assertIn("skip_verify = true", blocks["/etc/containerd/certs.d/quay.io/hosts.toml"])
        self.assertIn("insecure = true", conf)

    def test_no_insecure_lines_with_tls(self) -> None:
        blocks = self.page(secure=True)
        for path, text in blocks.items():
            self.assertNotIn("skip_verify", text, path)
            self.assertNotIn("insecure", text, path)
        self.assertIn(
            '[host."https://mirror.example.com:5000"]',
            blocks["/etc/containerd/certs.d/docker.io/hosts.toml"],
        )

    def test_docker_only_for_docker_hub(self) -> None:
        page = front_page(
            "m.example.com", False, [ServedRegistry("quay.io", "q.example.com")]
        ).decode()
        self.assertNotIn("daemon.json", page)
        self.assertIn("certs.d/quay.io/hosts.toml", page)
