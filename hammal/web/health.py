"""
``/healthz`` and ``/readyz`` for orchestrators.

``/healthz`` says the process serves. ``/readyz`` says it should get
traffic: not draining, Redis answering (when configured), and upstream
reached recently (or reachable now). Whether the cache directory accepts
writes is reported too, but does not make hammal unready: a cache that
cannot be written only means serving uncached.
"""

from __future__ import annotations

import json
import os
from typing import Any, Awaitable, Callable

from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from hammal.web.state import client_gone

Check = Callable[[], Awaitable[str | None]]
"""A readiness check: L{None} when fine, else what is wrong."""


class Readiness:
    """The readiness checks and the draining flag."""

    def __init__(self) -> None:
        self.draining = False
        self._checks: list[tuple[str, Check]] = []
        self._advisory: set[str] = set()

    def add(self, name: str, check: Check, required: bool = True) -> None:
        """
        Add a check; one that is not C{required} is reported but leaves
        hammal ready (it degrades the service, it does not stop it).
        """
        self._checks.append((name, check))
        if not required:
            self._advisory.add(name)

    def is_ready(self, report: dict[str, str]) -> bool:
        """Whether every required check in C{report} passed."""
        return all(value == "ok" for name, value in report.items() if name not in self._advisory)

    async def report(self) -> dict[str, str]:
        """Every check's outcome (``ok`` or the problem)."""
        results = {"draining": "draining: not accepting new work" if self.draining else "ok"}
        for name, check in self._checks:
            try:
                problem = await check()
            except Exception as failure:
                problem = f"{type(failure).__name__}: {failure}"
            results[name] = problem or "ok"
        return results


def cache_dir_writable(path: str) -> Check:
    """
    A check that hammal may create files in C{path}.

    It asks the kernel (C{access(2)}, which also reports a read-only file
    system) instead of writing a probe file: C{/readyz} is polled every few
    seconds by every load balancer and orchestrator, and a file per poll is
    disk churn, and litter when hammal is killed mid-probe.
    """

    async def check() -> str | None:
        if not os.path.isdir(path):
            return "cache directory not writable: it does not exist"
        if not os.access(path, os.W_OK | os.X_OK):
            return "cache directory not writable: permission denied or read-only file system"
        return None

    return check


def redis_answers(redis: Any, clock: Any, timeout: float = 1.0) -> Check:
    """A check that Redis answers PING within C{timeout}."""

    async def check() -> str | None:
        try:
            await redis.ping().addTimeout(timeout, clock)
        except Exception as failure:
            return f"redis not reachable: {type(failure).__name__}"
        return None

    return check


class ReadyResource(Resource):
    """``/readyz``: 200 when every check passes, else 503, with details."""

    isLeaf = True

    def __init__(self, readiness: Readiness) -> None:
        super().__init__()
        self._readiness = readiness

    def render_GET(self, request: Request) -> Any:
        Deferred.fromCoroutine(self._answer(request))
        return NOT_DONE_YET

    render_HEAD = render_GET

    async def _answer(self, request: Request) -> None:
        report = await self._readiness.report()
        ready = self._readiness.is_ready(report)
        body = json.dumps({"ready": ready, "checks": report}).encode()
        if client_gone(request):
            return
        request.setResponseCode(200 if ready else 503)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()
