"""
Uploading a blob to the object store while it is being filled.

A L{FileUpload} follows a fill's growing cache file (like the readers that
serve clients) and writes its bytes, in order, to an
L{hammal.storage.objects.ObjectUpload}. It completes the upload only once
the fill verified the digest, and aborts it when the fill fails, so the
shared store never holds an unverified blob. It reads the file rather than
tapping the network stream, so a fill whose first bytes came from a peer
and whose rest came from upstream is uploaded whole.
"""

from __future__ import annotations

import os
from typing import Callable, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from hammal.storage.objects import ObjectUpload

log = Logger()

#: Bytes read from the cache file per write to the upload (the upload
#: itself gathers them into parts of at least 8 MiB).
CHUNK = 1024 * 1024


class GrowingSource(Protocol):
    """What L{FileUpload} needs of a fill (L{hammal.cache.fetch.BlobFetch} has it)."""

    path: str
    written: int
    verified: bool
    size: int | None
    finished: Deferred[None]

    def subscribe(self, listener: Callable[[], None]) -> None: ...

    def unsubscribe(self, listener: Callable[[], None]) -> None: ...


class FileUpload:
    """
    One fill's bytes on their way to the object store.

    @ivar done: fires with C{True} once the object is complete in the store,
        C{False} when the upload was aborted or failed (never errbacks: a
        store that fails costs the cluster a copy, not a pull).
    @ivar on_failure: called with a reason when the store failed the upload
        (not for the fill's own failures, nor the local disk's).
    """

    def __init__(
        self,
        fill: GrowingSource,
        upload: ObjectUpload,
        on_failure: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self._fill = fill
        self._upload = upload
        self._on_failure = on_failure
        self._sent = 0
        self._busy = False
        self._fd: int | None = None
        self.done: Deferred[bool] = Deferred()

    def begin(self) -> None:
        """Open the fill's file and upload what is there and what comes."""
        if self.done.called:
            return
        try:
            self._fd = os.open(self._fill.path, os.O_RDONLY)
        except OSError as e:
            self._local_failure(f"cannot read {self._fill.path}: {e.strerror}")
            return
        self._fill.subscribe(self._more)
        self._fill.finished.addBoth(self._fill_ended)
        self._more()

    def cancel(self) -> None:
        """The fill failed before it began: drop the upload (nothing was sent)."""
        self._end(False, None, abort=True)

    def _local_failure(self, reason: str) -> None:
        log.warn("not uploading {path}: {reason}", path=self._fill.path, reason=reason)
        self._end(False, None, abort=True)

    def _fill_ended(self, result: object) -> object:
        if not self._fill.verified:
            self._end(False, None, abort=True)
        else:
            self._more()
        return result

    def _more(self) -> None:
        if self._busy or self.done.called or self._fd is None:
            return
        available = self._fill.written
        if self._sent < available:
            try:
                data = os.pread(self._fd, min(CHUNK, available - self._sent), self._sent)
            except OSError as e:
                self._local_failure(f"cannot read it: {e.strerror}")
                return
            if not data:
                self._local_failure("it ended early")
                return
            self._sent += len(data)
            self._step(self._upload.write, data)
            return
        if self._fill.verified and self._sent == self._fill.size:
            self._step(self._upload.complete, None)

    def _step(self, call: Callable[..., Deferred[None]], data: bytes | None) -> None:
        completing = data is None
        self._busy = True
        try:
            d = call() if completing else call(data)
        except Exception as e:  # an earlier part failed: the upload says so at once
            self._busy = False
            self._end(False, str(e), abort=True)
            return

        def stepped(_: object) -> None:
            self._busy = False
            if completing:
                self._end(True, None, abort=False)
            else:
                self._more()

        def failed(failure: Failure) -> None:
            self._busy = False
            self._end(False, failure.getErrorMessage(), abort=not completing)

        d.addCallbacks(stepped, failed)

    def _end(self, stored: bool, reason: str | None, abort: bool) -> None:
        if self.done.called:
            return
        self._fill.unsubscribe(self._more)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if reason is not None:
            self._on_failure(reason)
        if abort:
            # abort() never fails; the verdict waits for it so that a
            # caller releasing the fill lease leaves nothing half-done.
            self._upload.abort().addBoth(lambda _: self.done.callback(False))
        else:
            self.done.callback(stored)
