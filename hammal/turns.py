"""
Bulk work spread over reactor turns, a bounded amount per turn.

Each turn the reactor runs every delayed call that fell due and handles
every socket that became ready. When thousands of slow readers drain their
sockets at the same moment (they arrived together and read at the same
rate), thousands of cache readers ask to send in the same turn: hundreds of
megabytes copied by C{sendfile} before the next request on any other
connection (a manifest GET) is even read.

A L{TurnQueue} runs the calls queued on it in order, at most C{per_turn} in
one turn, and leaves the rest for the next ones; the reactor polls its
sockets in between, so requests already under way are answered between
the batches.
"""

from __future__ import annotations

import weakref
from collections import deque
from typing import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

#: Queued calls run per reactor turn. A cache reader's call sends at most
#: what its client's socket takes (up to a few hundred KiB to a slow client
#: with Linux's autotuned buffers), so 16 bound a turn to a few
#: milliseconds of copying.
CALLS_PER_TURN = 16


class QueuedCall:
    """One call waiting in a L{TurnQueue}; cancel it while it is L{active}."""

    __slots__ = ("_function", "_state")

    def __init__(self, function: Callable[[], object]) -> None:
        self._function = function
        self._state = "waiting"

    def active(self) -> bool:
        """Whether the call has neither run nor been cancelled."""
        return self._state == "waiting"

    def cancel(self) -> None:
        """Do not run it (no-op when it ran already)."""
        if self._state == "waiting":
            self._state = "cancelled"

    def _run(self) -> bool:
        if self._state != "waiting":
            return False
        self._state = "called"
        self._function()
        return True


class TurnQueue:
    """Runs queued calls in order, at most C{per_turn} per reactor turn."""

    def __init__(self, clock: IReactorTime, per_turn: int = CALLS_PER_TURN) -> None:
        self._clock = clock
        self._per_turn = per_turn
        self._queue: deque[QueuedCall] = deque()
        self._next_turn: IDelayedCall | None = None
        self._running = False

    def call(self, function: Callable[[], object]) -> QueuedCall:
        """Run C{function} in a coming turn, after the calls queued before it."""
        queued = QueuedCall(function)
        self._queue.append(queued)
        if not self._running and (self._next_turn is None or not self._next_turn.active()):
            # (checked, not a flag: a test's reactor clean-up may cancel it)
            self._next_turn = self._clock.callLater(0, self._drain)
        return queued

    def __len__(self) -> int:
        return len(self._queue)

    def _drain(self) -> None:
        # Only what was queued before this turn: a call queuing another (a
        # reader that sent its first slice) runs again in a later turn.
        queue = self._queue
        waiting = len(queue)
        ran = 0
        self._running = True
        try:
            while waiting and ran < self._per_turn:
                waiting -= 1
                if queue.popleft()._run():
                    ran += 1
        finally:
            self._running = False
            if queue:
                self._next_turn = self._clock.callLater(0, self._drain)


_QUEUES: weakref.WeakKeyDictionary[IReactorTime, TurnQueue] = weakref.WeakKeyDictionary()


def turn_queue(clock: IReactorTime) -> TurnQueue:
    """The one L{TurnQueue} of C{clock} (the reactor, or a test's Clock)."""
    queue = _QUEUES.get(clock)
    if queue is None:
        queue = _QUEUES[clock] = TurnQueue(clock)
    return queue
