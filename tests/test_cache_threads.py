"""
L{hammal.cache.threads}: a fill's hasher on a thread of its own, at a
lower CPU priority than the rest of the process.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable

from twisted.trial.unittest import SynchronousTestCase

from hammal.cache import threads
from hammal.cache.threads import DedicatedThread, lower_priority

#: Bound on every wait for a real thread (a failure, not a hang).
WAIT = 30.0


def _in_a_thread(f: Callable[[], Any]) -> Any:
    """Run C{f} on a new thread (so the test's own thread keeps its priority)."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(f()))
    thread.start()
    thread.join(WAIT)
    if not result:
        raise AssertionError("the thread did not finish")
    return result[0]


class _Reactor:
    """Enough of a reactor for deferToThreadPool: results delivered when the test says."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self.arrived = threading.Event()

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self.calls.append((f, args))
        self.arrived.set()

    def deliver(self) -> None:
        if not self.arrived.wait(WAIT):
            raise AssertionError("the job did not finish")
        self.arrived.clear()
        calls, self.calls = self.calls, []
        for f, args in calls:
            f(*args)


class LowerPriorityTests(SynchronousTestCase):
    def test_lowers_only_the_calling_thread(self) -> None:
        """The thread runs C{by} steps nicer; the process's other threads do not."""
        own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

        def lowered() -> tuple[int, int]:
            thread = threading.get_native_id()
            before = os.getpriority(os.PRIO_PROCESS, thread)
            lower_priority(5)
            return before, os.getpriority(os.PRIO_PROCESS, thread)

        before, after = _in_a_thread(lowered)
        self.assertEqual(after, min(19, before + 5))
        self.assertEqual(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), own)

    def test_refusal_is_not_an_error(self) -> None:
        """Where the system refuses, the thread runs as it is."""

        def refuse(*args: Any) -> None:
            raise PermissionError(1, "Operation not permitted")

        self.patch(os, "setpriority", refuse)
        lower_priority(5)  # no exception


class DedicatedThreadTests(SynchronousTestCase):
    def test_runs_jobs_on_one_lowered_thread(self) -> None:
        """
        Jobs run one after another on the same thread, lowered once, not
        on the caller's; results come back through the reactor.
        """
        lowered: list[int] = []
        self.patch(threads, "lower_priority", lowered.append)
        reactor = _Reactor()
        worker = DedicatedThread(reactor, "test-hash", lower_by=7)  # type: ignore[arg-type]
        worker.startService()
        self.addCleanup(worker.stopService)
        results: list[int] = []
        for _ in range(2):
            d = worker(threading.get_native_id)
            d.addCallback(results.append)
            reactor.deliver()
        self.assertEqual(len(results), 2)
        self.assertEqual(results[0], results[1])
        self.assertNotEqual(results[0], threading.get_native_id())
        self.assertEqual(lowered, [7])

    def test_failure_comes_back(self) -> None:
        """A job's exception is its Deferred's failure."""
        reactor = _Reactor()
        worker = DedicatedThread(reactor, "test-hash", lower_by=0)  # type: ignore[arg-type]
        worker.startService()
        self.addCleanup(worker.stopService)
        d = worker(os.read, -1, 1)
        reactor.deliver()
        self.failureResultOf(d, OSError)
