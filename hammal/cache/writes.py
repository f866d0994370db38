"""
Reporting cache writes that failed.

A cache write that fails (disk full, read-only filesystem, permissions, an
I/O error) or is refused for want of room only means "not cached": the
client is served from upstream all the same. Each failure is counted in
``hammal_cache_write_errors_total``; the log gets one warning per minute at
most (with how many were left unsaid), because a full disk fails every
write and would otherwise flood it.

Messages here name digests, never cache paths: paths say nothing to an
operator that the cache directory option does not, and must never reach
clients.
"""

from __future__ import annotations

import errno

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from hammal import metrics
from hammal.errors import RegistryError

#: At most one warning about failed cache writes per this many seconds.
WARNING_INTERVAL = 60.0


class LocalCacheError(RegistryError):
    """
    The cache could not keep something for a local reason (its disk, not
    upstream): the transfer goes on uncached. The message names no path.
    """


def describe(failure: OSError) -> str:
    """An C{OSError} without its file names: the reason alone."""
    if failure.errno is not None:
        return failure.strerror or errno.errorcode.get(failure.errno, str(failure.errno))
    return type(failure).__name__


class WriteErrors:
    """
    Counts failed cache writes and logs them, one warning per
    L{WARNING_INTERVAL} at most.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._last_warning: float | None = None
        self._unsaid = 0

    def record(self, kind: str, subject: str, reason: str) -> None:
        """
        A write of C{kind} (C{"blob"}, C{"manifest"}, C{"tag"}) for
        C{subject} (a digest or tag) failed for C{reason}.
        """
        metrics.cache_write_errors.labels(kind).inc()
        now = self._clock.seconds()
        if self._last_warning is not None and now - self._last_warning < WARNING_INTERVAL:
            self._unsaid += 1
            return
        self.log.warn(
            "cache write failed, serving uncached: {kind} {subject}: {reason}"
            " ({unsaid} more since the last warning)",
            kind=kind,
            subject=subject,
            reason=reason,
            unsaid=self._unsaid,
        )
        self._last_warning = now
        self._unsaid = 0
