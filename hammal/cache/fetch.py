"""
One upstream fetch per blob, fanned out through the growing cache file.

A L{BlobFetch} streams a blob from upstream into a temporary file, hashing
it on the way, resuming with ``Range`` when upstream breaks mid-body, and
commits it to the L{BlobStore} once the digest matched. Any number of
L{hammal.cache.readers} follow the file at their own pace, each the push producer of
its own client: a slow client never slows the fetch or the other clients,
and a client leaving never stops the fetch. Until the digest is verified
readers are given every written byte but the blob's last (C{TAIL_HOLD});
of a blob of unknown size, all but the last chunk received. So the first
bytes go out as soon as they are written, and a corrupt transfer is never
seen complete by anyone (unless the fetch was told not to hold the tail:
C{--no-hold-tail}).

The event loop only receives: each chunk goes, uncopied, to a writer that
runs off the event loop (C{offload}) in batches and hashes each batch right
after writing it, while it is in the CPU's cache (one hand-off per batch
for both). Readers need not
wait for the writer: what arrived and is not written yet is theirs from
memory (C{sendable}, L{BlobFetch.buffered}); the rest from the file. When
the tail is not held, nobody waits for the hash but the commit: upstream
pauses on the writer alone, and the hasher (C{hash_offload}, a thread of
lower priority) follows the written file at its own pace, reading it back
in slices, so it may lag without holding any received chunk.

The cache's own failures are not upstream's: a disk that is full, fails a
write or cannot be hashed makes the fetch fail with L{LocalCacheError}
(no resume, no blame on upstream), and its readers go on from upstream
uncached (L{hammal.cache.bypass}). Bytes are written at explicit offsets,
so the file always holds exactly what upstream sent up to C{written}.
"""

from __future__ import annotations

import errno
import os
from collections import deque
from functools import partial
from typing import Any, Callable

from twisted.internet import tcp
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from hammal import metrics
from hammal.cache.bypass import StartUpstream, starts_at
from hammal.cache.growing import FillNews
from hammal.cache.preallocate import preallocate
from hammal.cache.pump import BodyPump, BodyPumps
from hammal.cache.rawsocket import body_connection
from hammal.cache.storage import BlobStorage
from hammal.cache.tlsbody import TLSBody, tls_body_connection
from hammal.cache.tlspump import TLSBodyPump
from hammal.cache.writes import LocalCacheError, WriteErrors, describe
from hammal.errors import RegistryError, UpstreamBadResponse, UpstreamTimeout
from hammal.minrate import DEFAULT_MIN_RATE, RateWatch
from hammal.reference import Digest
from hammal.stream import (
    IdleTimer,
    ReadBounds,
    TransferBroken,
    _producer,
    body_broken,
    discard_body,
    expected_length,
    not_a_blob,
    read_body,
)
from hammal.upstream.client import default_deadline, upstream_error

__all__ = ["BlobFetch", "DigestMismatch", "Offload", "StartUpstream", "run_here"]

#: A fill of unknown size reserves room in the store in steps of this size.
RESERVE_STEP = 8 * 1024 * 1024
#: A fill checks the disk's free-space floor each time it wrote this much.
CHECK_FREE_EVERY = 4 * 1024 * 1024
#: Received bytes not yet written and hashed, past which upstream is paused.
MAX_BACKLOG = 8 * 1024 * 1024
#: A hasher that follows the written file reads it back this much at a time.
HASH_READ = 1024 * 1024
#: ... and reports progress (one hand-off) after hashing at most this much.
HASH_SLICE = 16 * 1024 * 1024
#: Bytes at the end of a blob of known size that readers get only once the
#: digest matched: one is enough for no client to hold a corrupt blob whole
#: (as L{hammal.cache.sibling} holds back for the processes that follow).
TAIL_HOLD = 1
#: A body with at least this much left is read by a pump thread (when the
#: fill has L{BodyPumps} and a TCP connection, plain or TLS), not on the event loop.
PUMP_AT_LEAST = 1024 * 1024

Offload = Callable[..., Deferred[Any]]
"""Runs C{f(*args)} off the event loop (a thread pool) and returns its result."""


def run_here(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """An L{Offload} that runs in place (its exceptions as failures): for tests and tools."""
    return maybeDeferred(f, *args)


def _write_chunks(fd: int, offset: int, chunks: list[bytes]) -> int:
    """
    Write C{chunks} to C{fd} one after another from C{offset} (runs on a
    thread: C{pwrite} releases the GIL); returns the end offset.
    """
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            count = os.pwrite(fd, view, offset)
            if count <= 0:
                raise OSError(errno.EIO, "the cache file accepts no more bytes")
            view = view[count:]
            offset += count
    return offset


def _hash_chunks(hasher: Any, chunks: list[bytes]) -> int:
    """
    Feed C{chunks} to C{hasher} (runs on a thread: hashlib releases the GIL
    on large buffers); returns how many bytes it hashed.
    """
    for chunk in chunks:
        hasher.update(chunk)
    return sum(len(chunk) for chunk in chunks)


class _HashFailed(Exception):
    """Hashing failed in L{_write_and_hash} (after the write): C{reason} says why."""

    def __init__(self, reason: BaseException) -> None:
        super().__init__(str(reason))
        self.reason = reason


def _write_and_hash(fd: int, offset: int, chunks: list[bytes], hasher: Any) -> int:
    """
    L{_write_chunks}, then L{_hash_chunks} of the same chunks while they
    are in the CPU's cache: one hand-off per batch for both; the end offset.

    @raise _HashFailed: when the hashing, not the write, failed.
    """
    end = _write_chunks(fd, offset, chunks)
    try:
        _hash_chunks(hasher, chunks)
    except Exception as failure:
        raise _HashFailed(failure) from failure
    return end


def create_cache_file(path: str) -> int:
    """
    Create the cache file C{path} (it must not exist yet) for reading and
    writing (without the held tail the hasher reads it back). Runs on the
    offload, like the file's preallocation: while the disk writes back a
    lot, the file system can hold a create or an C{fallocate} for hundreds
    of milliseconds (the benchmark saw 136-337 ms), which on the event loop
    would stall every client.
    """
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)


def _hash_file(fd: int, hasher: Any, start: int, end: int) -> int:
    """
    Feed bytes C{start} to C{end} of the file C{fd} to C{hasher}, read back
    (from the page cache) C{HASH_READ} at a time into one buffer (runs on a
    thread); returns how many bytes it hashed.
    """
    buffer = bytearray(min(HASH_READ, max(end - start, 1)))
    view = memoryview(buffer)
    offset = start
    while offset < end:
        count = os.preadv(fd, [view[: min(len(buffer), end - offset)]], offset)
        if count <= 0:
            raise OSError(errno.EIO, "the cache file ended before what was written")
        hasher.update(view[:count])
        offset += count
    return offset - start


def _reason(failure: Failure) -> str:
    if isinstance(failure.value, OSError):
        return describe(failure.value)
    return failure.getErrorMessage()


class DigestMismatch(TransferBroken):
    """The bytes upstream sent do not hash to the digest asked for."""


class BlobFetch(FillNews):
    """
    The single upstream transfer of one blob into the cache.

    @ivar size: the blob's size once upstream announced it.
    @ivar readable: how many bytes of the temporary file readers may use.
    @ivar sendable: how many bytes readers may have, from the file up to
        C{written} and from memory (L{buffered}) beyond it.
    @ivar complete: whether the blob was verified (and committed).
    @ivar failure: why the fetch failed, if it did.
    @ivar content_type: upstream's ``Content-Type``.
    """

    log = Logger()

    def __init__(
        self,
        digest: Digest,
        store: BlobStorage,
        clock: IReactorTime,
        start_upstream: StartUpstream,
        read_timeout: float,
        resumes: int,
        upstream: str,
        offload: Offload = run_here,
        deadline: float | None = None,
        write_errors: WriteErrors | None = None,
        hold_tail: bool = True,
        hash_offload: Offload | None = None,
        pumps: BodyPumps | None = None,
        min_rate: int = DEFAULT_MIN_RATE,
    ) -> None:
        self.digest = digest
        self.store = store
        self._clock = clock
        self._start_upstream = start_upstream
        self._read_timeout = read_timeout
        #: Bytes per second a body must bring over each read timeout (0: any).
        self._min_rate = min_rate
        self._resumes = resumes
        self._upstream = upstream
        self._offload = offload
        #: Where the hasher runs when it follows the file (no tail held).
        self._hash_offload = hash_offload if hash_offload is not None else offload
        # Each upstream answer (headers, or an error body) within this: the
        # fill is shared, and every waiter would hang with it.
        self._bounds = ReadBounds(
            clock,
            read_timeout,
            deadline if deadline is not None else default_deadline(read_timeout),
            upstream,
        )
        self.size: int | None = None
        self.written = 0
        self.readable = 0
        self.sendable = 0
        self.complete = False
        #: The digest matched: every byte is readable, stored or not.
        self.verified = False
        self.failure: RegistryError | None = None
        self.content_type = b"application/octet-stream"
        self.path = store.temporary_path(digest)
        self.upstream_requests = 0
        self._fd: int | None = None
        self._hold_tail = hold_tail
        #: Bytes taken from upstream, in order (C{written} is what is on disk).
        self.received = 0
        self._last_received = 0
        self._to_write: list[bytes] = []
        #: The received chunks not written yet, from offset C{written} on.
        self._unwritten: deque[bytes] = deque()
        self._writing: Deferred[int] | None = None
        self._hasher = digest.hasher()
        self._hashed = 0
        self._hashing: Deferred[int] | None = None
        self._drain_waiter: Deferred[None] | None = None
        self._drain_hashed = True  # whether the waiter waits for the hash too
        self._broken: LocalCacheError | None = None
        self._upstream_paused = False
        self._writer: _FileWriter | None = None
        self._write_errors = write_errors if write_errors is not None else WriteErrors(clock)
        self._reserved = 0
        #: Bytes the store was told were written (L{BlobStorage.wrote}): the
        #: file's preallocated blocks count from the start.
        self._accounted = 0
        self._preallocated = 0
        self._checked_free_at = 0
        self._spare: IResponse | None = None
        self._pumps = pumps
        self._pump: BodyPump | None = None
        FillNews.__init__(self)
        self.finished: Deferred[None] = Deferred()

    # Observation.

    def when_started(self) -> Deferred[BlobFetch]:
        """Fires once the temporary file exists and readers can follow."""
        if self._fd is not None or self.complete or self.verified:
            return succeed(self)
        if self.failure is not None:
            return fail(self.failure)
        return self._wait_for_start()

    # The transfer.

    async def run(self) -> None:
        """Fetch, verify and commit; never raises (failures are recorded)."""
        try:
            await self._transfer()
        except RegistryError as failure:
            self._fail(failure)
        except OSError as failure:
            self._fail(LocalCacheError(f"cannot use the cache: {describe(failure)}"))
        except Exception:  # a bug must not leave readers hanging
            self.log.failure("blob fetch {digest} crashed", digest=str(self.digest))
            self._fail(RegistryError(f"internal error fetching {self.digest}"))
        finally:
            self._close()
            if self._reserved:
                self.store.unreserve(self._reserved, self._accounted)
                self._reserved = 0
            if not self.finished.called:
                self.finished.callback(None)

    async def _transfer(self) -> None:
        response = await self._request(0)
        self.size = expected_length(response)
        content_type = response.headers.getRawHeaders(b"content-type")
        if content_type:
            self.content_type = content_type[0]
        try:
            self._make_room()
            await self._open()
            if self._broken is not None:  # the preallocation failed at once
                raise self._broken
        except (OSError, LocalCacheError) as failure:
            # A waiter may take this answer over and stream it uncached;
            # else it is dropped when the failure is known (see _fail).
            self._spare = response
            if isinstance(failure, OSError):
                raise LocalCacheError(f"cannot create the cache file: {describe(failure)}")
            raise
        self._started_now()
        resumes_left = self._resumes
        while True:
            try:
                await self._receive(response, skip=0 if response.code == 206 else self.received)
                break
            except (TransferBroken, UpstreamTimeout) as broken:
                if isinstance(broken, DigestMismatch) or resumes_left <= 0:
                    raise
                if self.size is not None and self.received >= self.size:
                    raise
                resumes_left -= 1
                self.log.info(
                    "resuming {digest} at byte {offset}: {reason}",
                    digest=str(self.digest),
                    offset=self.received,
                    reason=broken.message,
                )
                response = await self._request(self.received)
        await self._verify_and_commit()

    async def _request(self, offset: int) -> IResponse:
        """Upstream's answer from C{offset}, within the deadline (a 504 for every waiter)."""
        d = Deferred.fromCoroutine(self._answer(offset))
        deadline = self._bounds.deadline

        def timed_out(result: object, timeout: float) -> None:
            raise UpstreamTimeout(
                f"{self._upstream} did not answer for {self.digest} within {deadline:g} seconds"
            )

        d.addTimeout(deadline, self._clock, onTimeoutCancel=timed_out)
        return await d

    async def _answer(self, offset: int) -> IResponse:
        self.upstream_requests += 1
        response = await self._start_upstream(offset)
        if response.code == 200 or (response.code == 206 and offset > 0):
            if response.code == 206 and not starts_at(response, offset):
                await discard_body(response, self._bounds)
                raise TransferBroken(f"{self._upstream} answered a resume with the wrong range")
            if not_a_blob(response):
                await discard_body(response, self._bounds)
                raise UpstreamBadResponse(f"{self._upstream} sent a web page instead of a blob")
            return response
        try:
            body = await read_body(response, 64 * 1024, self._bounds)
        except RegistryError:
            body = b""
        raise upstream_error(response, body, self._upstream)

    def _make_room(self) -> None:
        """Reserve room for the blob in the store, or refuse to cache it."""
        if self.size is None:
            if not self.store.has_room():
                raise LocalCacheError("the cache disk is nearly full")
            return
        if not self.store.reserve(self.size):
            raise LocalCacheError(f"no room in the cache for {self.size} bytes")
        self._reserved = self.size

    def _ensure_room(self, end: int) -> None:
        """Keep within the reservation and above the free-space floor while writing."""
        if end > self._reserved:
            step = max(RESERVE_STEP, end - self._reserved)
            if not self.store.reserve(step):
                raise LocalCacheError("the cache is full")
            self._reserved += step
        if end - self._checked_free_at >= CHECK_FREE_EVERY:
            self._checked_free_at = end
            if not self.store.has_room():
                raise LocalCacheError("the cache disk is nearly full")

    async def _open(self) -> None:
        """Create the cache file (on the offload), then preallocate it (L{_preallocate})."""
        # (Nothing cancels a fill's run: the file it makes is always closed by it.)
        self._fd = await self._offload(create_cache_file, self.path)
        self._preallocate()

    def _preallocate(self) -> None:
        """
        Preallocate the blob's blocks (steadier, cheaper writes) as the
        writer's first job: the first write waits for it, readers do not
        (they take the first bytes from memory meanwhile), so a slow
        C{fallocate} does not delay the first byte to clients.
        """
        if self.size is None or self._fd is None:
            return
        self._writing = self._offload(preallocate, self._fd, self.size)
        self._writing.addCallbacks(self._preallocated_now, self._write_failed)

    def _preallocated_now(self, preallocated: bool) -> None:
        self._writing = None
        if preallocated and self.size is not None:
            # The disk's free space fell by the whole blob now.
            self._preallocated = self.size
            self._account_written(self.written)
        self._write_more()
        self._moved_on()

    def _account_written(self, end: int) -> None:
        """
        Tell the store what of the reservation is on disk now: the file up
        to C{end}, or its preallocated blocks if more (counted once).
        """
        if not self._reserved:
            return
        on_disk = max(end, self._preallocated)
        if on_disk > self._accounted:
            self.store.wrote(on_disk - self._accounted)
            self._accounted = on_disk

    def _receive(self, response: IResponse, skip: int) -> Deferred[None]:
        writer = _FileWriter(
            self, skip, self._clock, self._read_timeout, self._upstream, self._min_rate
        )
        self._writer = writer
        self._upstream_paused = False
        response.deliverBody(writer)
        connection = writer.connection_to_pump()
        tls = None
        if connection is None:
            tls = writer.tls_to_pump()
            connection = tls.tcp if tls is not None else None
        if (
            connection is None
            or self._pumps is None
            or self.size is None
            or self.size - self.received < PUMP_AT_LEAST
        ):
            return writer.done
        return Deferred.fromCoroutine(self._pump_body(writer, connection, tls))

    async def _pump_body(
        self, writer: _FileWriter, connection: tcp.Connection, tls: TLSBody | None = None
    ) -> None:
        """
        The rest of the body on a pump thread (L{hammal.cache.pump}; over
        TLS L{hammal.cache.tlspump}): the event loop stops reading the
        socket, the bytes that came with the headers are written and hashed
        first, then the pump takes over; if every pump is busy (or the TLS
        connection cannot be handed over) the event loop reads on after all.
        """
        connection.stopReading()
        writer.hand_over()

        def drop() -> None:
            if tls is not None:
                tls.abort()
            else:
                connection.abortConnection()

        try:
            # The headers may have been parsed from the middle of a read:
            # the rest of that read reaches the writer when the read ends.
            await _next_turn(self._clock)
            # The pump goes on writing from where the file ends; the hash
            # (without the held tail) may lag behind, on a thread of its own.
            await self._drained(hashed=self._hold_tail)
        except BaseException:
            drop()
            raise
        started = None
        pump_type: Callable[..., BodyPump] = BodyPump
        problem = tls.problem() if tls is not None else None
        if problem is not None:
            self.log.info(
                "{digest} read on the event loop: {problem}",
                digest=str(self.digest),
                problem=problem,
            )
        elif tls is not None:
            pump_type = partial(TLSBodyPump, tls=tls.connection())
        if (
            problem is None
            and self._pumps is not None
            and self._fd is not None
            and self.size is not None
        ):
            started = self._pumps.start(
                connection.fileno(),
                self._fd,
                self.received,
                self.size - self.received,
                self._hasher if self._hold_tail else None,
                self._read_timeout,
                self._upstream,
                self._pumped,
                pump_type,
                min_rate=self._min_rate,
            )
        if started is None:
            writer.take_back()
            connection.startReading()
            await writer.done
            return
        pump, done = started
        self._pump = pump
        try:
            await done
        finally:
            self._pump = None
            # Whatever ended it, the file (and the hash) hold exactly this
            # much: a resume goes on from there.
            self._pumped(pump.position)
            self._hash_more()  # without the held tail, the hash starts now
            # The body was read past Twisted's HTTP client: the connection
            # cannot carry another request.
            drop()

    def _pumped(self, end: int) -> None:
        """The pump wrote (and with the held tail, hashed) the file up to C{end}."""
        if end <= self.received or self._broken is not None or self.failure is not None:
            return
        count = end - self.received
        try:
            self._ensure_room(end)
        except LocalCacheError as broken:
            self._cache_failed(broken)
            return
        metrics.upstream_bytes.inc(count)
        self._account_written(end)
        self.received = self.written = end
        self._last_received = count
        if self._hold_tail:
            self._hashed = end
        self._release()
        self._hash_more()
        self._notify()

    def append(self, data: bytes) -> None:
        """
        Take a chunk from upstream: the same C{bytes} object (no copy) goes
        to the file writer, on a thread in batches of whatever arrived
        meanwhile, which (with the held tail) hashes what it wrote.
        Readers may use what was written, but for the tail until the digest
        matched (unless the tail is not held): see L{_release}.
        """
        if self._fd is None:
            raise RuntimeError("hammal bug: expected self._fd is not None")
        if self._broken is not None:
            raise self._broken
        if self.size is not None and self.received + len(data) > self.size:
            raise TransferBroken(f"{self._upstream} sent more bytes than announced")
        self._ensure_room(self.received + len(data))
        metrics.upstream_bytes.inc(len(data))
        self.received += len(data)
        self._last_received = len(data)
        self._to_write.append(data)
        self._unwritten.append(data)
        self._write_more()
        self._hash_more()
        if self._release():  # the chunk before this one, if written, is not the tail any more
            self._notify()
        if not self._upstream_paused and self._backlog() > MAX_BACKLOG and self._writer is not None:
            self._upstream_paused = True
            self._writer.pause()

    # The file writer follows the received chunks on a thread (os.pwrite
    # and hashlib release the GIL) and hashes each batch it wrote, so the
    # event loop neither copies into the page cache nor waits for sha256.
    # What it has not taken is bounded: past MAX_BACKLOG upstream is paused.
    # Without the held tail, readers need not wait for the hash: upstream
    # pauses on the writer only, and the hasher follows the file instead
    # of the chunks, so however far it lags it holds no memory.

    def _backlog(self) -> int:
        if not self._hold_tail:
            return self.received - self.written
        return self.received - min(self.written, self._hashed)

    def _write_more(self) -> None:
        if self._writing is not None or not self._to_write or self._fd is None:
            return
        if self._broken is not None or self.failure is not None:
            return
        chunks, self._to_write = self._to_write, []
        if self._hold_tail:
            self._writing = self._offload(
                _write_and_hash, self._fd, self.written, chunks, self._hasher
            )
            self._writing.addCallbacks(self._wrote_and_hashed, self._write_failed)
        else:
            self._writing = self._offload(_write_chunks, self._fd, self.written, chunks)
            self._writing.addCallbacks(self._wrote_to, self._write_failed)

    def _wrote_and_hashed(self, end: int) -> None:
        self._hashed = end
        self._wrote_to(end)

    def _wrote_to(self, end: int) -> None:
        self._writing = None
        self._account_written(end)
        at = self.written
        while self._unwritten and at + len(self._unwritten[0]) <= end:
            at += len(self._unwritten.popleft())
        self.written = end
        self._release()
        self._write_more()
        self._hash_more()
        self._moved_on()
        self._notify()

    def _release(self) -> bool:
        """
        Let readers have what was written, but for the tail while it is
        held: the blob's last C{TAIL_HOLD} bytes when its size is known,
        else the last chunk received. Whether C{readable} moved.
        """
        if self.verified:
            return False
        readable, sendable = self.written, self.received
        if self._hold_tail:
            if self.size is not None:
                hold = self.size - TAIL_HOLD
            else:
                hold = self.received - self._last_received
            readable, sendable = min(readable, hold), min(sendable, hold)
        if readable <= self.readable and sendable <= self.sendable:
            return False
        self.readable = max(self.readable, readable)
        self.sendable = max(self.sendable, sendable)
        return True

    def buffered(self, offset: int, limit: int) -> memoryview | None:
        """
        Bytes from C{offset} on (before C{limit}, within one received chunk)
        that are not in the file yet, from memory: for a reader ahead of
        the writer. L{None} when they are in the file already (or not here).
        """
        if offset < self.written or offset >= min(limit, self.received):
            return None
        at = self.written
        for chunk in self._unwritten:
            end = at + len(chunk)
            if offset < end:
                return memoryview(chunk)[offset - at : min(end, limit) - at]
            at = end
        return None

    def _write_failed(self, failure: Failure) -> None:
        self._writing = None
        if isinstance(failure.value, _HashFailed):
            reason = _reason(Failure(failure.value.reason))
            self._cache_failed(LocalCacheError(f"cannot hash the cache file: {reason}"))
            return
        self._cache_failed(LocalCacheError(f"cannot write the cache file: {_reason(failure)}"))

    def _hash_more(self) -> None:
        """Without the held tail: hash the next slice of what was written, from the file."""
        if self._hold_tail or self._hashing is not None or self._fd is None:
            return
        if self._broken is not None or self.failure is not None:
            return
        if self._pump is not None:
            # A pump is moving the body: hash once it is done, so that the
            # hash takes no core from the transfer (and its thread never
            # holds the GIL the event loop wants meanwhile).
            return
        if self._hashed >= self.written:
            return
        end = min(self.written, self._hashed + HASH_SLICE)
        self._hashing = self._hash_offload(_hash_file, self._fd, self._hasher, self._hashed, end)
        self._hashing.addCallbacks(self._hashed_some, self._hash_failed)

    def _hashed_some(self, count: int) -> None:
        self._hashing = None
        self._hashed += count
        self._hash_more()
        self._moved_on()

    def _hash_failed(self, failure: Failure) -> None:
        """
        Hashing failed part-way: the hasher holds an unknown prefix, so the
        fill fails (locally) rather than feed it again.
        """
        self._hashing = None
        self._cache_failed(LocalCacheError(f"cannot hash the cache file: {_reason(failure)}"))

    def _moved_on(self) -> None:
        """The writer or the hasher finished a batch: resume upstream, wake a drain."""
        if self._upstream_paused and self._backlog() <= MAX_BACKLOG // 2:
            self._upstream_paused = False
            if self._writer is not None:
                self._writer.resume()
        if self._drain_waiter is not None and self._idle(self._drain_hashed):
            waiter, self._drain_waiter = self._drain_waiter, None
            waiter.callback(None)

    def _idle(self, hashed: bool = True) -> bool:
        """Every byte received was written and, if C{hashed}, hashed."""
        written = self._writing is None and not self._to_write
        if not hashed or self._hold_tail:  # with the held tail, the writer hashes
            return written
        return written and self._hashing is None and self._hashed >= self.written

    def _cache_failed(self, broken: LocalCacheError) -> None:
        """The file could not be written or hashed: the fill fails locally, once."""
        if self._broken is not None:
            return
        self._broken = broken
        self._to_write.clear()
        self._unwritten.clear()
        if self._drain_waiter is not None:
            waiter, self._drain_waiter = self._drain_waiter, None
            waiter.errback(broken)
        elif self._pump is not None:
            self._pump.stop(broken)
        elif self._writer is not None:
            self._writer.abandon(broken)

    def _drained(self, hashed: bool = True) -> Deferred[None]:
        """Fires once every byte received so far was written and (if C{hashed}) hashed."""
        if self._broken is not None:
            return fail(self._broken)
        if self._idle(hashed):
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._drain_waiter = waiter
        self._drain_hashed = hashed
        return waiter

    async def _verify_and_commit(self) -> None:
        if self.size is not None and self.received != self.size:
            raise TransferBroken(f"{self._upstream} sent {self.received} of {self.size} bytes")
        await self._drained()
        if not self.digest.matches(self._hasher):
            metrics.digest_mismatches.inc()
            self.log.warn(
                "digest mismatch for {digest} from {upstream}: discarded",
                digest=str(self.digest),
                upstream=self._upstream,
            )
            raise DigestMismatch(f"{self._upstream} sent bytes that do not match {self.digest}")
        # Verified: clients get the tail now; the disk only has to be
        # durable before the blob enters the store.
        self.size = self.written
        self.readable = self.sendable = self.written
        self.verified = True
        self._notify()
        if self._fd is None:
            raise RuntimeError("hammal bug: expected self._fd is not None")
        try:
            await self._offload(os.fdatasync, self._fd)
            self.store.commit(self.path, self.digest, self._reserved, self._accounted)
            self._reserved = 0
        except OSError as failure:
            # Not stored: readers finish from the files they hold open;
            # the temporary goes now, not at the next sweep.
            self._write_errors.record("blob", str(self.digest), describe(failure))
            self._unlink()
            self._notify()
            return
        self.complete = True
        self._notify()

    def _fail(self, failure: RegistryError) -> None:
        if isinstance(failure, LocalCacheError):
            self._write_errors.record("blob", str(self.digest), failure.message)
        self.failure = failure
        self._to_write.clear()
        self._unwritten.clear()
        self._start_failed(failure)
        if self._spare is not None:
            # Waiters take it over now; whoever comes later has missed it.
            self._clock.callLater(0, self._drop_spare)
        self._unlink()
        self._notify()

    def _drop_spare(self) -> None:
        if self._spare is not None:  # nobody took it over
            discard_body(self._spare)  # drops the connection past 64 KiB
            self._spare = None

    def take_response(self) -> IResponse | None:
        """
        The upstream answer (a whole C{200}, body unread) of a fetch the
        cache refused before it wrote anything, for one waiter to stream
        uncached instead of asking upstream again; L{None} once taken, and
        after the reactor turn in which the fetch failed.
        """
        response, self._spare = self._spare, None
        return response

    def _unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as problem:
            self.log.warn("could not remove {path}: {error}", path=self.path, error=problem)

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            running = [job for job in (self._writing, self._hashing) if job is not None]
            if not running:
                os.close(fd)
                return
            # A write or a read-back still runs on it: close when they end.
            left = [len(running)]

            def close_after(result: Any) -> Any:
                left[0] -= 1
                if not left[0]:
                    os.close(fd)
                return result

            for job in running:
                job.addBoth(close_after)


def _next_turn(clock: IReactorTime) -> Deferred[None]:
    turn: Deferred[None] = Deferred()
    clock.callLater(0, turn.callback, None)
    return turn


class _FileWriter(Protocol):
    """Receives one upstream response body into a L{BlobFetch}."""

    def __init__(
        self,
        fetch: BlobFetch,
        skip: int,
        clock: IReactorTime,
        idle_timeout: float,
        upstream: str,
        min_rate: int = 0,
    ) -> None:
        self.done: Deferred[None] = Deferred()
        self._fetch = fetch
        self._skip = skip
        self._clock = clock
        self._upstream = upstream
        self._idle = IdleTimer(clock, idle_timeout, self._timed_out)
        # Over windows of the read timeout: a trickle is never silent for long.
        self._rate = RateWatch(clock, min_rate, idle_timeout, upstream, self._stop)
        self._handed_over = False

    def connectionMade(self) -> None:
        self._idle.arm()
        self._rate.start()

    def connection_to_pump(self) -> tcp.Connection | None:
        """
        The plain TCP connection the rest of the body could be pumped from:
        L{None} over TLS, for a test double, or once the body ended or
        while bytes of it are still to be skipped.
        """
        if self.done.called or self._skip:
            return None
        return body_connection(self.transport)

    def tls_to_pump(self) -> TLSBody | None:
        """
        The TLS connection the rest of the body could be pumped from (see
        L{connection_to_pump}); whether it can be taken over is known once
        the event loop stopped reading it (L{TLSBody.problem}).
        """
        if self.done.called or self._skip:
            return None
        return tls_body_connection(self.transport)

    def hand_over(self) -> None:
        """The rest of the body is read elsewhere (a pump): stop watching for it."""
        self._handed_over = True
        self._idle.cancel()
        self._rate.stop()

    def take_back(self) -> None:
        """The body comes here again after L{hand_over} (no pump was free)."""
        self._handed_over = False
        self._idle.arm()
        self._rate.start()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._idle.touch()
        self._rate.count(len(data))
        if self._skip:
            dropped = min(self._skip, len(data))
            data = data[dropped:]
            self._skip -= dropped
            if not data:
                return
        try:
            self._fetch.append(data)
        except (TransferBroken, LocalCacheError) as broken:
            self._stop(broken)

    def pause(self) -> None:
        """Stop reading upstream for now (the writer or hasher is behind)."""
        self._idle.cancel()
        self._rate.stop()  # our own choice: no window is judged on it
        _producer(self.transport).pauseProducing()

    def resume(self) -> None:
        """Read upstream again after L{pause}."""
        if self.done.called or self._handed_over:
            return  # a pump reads the socket: the event loop must not
        self._idle.arm()
        self._rate.start()
        _producer(self.transport).resumeProducing()

    def abandon(self, error: RegistryError) -> None:
        """Stop receiving for a reason of our own (the cache failed)."""
        self._stop(error)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._idle.cancel()
        self._rate.stop()
        if self.done.called or self._handed_over:
            return  # a pump reads the socket: the event loop must not
        broken = body_broken(reason, self._upstream, self._fetch.received)
        if broken is None:
            self.done.callback(None)
        else:
            self.done.errback(broken)

    def _timed_out(self) -> None:
        self._stop(
            UpstreamTimeout(
                f"{self._upstream} sent nothing for {self._idle.seconds:g} seconds"
                f" after {self._fetch.received} bytes"
            )
        )

    def _stop(self, error: RegistryError) -> None:
        self._idle.cancel()
        self._rate.stop()
        if not self.done.called:
            self.done.errback(error)
        _producer(self.transport).stopProducing()
