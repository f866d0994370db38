"""
Whether the process that wrote a temporary file or holds a fill still
runs on this host (pids: one host, one pid namespace).
"""

from __future__ import annotations

import os


def writer_alive(pid: int) -> bool:
    """Whether process C{pid} runs on this host (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rpartition(b")")[2].split()[:1]
    except OSError:
        return True  # no /proc: trust kill()
    return state not in ([b"Z"], [b"X"])
