"""What the machine running the benchmark can do: its CPU, the features
that decide how fast sha256 runs, that rate itself, and how many file
descriptors the harness (and the processes it starts) may open.
"""

from __future__ import annotations

import hashlib
import os
import platform
import resource
import time
from typing import Callable, Dict, Optional, Tuple

#: CPU flags that decide sha256's speed (x86 SHA extensions, AVX2) and
#: their counterparts on ARM (``sha2`` in ``Features``).
SHA_FLAGS = ("sha_ni", "avx2", "sha2")


def cpu_flags(cpuinfo: Optional[str] = None) -> Dict[str, bool]:
    """
    Whether the first CPU of ``/proc/cpuinfo`` (or the text given) has each
    of L{SHA_FLAGS}. Every flag is reported (false when absent or unknown).
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    found: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            found = set(value.split())
            break
    return {flag: flag in found for flag in SHA_FLAGS}


def describe_flags(flags: Dict[str, bool]) -> str:
    """``sha_ni yes, avx2 yes`` (ARM's ``sha2`` only when present)."""
    shown = [f for f in SHA_FLAGS if f != "sha2" or flags.get(f)]
    return ", ".join(f"{f} {'yes' if flags.get(f) else 'no'}" for f in shown)


def has_sha_extensions(flags: Dict[str, bool]) -> bool:
    return bool(flags.get("sha_ni") or flags.get("sha2"))


def sha256_speed(
    seconds: float = 0.5,
    max_chunks: int = 100_000,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """
    MB/s (10^6 bytes/s) of hashlib's sha256 fed 1 MiB chunks on one core:
    a cold pull whose last chunk waits for its digest cannot beat it.
    Bounded by C{seconds} and by C{max_chunks}.
    """
    data = os.urandom(1 << 20)
    h = hashlib.sha256()
    count = 0
    t0 = clock()
    while count < max_chunks:
        h.update(data)
        count += 1
        if clock() - t0 >= seconds:
            break
    elapsed = clock() - t0
    return round(count * len(data) / elapsed / 1e6, 1) if elapsed > 0 else 0.0


def cpu_model(cpuinfo: Optional[str] = None) -> str:
    """The CPU's model name, from ``/proc/cpuinfo`` (or the text given)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def raise_nofile(wanted: int) -> Tuple[int, int]:
    """
    Raise this process's soft ``RLIMIT_NOFILE`` to at least C{wanted} (and
    the hard limit too, where allowed); children started afterwards inherit
    it. Returns the (soft, hard) limits now in force, which may be lower
    than asked when the system refuses.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft, hard
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted, wanted
        except (ValueError, OSError):
            pass
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def tcp_kernel_mib(sockstat: Optional[str] = None) -> float:
    """
    The kernel's memory for TCP buffers, machine-wide, in MiB (the ``mem``
    pages of ``/proc/net/sockstat``); 0 when unknown. Thousands of slow
    readers hold their unsent bytes here, not in hammal's RSS.
    """
    if sockstat is None:
        try:
            with open("/proc/net/sockstat") as f:
                sockstat = f.read()
        except OSError:
            return 0.0
    for line in sockstat.splitlines():
        if line.startswith("TCP:"):
            fields = line.split()[1:]
            values = dict(zip(fields[::2], fields[1::2]))
            if values.get("mem", "").isdigit():
                return round(int(values["mem"]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20), 1)
    return 0.0
