"""
Tests for L{hammal.cache.fetch}: one L{BlobFetch} from upstream into the
cache, in memory (a L{Clock}, fake responses, offloads that run in place or
when the test says so: no threads, no network).

The data path: the received chunks go, as the same objects, to a writer and
a hasher off the event loop in batches; upstream pauses when they fall
behind; the tail is held until the digest matched unless C{hold_tail} is off.
Then the rest of the unit: verifying and committing, resuming with
``Range``, failures of the cache's own (never blamed on upstream), timeouts,
reservations, and the cleanup every failure owes.
"""

from __future__ import annotations

import errno
import hashlib
import os
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from hammal import metrics
from hammal.cache import fetch as fetch_module
from hammal.cache.fetch import BlobFetch, DigestMismatch, run_here
from hammal.cache.readers import BlobReader
from hammal.cache.store import BlobStore, FreeSpaceFloor
from hammal.cache.writes import LocalCacheError
from hammal.errors import (
    RegistryError,
    UpstreamBadResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from hammal.minrate import DEFAULT_MIN_RATE
from hammal.reference import Digest
from hammal.stream import TransferBroken


class _Transport:
    """The producer behind an upstream body: records pauses."""

    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


class _Response:
    """
    A C{200} (or C{code}) whose body the test pushes chunk by chunk, or
    which delivers C{body} at once when given one.
    """

    def __init__(
        self,
        length: Any,
        code: int = 200,
        headers: dict[bytes, list[bytes]] | None = None,
        body: bytes | None = None,
    ) -> None:
        self.code = code
        self.length = length
        self.headers = Headers({b"content-type": [b"application/octet-stream"], **(headers or {})})
        self.transport = _Transport()
        self.protocol: Any = None
        self._body = body

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)
        if self._body is not None:
            if self._body:
                self.send(self._body)
            self.end()

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def end(self) -> None:
        self.protocol.connectionLost(Failure(ResponseDone()))


def _settle(d: Deferred[Any], f: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """Run a held job as a thread pool would: its exception fails C{d}."""
    try:
        result = f(*args)
    except Exception as failure:
        d.errback(failure)
    else:
        d.callback(result)


class _HeldOffload:
    """
    An offload whose jobs run only when the test says so; but for the
    creation and preallocation of the cache file (run at once) unless
    C{hold_creates}.
    """

    def __init__(self, hold_creates: bool = False) -> None:
        self.jobs: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []
        self._hold_creates = hold_creates

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        creates = (fetch_module.create_cache_file, fetch_module.preallocate)
        if f in creates and not self._hold_creates:
            return run_here(f, *args)
        d: Deferred[Any] = Deferred()
        self.jobs.append((f, args, d))
        return d

    def of(self, f: Callable[..., Any]) -> list[tuple[Any, ...]]:
        return [args for g, args, _ in self.jobs if g is f]

    def run_only(self, f: Callable[..., Any]) -> None:
        """Run the jobs of C{f} (and those they start), leave the others waiting."""
        while any(g is f for g, _, _ in self.jobs):
            job = next(job for job in self.jobs if job[0] is f)
            self.jobs.remove(job)
            _settle(job[2], f, job[1])

    def run_all(self) -> None:
        while self.jobs:
            f, args, d = self.jobs.pop(0)
            _settle(d, f, args)

    def run_next(self) -> None:
        """Run the first held job."""
        f, args, d = self.jobs.pop(0)
        _settle(d, f, args)

    def fail_next(self, f: Callable[..., Any], error: Exception) -> None:
        """The first held job of C{f} fails with C{error} (without running)."""
        for job in self.jobs:
            if job[0] is f:
                self.jobs.remove(job)
                job[2].errback(error)
                return
        raise AssertionError(f"no job of {f} is held")


def _mismatches() -> float:
    return metrics.REGISTRY.get_sample_value("hammal_digest_mismatches_total") or 0


def _write_errors() -> float:
    value = metrics.REGISTRY.get_sample_value("hammal_cache_write_errors_total", {"kind": "blob"})
    return value or 0


class _FetchHarness(SynchronousTestCase):
    """A fill whose upstream answer and offload jobs the test drives."""

    def setUp(self) -> None:
        self.root = self.mktemp()
        self.store = BlobStore(self.root)
        os.makedirs(os.path.join(self.root, "tmp"), exist_ok=True)
        self.clock = Clock()
        self.offload = _HeldOffload()

    def fetch(
        self,
        blob: bytes,
        hold_tail: bool = True,
        digest: Digest | None = None,
        sized: bool = True,
    ) -> tuple[BlobFetch, _Response]:
        response = _Response(len(blob) if sized else UNKNOWN_LENGTH)
        fetch = self.make(blob, response, digest=digest, hold_tail=hold_tail)
        Deferred.fromCoroutine(fetch.run())
        self.assertIsNotNone(response.protocol)
        return fetch, response

    def make(
        self, blob: bytes, response: _Response, digest: Digest | None = None, **options: Any
    ) -> BlobFetch:
        """A fill of C{blob} whose upstream answers C{response}, on the held offload."""
        if digest is None:
            digest = Digest.parse("sha256:" + hashlib.sha256(blob).hexdigest())
        return BlobFetch(
            digest,
            self.store,
            self.clock,
            lambda offset: succeed(response),
            read_timeout=30,
            resumes=0,
            upstream="upstream.test",
            offload=self.offload,
            **options,
        )


class FetchPipelineTests(_FetchHarness):
    def test_preallocation_failing_later_fails_the_fill_cleanly(self) -> None:
        """
        A disk that refuses the blob's blocks once the fill has started
        (the preallocation runs on the offload, after readers were told)
        fails the fill as the cache's own failure: the upstream body is
        dropped, the file removed and the reservation given back.
        """
        blob = b"y" * 5000
        response = _Response(len(blob))
        self.offload = _HeldOffload(hold_creates=True)
        fetch = self.make(blob, response)
        Deferred.fromCoroutine(fetch.run())
        self.offload.run_next()  # the file exists, readers may follow
        self.assertIsNotNone(response.protocol)
        response.send(blob[:3000])
        self.offload.fail_next(
            fetch_module.preallocate, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        )
        self.offload.run_all()
        self.assertIsInstance(fetch.failure, LocalCacheError)
        self.assertIn("No space left", str(fetch.failure))
        self.assertTrue(response.transport.stopped)
        self.assertFalse(os.path.exists(fetch.path))
        self.assertEqual((self.store.reserved, self.store.reserved_written), (0, 0))

    def test_cache_file_created_off_the_event_loop(self) -> None:
        """
        Creating and preallocating the cache file are jobs of the offload,
        not of the event loop: under heavy writeback the file system can
        hold a create or an fallocate for hundreds of milliseconds, which
        on the event loop stalls every client. The body is taken once the
        file exists; the first bytes go to readers before the
        preallocation is done.
        """
        blob = b"x" * 5000
        response = _Response(len(blob))
        self.offload = _HeldOffload(hold_creates=True)
        fetch = self.make(blob, response)
        started = fetch.when_started()
        Deferred.fromCoroutine(fetch.run())
        self.assertFalse(os.path.exists(fetch.path))
        self.assertEqual([f for f, _, _ in self.offload.jobs], [fetch_module.create_cache_file])
        self.assertIsNone(response.protocol)
        self.assertNoResult(started)
        self.offload.run_next()
        self.assertTrue(os.path.exists(fetch.path))
        self.assertIs(self.successResultOf(started), fetch)
        # The preallocation runs next, as the writer's first job; readers
        # do not wait for it: they take the first bytes from memory.
        self.assertEqual([f for f, _, _ in self.offload.jobs], [fetch_module.preallocate])
        response.send(blob[:3000])
        self.assertEqual((fetch.written, fetch.sendable), (0, 3000))
        self.assertEqual(bytes(fetch.buffered(0, 3000) or b""), blob[:3000])
        self.offload.run_next()
        response.send(blob[3000:])
        response.end()
        self.offload.run_all()
        self.offload.run_all()
        self.assertTrue(fetch.complete)
        with open(self.store.path(fetch.digest), "rb") as stored:
            self.assertEqual(stored.read(), blob)

    def test_chunks_batched_and_hashed_in_hand(self) -> None:
        """
        Chunks arriving while a write runs go in one batch; the writer
        hashes the very objects received, in the same job (one hand-off per
        batch; the file is never read back).
        """
        chunks = [bytes([n]) * 1000 for n in range(5)]
        blob = b"".join(chunks)
        fetch, response = self.fetch(blob)
        reads: list[Any] = []
        self.patch(os, "pread", lambda *a: reads.append(a) or b"")
        for chunk in chunks:
            response.send(chunk)
        writes = self.offload.of(fetch_module._write_and_hash)
        # one job, started with the first chunk, and nothing else
        self.assertEqual(len(writes), 1)
        self.assertEqual(len(self.offload.jobs), 1)
        self.assertIs(writes[0][2][0], chunks[0])
        self.assertIs(writes[0][3], fetch._hasher)
        self.assertEqual((fetch.received, fetch.written, fetch.readable), (5000, 0, 0))
        f, args, d = self.offload.jobs.pop(0)
        d.callback(f(*args))
        # the rest went as one batch
        self.assertEqual([len(a[2]) for a in self.offload.of(fetch_module._write_and_hash)], [4])
        self.offload.run_all()
        self.assertEqual(fetch.written, 5000)
        self.assertEqual(fetch.readable, 5000 - fetch_module.TAIL_HOLD)  # the tail held
        response.end()
        self.offload.run_all()  # fdatasync
        self.assertTrue(fetch.complete)
        self.assertEqual(reads, [])
        with open(self.store.path(fetch.digest), "rb") as stored:
            self.assertEqual(stored.read(), blob)

    def test_first_bytes_readable_before_second_chunk(self) -> None:
        """
        With a known size only the blob's last bytes wait for the digest: a
        reader gets the first chunk as soon as it is written, before the
        second one arrives.
        """
        chunks = [bytes([n]) * 1000 for n in range(3)]
        fetch, response = self.fetch(b"".join(chunks))
        woken: list[int] = []
        fetch.subscribe(lambda: woken.append(fetch.readable))
        response.send(chunks[0])
        self.offload.run_all()
        self.assertEqual((fetch.written, fetch.readable), (1000, 1000))
        self.assertEqual(woken[-1], 1000)  # told when written (and when received)
        response.send(chunks[1])
        response.send(chunks[2])
        self.offload.run_only(fetch_module._write_and_hash)  # written and hashed, not ended
        self.assertEqual(fetch.written, 3000)
        self.assertEqual(fetch.readable, 3000 - fetch_module.TAIL_HOLD)
        self.assertFalse(fetch.verified)

    def test_received_bytes_sendable_before_written(self) -> None:
        """
        Readers may take a chunk from memory as soon as it arrives, before
        the writer thread wrote it (C{sendable}, C{buffered}); once written
        it comes from the file. The blob's last byte still waits for the
        digest.
        """
        chunks = [bytes([n]) * 1000 for n in range(3)]
        fetch, response = self.fetch(b"".join(chunks))
        woken: list[int] = []
        fetch.subscribe(lambda: woken.append(fetch.sendable))
        response.send(chunks[0])
        self.assertEqual((fetch.written, fetch.readable, fetch.sendable), (0, 0, 1000))
        self.assertEqual(woken, [1000])
        self.assertEqual(bytes(fetch.buffered(0, 1000)), chunks[0])
        self.assertEqual(bytes(fetch.buffered(500, 700)), chunks[0][500:700])
        response.send(chunks[1])
        response.send(chunks[2])
        self.assertEqual(fetch.sendable, 3000 - fetch_module.TAIL_HOLD)
        self.assertEqual(bytes(fetch.buffered(1000, 3000)), chunks[1])  # one chunk at most
        self.assertEqual(bytes(fetch.buffered(2000, fetch.sendable)), chunks[2][:-1])
        self.offload.run_only(fetch_module._write_and_hash)
        self.assertEqual(fetch.written, 3000)
        self.assertIsNone(fetch.buffered(0, 1000))  # in the file now
        self.assertEqual(fetch.sendable, 3000 - fetch_module.TAIL_HOLD)
        response.end()
        self.offload.run_all()
        self.assertTrue(fetch.complete)
        self.assertEqual(fetch.sendable, 3000)

    def test_unsized_blob_sendable_but_last_chunk(self) -> None:
        """Of a blob of unknown size, all but the last chunk received is sendable."""
        chunks = [bytes([n]) * 1000 for n in range(3)]
        fetch, response = self.fetch(b"".join(chunks), sized=False)
        response.send(chunks[0])
        self.assertEqual(fetch.sendable, 0)
        response.send(chunks[1])
        self.assertEqual(fetch.sendable, 1000)
        self.assertEqual(bytes(fetch.buffered(0, 1000)), chunks[0])

    def test_no_hold_tail_sendable_as_received(self) -> None:
        """Without the held tail every received byte is sendable at once."""
        fetch, response = self.fetch(b"x" * 2000, hold_tail=False)
        response.send(b"x" * 2000)
        self.assertEqual((fetch.written, fetch.sendable), (0, 2000))

    def test_previous_chunk_released_on_arrival(self) -> None:
        """
        Of a blob of unknown size, a written chunk is released as soon as
        the next one arrives, before that one is written: only the last
        chunk received is held.
        """
        chunks = [bytes([n]) * 1000 for n in range(3)]
        fetch, response = self.fetch(b"".join(chunks), sized=False)
        response.send(chunks[0])
        self.offload.run_all()
        self.assertEqual((fetch.written, fetch.readable), (1000, 0))
        woken: list[int] = []
        fetch.subscribe(lambda: woken.append(fetch.readable))
        response.send(chunks[1])
        self.assertEqual((fetch.written, fetch.readable), (1000, 1000))
        self.assertEqual(woken, [1000])
        self.offload.run_all()
        self.assertEqual((fetch.written, fetch.readable), (2000, 1000))
        response.send(chunks[2])
        response.end()
        self.offload.run_all()
        self.assertTrue(fetch.complete)
        self.assertEqual(fetch.readable, 3000)

    def test_batches_counted(self) -> None:
        """Five chunks during one write make two write jobs, not five."""
        chunks = [bytes([n]) * 100 for n in range(5)]
        fetch, response = self.fetch(b"".join(chunks))
        started: list[int] = []
        real = self.offload.__call__

        def counting(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
            if f is fetch_module._write_and_hash:
                started.append(len(args[2]))
            return real(f, *args)

        fetch._offload = counting
        for chunk in chunks:
            response.send(chunk)
        self.offload.run_all()
        self.assertEqual(started, [1, 4])

    def test_upstream_paused_while_behind(self) -> None:
        """
        Past MAX_BACKLOG received but unwritten bytes upstream pauses (memory
        stays bounded); it resumes once the writer and hasher caught up.
        """
        self.patch(fetch_module, "MAX_BACKLOG", 2500)
        chunks = [bytes([n]) * 1000 for n in range(6)]
        fetch, response = self.fetch(b"".join(chunks))
        for chunk in chunks[:3]:
            response.send(chunk)
        self.assertTrue(response.transport.paused)
        self.offload.run_all()
        self.assertFalse(response.transport.paused)
        for chunk in chunks[3:]:
            response.send(chunk)
        response.end()
        self.offload.run_all()
        self.assertTrue(fetch.complete)
        self.assertEqual(response.transport.pauses, 2)

    def test_no_hold_tail_every_byte_readable(self) -> None:
        """Without the held tail every written byte is readable at once."""
        chunks = [bytes([n]) * 1000 for n in range(3)]
        fetch, response = self.fetch(b"".join(chunks), hold_tail=False)
        for chunk in chunks:
            response.send(chunk)
            self.offload.run_all()
            self.assertEqual(fetch.readable, fetch.written)
        self.assertEqual(fetch.readable, 3000)
        self.assertFalse(fetch.verified)
        response.end()
        self.offload.run_all()
        self.assertTrue(fetch.complete)

    def test_no_hold_tail_mismatch_not_stored(self) -> None:
        """
        Without the held tail a corrupt blob reached its readers whole, but
        the digest still decides: not stored, counted, the fetch failed.
        """
        blob = b"x" * 3000
        wrong = Digest.parse("sha256:" + hashlib.sha256(b"y" * 3000).hexdigest())
        before = _mismatches()
        fetch, response = self.fetch(blob, hold_tail=False, digest=wrong)
        response.send(blob[:1500])
        response.send(blob[1500:])
        self.offload.run_all()
        self.assertEqual(fetch.readable, 3000)
        response.end()
        self.offload.run_all()
        self.assertIsInstance(fetch.failure, DigestMismatch)
        self.assertFalse(fetch.complete)
        self.assertNotIn(wrong, self.store)
        self.assertFalse(os.path.exists(fetch.path))
        self.assertEqual(_mismatches(), before + 1)

    def test_no_hold_tail_pauses_on_the_writer_only(self) -> None:
        """
        Without the held tail a hasher that lags does not pause upstream:
        once the writer caught up, upstream reads on, however far behind
        the hash is; the commit still waits for the digest.
        """
        self.patch(fetch_module, "MAX_BACKLOG", 2500)
        chunks = [bytes([n]) * 1000 for n in range(6)]
        blob = b"".join(chunks)
        fetch, response = self.fetch(blob, hold_tail=False)
        for chunk in chunks[:3]:
            response.send(chunk)
        self.assertTrue(response.transport.paused)  # the writer is behind
        self.offload.run_only(fetch_module._write_chunks)
        self.assertFalse(response.transport.paused)  # the hasher has done nothing
        for chunk in chunks[3:]:
            response.send(chunk)
        self.offload.run_only(fetch_module._write_chunks)
        self.assertFalse(response.transport.paused)
        self.assertEqual((fetch.written, fetch.readable), (6000, 6000))
        response.end()
        self.assertFalse(fetch.verified)  # waits for the hasher
        self.offload.run_all()
        self.assertTrue(fetch.complete)
        with open(self.store.path(fetch.digest), "rb") as stored:
            self.assertEqual(stored.read(), blob)

    def test_no_hold_tail_hasher_reads_the_file_in_slices(self) -> None:
        """
        Without the held tail the hasher holds no received chunk: it reads
        what was written back from the file, a bounded slice per job, so
        memory stays flat however far it lags.
        """
        self.patch(fetch_module, "HASH_SLICE", 1500)
        self.patch(fetch_module, "HASH_READ", 400)
        chunks = [bytes([n]) * 1000 for n in range(4)]
        blob = b"".join(chunks)
        fetch, response = self.fetch(blob, hold_tail=False)
        for chunk in chunks:
            response.send(chunk)
        self.assertEqual(self.offload.of(fetch_module._hash_chunks), [])
        self.offload.run_only(fetch_module._write_chunks)
        self.assertEqual(fetch.written, 4000)
        self.assertEqual(len(fetch._unwritten), 0)  # no chunk kept for the hasher
        slices = []
        while self.offload.jobs:  # one job at a time: each starts the next slice
            f, args, d = self.offload.jobs.pop(0)
            self.assertIs(f, fetch_module._hash_file)
            slices.append(args[2:])
            d.callback(f(*args))
        # the first chunk's write started one (the rest were not written yet)
        self.assertEqual(slices, [(0, 1000), (1000, 2500), (2500, 4000)])
        response.end()
        self.offload.run_all()
        self.assertTrue(fetch.complete)

    def test_no_hold_tail_read_back_failure_fails_locally(self) -> None:
        """
        The hasher cannot read the file back: the fill fails as the cache's
        fault (not a digest mismatch), nothing is stored, the file goes.
        """
        blob = b"r" * 3000
        before = _mismatches()
        fetch, response = self.fetch(blob, hold_tail=False)
        response.send(blob)
        self.offload.run_only(fetch_module._write_chunks)
        f, args, d = self.offload.jobs.pop(0)
        self.assertIs(f, fetch_module._hash_file)
        d.errback(OSError(5, "Input/output error"))
        response.end()
        self.offload.run_all()
        self.assertIsInstance(fetch.failure, LocalCacheError)
        self.assertFalse(fetch.complete)
        self.assertNotIn(fetch.digest, self.store)
        self.assertFalse(os.path.exists(fetch.path))
        self.assertEqual(_mismatches(), before)

    def test_no_hold_tail_hashes_on_its_own_offload(self) -> None:
        """The hasher that follows the file runs where C{hash_offload} says."""
        hashing = _HeldOffload()
        blob = b"z" * 3000
        response = _Response(len(blob))
        fetch = self.make(blob, response, hold_tail=False, hash_offload=hashing)
        Deferred.fromCoroutine(fetch.run())
        response.send(blob)
        response.end()
        self.offload.run_all()
        self.assertEqual(self.offload.of(fetch_module._hash_file), [])
        self.assertEqual(len(hashing.of(fetch_module._hash_file)), 1)
        self.assertFalse(fetch.verified)
        hashing.run_all()
        self.offload.run_all()  # fdatasync
        self.assertTrue(fetch.complete)

    def test_held_tail_mismatch_never_readable_whole(self) -> None:
        """With the held tail a corrupt blob is never readable to its end."""
        blob = b"x" * 3000
        wrong = Digest.parse("sha256:" + hashlib.sha256(b"y" * 3000).hexdigest())
        fetch, response = self.fetch(blob, digest=wrong)
        response.send(blob[:1500])
        response.send(blob[1500:])
        self.offload.run_all()
        self.assertLess(fetch.readable, 3000)
        response.end()
        self.offload.run_all()
        self.assertIsInstance(fetch.failure, DigestMismatch)
        self.assertLess(fetch.readable, 3000)


class _Consumer:
    """A client: records what was written, registers producers."""

    def __init__(self) -> None:
        self.data = b""
        self.producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.data += data


class _Bypass:
    """The rest of a blob from upstream: records where it was asked to start."""

    def __init__(self, blob: bytes, asked: list[tuple[int, int | None]], start: int) -> None:
        self._blob = blob
        self._start = start
        asked.append((start, None))

    def deliver(self, consumer: Any) -> Deferred[int]:
        consumer.write(self._blob[self._start :])
        return succeed(len(self._blob) - self._start)

    def stop(self) -> None:
        pass


class ReaderAheadOfWriterTests(_FetchHarness):
    """A reader that took bytes from the fill's memory, when the disk fails."""

    def test_write_failure_goes_on_from_the_reader_offset(self) -> None:
        """
        The reader had two chunks from memory, none written, when the write
        failed: it goes on from upstream at its own offset, so the client
        gets every byte once, in order.
        """
        chunks = [bytes([n]) * 1000 for n in range(1, 5)]
        blob = b"".join(chunks)
        fetch, response = self.fetch(blob)
        consumer = _Consumer()
        asked: list[tuple[int, int | None]] = []
        reader = BlobReader(
            consumer,
            self.clock,
            fetch.path,
            0,
            None,
            fetch,
            bypass=lambda offset, end: _Bypass(blob, asked, offset),
        )
        done: list[object] = []
        reader.done.addBoth(done.append)
        reader.begin()
        response.send(chunks[0])
        response.send(chunks[1])
        self.clock.advance(0)
        self.assertEqual(consumer.data, chunks[0] + chunks[1])
        self.assertEqual(fetch.written, 0)
        f, args, d = self.offload.jobs.pop(0)
        self.assertIs(f, fetch_module._write_and_hash)
        d.errback(OSError(28, "No space left on device"))
        self.clock.advance(0)
        self.assertEqual(asked, [(2000, None)])
        self.assertEqual(consumer.data, blob)
        self.assertEqual(done, [len(blob)])


BLOB = bytes(range(256)) * 12  # 3072 bytes
DIGEST = Digest.parse("sha256:" + hashlib.sha256(BLOB).hexdigest())


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class _Upstream:
    """
    The fetch's C{start_upstream}: answers each request with the next of
    C{answers} (a response, a L{Deferred} of one, or an exception to
    raise), and records the offsets asked for.
    """

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.offsets: list[int] = []

    def __call__(self, offset: int) -> Deferred[Any]:
        self.offsets.append(offset)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, Deferred):
            return answer
        return succeed(answer)


def _resumed(start: int, size: int = len(BLOB), body: bytes | None = None) -> _Response:
    """A C{206} for bytes C{[start, size)}."""
    return _Response(
        size - start,
        code=206,
        headers={b"content-range": [f"bytes {start}-{size - 1}/{size}".encode()]},
        body=body,
    )


def _break(response: _Response) -> None:
    """Upstream's connection resets mid-body."""
    response.protocol.connectionLost(Failure(ConnectionLost("reset by peer")))


class _FetchTestCase(SynchronousTestCase):
    """A store in a temporary folder (no free-space floor) and a clock."""

    def setUp(self) -> None:
        self.root = self.mktemp()
        self.store = BlobStore(self.root, min_free=FreeSpaceFloor(size=0))
        os.makedirs(os.path.join(self.root, "tmp"))
        self.clock = Clock()

    def start(
        self,
        upstream: _Upstream,
        offload: Any = run_here,
        resumes: int = 2,
        digest: Digest = DIGEST,
        read_timeout: float = 30,
        hold_tail: bool = True,
        min_rate: int = DEFAULT_MIN_RATE,
    ) -> BlobFetch:
        """A fetch of C{digest} from C{upstream}, running."""
        fetch = BlobFetch(
            digest,
            self.store,
            self.clock,
            upstream,
            read_timeout=read_timeout,
            resumes=resumes,
            upstream="upstream.test",
            offload=offload,
            hold_tail=hold_tail,
            min_rate=min_rate,
        )
        Deferred.fromCoroutine(fetch.run())
        return fetch

    def assertStored(self, fetch: BlobFetch, blob: bytes = BLOB) -> None:
        """The fetch verified and stored exactly C{blob}, and left nothing behind."""
        self.assertIsNone(fetch.failure)
        self.assertTrue(fetch.complete)
        self.assertTrue(fetch.verified)
        self.assertEqual((fetch.size, fetch.readable), (len(blob), len(blob)))
        with open(self.store.path(fetch.digest), "rb") as stored:
            self.assertEqual(stored.read(), blob)
        self.assertCleanedUp(fetch)

    def assertCleanedUp(self, fetch: BlobFetch, fd: int | None = None) -> None:
        """
        The fetch ended and owes nothing: the temporary is gone, its file
        descriptor closed, its reservation given back.
        """
        self.successResultOf(fetch.finished)
        self.assertFalse(os.path.exists(fetch.path))
        self.assertEqual(os.listdir(os.path.join(self.root, "tmp")), [])
        self.assertIsNone(fetch._fd)
        if fd is not None:
            self.assertFalse(_fd_open(fd))
        self.assertEqual((self.store.reserved, self.store.reserved_written), (0, 0))

    def assertFailed(self, fetch: BlobFetch, kind: type[Exception]) -> Exception:
        """The fetch failed with C{kind}, stored nothing and cleaned up."""
        self.assertIsInstance(fetch.failure, kind)
        self.assertFalse(fetch.complete)
        self.assertNotIn(fetch.digest, self.store)
        self.assertCleanedUp(fetch)
        assert fetch.failure is not None
        return fetch.failure


class OffloadTests(SynchronousTestCase):
    """The jobs a fetch offloads, and L{run_here}."""

    def test_run_here_runs_in_place(self) -> None:
        """run_here returns the result already there: no thread, no reactor turn."""
        self.assertEqual(self.successResultOf(run_here(divmod, 7, 2)), (3, 1))

    def test_run_here_turns_exceptions_into_failures(self) -> None:
        """A job that raises gives a failed Deferred, as a thread pool would."""
        self.failureResultOf(run_here(divmod, 1, 0), ZeroDivisionError)

    def test_write_chunks_writes_at_offsets_through_short_writes(self) -> None:
        """
        The chunks go one after another from the offset given, even when
        the disk takes a few bytes at a time; the end offset is returned.
        """
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"." * 4)
        real = os.pwrite
        sizes: list[int] = []

        def short(fd: int, data: Any, offset: int) -> int:
            sizes.append(len(data))
            return real(fd, bytes(data)[:3], offset)

        self.patch(os, "pwrite", short)
        fd = os.open(path, os.O_WRONLY)
        self.addCleanup(os.close, fd)
        self.assertEqual(fetch_module._write_chunks(fd, 4, [b"abcde", b"fgh"]), 12)
        self.assertEqual(sizes, [5, 2, 3])
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"....abcdefgh")

    def test_write_chunks_refused(self) -> None:
        """A disk that accepts no bytes is an I/O error, not an endless loop."""
        self.patch(os, "pwrite", lambda fd, data, offset: 0)
        error = self.assertRaises(OSError, fetch_module._write_chunks, 99, 0, [b"x"])
        self.assertEqual(error.errno, errno.EIO)

    def test_hash_chunks_counts(self) -> None:
        """The hasher is fed every chunk in order; the count is returned."""
        hasher = hashlib.sha256()
        self.assertEqual(fetch_module._hash_chunks(hasher, [b"ab", b"", b"c"]), 3)
        self.assertEqual(hasher.hexdigest(), hashlib.sha256(b"abc").hexdigest())


class VerifyAndCommitTests(_FetchTestCase):
    """The digest decides: a match is stored, a mismatch never is."""

    def test_whole_blob_stored(self) -> None:
        """An exact blob is stored, and the readers waiting were told."""
        response = _Response(len(BLOB))
        fetch = self.start(_Upstream(response))
        started = self.successResultOf(fetch.when_started())
        self.assertIs(started, fetch)
        woken: list[bool] = []
        fetch.subscribe(lambda: woken.append(fetch.complete))
        response.send(BLOB)
        response.end()
        self.assertStored(fetch)
        self.assertEqual(woken[-1], True)
        self.assertEqual(fetch.upstream_requests, 1)
        self.assertEqual(fetch.content_type, b"application/octet-stream")
        self.assertIs(self.successResultOf(fetch.when_started()), fetch)

    def test_waiters_told_once_the_file_exists(self) -> None:
        """
        Waiters that came before upstream answered are told once the
        temporary exists (readers can follow), not before; the type
        upstream announced is kept, and a default used when it sent none.
        """
        answer: Deferred[Any] = Deferred()
        fetch = self.start(_Upstream(answer))
        waiters = [fetch.when_started(), fetch.when_started()]
        self.assertNoResult(waiters[0])
        self.assertFalse(os.path.exists(fetch.path))
        response = _Response(len(BLOB))
        response.headers.removeHeader(b"content-type")
        answer.callback(response)
        for waiter in waiters:
            self.assertIs(self.successResultOf(waiter), fetch)
        self.assertTrue(os.path.exists(fetch.path))
        self.assertEqual(fetch.content_type, b"application/octet-stream")
        response.send(BLOB)
        response.end()
        self.assertStored(fetch)

    def test_unsubscribed_listener_not_called(self) -> None:
        """A reader that left is not woken any more."""
        response = _Response(len(BLOB))
        fetch = self.start(_Upstream(response))
        woken: list[int] = []

        def listener() -> None:
            woken.append(fetch.readable)

        fetch.subscribe(listener)
        response.send(BLOB[:1000])
        response.send(BLOB[1000:2000])
        fetch.unsubscribe(listener)
        count = len(woken)
        self.assertGreater(count, 0)
        response.send(BLOB[2000:])
        response.end()
        self.assertTrue(fetch.complete)
        self.assertEqual(len(woken), count)

    def test_tail_readable_once_verified_before_durable(self) -> None:
        """
        The last chunk becomes readable as soon as the digest matched, before
        the fdatasync that must precede storing it; the blob enters the store
        only after that.
        """
        offload = _HeldOffload()
        response = _Response(len(BLOB))
        fetch = self.start(_Upstream(response), offload=offload)
        response.send(BLOB[:2000])
        response.send(BLOB[2000:])
        offload.run_all()
        self.assertEqual(fetch.written, len(BLOB))
        self.assertLess(fetch.readable, len(BLOB))  # the tail held
        response.end()
        self.assertTrue(fetch.verified)
        self.assertEqual(fetch.readable, len(BLOB))
        self.assertFalse(fetch.complete)
        self.assertNotIn(DIGEST, self.store)
        ((fd,),) = offload.of(os.fdatasync)
        offload.run_all()
        self.assertStored(fetch)

    def test_mismatch_counted_and_not_resumed(self) -> None:
        """
        Bytes that do not hash to the digest: counted, not stored, and not
        "resumed" (asking again would only fetch the same bytes).
        """
        before = _mismatches()
        response = _Response(len(BLOB), body=b"y" * len(BLOB))
        fetch = self.start(_Upstream(response), resumes=3)
        failure = self.assertFailed(fetch, DigestMismatch)
        self.assertIn(str(DIGEST), failure.message)
        self.assertEqual(_mismatches(), before + 1)
        self.assertEqual(fetch.upstream_requests, 1)
        self.assertLess(fetch.readable, len(BLOB))

    def test_short_body_not_stored(self) -> None:
        """A body that ends cleanly but short of the announced size fails."""
        response = _Response(len(BLOB), body=BLOB[:-1])
        fetch = self.start(_Upstream(response), resumes=0)
        failure = self.assertFailed(fetch, TransferBroken)
        self.assertIn(f"{len(BLOB) - 1} of {len(BLOB)} bytes", failure.message)

    def test_more_than_announced_stops_upstream(self) -> None:
        """Bytes past the announced size end the fetch and the connection."""
        response = _Response(10)
        fetch = self.start(_Upstream(response), resumes=0)
        response.send(b"x" * 11)
        self.assertTrue(response.transport.stopped)
        failure = self.assertFailed(fetch, TransferBroken)
        self.assertIn("more bytes than announced", failure.message)

    def test_unknown_size_verified_by_digest(self) -> None:
        """Without a Content-Length the digest alone decides; the size is what came."""
        response = _Response(UNKNOWN_LENGTH, body=BLOB)
        fetch = self.start(_Upstream(response))
        self.assertStored(fetch)

    def test_commit_failure_serves_readers_and_stores_nothing(self) -> None:
        """
        fdatasync failing after the digest matched: readers may still read
        every byte (verified), nothing is stored, the failed write is
        counted and the temporary removed at once.
        """

        def broken(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        self.patch(os, "fdatasync", broken)
        errors = _write_errors()
        fetch = self.start(_Upstream(_Response(len(BLOB), body=BLOB)))
        self.assertIsNone(fetch.failure)
        self.assertTrue(fetch.verified)
        self.assertFalse(fetch.complete)
        self.assertEqual(fetch.readable, len(BLOB))
        self.assertNotIn(DIGEST, self.store)
        self.assertCleanedUp(fetch)
        self.assertEqual(_write_errors(), errors + 1)


class UpstreamAnswerTests(_FetchTestCase):
    """What upstream answers before the body: errors, pages, no answer at all."""

    def test_error_status_is_upstreams(self) -> None:
        """A 404 with an OCI error body fails the fetch with upstream's own error."""
        body = b'{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry"}]}'
        fetch = self.start(_Upstream(_Response(len(body), code=404, body=body)))
        failure = self.failureResultOf(fetch.when_started())
        self.assertIn("blob unknown to registry", failure.getErrorMessage())
        self.assertEqual(self.assertFailed(fetch, RegistryError).code, "BLOB_UNKNOWN")
        self.assertNotIsInstance(fetch.failure, LocalCacheError)

    def test_error_body_that_stalls(self) -> None:
        """
        An error answer whose body never comes is reported from its status
        alone once the read times out, and its connection dropped.
        """
        error = _Response(100, code=503)
        fetch = self.start(_Upstream(error), read_timeout=1)
        waiter = fetch.when_started()
        self.assertNoResult(waiter)
        self.clock.advance(1)
        self.failureResultOf(waiter, UpstreamUnavailable)
        self.assertTrue(error.transport.stopped)
        failure = self.assertFailed(fetch, RegistryError)
        self.assertIn("HTTP 503", failure.message)

    def test_first_answer_partial(self) -> None:
        """A 206 to a request for the whole blob is not a blob."""
        fetch = self.start(_Upstream(_resumed(0, body=BLOB)))
        failure = self.assertFailed(fetch, UpstreamBadResponse)
        self.assertIn("HTTP 206", failure.message)

    def test_web_page_refused(self) -> None:
        """A 200 HTML page (a captive portal) is refused, its body read and dropped."""
        page = _Response(5, headers={b"content-type": [b"text/html"]}, body=b"<html")
        fetch = self.start(_Upstream(page))
        self.assertFailed(fetch, UpstreamBadResponse)
        self.assertIsNotNone(page.protocol)

    def test_no_answer_within_the_deadline(self) -> None:
        """
        Upstream never answers: at the deadline (4 x the read timeout by
        default) the request is cancelled and every waiter fails with a 504.
        """
        cancelled: list[bool] = []
        never: Deferred[Any] = Deferred(lambda d: cancelled.append(True))
        fetch = self.start(_Upstream(never), read_timeout=2)
        waiter = fetch.when_started()
        self.clock.advance(7.9)
        self.assertNoResult(waiter)
        self.clock.advance(0.1)
        failure = self.failureResultOf(waiter, UpstreamTimeout)
        self.assertEqual(failure.value.status, 504)
        self.assertEqual(cancelled, [True])
        self.assertFailed(fetch, UpstreamTimeout)

    def test_a_bug_fails_the_fetch_not_the_waiters(self) -> None:
        """An unexpected exception ends the fetch with an error; nobody hangs."""
        fetch = self.start(_Upstream(ValueError("a bug")))
        waiter = fetch.when_started()
        self.failureResultOf(waiter, RegistryError)
        self.assertIn("internal error", fetch.failure.message)  # type: ignore[union-attr]
        self.assertCleanedUp(fetch)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)


class ResumeTests(_FetchTestCase):
    """A body that breaks is resumed with ``Range`` from the byte it reached."""

    def test_resumed_with_a_range(self) -> None:
        """Upstream answers the resume with 206 from the offset: the blob is exact."""
        first = _Response(len(BLOB))
        upstream = _Upstream(first, _resumed(1000, body=BLOB[1000:]))
        fetch = self.start(upstream)
        first.send(BLOB[:1000])
        _break(first)
        self.assertEqual(upstream.offsets, [0, 1000])
        self.assertStored(fetch)
        self.assertEqual(fetch.upstream_requests, 2)

    def test_resume_answered_from_zero(self) -> None:
        """
        Upstream ignores the Range and sends the whole blob again (200): the
        bytes already held are skipped, not written or hashed twice.
        """
        first = _Response(len(BLOB))
        fetch = self.start(_Upstream(first, _Response(len(BLOB), body=BLOB)))
        first.send(BLOB[:1500])
        _break(first)
        self.assertStored(fetch)

    def test_resume_answered_with_the_wrong_range(self) -> None:
        """A 206 starting elsewhere is refused (its body dropped), not spliced in."""
        first = _Response(len(BLOB))
        wrong = _resumed(0, body=BLOB)
        fetch = self.start(_Upstream(first, wrong))
        first.send(BLOB[:1000])
        _break(first)
        failure = self.assertFailed(fetch, TransferBroken)
        self.assertIn("wrong range", failure.message)
        self.assertIsNotNone(wrong.protocol)

    def test_resumes_run_out(self) -> None:
        """After C{resumes} resumes that broke too, the fetch fails."""
        answers = [_Response(len(BLOB)), _resumed(100), _resumed(200)]
        upstream = _Upstream(*answers)
        fetch = self.start(upstream, resumes=2)
        for index, response in enumerate(answers):
            response.send(BLOB[index * 100 : (index + 1) * 100])
            _break(response)
        self.assertEqual(upstream.offsets, [0, 100, 200])
        failure = self.assertFailed(fetch, TransferBroken)
        self.assertIn("after 300 bytes", failure.message)

    def test_no_resume_once_every_byte_came(self) -> None:
        """A connection lost after the last byte has nothing left to resume."""
        first = _Response(len(BLOB))
        upstream = _Upstream(first)
        fetch = self.start(upstream)
        first.send(BLOB)
        _break(first)
        self.assertEqual(upstream.offsets, [0])
        self.assertFailed(fetch, TransferBroken)

    def test_silent_upstream_times_out_and_resumes(self) -> None:
        """
        Upstream silent for the read timeout: the connection is dropped and
        the transfer resumed from the byte it reached.
        """
        first = _Response(len(BLOB))
        upstream = _Upstream(first, _resumed(500, body=BLOB[500:]))
        fetch = self.start(upstream, read_timeout=5)
        first.send(BLOB[:500])
        self.clock.advance(4.9)
        self.assertEqual(upstream.offsets, [0])
        self.clock.advance(0.1)
        self.assertTrue(first.transport.stopped)
        self.assertEqual(upstream.offsets, [0, 500])
        self.assertStored(fetch)

    def test_silent_upstream_without_resumes(self) -> None:
        """With no resume left, silence fails the fetch with a timeout."""
        first = _Response(len(BLOB))
        fetch = self.start(_Upstream(first), resumes=0, read_timeout=5)
        first.send(BLOB[:500])
        self.clock.advance(5)
        failure = self.assertFailed(fetch, UpstreamTimeout)
        self.assertIn("sent nothing for 5 seconds after 500 bytes", failure.message)


class BacklogTests(_FetchTestCase):
    """Upstream waits while the writer or the hasher is behind."""

    def test_paused_upstream_is_not_timed_out(self) -> None:
        """
        While the fetch itself holds upstream paused, upstream's silence is
        not a timeout; the timer runs again once it is resumed.
        """
        self.patch(fetch_module, "MAX_BACKLOG", 1500)
        offload = _HeldOffload()
        response = _Response(len(BLOB))
        fetch = self.start(_Upstream(response), offload=offload, resumes=0, read_timeout=5)
        response.send(BLOB[:1000])
        response.send(BLOB[1000:2000])
        self.assertTrue(response.transport.paused)
        self.clock.advance(60)
        self.assertIsNone(fetch.failure)
        offload.run_all()
        self.assertFalse(response.transport.paused)
        self.clock.advance(5)
        self.assertIsInstance(fetch.failure, UpstreamTimeout)

    def test_resumed_only_below_half(self) -> None:
        """
        Upstream resumes once the backlog fell to half of MAX_BACKLOG, not
        at the first job that ends (no pause/resume flapping).
        """
        self.patch(fetch_module, "MAX_BACKLOG", 2000)
        offload = _HeldOffload()
        response = _Response(len(BLOB))
        self.start(_Upstream(response), offload=offload)
        response.send(BLOB[:1000])  # written and hashed in a first batch
        response.send(BLOB[1000:1500])
        self.assertFalse(response.transport.paused)
        response.send(BLOB[1500:2100])
        self.assertTrue(response.transport.paused)  # 2100 behind
        offload.run_next()  # the first batch, written and hashed
        self.assertEqual(offload.jobs[0][0], fetch_module._write_and_hash)
        self.assertTrue(response.transport.paused)  # 1100 behind: more than half
        offload.run_all()
        self.assertFalse(response.transport.paused)


class MinimumRateTests(_FetchTestCase):
    """
    A body that trickles (never silent for a read timeout, yet slower than
    C{--upstream-min-rate}) is given up after a window of the read timeout,
    the way silence is: resumed with C{Range}, then a timeout.
    """

    def trickle(self, response: _Response, at: int, size: int, every: float, until: float) -> int:
        """Send C{size} bytes of the blob from C{at} each C{every} seconds up to C{until}."""
        while at < len(BLOB) and self.clock.seconds() < until:
            response.send(BLOB[at : at + size])
            at = min(at + size, len(BLOB))
            self.clock.advance(every)
        return at

    def test_trickle_below_the_rate_fails_after_one_window(self) -> None:
        """
        10 bytes every 10 s (1 B/s, under 10 B/s): never silent for the 30 s
        read timeout, but given up once its first 30 s window ends short.
        """
        response = _Response(len(BLOB))
        fetch = self.start(_Upstream(response), resumes=0, min_rate=10)
        for _ in range(3):
            response.send(BLOB[:10])
            self.clock.advance(9.99)
            self.assertIsNone(fetch.failure)
            self.clock.advance(0.01)
        failure = self.assertFailed(fetch, UpstreamTimeout)
        self.assertTrue(response.transport.stopped)
        self.assertEqual(
            failure.message,
            "upstream.test sent 30 bytes in the last 30 s, below --upstream-min-rate 10 B/s",
        )
        self.assertEqual(failure.status, 504)

    def test_trickle_resumes_with_a_range(self) -> None:
        """A window that ends short resumes from the byte reached, like a read timeout."""
        first = _Response(len(BLOB))
        upstream = _Upstream(first, _resumed(30, body=BLOB[30:]))
        fetch = self.start(upstream, resumes=1, min_rate=10)
        self.trickle(first, 0, 10, every=10, until=30)
        self.assertTrue(first.transport.stopped)
        self.assertEqual(upstream.offsets, [0, 30])
        self.assertStored(fetch)

    def test_slow_body_above_the_rate_completes(self) -> None:
        """110 bytes every 10 s (11 B/s, over 10 B/s) for 280 s: every byte, stored."""
        response = _Response(len(BLOB))
        upstream = _Upstream(response)
        fetch = self.start(upstream, resumes=0, min_rate=10)
        self.assertEqual(self.trickle(response, 0, 110, every=10, until=1000), len(BLOB))
        self.assertIsNone(fetch.failure)
        response.end()
        self.assertEqual(upstream.offsets, [0])
        self.assertStored(fetch)

    def test_first_window_not_judged_early(self) -> None:
        """
        A slow start is judged on the whole window, not before it ends: one
        byte in 29 s, then the rest of the window's due, passes.
        """
        response = _Response(len(BLOB))
        fetch = self.start(_Upstream(response), resumes=0, min_rate=10)
        response.send(BLOB[:1])
        self.clock.advance(29)
        self.assertIsNone(fetch.failure)
        response.send(BLOB[1:300])
        self.clock.advance(1)
        self.assertIsNone(fetch.failure)
        response.send(BLOB[300:])
        response.end()
        self.assertStored(fetch)

    def test_each_window_is_judged(self) -> None:
        """A fast first window does not excuse a slow second one."""
        response = _Response(len(BLOB))
        fetch = self.start(_Upstream(response), resumes=0, min_rate=10)
        response.send(BLOB[:1000])
        self.clock.advance(15)
        response.send(BLOB[1000:2000])
        self.clock.advance(15)
        self.assertIsNone(fetch.failure)
        self.trickle(response, 2000, 10, every=10, until=60)
        failure = self.assertFailed(fetch, UpstreamTimeout)
        self.assertIn("sent 30 bytes in the last 30 s", failure.message)

    def test_zero_turns_it_off(self) -> None:
        """With C{min_rate=0} only silence is judged: a trickle may take as long as it does."""
        response = _Response(len(BLOB))
        fetch = self.start(_Upstream(response), resumes=0, min_rate=0)
        self.assertEqual(self.trickle(response, 0, 10, every=20, until=10_000), len(BLOB))
        self.assertIsNone(fetch.failure)
        response.end()
        self.assertStored(fetch)

    def test_not_judged_while_we_hold_upstream_back(self) -> None:
        """
        While the fetch itself pauses upstream (its writer behind), no
        window is judged; a fresh one starts when reading resumes.
        """
        self.patch(fetch_module, "MAX_BACKLOG", 1500)
        offload = _HeldOffload()
        response = _Response(len(BLOB))
        fetch = self.start(_Upstream(response), offload=offload, resumes=0, min_rate=100)
        response.send(BLOB[:1000])
        self.clock.advance(20)
        response.send(BLOB[1000:2000])
        self.assertTrue(response.transport.paused)
        self.clock.advance(25)  # 45 s since the start, 2000 bytes: paused, not judged
        self.assertIsNone(fetch.failure)
        offload.run_all()
        self.assertFalse(response.transport.paused)
        self.clock.advance(10)
        response.send(BLOB[2000:2010])
        offload.run_all()
        self.clock.advance(19.99)
        self.assertIsNone(fetch.failure)
        self.clock.advance(0.01)
        failure = self.assertFailed(fetch, UpstreamTimeout)
        self.assertIn("sent 10 bytes in the last 30 s", failure.message)


class LocalFailureTests(_FetchTestCase):
    """
    The cache's own failures (its disk) fail the fetch with
    L{LocalCacheError}: no resume, no blame on upstream, counted, and the
    message names no path.
    """

    def assertLocal(self, fetch: BlobFetch, errors: float) -> str:
        failure = self.assertFailed(fetch, LocalCacheError)
        self.assertEqual(fetch.upstream_requests, 1)
        self.assertNotIn(self.root, failure.message)
        self.assertEqual(_write_errors(), errors + 1)
        return failure.message

    def test_write_fails(self) -> None:
        """A full disk while writing stops upstream and fails the fetch locally."""
        errors = _write_errors()

        def full(fd: int, data: Any, offset: int) -> int:
            raise OSError(errno.ENOSPC, "No space left on device", self.root)

        self.patch(os, "pwrite", full)
        response = _Response(len(BLOB))
        fetch = self.start(_Upstream(response))
        fd = fetch._fd
        response.send(BLOB[:1000])
        self.assertTrue(response.transport.stopped)
        message = self.assertLocal(fetch, errors)
        self.assertEqual(message, "cannot write the cache file: No space left on device")
        self.assertCleanedUp(fetch, fd)

    def test_write_fails_after_the_body_ended(self) -> None:
        """A write failing while the fetch waits for the last writes still fails it locally."""
        errors = _write_errors()
        offload = _HeldOffload()
        response = _Response(len(BLOB))
        fetch = self.start(_Upstream(response), offload=offload)
        response.send(BLOB)
        response.end()
        offload.fail_next(fetch_module._write_and_hash, OSError(errno.EIO, "Input/output error"))
        offload.run_all()
        self.assertIn("Input/output error", self.assertLocal(fetch, errors))

    def test_offloaded_job_fails_oddly(self) -> None:
        """A job failing with something other than an OSError is still a local failure."""
        errors = _write_errors()
        offload = _HeldOffload()
        response = _Response(len(BLOB))
        fetch = self.start(_Upstream(response), offload=offload)
        response.send(BLOB[:1000])
        offload.fail_next(fetch_module._write_and_hash, MemoryError("out of memory"))
        offload.run_all()
        message = self.assertLocal(fetch, errors)
        self.assertEqual(message, "cannot write the cache file: out of memory")

    def test_hash_fails(self) -> None:
        """
        Hashing failing part-way fails the fetch locally, once: not a digest
        mismatch (the hasher is never fed again).
        """
        errors = _write_errors()
        mismatches = _mismatches()
        offload = _HeldOffload()
        response = _Response(len(BLOB))
        fetch = self.start(_Upstream(response), offload=offload)
        response.send(BLOB[:1000])

        def broken(hasher: Any, chunks: list[bytes]) -> int:
            raise OSError(errno.EIO, "Input/output error")

        self.patch(fetch_module, "_hash_chunks", broken)
        offload.run_next()  # the batch is written, then its hashing fails
        self.assertTrue(response.transport.stopped)
        response.send(BLOB[1000:])  # late bytes from the stopping connection are ignored
        offload.run_all()
        message = self.assertLocal(fetch, errors)
        self.assertEqual(message, "cannot hash the cache file: Input/output error")
        self.assertEqual(_mismatches(), mismatches)

    def test_temporary_cannot_be_created(self) -> None:
        """
        The temporary cannot be created: the fetch fails locally before any
        write, and its untouched answer is there for one waiter to stream
        uncached, in the same reactor turn only.
        """
        errors = _write_errors()
        os.rmdir(os.path.join(self.root, "tmp"))
        response = _Response(len(BLOB))
        fetch = self.start(_Upstream(response))
        self.failureResultOf(fetch.when_started(), LocalCacheError)
        self.assertIsNone(response.protocol)  # the body is untouched
        self.assertIs(fetch.take_response(), response)
        self.assertIsNone(fetch.take_response())
        self.assertIn("cannot create the cache file", fetch.failure.message)  # type: ignore[union-attr]
        self.assertEqual(_write_errors(), errors + 1)
        self.assertEqual((self.store.reserved, self.store.reserved_written), (0, 0))

    def test_answer_not_taken_is_dropped(self) -> None:
        """An answer no waiter took over is read and dropped in the next turn."""
        os.rmdir(os.path.join(self.root, "tmp"))
        response = _Response(len(BLOB), body=BLOB)
        fetch = self.start(_Upstream(response))
        self.assertIsNone(response.protocol)
        self.clock.advance(0)
        self.assertIsNotNone(response.protocol)
        self.assertIsNone(fetch.take_response())

    def test_failure_during_a_write_closes_the_file_after_it(self) -> None:
        """
        The fetch failing while a write runs on a thread: the file
        descriptor is closed when that write ends, never under it.
        """
        offload = _HeldOffload()
        response = _Response(len(BLOB))
        fetch = self.start(_Upstream(response), offload=offload, resumes=0)
        fd = fetch._fd
        assert fd is not None
        response.send(BLOB[:1000])
        _break(response)
        self.assertIsInstance(fetch.failure, TransferBroken)
        self.assertTrue(_fd_open(fd))
        offload.run_all()
        self.assertCleanedUp(fetch, fd)


class ReservationTests(_FetchTestCase):
    """Room in the store: reserved before writing, given back at the end."""

    def test_known_size_reserved_up_front(self) -> None:
        """A blob of announced size reserves it all at once."""
        response = _Response(len(BLOB))
        fetch = self.start(_Upstream(response))
        self.assertEqual(self.store.reserved, len(BLOB))
        response.send(BLOB)
        self.assertEqual(self.store.reserved_written, len(BLOB))
        response.end()
        self.assertStored(fetch)

    def test_no_room_for_the_known_size(self) -> None:
        """A blob larger than the cache may hold is refused before any write."""
        self.store.max_size = len(BLOB) - 1
        fetch = self.start(_Upstream(_Response(len(BLOB))))
        self.assertIn(f"no room in the cache for {len(BLOB)} bytes", fetch.failure.message)  # type: ignore[union-attr]
        self.assertCleanedUp(fetch)

    def test_unknown_size_reserved_in_steps(self) -> None:
        """Without a size, room is reserved a step at a time as bytes arrive."""
        self.patch(fetch_module, "RESERVE_STEP", 1000)
        response = _Response(UNKNOWN_LENGTH)
        fetch = self.start(_Upstream(response))
        self.assertEqual(self.store.reserved, 0)
        response.send(BLOB[:600])
        self.assertEqual(self.store.reserved, 1000)
        response.send(BLOB[600:1200])
        self.assertEqual(self.store.reserved, 2000)
        response.send(BLOB[1200:])  # more than a step at once: reserved as it is
        self.assertEqual(self.store.reserved, len(BLOB))
        response.end()
        self.assertStored(fetch)

    def test_unknown_size_and_a_nearly_full_disk(self) -> None:
        """Below the free-space floor a blob of unknown size is not even started."""
        self.store.min_free = FreeSpaceFloor(size=1 << 62)
        fetch = self.start(_Upstream(_Response(UNKNOWN_LENGTH)))
        self.assertIsInstance(fetch.failure, LocalCacheError)
        self.assertCleanedUp(fetch)

    def test_cache_full_midway(self) -> None:
        """The store refusing the next step fails the fetch locally and stops upstream."""
        self.patch(fetch_module, "RESERVE_STEP", 1000)
        response = _Response(UNKNOWN_LENGTH)
        fetch = self.start(_Upstream(response))
        response.send(BLOB[:1000])
        self.patch(self.store, "reserve", lambda size: False)
        response.send(BLOB[1000:1001])
        self.assertTrue(response.transport.stopped)
        self.assertEqual(fetch.failure.message, "the cache is full")  # type: ignore[union-attr]
        self.assertCleanedUp(fetch)

    def test_floor_reached_midway(self) -> None:
        """The free-space floor is checked as the fetch writes, every CHECK_FREE_EVERY bytes."""
        self.patch(fetch_module, "CHECK_FREE_EVERY", 1000)
        response = _Response(len(BLOB))
        fetch = self.start(_Upstream(response))
        response.send(BLOB[:500])
        self.store.min_free = FreeSpaceFloor(size=1 << 62)
        response.send(BLOB[500:999])  # not checked yet
        self.assertIsNone(fetch.failure)
        response.send(BLOB[999:1000])
        self.assertTrue(response.transport.stopped)
        self.assertEqual(fetch.failure.message, "the cache disk is nearly full")  # type: ignore[union-attr]
        self.assertCleanedUp(fetch)
