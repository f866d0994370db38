"""
Log observers for twistd: hammal's text or JSON lines, filtered at info
level (debug with ``--debug``), written where twistd's own options say --
standard output with ``-n``, the ``--logfile`` (default ``twistd.log`` for a
daemon, rotated on ``SIGUSR1`` like twistd's), or syslog with ``--syslog``
(``--prefix`` as the ident).

twistd takes its ``--logger`` as a dotted name, so the destination is
recorded here (L{set_destination}, from the plugin's options) before twistd
calls the named factory.
"""

from __future__ import annotations

import signal
import sys
import syslog as _stdlib_syslog
from typing import IO, Any, Callable, Mapping

import attrs
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsJSON,
    formatEventAsClassicLogText,
    formatTime,
    jsonFileLogObserver,
)
from twisted.python import logfile
from zope.interface import implementer


@attrs.frozen
class Destination:
    """Where log lines go: a file path, syslog (with an ident), or stdout."""

    path: str | None = None
    syslog_prefix: str | None = None

    @classmethod
    def from_twistd(cls, options: Mapping[str, Any]) -> Destination:
        """
        twistd's choice for its own options (C{logfile}, C{syslog},
        C{prefix}, C{nodaemon}).

        @raise ValueError: for ``--logfile -`` without ``-n``.
        """
        if options.get("syslog"):
            return cls(syslog_prefix=options.get("prefix") or "twisted")
        path = options.get("logfile") or ""
        # Only twistd's Unix options have "nodaemon"; elsewhere hammal runs
        # in the foreground.
        nodaemon = bool(options.get("nodaemon", True))
        if path == "-":
            if not nodaemon:
                raise ValueError("a daemon cannot log to stdout: give --logfile FILE or -n")
            return cls()
        if not path:
            return cls() if nodaemon else cls(path="twistd.log")
        return cls(path=path)


_destination = Destination()


def set_destination(destination: Destination) -> None:
    """Record where the observers made later write."""
    global _destination
    _destination = destination


#: Log levels to syslog priorities.
_PRIORITIES = {
    LogLevel.debug: _stdlib_syslog.LOG_DEBUG,
    LogLevel.info: _stdlib_syslog.LOG_INFO,
    LogLevel.warn: _stdlib_syslog.LOG_WARNING,
    LogLevel.error: _stdlib_syslog.LOG_ERR,
    LogLevel.critical: _stdlib_syslog.LOG_CRIT,
}
_DEFAULT_PRIORITY = _stdlib_syslog.LOG_INFO


@implementer(ILogObserver)
class SyslogObserver:
    """hammal's formatted lines to syslog, one message per line."""

    def __init__(
        self, format_event: Callable[[LogEvent], str | None], prefix: str, syslog: Any = None
    ) -> None:
        self._format = format_event
        self._syslog = _stdlib_syslog if syslog is None else syslog
        self._syslog.openlog(prefix, 0, _stdlib_syslog.LOG_DAEMON)

    def __call__(self, event: LogEvent) -> None:
        text = self._format(event)
        if not text:
            return
        priority = _PRIORITIES.get(event.get("log_level"), _DEFAULT_PRIORITY)
        for line in text.rstrip("\n").split("\n"):
            self._syslog.syslog(priority, line)


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


def _text_format() -> Callable[[LogEvent], str | None]:
    clock = _SecondsClock()

    def format_event(event: LogEvent) -> str | None:
        if event.get("log_format") == "{access}" and "access" in event:
            # The access line is ready-made: skip the generic formatter,
            # which costs more than the request it describes.
            return f"{clock(event.get('log_time'))} [hammal.access#info] {event['access']}\n"
        return formatEventAsClassicLogText(event, formatTime=clock)

    return format_event


def _json_line(event: LogEvent) -> str:
    return eventAsJSON(event) + "\n"


def _open_file(path: str) -> IO[Any]:
    """twistd's rotating log file, rotated on SIGUSR1 unless that is taken."""
    log_file = logfile.LogFile.fromFullPath(path)
    if not signal.getsignal(signal.SIGUSR1):

        def rotate(signum: int, frame: object) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(log_file.rotate)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, rotate)
    return log_file


def build_observer(log_format: str, destination: Destination) -> ILogObserver:
    """hammal's unfiltered observer in C{log_format} to C{destination}."""
    if destination.syslog_prefix is not None:
        format_event = _json_line if log_format == "json" else _text_format()
        return SyslogObserver(format_event, destination.syslog_prefix)
    output: IO[Any] = sys.stdout if destination.path is None else _open_file(destination.path)
    if log_format == "json":
        return jsonFileLogObserver(output)
    return FileLogObserver(output, _text_format())


def observer_factory(log_format: str, debug: bool) -> Callable[[], ILogObserver]:
    """A factory for twistd's ``logger`` option, writing to L{set_destination}'s choice."""

    def make() -> ILogObserver:
        observer = build_observer(log_format, _destination)
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
