"""``Range`` request headers (RFC 9110 section 14): one byte range."""

from __future__ import annotations

import re

from hammal.errors import RangeInvalid

_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*\Z")


def parse_range(header: bytes | None, size: int) -> tuple[int, int] | None:
    """
    The C{(start, end)} (end exclusive) a ``Range`` header asks of a
    C{size}-byte body; L{None} to send the whole body (no header, or one
    hammal ignores, such as several ranges).

    @raise RangeInvalid: when the range cannot be satisfied (416).
    """
    if not header:
        return None
    match = _RANGE.match(header.decode("latin-1"))
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:
        suffix = int(last)
        if suffix == 0:
            raise _unsatisfiable(size)
        return (max(0, size - suffix), size)
    start = int(first)
    end = size if not last else min(size, int(last) + 1)
    if last and int(last) < start:
        return None
    if start >= size:
        raise _unsatisfiable(size)
    return (start, end)


def _unsatisfiable(size: int) -> RangeInvalid:
    return RangeInvalid(
        f"the range is not satisfiable for {size} bytes",
        headers={"Content-Range": f"bytes */{size}"},
    )


def content_range(start: int, end: int, size: int) -> bytes:
    """The ``Content-Range`` value for C{[start, end)} of C{size} bytes."""
    return f"bytes {start}-{end - 1}/{size}".encode()
