"""
Threads of their own for a fill's work off the event loop.

The reactor's shared pool serves every offloaded job in turn; a fill's
hasher that follows the written file (C{--no-hold-tail}) is better on a
thread of its own at a lower CPU priority: nobody waits for it but the
commit, so on a busy machine it yields the cores to the transfer (the
event loop, the writer, the client), and other pool work keeps its
priority.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

__all__ = ["LOWER_PRIORITY_BY", "DedicatedThread", "lower_priority"]

log = Logger()

#: How much nicer (Linux "nice" steps, up to 19) a low-priority thread runs.
LOWER_PRIORITY_BY = 10

_state = threading.local()


def lower_priority(by: int) -> None:
    """
    Make the calling thread C{by} steps nicer (Linux schedules threads one
    by one, so the rest of the process keeps its priority). Never raises:
    where it cannot be done, the thread runs as it is.
    """
    if by <= 0:
        return
    try:
        thread = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(19, current + by))
    except (OSError, AttributeError) as failure:
        log.info("cannot lower a thread's priority: {error}", error=str(failure))


def _run_lowered(by: int, f: Callable[..., Any], *args: Any) -> Any:
    """Run C{f(*args)}, this thread lowered by C{by} steps first (once per thread)."""
    if getattr(_state, "lowered", None) != by:
        _state.lowered = by
        lower_priority(by)
    return f(*args)


class DedicatedThread(Service):
    """
    One thread, started and stopped with hammal's services, that runs the
    jobs handed to it one after another (an L{hammal.cache.fetch.Offload}),
    C{lower_by} steps below the rest of the process.
    """

    def __init__(
        self, reactor: IReactorFromThreads, name: str, lower_by: int = LOWER_PRIORITY_BY
    ) -> None:
        self._reactor = reactor
        self._lower_by = lower_by
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name=name)

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Run C{f(*args)} on the thread; its result (or failure) comes back on the reactor."""
        return deferToThreadPool(self._reactor, self.pool, _run_lowered, self._lower_by, f, *args)

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> Any:
        super().stopService()
        self.pool.stop()
