"""
What the pull logic hands to the web layer: complete documents, blob
replies with a body still to stream, and how each was served.
"""

from __future__ import annotations

import attrs

from hammal.stream import BodySource

HeaderList = list[tuple[bytes, list[bytes]]]
"""Response headers: lower-case names with all their values."""

#: RFC 9211 ``Cache-Status`` values: how a response was served.
CACHE_HIT = "hammal; hit"
CACHE_MISS = "hammal; fwd=miss"
CACHE_COALESCED = "hammal; fwd=miss; collapsed; detail=coalesced"
CACHE_REVALIDATED = "hammal; fwd=stale; fwd-status=200"
CACHE_STALE = "hammal; fwd=stale; detail=stale-if-error"
CACHE_BYPASS = "hammal; fwd=bypass"

#: The RFC 7234 warning sent with a stale answer.
STALE_WARNING = b'110 - "Response is Stale"'


@attrs.frozen
class Document:
    """
    A complete small response: status, headers and body.

    @ivar vouched: whether upstream's framing or digest vouches for the body
        being all it meant to send; a body that merely ended when the
        connection closed may be cut short, and is never cached.
    """

    status: int
    headers: HeaderList
    body: bytes = b""
    length: int | None = None
    cache_status: str = CACHE_BYPASS
    vouched: bool = True

    @property
    def content_length(self) -> int:
        return self.length if self.length is not None else len(self.body)


@attrs.frozen
class BlobReply:
    """
    A blob response whose body is still to be streamed.

    @ivar body: where the bytes come from; L{None} for HEAD.
    @ivar cache_status: how it was served.
    """

    status: int
    headers: HeaderList
    length: int | None
    body: BodySource | None
    cache_status: str = CACHE_BYPASS


def find_header(headers: HeaderList, name: bytes) -> bytes | None:
    """The first value of header C{name}, or L{None}."""
    for key, values in headers:
        if key == name and values:
            return values[0]
    return None


def replace_header(headers: HeaderList, name: bytes, value: bytes) -> HeaderList:
    """C{headers} with C{name} set to the single C{value}."""
    return [(key, values) for key, values in headers if key != name] + [(name, [value])]
