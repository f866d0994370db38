"""
Tests for L{hammal.headers}: which headers cross the proxy in each
direction.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from hammal.headers import (
    HOP_BY_HOP,
    end_to_end,
    relayed_response_headers,
    upstream_request_headers,
)

#: The six Accept headers ``podman pull`` sends, each on its own line.
PODMAN_ACCEPTS = [
    b"application/vnd.oci.image.manifest.v1+json",
    b"application/vnd.docker.distribution.manifest.v2+json",
    b"application/vnd.docker.distribution.manifest.v1+prettyjws",
    b"application/vnd.docker.distribution.manifest.v1+json",
    b"application/vnd.docker.distribution.manifest.list.v2+json",
    b"application/vnd.oci.image.index.v1+json",
]


def headers(*pairs: tuple[bytes, bytes]) -> Headers:
    """L{Headers} with each C{(name, value)} added in order, repeats kept."""
    result = Headers()
    for name, value in pairs:
        result.addRawHeader(name, value)
    return result


def as_dict(pairs: list[tuple[bytes, list[bytes]]]) -> dict[bytes, list[bytes]]:
    """Relayed header pairs as a dict, checking no name appears twice."""
    result = dict(pairs)
    assert len(result) == len(pairs), pairs
    return result


def names(h: Headers) -> set[bytes]:
    return {name.lower() for name, _ in h.getAllRawHeaders()}


class EndToEndTests(SynchronousTestCase):
    """L{end_to_end} drops hop-by-hop headers and those named in Connection."""

    def test_hop_by_hop_dropped(self) -> None:
        h = headers(*((name, b"x") for name in sorted(HOP_BY_HOP)), (b"X-Kept", b"1"))
        self.assertEqual(end_to_end(h), [(b"x-kept", [b"1"])])

    def test_mixed_case_hop_by_hop(self) -> None:
        h = headers(
            (b"Transfer-Encoding", b"chunked"), (b"KEEP-ALIVE", b"timeout=5"), (b"ETag", b'"e"')
        )
        self.assertEqual(end_to_end(h), [(b"etag", [b'"e"'])])

    def test_connection_named(self) -> None:
        """Headers listed in C{Connection} are hop-by-hop too, in any case."""
        h = headers(
            (b"Connection", b"X-Secret, x-other ,,"),
            (b"Connection", b"X-Third"),
            (b"X-Secret", b"s"),
            (b"X-Other", b"o"),
            (b"X-Third", b"t"),
            (b"X-Kept", b"k"),
        )
        self.assertEqual(end_to_end(h), [(b"x-kept", [b"k"])])

    def test_names_lowercased(self) -> None:
        h = headers((b"Docker-Content-Digest", b"sha256:0"))
        self.assertEqual(end_to_end(h), [(b"docker-content-digest", [b"sha256:0"])])


class UpstreamRequestHeadersTests(SynchronousTestCase):
    """L{upstream_request_headers} forwards only what a registry needs."""

    def test_all_accept_values(self) -> None:
        """Every one of podman's six Accept headers reaches upstream."""
        client = headers(*((b"Accept", value) for value in PODMAN_ACCEPTS))
        forwarded = upstream_request_headers(client)
        self.assertEqual(forwarded.getRawHeaders(b"accept"), PODMAN_ACCEPTS)

    def test_comma_joined_accept(self) -> None:
        value = b"application/vnd.oci.image.index.v1+json, application/json;q=0.5"
        forwarded = upstream_request_headers(headers((b"Accept", value)))
        self.assertEqual(forwarded.getRawHeaders(b"accept"), [value])

    def test_conditional_and_range(self) -> None:
        client = headers(
            (b"Range", b"bytes=0-99"),
            (b"If-None-Match", b'"abc"'),
            (b"If-Range", b'"abc"'),
        )
        forwarded = upstream_request_headers(client)
        self.assertEqual(forwarded.getRawHeaders(b"range"), [b"bytes=0-99"])
        self.assertEqual(forwarded.getRawHeaders(b"if-none-match"), [b'"abc"'])
        self.assertEqual(forwarded.getRawHeaders(b"if-range"), [b'"abc"'])

    def test_authorization_never_forwarded(self) -> None:
        """The client's credentials are for hammal, never for upstream."""
        client = headers(
            (b"Authorization", b"Bearer client-token"),
            (b"authorization", b"Basic dXNlcjpwYXNz"),
            (b"Proxy-Authorization", b"Basic eDp5"),
            (b"Cookie", b"session=1"),
            (b"Accept", b"*/*"),
        )
        forwarded = upstream_request_headers(client)
        self.assertEqual(names(forwarded), {b"accept"})
        self.assertFalse(forwarded.hasHeader(b"authorization"))

    def test_other_headers_dropped(self) -> None:
        client = headers(
            (b"Host", b"mirror.test"),
            (b"User-Agent", b"docker/25"),
            (b"X-Forwarded-For", b"10.0.0.1"),
            (b"Content-Length", b"5"),
            (b"Accept-Encoding", b"gzip"),
        )
        self.assertEqual(names(upstream_request_headers(client)), set())

    def test_connection_named_forwardable_dropped(self) -> None:
        """Even a forwardable header goes when C{Connection} names it."""
        client = headers((b"Connection", b"range"), (b"Range", b"bytes=0-1"), (b"Accept", b"*/*"))
        self.assertEqual(names(upstream_request_headers(client)), {b"accept"})

    def test_hop_by_hop_dropped(self) -> None:
        client = headers((b"TE", b"trailers"), (b"Upgrade", b"h2c"), (b"Accept", b"*/*"))
        self.assertEqual(names(upstream_request_headers(client)), {b"accept"})

    def test_client_headers_unchanged(self) -> None:
        client = headers((b"Authorization", b"Bearer t"), (b"Accept", b"*/*"))
        upstream_request_headers(client)
        self.assertEqual(client.getRawHeaders(b"authorization"), [b"Bearer t"])


class RelayedResponseHeadersTests(SynchronousTestCase):
    """L{relayed_response_headers} passes on upstream's end-to-end headers."""

    def test_registry_headers_relayed(self) -> None:
        upstream = headers(
            (b"Content-Type", b"application/vnd.oci.image.index.v1+json"),
            (b"Docker-Content-Digest", b"sha256:" + b"0" * 64),
            (b"ETag", b'"sha256:0"'),
            (b"Accept-Ranges", b"bytes"),
            (b"Content-Range", b"bytes 0-9/100"),
            (b"Last-Modified", b"Wed, 01 May 2024 12:00:00 GMT"),
            (b"Link", b'</v2/a/tags/list?n=1&last=b>; rel="next"'),
        )
        relayed = as_dict(relayed_response_headers(upstream))
        self.assertEqual(
            set(relayed),
            {
                b"content-type",
                b"docker-content-digest",
                b"etag",
                b"accept-ranges",
                b"content-range",
                b"last-modified",
                b"link",
            },
        )
        self.assertEqual(relayed[b"docker-content-digest"], [b"sha256:" + b"0" * 64])

    def test_not_relayed(self) -> None:
        """Framing, authentication and hammal's own headers stay behind."""
        upstream = headers(
            (b"Content-Length", b"10"),
            (b"Content-Encoding", b"gzip"),
            (b"Date", b"x"),
            (b"Server", b"registry"),
            (b"Set-Cookie", b"a=b"),
            (b"WWW-Authenticate", b'Bearer realm="r"'),
            (b"Strict-Transport-Security", b"max-age=1"),
            (b"Location", b"https://cdn.test/blob"),
            (b"Docker-Distribution-API-Version", b"registry/2.0"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Connection", b"keep-alive, X-Hop"),
            (b"Keep-Alive", b"timeout=5"),
            (b"X-Hop", b"1"),
            (b"Proxy-Authenticate", b"Basic"),
            (b"Trailer", b"X-Checksum"),
            (b"Upgrade", b"h2"),
        )
        self.assertEqual(relayed_response_headers(upstream), [])

    def test_repeated_values_kept(self) -> None:
        upstream = headers((b"Link", b"<a>"), (b"Link", b"<b>"))
        self.assertEqual(relayed_response_headers(upstream), [(b"link", [b"<a>", b"<b>"])])
