"""Time to first byte: from the start of a request to the first byte of the
response *body* at the client.

curl's ``time_starttransfer`` stops at the first byte of the response,
headers included; a proxy that answers with headers at once and holds the
body would look fast there. This client reads the status line and headers
itself and stops the clock at the first body byte, then reads the body to
its end (so the transfer completes as it would for a real client).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

#: One receive into a preallocated buffer of this size.
_READ_SIZE = 1 << 20


@dataclass
class FirstByte:
    """What one GET measured (seconds from just before ``connect``)."""

    status: int
    headers_s: float  # the end of the response headers arrived
    ttfb_s: float  # the first body byte arrived (0 when none did)
    body_bytes: int
    seconds: float  # the body ended (or the attempt gave up)
    error: str = ""


def request_bytes(
    path: str, host: str, headers: Sequence[Tuple[str, str]], close: bool = True
) -> bytes:
    """An HTTP/1.1 GET of C{path}; with C{close}, asking the server to close after answering."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}"]
    if close:
        lines.append("Connection: close")
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def content_length(head: bytes) -> Optional[int]:
    """The C{Content-Length} of a response head, if it has one."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return int(value.strip())
    return None


def first_body_byte(
    port: int,
    path: str,
    headers: Sequence[Tuple[str, str]] = (),
    host: str = "127.0.0.1",
    timeout: float = 300,
    clock: Callable[[], float] = time.perf_counter,
    on_headers: Optional[Callable[[], None]] = None,
) -> FirstByte:
    """
    GET C{path} and time the first body byte; the body is read to its end
    (``Content-Length``, else until the server closes). Every wait is
    bounded by C{timeout} overall. C{on_headers} is called once the headers
    are in, before the body is waited for.
    """
    t0 = clock()
    deadline = time.monotonic() + timeout
    status = 0
    headers_s = ttfb_s = 0.0
    body = 0
    length: Optional[int] = None
    head = b""
    buffer = bytearray(_READ_SIZE)
    view = memoryview(buffer)

    def result(error: str = "") -> FirstByte:
        return FirstByte(status, headers_s, ttfb_s, body, clock() - t0, error)

    try:
        with socket.create_connection((host, port), timeout=min(10.0, timeout)) as s:
            s.sendall(request_bytes(path, f"{host}:{port}", headers))
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return result(f"timed out after {timeout:g}s")
                s.settimeout(left)
                count = s.recv_into(buffer)
                if not count:
                    break
                if not headers_s:
                    head += bytes(view[:count])
                    if b"\r\n\r\n" not in head:
                        if len(head) > 65536:
                            return result("no end of headers in 64 KiB")
                        continue
                    headers_s = clock() - t0
                    head, _, rest = head.partition(b"\r\n\r\n")
                    parts = head.split(b" ", 2)
                    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
                    length = content_length(head)
                    if on_headers is not None:
                        on_headers()
                    count = len(rest)
                    if not count:
                        if length == 0:
                            break
                        continue
                if not ttfb_s:
                    ttfb_s = clock() - t0
                body += count
                if length is not None and body >= length:
                    break
    except (OSError, ValueError) as problem:
        return result(f"{type(problem).__name__}: {problem}")
    if length is not None and body < length:
        return result(f"the body ended after {body} of {length} bytes")
    return result()
