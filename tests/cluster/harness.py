"""
Real processes for the cluster tests, on free loopback ports: SeaweedFS as
an S3 store (L{SeaweedFS}) and HAProxy as a round-robin load balancer
(L{HAProxy}, with its config from L{haproxy_config}). Redis comes from
L{tests.integration.environment.RedisServer}.

Every process is a L{ManagedProcess} (stopped by the tests' cleanups, and at
exit in any case); every directory comes from L{make_tempdir}.
"""

from __future__ import annotations

import os
import shutil

from twisted.trial.unittest import SkipTest


def require_binaries(*paths: str) -> None:
    """Skip the test when one of C{paths} is not an executable."""
    missing = [p for p in paths if not (os.path.isfile(p) and os.access(p, os.X_OK))]
    if missing:
        raise SkipTest(f"missing {', '.join(missing)} (make system-deps / make deps)")


def which(name: str, *fallbacks: str) -> str:
    """The path of C{name} on PATH, else the first existing fallback."""
    found = shutil.which(name)
    if found:
        return found
    for path in fallbacks:
        if os.path.exists(path):
            return path
    return fallbacks[0] if fallbacks else name
