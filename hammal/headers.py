"""
Header hygiene between clients and upstream.

Hop-by-hop headers (RFC 9110 section 7.6.1) and every header named in
``Connection`` are dropped in both directions. Towards upstream only the
headers a registry needs are sent (never the client's ``Authorization``);
from upstream everything but hop-by-hop, framing and authentication headers
is relayed.
"""

from __future__ import annotations

from twisted.web.http_headers import Headers

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: Client request headers that go upstream (after hop-by-hop removal).
FORWARDED_TO_UPSTREAM = frozenset({b"accept", b"range", b"if-none-match", b"if-range"})

#: Upstream response headers hammal sets itself or must not relay.
NOT_RELAYED = frozenset(
    {
        b"content-length",
        b"content-encoding",
        b"date",
        b"server",
        b"set-cookie",
        b"www-authenticate",
        b"strict-transport-security",
        b"location",
        b"docker-distribution-api-version",
    }
)


def _connection_named(headers: Headers) -> set[bytes]:
    named: set[bytes] = set()
    for value in headers.getRawHeaders(b"connection", []):
        named.update(token.strip().lower() for token in value.split(b",") if token.strip())
    return named


def end_to_end(headers: Headers) -> list[tuple[bytes, list[bytes]]]:
    """The headers of C{headers} that are not hop-by-hop, lower-cased."""
    dropped = HOP_BY_HOP | _connection_named(headers)
    return [
        (name.lower(), list(values))
        for name, values in headers.getAllRawHeaders()
        if name.lower() not in dropped
    ]


def upstream_request_headers(client: Headers) -> Headers:
    """The headers to send upstream on behalf of a client request."""
    forwarded = Headers()
    for name, values in end_to_end(client):
        if name in FORWARDED_TO_UPSTREAM:
            forwarded.setRawHeaders(name, values)
    return forwarded


def relayed_response_headers(upstream: Headers) -> list[tuple[bytes, list[bytes]]]:
    """The upstream response headers to pass on to the client."""
    return [(name, values) for name, values in end_to_end(upstream) if name not in NOT_RELAYED]
