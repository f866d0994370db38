"""
Tests for L{hammal.cache.pump}: a fill's upstream body read on a pump
thread straight from the socket, over real TCP (a twisted.web upstream on
127.0.0.1, Twisted's HTTP client, the real reactor and threads).
"""

from __future__ import annotations

import errno
import hashlib
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.static import File

from hammal.cache import fetch as fetch_module
from hammal.cache import pump as pump_module
from hammal.cache.fetch import BlobFetch, DigestMismatch, run_here
from hammal.cache.pump import BodyPumps
from hammal.cache.rawsocket import body_connection
from hammal.cache.store import BlobStore
from hammal.cache.writes import LocalCacheError
from hammal.errors import UpstreamTimeout
from hammal.reference import Digest

MiB = 1024 * 1024


def _digest(data: bytes) -> Digest:
    return Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())


class _BreaksOnce(Resource):
    """
    Announces the whole blob, sends half and drops the connection the first
    time; answers a C{Range} request properly (C{206}) after that.
    """

    isLeaf = True

    def __init__(self, blob: bytes) -> None:
        super().__init__()
        self.blob = blob
        self.requests = 0

    def render_GET(self, request: Any) -> Any:
        self.requests += 1
        request.setHeader(b"content-type", b"application/octet-stream")
        wanted = request.getHeader(b"range")
        if wanted is None:
            request.setHeader(b"content-length", b"%d" % len(self.blob))
            request.write(self.blob[: len(self.blob) // 2])
            reactor.callLater(0.05, request.channel.transport.abortConnection)
            return NOT_DONE_YET
        start = int(wanted.split(b"=")[1].split(b"-")[0])
        request.setResponseCode(206)
        request.setHeader(
            b"content-range", b"bytes %d-%d/%d" % (start, len(self.blob) - 1, len(self.blob))
        )
        request.setHeader(b"content-length", b"%d" % (len(self.blob) - start))
        return self.blob[start:]


class _Stalls(Resource):
    """Announces the whole blob, sends a part and then nothing."""

    isLeaf = True

    def __init__(self, blob: bytes, sent: int) -> None:
        super().__init__()
        self.blob = blob
        self.sent = sent
        self.open: list[Any] = []

    def render_GET(self, request: Any) -> Any:
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", b"%d" % len(self.blob))
        request.write(self.blob[: self.sent])
        self.open.append(request)
        return NOT_DONE_YET


class PumpedFillTests(TestCase):
    """A fill of a blob of known length over plain TCP, pumped on a thread."""

    def setUp(self) -> None:
        self.root = self.mktemp()
        self.store = BlobStore(self.root)
        self.store.open()
        files = self.mktemp()
        os.makedirs(files)
        self.files = files
        self.web = Resource()
        self.web.putChild(b"files", File(files, defaultType="application/octet-stream"))
        port = reactor.listenTCP(0, Site(self.web), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.base = b"http://127.0.0.1:%d/" % port.getHost().port
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=self.pool)
        self.pumps = BodyPumps(reactor, threads=2)
        self.pumps.startService()
        self.addCleanup(self.pumps.stopService)

    def blob_file(self, name: str, data: bytes) -> bytes:
        with open(os.path.join(self.files, name), "wb") as out:
            out.write(data)
        return self.base + b"files/" + name.encode()

    def fetch(
        self,
        url: bytes,
        digest: Digest,
        hold_tail: bool = True,
        resumes: int = 0,
        read_timeout: float = 30,
        pumps: BodyPumps | None = None,
        hash_offload: Any = run_here,
    ) -> BlobFetch:
        def start(offset: int) -> Deferred[Any]:
            headers = Headers()
            if offset:
                headers.addRawHeader(b"range", b"bytes=%d-" % offset)
            return self.agent.request(b"GET", url, headers)

        return BlobFetch(
            digest,
            self.store,
            reactor,
            start,
            read_timeout=read_timeout,
            resumes=resumes,
            upstream="upstream.test",
            offload=run_here,
            hold_tail=hold_tail,
            hash_offload=hash_offload,
            pumps=self.pumps if pumps is None else pumps,
        )

    @inlineCallbacks
    def test_blob_pumped_verified_and_stored(self) -> Any:
        """
        A 5 MiB blob goes through a pump thread (not the event loop), is
        hashed on the way and committed under its digest, byte for byte.
        """
        blob = os.urandom(5 * MiB + 123)
        digest = _digest(blob)
        fetch = self.fetch(self.blob_file("good", blob), digest)
        yield Deferred.fromCoroutine(fetch.run())
        self.assertIsNone(fetch.failure)
        self.assertTrue(fetch.complete)
        self.assertEqual(self.pumps.started, 1)
        with open(self.store.path(digest), "rb") as stored:
            self.assertEqual(hashlib.sha256(stored.read()).hexdigest(), digest.hex)
        self.assertEqual((self.store.reserved, self.store.reserved_written), (0, 0))

    @inlineCallbacks
    def test_copies_where_splice_is_missing(self) -> Any:
        """Without C{os.splice} the pump reads into a buffer and writes it, all the same."""
        self.patch(pump_module, "_can_splice", lambda: False)
        blob = os.urandom(3 * MiB + 7)
        digest = _digest(blob)
        fetch = self.fetch(self.blob_file("copied", blob), digest)
        yield Deferred.fromCoroutine(fetch.run())
        self.assertTrue(fetch.complete)
        self.assertEqual(self.pumps.started, 1)
        with open(self.store.path(digest), "rb") as stored:
            self.assertEqual(stored.read(), blob)

    @inlineCallbacks
    def test_copies_where_splice_cannot_move_the_bytes(self) -> Any:
        """A C{splice} refused for these descriptors (EINVAL) falls back to copying."""
        refused: list[int] = []

        def refuse(*args: Any, **kwargs: Any) -> int:
            refused.append(1)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

        self.patch(os, "splice", refuse)
        blob = os.urandom(3 * MiB)
        digest = _digest(blob)
        fetch = self.fetch(self.blob_file("refused", blob), digest)
        yield Deferred.fromCoroutine(fetch.run())
        self.assertTrue(fetch.complete)
        self.assertEqual(refused, [1])
        with open(self.store.path(digest), "rb") as stored:
            self.assertEqual(stored.read(), blob)

    @inlineCallbacks
    def test_without_held_tail_the_hasher_follows_the_pumped_file(self) -> Any:
        """
        With C{--no-hold-tail} the pump only writes and the hash waits for
        it to end (no core taken from the transfer); the digest still
        decides the commit.
        """
        blob = os.urandom(3 * MiB)
        digest = _digest(blob)
        pumping_when_hashed: list[bool] = []

        def hash_offload(f: Any, *args: Any) -> Deferred[Any]:
            pumping_when_hashed.append(fetch._pump is not None)
            return run_here(f, *args)

        fetch = self.fetch(
            self.blob_file("loose", blob), digest, hold_tail=False, hash_offload=hash_offload
        )
        yield Deferred.fromCoroutine(fetch.run())
        self.assertTrue(fetch.complete)
        self.assertEqual(self.pumps.started, 1)
        self.assertTrue(os.path.exists(self.store.path(digest)))
        self.assertTrue(pumping_when_hashed)  # hashed, once the pump was done
        self.assertNotIn(True, pumping_when_hashed)

    @inlineCallbacks
    def test_without_held_tail_the_pump_does_not_wait_for_the_hash(self) -> Any:
        """
        With C{--no-hold-tail} the pump needs the first bytes written, not
        hashed: behind a busy hash thread it starts all the same.
        """
        blob = os.urandom(3 * MiB)
        digest = _digest(blob)
        hashing_at_pump_start: list[bool] = []

        def hash_offload(f: Any, *args: Any) -> Deferred[Any]:
            if fetch._pump is not None or hashing_at_pump_start:
                return run_here(f, *args)
            waiting: Deferred[Any] = Deferred()

            def run() -> None:
                if timer.active():
                    timer.cancel()
                if not waiting.called:
                    waiting.callback(f(*args))

            # The busy hash thread: it gets to this slice once the pump has
            # started (or, should the pump wait for it, after 5 s).
            timer = reactor.callLater(5, run)  # type: ignore[attr-defined]
            self.addCleanup(run)  # however the test ends, nothing is left waiting
            pending_hashes.append(run)
            return waiting

        pending_hashes: list[Any] = []
        start = self.pumps.start

        def start_pump(*args: Any, **kwargs: Any) -> Any:
            hashing_at_pump_start.append(fetch._hashing is not None)
            for run in pending_hashes:
                reactor.callLater(0, run)  # type: ignore[attr-defined]
            return start(*args, **kwargs)

        self.patch(self.pumps, "start", start_pump)
        fetch = self.fetch(
            self.blob_file("busy-hash", blob), digest, hold_tail=False, hash_offload=hash_offload
        )
        yield Deferred.fromCoroutine(fetch.run())
        self.assertTrue(fetch.complete)
        self.assertEqual(hashing_at_pump_start, [True])
        with open(self.store.path(digest), "rb") as stored:
            self.assertEqual(stored.read(), blob)

    @inlineCallbacks
    def test_corrupt_bytes_never_stored(self) -> Any:
        """Bytes that do not hash to the digest fail the fill, and nothing is stored."""
        blob = os.urandom(4 * MiB)
        digest = _digest(blob)
        corrupt = bytearray(blob)
        corrupt[3 * MiB] ^= 0xFF
        fetch = self.fetch(self.blob_file("corrupt", bytes(corrupt)), digest)
        yield Deferred.fromCoroutine(fetch.run())
        self.assertIsInstance(fetch.failure, DigestMismatch)
        self.assertEqual(self.pumps.started, 1)
        self.assertFalse(fetch.complete)
        self.assertLess(fetch.readable, len(blob))
        self.assertFalse(os.path.exists(self.store.path(digest)))
        self.assertFalse(os.path.exists(fetch.path))
        self.assertEqual((self.store.reserved, self.store.reserved_written), (0, 0))

    @inlineCallbacks
    def test_preallocated_blocks_count_as_written(self) -> Any:
        """
        The file's blocks, allocated up front, count as on the disk from
        the start (the free-space floor does not count them twice), and the
        reservation is given back whole when the fill ends early.
        """
        blob = os.urandom(4 * MiB)
        stalls = _Stalls(blob, sent=2 * MiB)
        self.web.putChild(b"stalls", stalls)
        fetch = self.fetch(self.base + b"stalls", _digest(blob), read_timeout=0.5)
        running = Deferred.fromCoroutine(fetch.run())
        while fetch.received < 2 * MiB:
            yield _turn()
        self.assertEqual(self.store.reserved, 4 * MiB)
        with open(fetch.path, "rb") as temporary:
            allocated = os.fstat(temporary.fileno()).st_blocks * 512 >= 4 * MiB
        # preallocated: nothing left to write; else what is not written yet
        self.assertEqual(self.store.unwritten(), 0 if allocated else 4 * MiB - fetch.received)
        yield running
        for request in stalls.open:
            request.channel.transport.abortConnection()
        self.assertIsInstance(fetch.failure, UpstreamTimeout)
        self.assertEqual((self.store.reserved, self.store.reserved_written), (0, 0))

    @inlineCallbacks
    def test_broken_body_resumes_with_range(self) -> Any:
        """
        Upstream dropping the connection mid-body ends the pump with the
        bytes it wrote; the fill asks for the rest with C{Range} and the
        blob is whole and verified.
        """
        blob = os.urandom(6 * MiB)
        digest = _digest(blob)
        breaks = _BreaksOnce(blob)
        self.web.putChild(b"breaks", breaks)
        fetch = self.fetch(self.base + b"breaks", digest, resumes=2)
        yield Deferred.fromCoroutine(fetch.run())
        self.assertIsNone(fetch.failure)
        self.assertTrue(fetch.complete)
        self.assertEqual(breaks.requests, 2)
        self.assertEqual(fetch.upstream_requests, 2)
        with open(self.store.path(digest), "rb") as stored:
            self.assertEqual(stored.read(), blob)

    @inlineCallbacks
    def test_silent_upstream_times_out(self) -> Any:
        """A pumped body that stops arriving fails the fill after the read timeout."""
        blob = os.urandom(4 * MiB)
        stalls = _Stalls(blob, sent=2 * MiB)
        self.web.putChild(b"stalls", stalls)
        fetch = self.fetch(self.base + b"stalls", _digest(blob), read_timeout=0.5)
        yield Deferred.fromCoroutine(fetch.run())
        for request in stalls.open:
            request.channel.transport.abortConnection()
        self.assertIsInstance(fetch.failure, UpstreamTimeout)
        self.assertEqual(self.pumps.started, 1)
        self.assertFalse(os.path.exists(fetch.path))

    @inlineCallbacks
    def test_trickle_below_the_minimum_rate_fails(self) -> Any:
        """
        A pumped body that trickles a byte every 10 s (on the pumps' clock,
        which the test moves) is never silent for the read timeout, but the
        pump gives it up as an upstream timeout once a 30 s window brought
        less than the fill's minimum rate.
        """
        now = [0.0]
        pumps = BodyPumps(reactor, threads=1, clock=lambda: now[0])
        pumps.startService()
        self.addCleanup(pumps.stopService)
        blob = os.urandom(4 * MiB)
        stalls = _Stalls(blob, sent=100)
        self.web.putChild(b"trickles", stalls)
        fetch = self.fetch(self.base + b"trickles", _digest(blob), pumps=pumps)
        running = Deferred.fromCoroutine(fetch.run())
        while not stalls.open or not pumps.started:
            yield _turn()
        trickled = 0
        while not running.called and trickled < 10:
            now[0] += 10
            stalls.open[0].write(b"x")
            trickled += 1
            while fetch.received < 100 + trickled and not running.called:
                yield _turn()
        given_up = running.called
        if not given_up:
            yield pumps.stopService()  # ends the pump: the test fails, and cleanly
        yield running
        for request in stalls.open:
            if request.channel is not None:
                request.channel.transport.abortConnection()
        self.assertTrue(given_up, "a trickle 100 s long was not given up")
        self.assertIsInstance(fetch.failure, UpstreamTimeout)
        assert fetch.failure is not None
        self.assertIn("below --upstream-min-rate 1024 B/s", fetch.failure.message)
        self.assertLessEqual(trickled, 4)
        self.assertEqual(pumps.started, 1)
        self.assertFalse(os.path.exists(fetch.path))

    @inlineCallbacks
    def test_stopping_ends_a_pump(self) -> Any:
        """Stopping the pumps (hammal shutting down) ends a pump blocked on a silent upstream."""
        blob = os.urandom(4 * MiB)
        stalls = _Stalls(blob, sent=2 * MiB)
        self.web.putChild(b"stalls", stalls)
        fetch = self.fetch(self.base + b"stalls", _digest(blob))
        running = Deferred.fromCoroutine(fetch.run())
        while fetch.received < 2 * MiB:  # the pump has the socket
            yield _turn()
        yield self.pumps.stopService()
        yield running
        for request in stalls.open:
            request.channel.transport.abortConnection()
        self.assertIsInstance(fetch.failure, LocalCacheError)

    @inlineCallbacks
    def test_event_loop_reads_when_no_pump_is_free(self) -> Any:
        """With every pump thread busy the fill reads on the event loop, as before."""
        busy = BodyPumps(reactor, threads=0)
        busy.startService()
        self.addCleanup(busy.stopService)
        blob = os.urandom(3 * MiB)
        digest = _digest(blob)
        fetch = self.fetch(self.blob_file("nopump", blob), digest, pumps=busy)
        yield Deferred.fromCoroutine(fetch.run())
        self.assertTrue(fetch.complete)
        self.assertEqual(busy.started, 0)
        with open(self.store.path(digest), "rb") as stored:
            self.assertEqual(stored.read(), blob)

    @inlineCallbacks
    def test_no_room_for_the_file(self) -> Any:
        """
        A disk that cannot give the blob's blocks up front fails the fill as
        the cache's own failure (its waiters go on uncached), file removed.
        """

        def no_room(fd: int, size: int) -> bool:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        self.patch(fetch_module, "preallocate", no_room)
        blob = os.urandom(2 * MiB)
        fetch = self.fetch(self.blob_file("noroom", blob), _digest(blob))
        yield Deferred.fromCoroutine(fetch.run())
        self.assertIsInstance(fetch.failure, LocalCacheError)
        self.assertEqual(self.pumps.started, 0)
        self.assertFalse(os.path.exists(fetch.path))
        yield _turn()  # the unclaimed answer is dropped
        yield _turn()

    @inlineCallbacks
    def test_disk_filling_up_stops_the_pump(self) -> Any:
        """
        The free-space floor, checked as the pump reports progress, stops a
        pump mid-body when the disk fills up: the fill fails as the cache's
        own failure and its file is removed.
        """
        self.patch(self.store, "has_room", lambda size=0: False)
        blob = os.urandom(6 * MiB)
        stalls = _Stalls(blob, sent=5 * MiB)  # never ends: only the floor can stop it
        self.web.putChild(b"fills", stalls)
        fetch = self.fetch(self.base + b"fills", _digest(blob))
        yield Deferred.fromCoroutine(fetch.run())
        for request in stalls.open:
            request.channel.transport.abortConnection()
        self.assertIsInstance(fetch.failure, LocalCacheError)
        self.assertEqual(self.pumps.started, 1)
        self.assertFalse(os.path.exists(fetch.path))

    @inlineCallbacks
    def test_small_bodies_stay_on_the_event_loop(self) -> Any:
        """A body under a MiB is not worth a thread: no pump starts."""
        blob = os.urandom(200 * 1024)
        digest = _digest(blob)
        fetch = self.fetch(self.blob_file("small", blob), digest)
        yield Deferred.fromCoroutine(fetch.run())
        self.assertTrue(fetch.complete)
        self.assertEqual(self.pumps.started, 0)


class BodyConnectionTests(TestCase):
    def test_only_plain_tcp(self) -> None:
        """Anything but a plain TCP connection under the body's transport is not pumped."""
        self.assertIsNone(body_connection(None))
        self.assertIsNone(body_connection(object()))


def _turn() -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(0.01, d.callback, None)
    return d
