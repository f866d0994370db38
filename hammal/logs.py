"""
Log observers for twistd: text or JSON on standard output, filtered at
info level (debug with ``--debug``).
"""

from __future__ import annotations

import sys
from typing import Callable

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    formatEventAsClassicLogText,
    formatTime,
    jsonFileLogObserver,
)


class _SecondsClock:
    """
    Time stamps for text logs, formatted once per second: formatting a
    time stamp per event cost a fifth of a cached manifest request.
    """

    def __init__(self) -> None:
        self._second: int | None = None
        self._text = ""

    def __call__(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = int(when)
        if second != self._second:
            self._second = second
            self._text = formatTime(when)
        return self._text


def _text_observer() -> ILogObserver:
    clock = _SecondsClock()

    def format_event(event: LogEvent) -> str | None:
        if event.get("log_format") == "{access}" and "access" in event:
            # The access line is ready-made: skip the generic formatter,
            # which costs more than the request it describes.
            return f"{clock(event.get('log_time'))} [hammal.access#info] {event['access']}\n"
        return formatEventAsClassicLogText(event, formatTime=clock)

    return FileLogObserver(sys.stdout, format_event)


def observer_factory(log_format: str, debug: bool) -> Callable[[], ILogObserver]:
    """A factory for twistd's ``logger`` option."""

    def make() -> ILogObserver:
        observer: ILogObserver
        if log_format == "json":
            observer = jsonFileLogObserver(sys.stdout)
        else:
            observer = _text_observer()
        level = LogLevel.debug if debug else LogLevel.info
        return FilteringLogObserver(observer, [LogLevelFilterPredicate(defaultLogLevel=level)])

    return make


# Named factories: twistd takes its ``logger`` option as a dotted name.
text_observer = observer_factory("text", debug=False)
text_debug_observer = observer_factory("text", debug=True)
json_observer = observer_factory("json", debug=False)
json_debug_observer = observer_factory("json", debug=True)


def observer_name(log_format: str, debug: bool) -> str:
    """The dotted name of the factory for twistd's ``logger`` option."""
    return f"{__name__}.{log_format}{'_debug' if debug else ''}_observer"
