"""L{hammal.logs}: hammal's lines on the destination twistd's options chose."""

from __future__ import annotations

import json
import os
import signal
import syslog
from typing import Any

from twisted.logger import LogLevel
from twisted.python.reflect import namedAny
from twisted.python.usage import UsageError
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import SynchronousTestCase

from hammal.logs import Destination, SyslogObserver, set_destination


def _event(text: str, level: LogLevel = LogLevel.info) -> dict[str, Any]:
    return {
        "log_level": level,
        "log_format": "event {n}",
        "log_namespace": "test",
        "log_time": 0.0,
        "n": text,
    }


class DestinationTests(SynchronousTestCase):
    def test_twistd_rules(self) -> None:
        self.assertEqual(Destination.from_twistd({"nodaemon": 1, "logfile": None}), Destination())
        self.assertEqual(
            Destination.from_twistd({"nodaemon": 0, "logfile": None}), Destination("twistd.log")
        )
        self.assertEqual(
            Destination.from_twistd({"nodaemon": 0, "logfile": "/x/h.log"}), Destination("/x/h.log")
        )
        self.assertEqual(Destination.from_twistd({"nodaemon": 1, "logfile": "-"}), Destination())
        self.assertEqual(
            Destination.from_twistd({"syslog": 1, "prefix": "hammal", "logfile": "/x"}),
            Destination(None, "hammal"),
        )
        with self.assertRaises(ValueError):
            Destination.from_twistd({"nodaemon": 0, "logfile": "-"})


class TwistdOptionsTests(SynchronousTestCase):
    """The plugin's options under twistd's real L{ServerOptions}."""

    def setUp(self) -> None:
        self.addCleanup(set_destination, Destination())
        previous = signal.getsignal(signal.SIGUSR1)
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)

    def parse(self, *args: str) -> ServerOptions:
        config = ServerOptions()
        config.parseOptions([*args, "hammal", "--no-cache"])
        return config

    def test_logfile_gets_hammals_lines(self) -> None:
        path = os.path.join(self.mktemp() + "-dir", "hammal.log")
        os.makedirs(os.path.dirname(path))
        config = self.parse("--logfile", path)
        observer = config["logger"]()
        observer(_event("to the file"))
        observer(_event("filtered", LogLevel.debug))
        with open(path) as f:
            text = f.read()
        self.assertIn("[test#info] event to the file", text)
        self.assertNotIn("filtered", text)
        self.assertTrue(signal.getsignal(signal.SIGUSR1))  # rotation, as twistd does

    def test_json_to_the_logfile(self) -> None:
        path = self.mktemp()
        config = ServerOptions()
        config.parseOptions(["--logfile", path, "hammal", "--no-cache", "--log-format", "json"])
        config["logger"]()(_event("as json"))
        with open(path) as f:
            self.assertEqual(json.loads(f.read().strip("\x1e\n"))["n"], "as json")

    def test_daemon_cannot_log_to_stdout(self) -> None:
        with self.assertRaises(UsageError):
            self.parse("--logfile", "-")

    def test_explicit_logger_is_kept(self) -> None:
        config = self.parse("--logger", "twisted.logger.textFileLogObserver")
        self.assertIs(config["logger"], namedAny("twisted.logger.textFileLogObserver"))


class _FakeSyslog:
    LOG_DAEMON = syslog.LOG_DAEMON

    def __init__(self) -> None:
        self.opened: tuple[Any, ...] | None = None
        self.lines: list[tuple[int, str]] = []

    def openlog(self, *args: Any) -> None:
        self.opened = args

    def syslog(self, priority: int, line: str) -> None:
        self.lines.append((priority, line))


class SyslogTests(SynchronousTestCase):
    def test_lines_and_priorities(self) -> None:
        fake = _FakeSyslog()
        observer = SyslogObserver(lambda e: f"{e['n']}\nsecond line\n", "hammal", fake)
        observer(_event("warned", LogLevel.warn))
        self.assertEqual(fake.opened, ("hammal", 0, syslog.LOG_DAEMON))
        self.assertEqual(
            fake.lines, [(syslog.LOG_WARNING, "warned"), (syslog.LOG_WARNING, "second line")]
        )

    def test_syslog_option_chooses_syslog(self) -> None:
        self.addCleanup(set_destination, Destination())
        fake = _FakeSyslog()
        import hammal.logs

        self.patch(hammal.logs, "_stdlib_syslog", fake)
        config = ServerOptions()
        config.parseOptions(["--syslog", "--prefix", "mirror", "hammal", "--no-cache"])
        config["logger"]()(_event("to syslog"))
        self.assertEqual(fake.opened[0] if fake.opened else None, "mirror")
        self.assertEqual(len(fake.lines), 1)
        self.assertIn("[test#info] event to syslog", fake.lines[0][1])
