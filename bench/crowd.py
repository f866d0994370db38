"""A crowd of slow readers connecting at once.

Thousands of sockets are opened with non-blocking ``connect`` in one tight
loop (no waiting for one before the next: they arrive together, as when a
fleet of nodes starts pulling), each sends its GET as soon as it is
connected, then reads at a fixed rate (a token bucket per socket) until the
hold time ends. One thread and one ``selectors`` loop; every wait is
bounded.
"""

from __future__ import annotations

import errno
import selectors
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from bench.ttfb import request_bytes

#: How often every connected socket gets its allowance (seconds).
_STEP = 0.1


@dataclass
class _Reader:
    sock: socket.socket
    request: bytes
    connected_at: float = 0.0
    head: bytes = b""
    status: bytes = b""
    body: int = 0
    closed: bool = False
    failed: str = ""


@dataclass
class CrowdResult:
    """What the crowd saw."""

    attempted: int
    connected: int
    connect_errors: Dict[str, int]
    connect_s: float  # from the first connect to the last connection made
    statuses: Dict[str, int]
    held_open: int  # answered 200 and still open at the end
    body_bytes: int
    seconds: float
    per_reader_Bps: float = 0.0
    notes: List[str] = field(default_factory=list)


def slow_crowd(
    port: int,
    path: str,
    headers: Sequence[Tuple[str, str]] = (),
    count: int = 3000,
    rate: float = 64 * 1024,
    seconds: float = 20,
    on_tick: Optional[Callable[[int], None]] = None,
    host: str = "127.0.0.1",
    rcvbuf: int = 32 * 1024,
    connect_timeout: float = 30,
) -> CrowdResult:
    """
    C{count} connections to C{host:port}, all started at once, each
    requesting C{path} and reading at C{rate} bytes/s until C{seconds}
    after the first connect; then all are closed. C{on_tick(i)} is called
    once a second (RSS sampling). A connection not made within
    C{connect_timeout} seconds is an error.
    """
    sel = selectors.DefaultSelector()
    readers: List[_Reader] = []
    errors: Dict[str, int] = {}
    request = request_bytes(path, f"{host}:{port}", headers, close=False)

    def error(name: str) -> None:
        errors[name] = errors.get(name, 0) + 1

    t0 = time.monotonic()
    try:
        for _ in range(count):
            try:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            except OSError as problem:
                error(errno.errorcode.get(problem.errno or 0, str(problem)))
                continue
            # before connect, so the receive window never grows past it
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            s.setblocking(False)
            code = s.connect_ex((host, port))
            if code not in (0, errno.EINPROGRESS):
                error(errno.errorcode.get(code, str(code)))
                s.close()
                continue
            reader = _Reader(s, request)
            readers.append(reader)
            sel.register(s, selectors.EVENT_WRITE, reader)
        pending = len(readers)
        last_connect = t0
        tick = 0
        next_step = time.monotonic()
        while True:
            now = time.monotonic()
            elapsed = now - t0
            while on_tick is not None and tick <= elapsed and tick <= seconds:
                on_tick(tick)
                tick += 1
            if elapsed >= seconds:
                break
            if pending:
                for key, _ in sel.select(timeout=min(_STEP, max(0.0, next_step - now))):
                    reader = key.data
                    sel.unregister(reader.sock)
                    pending -= 1
                    code = reader.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if code:
                        error(errno.errorcode.get(code, str(code)))
                        reader.closed = True
                        reader.failed = "connect"
                        continue
                    try:
                        reader.sock.send(reader.request)  # small: fits the empty buffer
                    except OSError as problem:
                        error(f"send {errno.errorcode.get(problem.errno or 0, problem)}")
                        reader.closed = True
                        reader.failed = "send"
                        continue
                    reader.connected_at = time.monotonic()
                    last_connect = reader.connected_at
                if pending and elapsed > connect_timeout:
                    for key in list(sel.get_map().values()):
                        sel.unregister(key.fileobj)
                        key.data.closed = True
                        key.data.failed = "connect timeout"
                        error("connect timeout")
                    pending = 0
            else:
                time.sleep(max(0.0, min(_STEP, next_step - now)))
            now = time.monotonic()
            if now >= next_step:
                next_step = now + _STEP
                for reader in readers:
                    if reader.connected_at and not reader.closed:
                        _read_allowance(reader, rate, now)
        statuses: Dict[str, int] = {}
        for reader in readers:
            if reader.failed:
                continue
            parts = reader.status.split(b" ")
            status = parts[1].decode() if len(parts) > 1 else "none"
            statuses[status] = statuses.get(status, 0) + 1
        connected = sum(1 for r in readers if r.connected_at)
        body = sum(r.body for r in readers)
        held = sum(1 for r in readers if r.status.split(b" ")[1:2] == [b"200"] and not r.closed)
        spent = time.monotonic() - t0
        return CrowdResult(
            attempted=count,
            connected=connected,
            connect_errors=errors,
            connect_s=round(last_connect - t0, 3),
            statuses=statuses,
            held_open=held,
            body_bytes=body,
            seconds=round(spent, 2),
            per_reader_Bps=round(body / spent / connected, 1) if connected and spent else 0.0,
        )
    finally:
        sel.close()
        for reader in readers:
            reader.sock.close()


def _read_allowance(reader: _Reader, rate: float, now: float) -> None:
    """Read what the reader's rate allows by now (its headers are free)."""
    allowed = int(rate * (now - reader.connected_at)) - reader.body
    while allowed > 0 or not reader.status:
        try:
            data = reader.sock.recv(min(allowed if reader.status else 4096, 256 * 1024))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            reader.closed = True
            return
        if not reader.status:
            reader.head += data
            if b"\r\n\r\n" not in reader.head:
                if len(reader.head) > 65536:
                    reader.closed = True
                    return
                continue
            head, _, rest = reader.head.partition(b"\r\n\r\n")
            reader.status = head.split(b"\r\n", 1)[0]
            reader.head = b""
            data = rest
        reader.body += len(data)
        allowed -= len(data)
