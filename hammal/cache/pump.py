"""
Upstream blob bodies moved straight from the socket to the cache file, on
threads of their own.

Twisted reads an upstream body on the event loop: a C{recv} into a new
C{bytes} object per read, the HTTP client's parser per chunk, a hand-off
to the writer's thread per batch and a wake-up of the event loop back.
For the body of a blob of known length on a plain TCP connection none of
that is needed: once the response's headers are parsed, the fill stops the
reactor reading the socket and hands it to a L{BodyPump}, which moves the
bytes on a thread of its own with C{splice} (socket to pipe to file: the
bytes never enter Python), or, where C{splice} cannot, reads them into one
buffer and writes them at their offset. When the fill verifies before
releasing its tail, a second thread hashes what was written, read back
from the page cache, while the pump moves the next bytes. Every call there
releases the GIL, so the pump runs beside the event loop, which is left
with sending the written bytes to clients; it hears of the pump's progress
at most once per turn.

A pump is bounded like every upstream read: it gives up after the read
timeout without a byte, or when a window of the read timeout brought less
than the minimum rate (L{hammal.minrate}; both L{UpstreamTimeout},
judged on the pump's monotonic clock, so time spent writing to a slow
disk counts too), on an early end or a reset
(L{TransferBroken}: the fill resumes with C{Range} from what was written
and hashed), on a cache file that cannot be written or hashed
(L{LocalCacheError}), and when the event loop stops it (L{BodyPump.stop}).
The socket stays the reactor's: it is closed there, once the pump's thread
has let go of it.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import queue
import select
import threading
import time
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from hammal import metrics
from hammal.cache.writes import LocalCacheError, describe
from hammal.errors import RegistryError, UpstreamTimeout
from hammal.minrate import DEFAULT_MIN_RATE, RateFloor
from hammal.stream import TransferBroken

__all__ = ["PUMP_READ", "PUMP_THREADS", "BodyPump", "BodyPumps", "write_at"]

#: How much a pump asks of the socket at once (one buffer per pump).
PUMP_READ = 1024 * 1024
#: fcntl's F_SETPIPE_SZ (Linux): a pipe that holds a whole read.
F_SETPIPE_SZ = 1031
#: Pumps at once; a fill finding them all busy reads on the event loop.
PUMP_THREADS = 8

Progress = Callable[[int], None]
"""Called on the event loop with the file offset the pump has written up to."""
Clock = Callable[[], float]
"""Monotonic seconds, read on the pump thread (tests pass one they move)."""


class BodyPump:
    """
    Reads C{length} bytes of a response body from the socket C{socket_fd}
    into the file C{file_fd} from C{offset} on, hashing them into C{hasher}
    if one is given. L{run} runs on a pump thread; the rest on the event loop.

    @ivar position: the file offset written up to (set by the pump thread).
    """

    #: What the pump reads from: counted per kind in L{BodyPumps.started_by_kind}.
    kind = "tcp"

    def __init__(
        self,
        reactor: IReactorFromThreads,
        socket_fd: int,
        file_fd: int,
        offset: int,
        length: int,
        hasher: Any,
        idle_timeout: float,
        upstream: str,
        progress: Progress,
        min_rate: int = DEFAULT_MIN_RATE,
        clock: Clock = time.monotonic,
    ) -> None:
        self._reactor = reactor
        # A descriptor of the pump's own for the socket: whatever happens to
        # the reactor's, the pump never reads a number reused for another file.
        self._socket_fd = os.dup(socket_fd)
        self._file_fd = file_fd
        self._start = offset
        self._end = offset + length
        self._hasher = hasher
        self._idle_ms = max(1, int(idle_timeout * 1000))
        self._idle_timeout = idle_timeout
        self._upstream = upstream
        self._progress = progress
        self._clock = clock
        # Over windows of the read timeout, from when the pump starts (run).
        self._floor = RateFloor(min_rate, idle_timeout, upstream, clock(), offset)
        #: When upstream's last bytes came (on C{clock}): silence counts from there.
        self._heard_at = clock()
        self.position = offset
        self._told = False
        self._stopping: RegistryError | None = None
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    # On the event loop.

    def stop(self, reason: RegistryError) -> None:
        """Have the pump end as soon as it can, failing with C{reason}."""
        if self._stopping is None:
            self._stopping = reason
            try:
                os.eventfd_write(self._wake, 1)
            except OSError:
                pass  # closed: the pump has ended already

    def _tell(self) -> None:
        self._told = False  # before reading the position: a later move calls again
        self._progress(self.position)

    def close(self) -> None:
        """Release the pump's own descriptors (after L{run} returned)."""
        if self._wake >= 0:
            os.close(self._wake)
            self._wake = -1
        if self._socket_fd >= 0:
            os.close(self._socket_fd)
            self._socket_fd = -1

    # On the pump thread.

    def run(self) -> int:
        """Pump the body; returns the end offset, or raises why it stopped."""
        self._started()
        hashing = self._hash_behind()
        poller = self._poller(select.POLLIN)
        position = self._start
        move = _Splice() if _can_splice() else None
        buffer = None
        try:
            while position < self._end:
                self._wait_readable(poller, position)
                count = 0
                if move is not None:
                    try:
                        count = self._splice(move, position)
                    except _NoSplice:
                        move.close()
                        move = None
                if move is None:
                    if buffer is None:
                        buffer = bytearray(min(PUMP_READ, self._end - self._start))
                    count = self._copy(memoryview(buffer), position)
                if not count:
                    continue  # nothing there after all: wait again
                if hashing is not None:
                    hashing.hash(count)
                position += count
                self._moved_to(position)
        finally:
            if move is not None:
                move.close()
            if hashing is not None:
                # Whatever ended the pump, the hasher has taken exactly the
                # bytes written: a resume goes on from there.
                hashing.finish()
        return position

    def _started(self) -> None:
        """The pump thread begins: the first window and the silence count from now."""
        self._heard_at = self._clock()
        self._floor.restart(self._heard_at, self._start)

    def _hash_behind(self) -> _FileHash | None:
        """The thread hashing what was written, if this pump hashes."""
        if self._hasher is None:
            return None
        return _FileHash(self._hasher, self._file_fd, self._start)

    def _poller(self, events: int) -> select.poll:
        """A poll of the socket for C{events}, woken by L{stop} too."""
        poller = select.poll()
        poller.register(self._socket_fd, events)
        poller.register(self._wake, select.POLLIN)
        return poller

    def _moved_to(self, position: int) -> None:
        """The file holds the body up to C{position}: tell the event loop (once per turn)."""
        self._heard_at = self._clock()
        self.position = position
        if not self._told:
            self._told = True
            self._reactor.callFromThread(self._tell)

    def _wait_readable(self, poller: select.poll, position: int) -> None:
        """
        Until the socket has bytes (or an end), within the idle timeout
        and the minimum rate (C{position}: the body so far), both judged on
        the pump's clock each time the poll wakes, before anything is read.
        """
        readable = False
        while True:
            if self._stopping is not None:
                raise self._stopping
            now = self._clock()
            silent = now - self._heard_at
            if silent >= self._idle_timeout:  # silence, said as such where both apply
                raise UpstreamTimeout(
                    f"{self._upstream} sent nothing for {self._idle_timeout:g} seconds"
                    f" after {position} bytes"
                )
            slow = self._floor.judge(now, position)
            if slow is not None:
                raise slow
            if readable:
                return
            wait = self._idle_timeout - silent
            due = self._floor.due()
            if due is not None:
                wait = min(wait, due - now)
            ready = dict(poller.poll(max(1, math.ceil(wait * 1000))))
            readable = self._socket_fd in ready

    def _splice(self, move: _Splice, position: int) -> int:
        """Move what the socket has to the file through the pipe; how much (0: nothing yet)."""
        want = min(PUMP_READ, self._end - position)
        try:
            count = os.splice(
                self._socket_fd, move.into, want, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
            )
        except BlockingIOError:
            return 0
        except OSError as failure:
            if failure.errno in _SPLICE_UNSUPPORTED and position == self._start:
                raise _NoSplice() from failure
            raise self._broken(position, failure) from failure
        if count == 0:
            raise self._ended_early(position)
        left = count
        try:
            while left:
                left -= os.splice(move.out, self._file_fd, left, offset_dst=position + count - left)
        except OSError as failure:
            raise LocalCacheError(f"cannot write the cache file: {describe(failure)}") from failure
        return count

    def _copy(self, view: memoryview, position: int) -> int:
        """Read what the socket has into C{view} and write it to the file; how much."""
        try:
            count = os.readv(self._socket_fd, [view[: self._end - position]])
        except BlockingIOError:
            return 0
        except OSError as failure:
            raise self._broken(position, failure) from failure
        if count == 0:
            raise self._ended_early(position)
        write_at(self._file_fd, view[:count], position)
        return count

    def _broken(self, position: int, failure: OSError) -> TransferBroken:
        return TransferBroken(
            f"{self._upstream} broke the connection after {position} bytes: {describe(failure)}"
        )

    def _ended_early(self, position: int) -> TransferBroken:
        return TransferBroken(
            f"{self._upstream} closed the connection after {position} of {self._end} bytes"
        )


def write_at(fd: int, data: memoryview, offset: int) -> None:
    """Write all of C{data} to the file C{fd} at C{offset} (L{LocalCacheError} if it cannot)."""
    try:
        while data:
            written = os.pwrite(fd, data, offset)
            if written <= 0:
                raise OSError(errno.EIO, "the cache file accepts no more bytes")
            offset += written
            data = data[written:]
    except OSError as failure:
        raise LocalCacheError(f"cannot write the cache file: {describe(failure)}") from failure


#: What C{splice} answers where it cannot move these descriptors' bytes.
_SPLICE_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}


def _can_splice() -> bool:
    return hasattr(os, "splice")


class _NoSplice(Exception):
    """C{splice} cannot move this socket's bytes to this file: copy them instead."""


class _Splice:
    """The pipe a pump moves bytes through, socket to file, without copying them to Python."""

    def __init__(self) -> None:
        self.out, self.into = os.pipe2(os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.into, F_SETPIPE_SZ, PUMP_READ)
        except OSError:
            pass  # a smaller pipe only means more, smaller moves

    def close(self) -> None:
        os.close(self.out)
        os.close(self.into)


class _FileHash:
    """
    Hashes what a pump wrote, read back from the file (the page cache) on a
    thread of its own while the pump moves the next bytes: in order, one
    buffer, however far it lags.
    """

    def __init__(self, hasher: Any, fd: int, start: int) -> None:
        self._hasher = hasher
        self._fd = fd
        self._at = start
        self._written: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="hammal-pump-hash", daemon=True)
        self._thread.start()

    def hash(self, count: int) -> None:
        """The next C{count} bytes of the file were written: hash them."""
        if self._failure is not None:
            raise _hash_failed(self._failure)
        self._written.put(count)

    def finish(self) -> None:
        """Wait until everything written was hashed; raise if hashing failed."""
        self._written.put(None)
        self._thread.join()
        if self._failure is not None:
            raise _hash_failed(self._failure)

    def _run(self) -> None:
        view = memoryview(bytearray(PUMP_READ))
        while True:
            count = self._written.get()
            if count is None:
                return
            while count and self._failure is None:
                try:
                    got = os.preadv(self._fd, [view[: min(len(view), count)]], self._at)
                    if got <= 0:
                        raise OSError(errno.EIO, "the cache file ended before what was written")
                    self._hasher.update(view[:got])
                except Exception as failure:
                    self._failure = failure
                    return
                self._at += got
                count -= got


def _hash_failed(failure: BaseException) -> LocalCacheError:
    return LocalCacheError(f"cannot hash the cache file: {failure}")


class BodyPumps(Service):
    """
    The pump threads of a process: at most L{PUMP_THREADS} bodies pumped at
    once, started and stopped with hammal's services (stopping ends every
    pump still running).
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        threads: int = PUMP_THREADS,
        clock: Clock = time.monotonic,
    ) -> None:
        self._reactor = reactor
        self._threads = threads
        #: The pumps' clock (their read timeout and minimum rate).
        self._clock = clock
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name="hammal-pump")
        self._running: set[BodyPump] = set()
        #: Bodies handed to a pump since start.
        self.started = 0
        #: ... of them, per L{BodyPump.kind}.
        self.started_by_kind: dict[str, int] = {}

    def start(
        self,
        socket_fd: int,
        file_fd: int,
        offset: int,
        length: int,
        hasher: Any,
        idle_timeout: float,
        upstream: str,
        progress: Progress,
        pump_type: Callable[..., BodyPump] = BodyPump,
        min_rate: int = DEFAULT_MIN_RATE,
    ) -> tuple[BodyPump, Deferred[int]] | None:
        """
        Pump a body on a thread: the pump and its end offset (or failure),
        on the event loop once the thread let go of both descriptors;
        L{None} when every pump thread is busy or the service is stopped.
        C{pump_type} makes the pump from these arguments (a L{BodyPump}
        for a plain TCP socket). C{min_rate} is the bytes per second the
        body must bring over each window of C{idle_timeout} seconds.
        """
        if not self.running or len(self._running) >= self._threads:
            return None
        pump = pump_type(
            self._reactor,
            socket_fd,
            file_fd,
            offset,
            length,
            hasher,
            idle_timeout,
            upstream,
            progress,
            min_rate=min_rate,
            clock=self._clock,
        )
        self._running.add(pump)
        self.started += 1
        self.started_by_kind[pump.kind] = self.started_by_kind.get(pump.kind, 0) + 1
        metrics.labelled(metrics.pumped_bodies, pump.kind).inc()
        done = deferToThreadPool(self._reactor, self._pool, pump.run)

        def ended(result: Any) -> Any:
            self._running.discard(pump)
            pump.close()
            return result

        done.addBoth(ended)
        return pump, done

    def startService(self) -> None:
        super().startService()
        self._pool.start()

    def stopService(self) -> Any:
        if not self.running:
            return None
        super().stopService()
        for pump in list(self._running):
            pump.stop(_stopping())
        self._pool.stop()


def _stopping() -> RegistryError:
    return LocalCacheError("hammal is stopping")
