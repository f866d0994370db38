"""Shared pieces of the resilience tests: hammal in a sandbox, raw HTTP,
and checks on hammal's process (file descriptors, sockets, log, cache).

hammal is started by :func:`start_sandboxed_hammal` in a temporary working
directory of its own (not the repository, which other work may be changing),
with its ``--cache-dir`` inside it and its log outside it, so the tests can
snapshot that directory and see any file written where it should not be.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Type

from twisted.trial import unittest

from tests.integration.environment import (
    REPO_ROOT,
    HammalProcess,
    ManagedProcess,
    clean_env,
    free_port,
    hammal_argv,
    http_request,
    make_tempdir,
    wait_until,
)

__all__ = [
    "Sandbox",
    "RawResponse",
    "raw_exchange",
    "get_blob",
    "open_fds",
    "established_sockets",
    "tree_snapshot",
    "cache_problems",
    "ResilienceCase",
    "FixtureCase",
]

TRACEBACK_MARKERS = ("Traceback (most recent call last)", "Unhandled error", "Unhandled Error")


@dataclass
class Sandbox:
    """A hammal running in its own working directory."""

    hammal: HammalProcess
    root: str  # a temp dir: ROOT/outer/inner/cwd is hammal's cwd
    workdir: str  # hammal's cwd; holds cache/
    cache_dir: str

    @property
    def pid(self) -> int:
        pid = self.hammal.process.pid
        assert pid is not None
        return pid

    def stop(self) -> None:
        self.hammal.stop()


def start_sandboxed_hammal(
    upstream: str, redis: Optional[str] = None, extra_args: Sequence[str] = (), **options: object
) -> Sandbox:
    """``twistd -n hammal`` on a free port, cwd and cache in a fresh temp dir.

    *options* are :func:`tests.integration.environment.hammal_argv`'s
    (``read_timeout``, ``retries``, ...); the defaults here are short.
    """
    opts: Dict[str, object] = dict(retries=2, retry_backoff=0.05, connect_timeout=2, read_timeout=2)
    opts.update(options)
    root = make_tempdir("hammal-res-")
    # nested, so that a path escaping the cache by a few ".." still lands
    # inside ROOT, where the tests look
    workdir = os.path.join(root, "outer", "inner", "cwd")
    os.makedirs(workdir)
    logdir = make_tempdir("hammal-res-log-")
    cache_dir = os.path.join(workdir, "cache")
    port = free_port()
    argv = hammal_argv(
        port, upstream, redis=redis, cache_dir=cache_dir, extra_args=list(extra_args), **opts
    )  # type: ignore[arg-type]
    env = {
        k: v
        for k, v in clean_env().items()
        if not k.startswith("HAMMAL_") and k not in ("DOCKER_USERNAME", "DOCKER_PASSWORD")
    }
    env["PYTHONPATH"] = REPO_ROOT
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    proc = ManagedProcess(
        "hammal", argv, os.path.join(logdir, "hammal.log"), env=env, cwd=workdir
    ).start()
    hammal = HammalProcess(proc, port, argv, None)

    def ready() -> bool:
        return http_request("GET", hammal.url + "/v2/", timeout=2).status == 200

    try:
        wait_until(ready, f"hammal GET /v2/ on port {port}", 30, proc)
    except BaseException:
        hammal.stop()
        raise
    return Sandbox(hammal, root, workdir, cache_dir)


# -- raw HTTP ---------------------------------------------------------------------


@dataclass
class RawResponse:
    """What came back on a raw socket: parsed if it was HTTP."""

    status: Optional[int]
    headers: List[Tuple[str, str]]
    body: bytes
    complete: bool  # the body had every byte Content-Length announced
    error: str = ""  # how the exchange ended, if not cleanly

    def header(self, name: str) -> Optional[str]:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


def _parse_head(head: bytes) -> Tuple[Optional[int], List[Tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    status = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None
    headers = []
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers.append((k.strip(), v.strip()))
    return status, headers


def raw_exchange(
    port: int,
    payload: bytes,
    timeout: float = 10.0,
    max_body: int = 64 * 1024 * 1024,
    method_head: bool = False,
) -> RawResponse:
    """Send *payload* as is, read one response (or until close/timeout)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    deadline = time.monotonic() + timeout
    data = b""
    try:
        try:
            s.sendall(payload)
        except OSError as e:
            return RawResponse(None, [], b"", False, f"send: {e}")
        error = ""
        while True:
            while b"\r\n\r\n" not in data and time.monotonic() < deadline:
                try:
                    chunk = s.recv(65536)
                except OSError as e:
                    error = f"recv: {e}"
                    break
                if not chunk:
                    error = "closed before a response"
                    break
                data += chunk
            if b"\r\n\r\n" not in data:
                return RawResponse(None, [], data, False, error or "timeout")
            head, body = data.split(b"\r\n\r\n", 1)
            status, headers = _parse_head(head)
            if status is not None and 100 <= status < 200 and status != 101 and not error:
                data = body  # an interim answer ("100 Continue"): the real one follows
                continue
            break
        resp = RawResponse(status, headers, b"", False)
        length_text = resp.header("content-length")
        length = int(length_text) if length_text and length_text.isdigit() else None
        if method_head or status in (204, 304):
            resp.complete = True
            return resp
        while (
            (length is None or len(body) < length)
            and len(body) < max_body
            and time.monotonic() < deadline
        ):
            try:
                chunk = s.recv(1 << 20)
            except OSError as e:
                resp.error = f"recv: {e}"
                break
            if not chunk:
                if length is not None:
                    resp.error = "closed early"
                break
            body += chunk
        resp.body = body
        resp.complete = length is not None and len(body) >= length
        if length is not None and len(body) > length:
            resp.body = body[:length]
        if not resp.complete and not resp.error:
            resp.error = "timeout" if time.monotonic() >= deadline else "no length"
        return resp
    finally:
        s.close()


def get_blob(
    port: int,
    name: str,
    digest: str,
    headers: Sequence[Tuple[str, str]] = (),
    timeout: float = 30.0,
    method: str = "GET",
) -> RawResponse:
    """``GET /v2/NAME/blobs/DIGEST`` (``Connection: close``)."""
    lines = [
        f"{method} /v2/{name}/blobs/{digest} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Connection: close",
        *[f"{k}: {v}" for k, v in headers],
    ]
    return raw_exchange(
        port,
        ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"),
        timeout,
        method_head=method == "HEAD",
    )


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- hammal's process -------------------------------------------------------------------


def open_fds(pid: int) -> Dict[str, str]:
    """fd number -> what it points at."""
    out = {}
    base = f"/proc/{pid}/fd"
    for fd in os.listdir(base):
        try:
            out[fd] = os.readlink(os.path.join(base, fd))
        except OSError:
            pass
    return out


def established_sockets(pid: int) -> List[Tuple[str, str]]:
    """(local, remote) of the ESTABLISHED TCP sockets *pid* holds."""
    inodes = {t[len("socket:[") : -1] for t in open_fds(pid).values() if t.startswith("socket:[")}
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[3] == "01" and cols[9] in inodes:
                        out.append((_addr(cols[1]), _addr(cols[2])))
        except OSError:
            pass
    return out


def _addr(text: str) -> str:
    host, port = text.split(":")
    if len(host) == 8:
        ip = ".".join(str(int(host[i : i + 2], 16)) for i in (6, 4, 2, 0))
    else:
        ip = host
    return f"{ip}:{int(port, 16)}"


def tree_snapshot(root: str, skip: Iterable[str] = ()) -> Dict[str, Tuple[int, int]]:
    """relative path -> (size, mtime_ns) of every file and dir under *root*,
    not descending into the absolute paths in *skip*."""
    skip = {os.path.abspath(p) for p in skip}
    out: Dict[str, Tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in skip]
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            rel = os.path.relpath(path, root)
            out[rel] = (
                st.st_size if not os.path.isdir(path) else 0,
                st.st_mtime_ns if not os.path.isdir(path) else 0,
            )
    return out


def cache_problems(cache_dir: str) -> List[str]:
    """Every stored blob and manifest must hash to its name."""
    problems = []
    for kind in ("blobs", "manifests"):
        root = os.path.join(cache_dir, kind, "sha256")
        if not os.path.isdir(root):
            continue
        for prefix in os.listdir(root):
            for name in os.listdir(os.path.join(root, prefix)):
                if "." in name:
                    continue  # e.g. <hex>.type beside a manifest
                path = os.path.join(root, prefix, name)
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                if h.hexdigest() != name:
                    problems.append(
                        f"{kind}/{prefix}/{name} holds bytes hashing to {h.hexdigest()}"
                    )
    return problems


class ResilienceCase(unittest.SynchronousTestCase):
    """Assertions on a running hammal."""

    def assertNoTraceback(self, sandbox: Sandbox, since: int = 0) -> None:
        text = sandbox.hammal.log_text()[since:]
        for marker in TRACEBACK_MARKERS:
            if marker in text:
                at = text.index(marker)
                self.fail(f"hammal logged {marker!r}:\n{text[max(0, at - 1500) : at + 3000]}")

    def assertAlive(self, sandbox: Sandbox) -> None:
        if not sandbox.hammal.running():
            self.fail(f"hammal exited; its log:\n{sandbox.hammal.log_tail()}")

    def settle(self, check: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Poll *check* up to *timeout* seconds; its last value."""
        deadline = time.monotonic() + timeout
        while True:
            if check():
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)

    def assertNoLeaks(
        self,
        sandbox: Sandbox,
        fds_before: int,
        est_before: int,
        upstream_ports: Sequence[int] = (),
        pool_limit: int = 4,
        slack: int = 2,
        timeout: float = 10.0,
    ) -> None:
        """No client connection left open, at most *pool_limit* persistent
        connections to the upstream (*upstream_ports*: hammal's pool keeps
        them on purpose), and every other fd back to what it was, give or
        take *slack* (the baselines count the pool at the start)."""
        pid = sandbox.pid
        own = f":{sandbox.hammal.port}"
        ports = {f":{p}" for p in upstream_ports}
        state: Dict[str, object] = {}

        def settled() -> bool:
            fds = open_fds(pid)
            est = established_sockets(pid)
            clients = [e for e in est if e[0].endswith(own)]
            pooled = [e for e in est if any(e[1].endswith(p) for p in ports)]
            state.update(fds=fds, est=est, clients=clients, pooled=pooled)
            return (
                not clients
                and len(pooled) <= pool_limit
                and len(fds) - len(pooled) <= fds_before + slack
                and len(est) - len(pooled) <= est_before + slack
            )

        if not self.settle(settled, timeout):
            fds = state["fds"]
            self.fail(
                f"hammal holds {len(fds)} fds (was {fds_before}; slack {slack}), "  # type: ignore[arg-type]
                f"{len(state['clients'])} client connections, "  # type: ignore[arg-type]
                f"{len(state['pooled'])} pooled upstream connections (limit {pool_limit}),"  # type: ignore[arg-type]
                f" ESTABLISHED {state['est']} (was {est_before}):\n"
                f"{sorted(fds.values())}\nlog tail:\n{sandbox.hammal.log_tail(3000)}"
            )  # type: ignore[attr-defined]


# -- one shared fixture per test class ------------------------------------------------
#
# trial has no setUpClass: a class's fixture (an upstream and a hammal) is
# started by its first test and stopped when a test of another class needs
# its own, or at exit. So at most one such fixture is alive at a time.

_fixture_lock = threading.Lock()
_live_fixture: "Optional[Type[FixtureCase]]" = None


def _stop_live_fixture() -> None:
    global _live_fixture
    with _fixture_lock:
        live, _live_fixture = _live_fixture, None
    if live is not None:
        live.stop_fixture()


atexit.register(_stop_live_fixture)


class FixtureCase(ResilienceCase):
    """A test case whose class shares one fixture (see above)."""

    _fixture_error: Optional[BaseException] = None

    @classmethod
    def start_fixture(cls) -> None:
        """Start what the class's tests share (set class attributes)."""

    @classmethod
    def stop_fixture(cls) -> None:
        """Stop it."""

    @classmethod
    def _stop_shared(cls, *names: str) -> None:
        """Stop and forget the class attributes *names* (each has a stop())."""
        for name in names:
            value = cls.__dict__.get(name)
            if value is not None:
                value.stop()
                delattr(cls, name)

    def setUp(self) -> None:
        global _live_fixture
        cls = type(self)
        if _live_fixture is not cls:
            _stop_live_fixture()
            if cls._fixture_error is not None:
                raise cls._fixture_error
            try:
                cls.start_fixture()
            except BaseException as e:
                cls._fixture_error = e
                cls.stop_fixture()
                raise
            with _fixture_lock:
                _live_fixture = cls
