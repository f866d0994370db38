"""``Range`` request headers (RFC 9110 section 14): one byte range."""

from __future__ import annotations

import re

from hammal.errors import RangeInvalid

_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*\Z")

#: Past every blob size: a position with more digits than this is taken as
#: "beyond the end" without converting it (Python refuses to convert more
#: than 4300 digits, and nothing that long is a real offset).
_HUGE = 1 << 63


def _position(digits: str) -> int:
    significant = digits.lstrip("0")
    return _HUGE if len(significant) > 18 else int(significant or "0")


def parse_range(header: bytes | None, size: int) -> tuple[int, int] | None:
    """
    The C{(start, end)} (end exclusive) a ``Range`` header asks of a
    C{size}-byte body; L{None} to send the whole body (no header, or one
    hammal ignores, such as several ranges). Positions of any length are
    accepted: past the end they are the end (or unsatisfiable), never an
    error of hammal's.

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
        suffix = _position(last)
        if suffix == 0:
            raise _unsatisfiable(size)
        if size == 0:
            return None  # satisfiable (RFC 9110 14.1.1), but no byte to name: the empty body
        return (max(0, size - suffix), size)
    start = _position(first)
    end = size if not last else min(size, _position(last) + 1)
    if last and _position(last) < start:
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
