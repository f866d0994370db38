"""
Conditional requests (RFC 9110 section 13) answered by hammal itself.

A client's ``If-None-Match`` or ``If-Range`` must never go out on upstream
work that other clients share: a ``304`` meant for one would fail them all.
hammal answers them from what it knows instead: manifests and blobs are
content-addressed, so their entity tag is their digest (``ETag:
"sha256:..."``, as Distribution sends it).
"""

from __future__ import annotations

from typing import Sequence

from twisted.web.http_headers import Headers

#: The conditional request headers hammal evaluates itself.
CONDITIONAL_HEADERS = (
    b"if-none-match",
    b"if-range",
    b"if-match",
    b"if-modified-since",
    b"if-unmodified-since",
)


def etag(digest: str) -> bytes:
    """The strong entity tag of the content with C{digest}."""
    return b'"' + digest.encode("ascii", "replace") + b'"'


def _tags(values: Sequence[bytes]) -> list[bytes]:
    tags = []
    for value in values:
        for item in value.split(b","):
            item = item.strip()
            if item:
                tags.append(item)
    return tags


def none_match(headers: Headers, digest: str) -> bool:
    """
    Whether the client's ``If-None-Match`` names the content with C{digest}
    (weak comparison), so that a ``304 Not Modified`` answers it.
    """
    values = headers.getRawHeaders(b"if-none-match")
    if not values:
        return False
    wanted = etag(digest)
    for tag in _tags(values):
        if tag == b"*":
            return True
        if tag.startswith(b"W/"):
            tag = tag[2:]
        if tag == wanted:
            return True
    return False


def range_applies(headers: Headers, digest: str) -> bool:
    """
    Whether the client's ``Range`` is to be honoured: without ``If-Range``,
    or when its entity tag is the content's (strong comparison). A date or
    another tag means "send it all" (hammal keeps no modification dates).
    """
    values = headers.getRawHeaders(b"if-range")
    if not values:
        return True
    return values[0].strip() == etag(digest)


def without_conditionals(headers: Headers) -> Headers:
    """A copy of C{headers} fit for shared upstream work: no conditionals."""
    copy = headers.copy()
    for name in CONDITIONAL_HEADERS:
        copy.removeHeader(name)
    return copy
