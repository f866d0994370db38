"""Log observers selectable with ``--log-format``."""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, jsonFileLogObserver


def json_log_observer() -> ILogObserver:
    """One JSON object per event on standard output (for twistd --logger)."""
    return jsonFileLogObserver(sys.stdout)
