"""
Upstream blob bodies read straight from the socket, on threads of their own.

Twisted reads an upstream body on the event loop: a C{recv} into a new
C{bytes} object per read, the HTTP client's parser per chunk, a hand-off
to the writer's thread per batch and a wake-up of the event loop back.
For the body of a blob of known length on a plain TCP connection none of
that is needed: once the response's headers are parsed, the fill stops the
reactor reading the socket and hands it to a L{BodyPump}, which reads it
into one buffer on a thread of its own, writes each read to the cache file
at its offset and, when the fill verifies before releasing its tail, hashes
it while it is in the CPU's cache. The read, the C{pwrite} and sha256 all
release the GIL, so the pump runs beside the event loop, which is left
with sending the written bytes to clients; it hears of the pump's progress
at most once per turn.

A pump is bounded like every upstream read: it gives up after the read
timeout without a byte (L{UpstreamTimeout}), on an early end or a reset
(L{TransferBroken}: the fill resumes with C{Range}), on a cache file that
cannot be written or hashed (L{LocalCacheError}), and when the event loop
stops it (L{BodyPump.stop}). The socket stays the reactor's: it is closed
there, once the pump's thread has let go of it.
"""

from __future__ import annotations

import errno
import os
import queue
import select
import threading
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from hammal.cache.writes import LocalCacheError, describe
from hammal.errors import RegistryError, UpstreamTimeout
from hammal.stream import TransferBroken

__all__ = ["PUMP_READ", "PUMP_THREADS", "BodyPump", "BodyPumps"]

#: How much a pump asks of the socket at once (one buffer per pump).
PUMP_READ = 1024 * 1024
#: Buffers going round between a pump and its hasher (memory per pump).
HASH_RING = 4
#: Pumps at once; a fill finding them all busy reads on the event loop.
PUMP_THREADS = 8

Progress = Callable[[int], None]
"""Called on the event loop with the file offset the pump has written up to."""


class BodyPump:
    """
    Reads C{length} bytes of a response body from the socket C{socket_fd}
    into the file C{file_fd} from C{offset} on, hashing them into C{hasher}
    if one is given. L{run} runs on a pump thread; the rest on the event loop.

    @ivar position: the file offset written up to (set by the pump thread).
    """

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
    ) -> None:
        self._reactor = reactor
        self._socket_fd = socket_fd
        self._file_fd = file_fd
        self._start = offset
        self._end = offset + length
        self._hasher = hasher
        self._idle_ms = max(1, int(idle_timeout * 1000))
        self._idle_timeout = idle_timeout
        self._upstream = upstream
        self._progress = progress
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
        """Release the pump's own descriptor (after L{run} returned)."""
        if self._wake >= 0:
            os.close(self._wake)
            self._wake = -1

    # On the pump thread.

    def run(self) -> int:
        """Pump the body; returns the end offset, or raises why it stopped."""
        size = min(PUMP_READ, max(self._end - self._start, 1))
        hashing = _PipelinedHash(self._hasher, size) if self._hasher is not None else None
        single = bytearray(size)
        poller = select.poll()
        poller.register(self._socket_fd, select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        position = self._start
        try:
            while position < self._end:
                buffer = hashing.free_buffer() if hashing is not None else single
                count = self._read(poller, memoryview(buffer), position)
                self._write(memoryview(buffer)[:count], position)
                if hashing is not None:
                    hashing.hash(buffer, count)
                position += count
                self.position = position
                if not self._told:
                    self._told = True
                    self._reactor.callFromThread(self._tell)
        finally:
            if hashing is not None:
                # Whatever ended the pump, the hasher has taken exactly the
                # bytes written: a resume goes on from there.
                hashing.finish()
        return position

    def _read(self, poller: select.poll, view: memoryview, position: int) -> int:
        """Read what the socket has (waiting for it within the idle timeout)."""
        while True:
            if self._stopping is not None:
                raise self._stopping
            try:
                count = os.readv(self._socket_fd, [view[: self._end - position]])
            except BlockingIOError:
                if not poller.poll(self._idle_ms):
                    raise UpstreamTimeout(
                        f"{self._upstream} sent nothing for {self._idle_timeout:g} seconds"
                        f" after {position} bytes"
                    ) from None
                continue
            except OSError as failure:
                raise TransferBroken(
                    f"{self._upstream} broke the connection after {position} bytes:"
                    f" {describe(failure)}"
                ) from failure
            if count == 0:
                raise TransferBroken(
                    f"{self._upstream} closed the connection after {position} of {self._end} bytes"
                )
            return count

    def _write(self, data: memoryview, offset: int) -> None:
        try:
            while data:
                written = os.pwrite(self._file_fd, data, offset)
                if written <= 0:
                    raise OSError(errno.EIO, "the cache file accepts no more bytes")
                offset += written
                data = data[written:]
        except OSError as failure:
            raise LocalCacheError(f"cannot write the cache file: {describe(failure)}") from failure


class _PipelinedHash:
    """
    Hashes a pump's buffers on a thread of its own, while the pump reads and
    writes the next: C{HASH_RING} buffers go round between the two, so the
    hash lags at most that many reads and holds no more memory.
    """

    def __init__(self, hasher: Any, size: int) -> None:
        self._hasher = hasher
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._full: queue.SimpleQueue[tuple[bytearray, int] | None] = queue.SimpleQueue()
        for _ in range(HASH_RING):
            self._free.put(bytearray(size))
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="hammal-pump-hash", daemon=True)
        self._thread.start()

    def free_buffer(self) -> bytearray:
        """A buffer the hasher is done with (waits for one)."""
        if self._failure is not None:
            raise _hash_failed(self._failure)
        return self._free.get()

    def hash(self, buffer: bytearray, count: int) -> None:
        """Hash the first C{count} bytes of C{buffer}, in order, on the hashing thread."""
        self._full.put((buffer, count))

    def finish(self) -> None:
        """Wait until everything handed over was hashed; raise if hashing failed."""
        self._full.put(None)
        self._thread.join()
        if self._failure is not None:
            raise _hash_failed(self._failure)

    def _run(self) -> None:
        while True:
            item = self._full.get()
            if item is None:
                return
            buffer, count = item
            if self._failure is None:
                try:
                    self._hasher.update(memoryview(buffer)[:count])
                except Exception as failure:
                    self._failure = failure
            self._free.put(buffer)


def _hash_failed(failure: BaseException) -> LocalCacheError:
    return LocalCacheError(f"cannot hash the cache file: {failure}")


class BodyPumps(Service):
    """
    The pump threads of a process: at most L{PUMP_THREADS} bodies pumped at
    once, started and stopped with hammal's services (stopping ends every
    pump still running).
    """

    def __init__(self, reactor: IReactorFromThreads, threads: int = PUMP_THREADS) -> None:
        self._reactor = reactor
        self._threads = threads
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name="hammal-pump")
        self._running: set[BodyPump] = set()
        #: Bodies handed to a pump since start.
        self.started = 0

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
    ) -> tuple[BodyPump, Deferred[int]] | None:
        """
        Pump a body on a thread: the pump and its end offset (or failure),
        on the event loop once the thread let go of both descriptors;
        L{None} when every pump thread is busy or the service is stopped.
        """
        if not self.running or len(self._running) >= self._threads:
            return None
        pump = BodyPump(
            self._reactor,
            socket_fd,
            file_fd,
            offset,
            length,
            hasher,
            idle_timeout,
            upstream,
            progress,
        )
        self._running.add(pump)
        self.started += 1
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
