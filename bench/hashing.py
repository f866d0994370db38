"""A client that hashes what it receives, on a second thread: the ceiling of
a hashing proxy on this machine.

The sha256 target of issue 12 asks a cold pull through hammal to reach
0.85x of one core's sha256 rate. Whatever proxies the blob must hash it
somewhere on the machine's cores, beside the CDN that sends it and the
client that receives it. This client receives a body into a few large
buffers and hashes them on a thread of its own (the receive goes on
meanwhile), as a proxy that hashed for free would leave the machine to do:
GET through nginx ``proxy_pass`` (which neither hashes nor stores) with this
client gives the figure no proxy doing at least nginx's work plus the hash
can beat in the same run; straight from the CDN, the figure with no proxy
at all.
"""

from __future__ import annotations

import hashlib
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from bench.ttfb import content_length, request_bytes

#: Each receive buffer; the hash thread takes a full one while the next fills.
_BUFFER = 4 << 20
_BUFFERS = 8


@dataclass
class HashedGet:
    """What one hashed GET measured."""

    status: int
    body_bytes: int
    seconds: float  # from just before connect to the end of the hash
    digest: str  # "sha256:<hex>" of the body
    error: str = ""

    @property
    def speed(self) -> float:
        """Body bytes per second (0 on an error)."""
        return self.body_bytes / self.seconds if self.seconds > 0 and not self.error else 0.0


class _Hasher:
    """Hashes the buffers it is given, in order, on a thread of its own."""

    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()
        self.free: "queue.SimpleQueue[memoryview]" = queue.SimpleQueue()
        for _ in range(_BUFFERS):
            self.free.put(memoryview(bytearray(_BUFFER)))
        self._full: "queue.SimpleQueue[Optional[Tuple[memoryview, int]]]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="bench-hash", daemon=True)
        self._thread.start()

    def hash(self, buffer: memoryview, count: int) -> None:
        self._full.put((buffer, count))

    def finish(self) -> str:
        self._full.put(None)
        self._thread.join()
        return "sha256:" + self.sha256.hexdigest()

    def _run(self) -> None:
        while True:
            item = self._full.get()
            if item is None:
                return
            buffer, count = item
            self.sha256.update(buffer[:count])
            self.free.put(buffer)


def hashed_get(
    port: int,
    path: str,
    headers: Sequence[Tuple[str, str]] = (),
    host: str = "127.0.0.1",
    timeout: float = 300,
) -> HashedGet:
    """
    GET C{path} and sha256 its body on a second thread while receiving;
    the body is read to its ``Content-Length`` (else until the server
    closes). Every wait is bounded by C{timeout} overall.
    """
    t0 = time.perf_counter()
    deadline = time.monotonic() + timeout
    hasher = _Hasher()
    status = body = 0
    error = ""
    try:
        with socket.create_connection((host, port), timeout=min(10.0, timeout)) as s:
            s.sendall(request_bytes(path, f"{host}:{port}", headers))
            head = b""
            while b"\r\n\r\n" not in head:
                if len(head) > 65536:
                    raise ValueError("no end of headers in 64 KiB")
                s.settimeout(max(0.001, deadline - time.monotonic()))
                got = s.recv(65536)
                if not got:
                    raise ValueError("the connection closed before the end of the headers")
                head += got
            head, _, rest = head.partition(b"\r\n\r\n")
            parts = head.split(b" ", 2)
            status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            length = content_length(head)
            first = hasher.free.get()
            first[: len(rest)] = rest
            body = len(rest)
            hasher.hash(first, len(rest))
            ended = False
            while not ended and (length is None or body < length):
                buffer = hasher.free.get()
                filled = 0
                while filled < _BUFFER and (length is None or body + filled < length):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"timed out after {timeout:g}s")
                    s.settimeout(left)
                    count = s.recv_into(buffer[filled:])
                    if not count:
                        ended = True
                        break
                    filled += count
                body += filled
                hasher.hash(buffer, filled)
            if length is not None and body != length:
                error = f"the body ended after {body} of {length} bytes"
    except (OSError, ValueError) as problem:
        error = f"{type(problem).__name__}: {problem}"
    digest = hasher.finish()
    return HashedGet(status, body, time.perf_counter() - t0, digest, error)
