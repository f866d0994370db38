"""
The cold path's data path in L{hammal.cache.fetch.BlobFetch}: the received
chunks go, as the same objects, to a writer and a hasher off the event
loop in batches; upstream pauses when they fall behind; the tail is held
until the digest matched unless C{hold_tail} is off.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from hammal import metrics
from hammal.cache import fetch as fetch_module
from hammal.cache.fetch import BlobFetch, DigestMismatch
from hammal.cache.readers import BlobReader
from hammal.cache.store import BlobStore
from hammal.cache.writes import LocalCacheError
from hammal.reference import Digest


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
    """A C{200} whose body the test pushes chunk by chunk."""

    code = 200

    def __init__(self, length: Any) -> None:
        self.length = length
        self.headers = Headers({b"content-type": [b"application/octet-stream"]})
        self.transport = _Transport()
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def end(self) -> None:
        self.protocol.connectionLost(Failure(ResponseDone()))


class _HeldOffload:
    """An offload whose jobs run only when the test says so."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
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
            job[2].callback(f(*job[1]))

    def run_all(self) -> None:
        while self.jobs:
            f, args, d = self.jobs.pop(0)
            d.callback(f(*args))


def _mismatches() -> float:
    return metrics.REGISTRY.get_sample_value("hammal_digest_mismatches_total") or 0


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
        if digest is None:
            digest = Digest.parse("sha256:" + hashlib.sha256(blob).hexdigest())
        fetch = BlobFetch(
            digest,
            self.store,
            self.clock,
            lambda offset: succeed(response),
            read_timeout=30,
            resumes=0,
            upstream="upstream.test",
            offload=self.offload,
            hold_tail=hold_tail,
        )
        Deferred.fromCoroutine(fetch.run())
        self.assertIsNotNone(response.protocol)
        return fetch, response


class FetchPipelineTests(_FetchHarness):
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
        fetch = BlobFetch(
            Digest.parse("sha256:" + hashlib.sha256(blob).hexdigest()),
            self.store,
            self.clock,
            lambda offset: succeed(response),
            read_timeout=30,
            resumes=0,
            upstream="upstream.test",
            offload=self.offload,
            hold_tail=False,
            hash_offload=hashing,
        )
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
