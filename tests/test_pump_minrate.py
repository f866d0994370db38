"""
The minimum upstream rate on pump threads (L{hammal.cache.pump.BodyPump},
L{hammal.cache.tlspump.TLSBodyPump}): a body read from a real TCP
connection on 127.0.0.1, trickled by a server thread, the pump run on the
test's thread with a clock the server thread advances between its sends.
Nothing sleeps: each send waits for the pump to report the bytes written
(or to end), then moves the clock on.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from typing import Any, Callable

from OpenSSL import SSL
from twisted.trial.unittest import SynchronousTestCase

from hammal.cache.pump import BodyPump
from hammal.cache.tlspump import TLSBodyPump
from hammal.errors import UpstreamTimeout
from hammal.selfsigned import ensure_self_signed
from tests.test_tlspump import tls_pair

#: How long a server thread waits for the pump to take a send (a bound, not a pace).
PATIENCE = 30.0


class _Reactor:
    """callFromThread, run at once (the pump's progress reports)."""

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        f(*args)


class _Clock:
    """A monotonic clock that moves only when told (by the server thread)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class _Progress:
    """Where the pump reports having written up to; lets the server wait for it."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.position = 0
        self.ended = False

    def __call__(self, position: int) -> None:
        with self._changed:
            self.position = position
            self._changed.notify_all()

    def end(self) -> None:
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    def reached(self, position: int) -> bool:
        """Wait until the pump wrote up to C{position}; C{False} if it ended first."""
        with self._changed:
            self._changed.wait_for(lambda: self.ended or self.position >= position, PATIENCE)
            return self.position >= position


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Both ends of a TCP connection on 127.0.0.1 (ours non-blocking, as a pump gets it)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        ours = socket.create_connection(listener.getsockname(), timeout=PATIENCE)
        theirs, _ = listener.accept()
    finally:
        listener.close()
    ours.setblocking(False)
    theirs.settimeout(PATIENCE)
    return ours, theirs


Step = tuple[int, float]
"""A server step: send this many bytes of the body, then move the clock on this far."""


class _TrickleCase:
    """
    A pump reading a body a server thread trickles over TCP, on a clock it
    moves; mixed into a L{SynchronousTestCase} for each kind of pump.
    """

    pump_type: Callable[..., BodyPump] = BodyPump

    def setUp(self) -> None:
        self.ours, self.theirs = _tcp_pair()
        self.addCleanup(self.ours.close)
        self.addCleanup(self.theirs.close)
        self.path = self.mktemp()
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self.addCleanup(os.close, self.fd)
        self.clock = _Clock()
        self.progress = _Progress()

    def pump(self, length: int, min_rate: int, read_timeout: float = 30, **kw: Any) -> BodyPump:
        pump = self.pump_type(
            _Reactor(),
            self.ours.fileno(),
            self.fd,
            0,
            length,
            hashlib.sha256(),
            read_timeout,
            "upstream.test",
            self.progress,
            min_rate=min_rate,
            clock=self.clock,
            **kw,
        )
        self.addCleanup(pump.close)
        return pump

    def send(self, data: bytes) -> None:
        """The server sends C{data} on the wire."""
        self.theirs.sendall(data)

    def trickle(self, pump: BodyPump, body: bytes, steps: list[Step]) -> Any:
        """
        Run C{pump} here while a server thread sends C{body} by C{steps};
        the pump's result, or why it stopped.
        """

        def server() -> None:
            sent = 0
            for size, seconds in steps:
                self.send(body[sent : sent + size])
                sent += size
                if not self.progress.reached(sent):
                    return  # the pump ended
                self.clock.advance(seconds)

        feeder = threading.Thread(target=server)
        feeder.start()
        try:
            return pump.run()
        except Exception as failure:
            return failure
        finally:
            self.progress.end()
            feeder.join(PATIENCE)

    def written(self) -> bytes:
        with open(self.path, "rb") as stored:
            return stored.read()

    # The cases, for either pump.

    def test_trickle_below_the_rate_fails_after_one_window(self) -> None:
        """
        100 bytes every 10 s (10 B/s, under 100 B/s) is never silent for the
        30 s read timeout, but the pump gives up once the first window ends.
        """
        body = os.urandom(10_000)
        failure = self.trickle(self.pump(len(body), 100), body, [(100, 10)] * 10)
        self.assertIsInstance(failure, UpstreamTimeout)
        self.assertEqual(
            failure.message,
            "upstream.test sent 300 bytes in the last 30 s, below --upstream-min-rate 100 B/s",
        )
        self.assertEqual(self.written()[:300], body[:300])

    def test_slow_body_above_the_rate_completes(self) -> None:
        """1,100 bytes every 10 s (110 B/s, over 100 B/s) for 100 s: every byte."""
        body = os.urandom(11_000)
        result = self.trickle(self.pump(len(body), 100), body, [(1100, 10)] * 10)
        self.assertEqual(result, len(body))
        self.assertEqual(self.written(), body)

    def test_first_window_not_judged_early(self) -> None:
        """One byte in the first 29 s, then the window's due: not given up."""
        body = os.urandom(5000)
        steps = [(1, 29), (2999, 1), (2000, 0)]
        result = self.trickle(self.pump(len(body), 100), body, steps)
        self.assertEqual(result, len(body))
        self.assertEqual(self.written(), body)

    def test_each_window_is_judged(self) -> None:
        """A fast first window does not excuse a slow second one."""
        body = os.urandom(10_000)
        steps = [(2000, 15), (2000, 15)] + [(100, 10)] * 10
        failure = self.trickle(self.pump(len(body), 100), body, steps)
        self.assertIsInstance(failure, UpstreamTimeout)
        self.assertIn("sent 300 bytes in the last 30 s", failure.message)

    def test_zero_turns_it_off(self) -> None:
        """With C{min_rate=0} a trickle goes on as long as it is not silent."""
        body = os.urandom(500)
        result = self.trickle(self.pump(len(body), 0), body, [(10, 20)] * 50)
        self.assertEqual(result, len(body))
        self.assertEqual(self.written(), body)

    def test_silence_is_judged_on_the_same_clock(self) -> None:
        """The read timeout counts on the pump's clock too: 30 s without a byte."""
        body = os.urandom(1000)
        failure = self.trickle(self.pump(len(body), 0), body, [(100, 30), (100, 0)])
        self.assertIsInstance(failure, UpstreamTimeout)
        self.assertIn("sent nothing for 30 seconds after 100 bytes", failure.message)


class PlainPumpMinimumRateTests(_TrickleCase, SynchronousTestCase):
    """The plain pump (C{splice}, or reads and writes where it cannot)."""


class TLSPumpMinimumRateTests(_TrickleCase, SynchronousTestCase):
    """The TLS pump: the body decrypted on the pump thread, the same floor."""

    def setUp(self) -> None:
        super().setUp()
        made = ensure_self_signed(self.mktemp(), ["localhost"], ["127.0.0.1"])
        self.client, self.server = tls_pair(made.cert_path, made.key_path)
        self._server_lock = threading.Lock()

    def pump(self, length: int, min_rate: int, read_timeout: float = 30, **kw: Any) -> BodyPump:
        self.pump_type = TLSBodyPump
        return super().pump(length, min_rate, read_timeout, tls=self.client, **kw)

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[self.server.send(view[: 16 * 1024]) :]
        while True:
            try:
                self.theirs.sendall(self.server.bio_read(256 * 1024))
            except SSL.WantReadError:
                return
