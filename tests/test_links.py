"""Tag-list ``Link`` headers keep the client on the route it came by."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from hammal.links import client_link, rewrite_links
from tests.fakes import REGISTRY
from tests.test_v2 import Mirror, header

UPSTREAM_LINK = b'</v2/library/alpine/tags/list?last=b&n=1>; rel="next"'


class ClientLinkTests(SynchronousTestCase):
    def test_plain(self) -> None:
        self.assertEqual(
            client_link(UPSTREAM_LINK, "alpine", []),
            b'</v2/alpine/tags/list?last=b&n=1>; rel="next"',
        )

    def test_path_prefix_and_ns(self) -> None:
        self.assertEqual(
            client_link(UPSTREAM_LINK, "ghcr.io/owner/repo", [("ns", "ghcr.io")]),
            b'</v2/ghcr.io/owner/repo/tags/list?last=b&n=1&ns=ghcr.io>; rel="next"',
        )

    def test_only_pagination_kept(self) -> None:
        link = b'<https://evil.test/v2/x/tags/list?n=5&last=a%2Fb&ns=other&x=1>; rel="next"'
        self.assertEqual(
            client_link(link, "x", []), b'</v2/x/tags/list?n=5&last=a%2Fb>; rel="next"'
        )

    def test_not_a_link(self) -> None:
        self.assertIsNone(client_link(b"garbage", "x", []))
        self.assertEqual(
            rewrite_links([(b"link", [b"garbage"]), (b"a", [b"b"])], "x", []), [(b"a", [b"b"])]
        )


class TagListLinkThroughMirrorTests(SynchronousTestCase):
    """The fake upstream answers every tag list with a ``Link`` to ``/v2/x/...``."""

    def link(self, path: str) -> str | None:
        mirror = Mirror()
        response = mirror.request(b"GET", path)
        self.assertEqual(response.code, 200)
        return header(response, b"link")

    def test_default_route(self) -> None:
        self.assertEqual(
            self.link("/v2/alpine/tags/list?n=1"), '</v2/alpine/tags/list?last=b&n=1>; rel="next"'
        )

    def test_path_prefix_route(self) -> None:
        self.assertEqual(
            self.link(f"/v2/{REGISTRY}/alpine/tags/list?n=1"),
            f'</v2/{REGISTRY}/alpine/tags/list?last=b&n=1>; rel="next"',
        )

    def test_ns_route(self) -> None:
        self.assertEqual(
            self.link(f"/v2/alpine/tags/list?n=1&ns={REGISTRY}"),
            f'</v2/alpine/tags/list?last=b&n=1&ns={REGISTRY}>; rel="next"',
        )
