"""
Name the unit tests that leave timers, readers or writers on the global
reactor (run: PYTHONPATH=. python tools/reactor_hygiene.py [tests.test_x ...]).

trial checks the reactor only after tests that use it (C{TestCase}); a
C{SynchronousTestCase} that arms a real timer passes, and the next
real-reactor test fails with C{DirtyReactorAggregateError} instead. This
runs the unit modules (all of C{tests/test_*.py} by default) and says which
test left something behind, then cancels its timers so the next is judged
alone. Exits 1 when a test failed or left something.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Any

from twisted.internet import reactor
from twisted.trial import reporter, runner

_reactor: Any = reactor


def _state() -> tuple[set[Any], set[Any], set[Any]]:
    return (
        set(_reactor.getDelayedCalls()),
        set(_reactor.getReaders()),
        set(_reactor.getWriters()),
    )


class HygieneReporter(reporter.TreeReporter):
    """A tree reporter that also names tests leaving the global reactor dirty."""

    dirty: list[str] = []

    def startTest(self, test: Any) -> None:
        super().startTest(test)
        self._before = _state()

    def stopTest(self, test: Any) -> None:
        gc.collect()
        calls, readers, writers = (now - before for now, before in zip(_state(), self._before))
        if calls or readers or writers:
            HygieneReporter.dirty.append(
                f"{test.id()}: calls={sorted(map(repr, calls))} readers={readers} writers={writers}"
            )
            for call in calls:
                if call.active():
                    call.cancel()
        super().stopTest(test)


def unit_modules() -> list[str]:
    """Every C{tests/test_*.py} module, as C{make test-unit} runs them."""
    names = sorted(name for name in os.listdir("tests") if name.startswith("test_"))
    return [f"tests.{name[:-3]}" for name in names if name.endswith(".py")]


def main(argv: list[str]) -> int:
    names = argv or unit_modules()
    suite = runner.TestLoader().loadByNames(names, recurse=True)
    trial = runner.TrialRunner(
        HygieneReporter, workingDirectory="_trial_temp.hygiene", forceGarbageCollection=True
    )
    result = trial.run(suite)
    for line in HygieneReporter.dirty:
        sys.stderr.write(f"left on the reactor: {line}\n")
    return 0 if result.wasSuccessful() and not HygieneReporter.dirty else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
