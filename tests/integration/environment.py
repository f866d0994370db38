"""The Docker-Hub-like upstream the integration tests pull through hammal.

:func:`get_environment` lazily starts, once per trial process, an
:class:`UpstreamEnvironment`:

* ``redis-server`` (no persistence) that hammal may use as its cache index,
  and that tests can kill and restart on the same port;
* the token server (``tokenserver.py``, an auth.docker.io look-alike);
* the "CDN" (``cdn.py``, static files over the registry's storage root);
* CNCF Distribution (``docker-registry serve``) with token auth and the
  ``redirect`` storage middleware pointing at the CDN, as Docker Hub does.

Its storage is seeded with :func:`images.build_images`'s images by a second,
auth-less, redirect-less registry process on the same storage root
(Distribution's HEAD-before-push would otherwise go to the CDN), which is
stopped before any test runs.

:func:`start_hammal` launches hammal itself as a ``twistd`` subprocess.

Every process started here is a child of the test process, on 127.0.0.1 only,
stopped by the tests' cleanups and in any case at exit (``atexit``, and
``PR_SET_PDEATHSIG`` should the test process die without running it); every
temporary directory is removed at exit unless ``HAMMAL_IT_KEEP=1``.
"""

from __future__ import annotations

import atexit
import base64
import ctypes
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from tests.integration.images import ALL_MANIFEST_TYPES, TestImage, build_images
from tests.integration.pki import PKIFiles, generate_pki

__all__ = [
    "HERE",
    "REPO_ROOT",
    "ADMIN_USER",
    "ADMIN_PASSWORD",
    "PRIVATE_USER",
    "PRIVATE_PASSWORD",
    "OTHER_USER",
    "OTHER_PASSWORD",
    "REGISTRY_SERVICE",
    "TOKEN_ISSUER",
    "HarnessError",
    "HTTPResponse",
    "ManagedProcess",
    "RedisServer",
    "HammalProcess",
    "UpstreamEnvironment",
    "SilentServer",
    "free_port",
    "http_request",
    "wait_until",
    "get_environment",
    "start_hammal",
    "make_tempdir",
    "DEFAULT_IDLE_TIMEOUT",
    "http_get_digest",
    "missing_binaries",
    "skopeo",
    "skopeo_pull",
    "clean_env",
    "port_open",
    "hammal_argv",
    "twistd_path",
]

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"
SKOPEO_BIN = shutil.which("skopeo") or "/usr/bin/skopeo"
REDIS_BIN = shutil.which("redis-server") or "/usr/bin/redis-server"

REGISTRY_SERVICE = "registry.hammal.test"
TOKEN_ISSUER = "hammal-test-token-issuer"
PRIVATE_USER = "alice"
PRIVATE_PASSWORD = "wonderland-7"
ADMIN_USER = "admin"
ADMIN_PASSWORD = "admin-secret-3"
#: A second tenant: a user whose only private grant is its own repository
#: (the token server's per-repository grants), never ``private/secret``.
OTHER_USER = "bob"
OTHER_PASSWORD = "builder-5"
OTHER_PRIVATE_REPOSITORY = "private/bob"

STARTUP_TIMEOUT = 30.0
_KEEP = os.environ.get("HAMMAL_IT_KEEP") == "1"


class HarnessError(RuntimeError):
    """The upstream environment (or hammal) could not be brought up."""


# -- process and temp-dir bookkeeping -----------------------------------------

_live_processes: "List[ManagedProcess]" = []
_tempdirs: List[str] = []
_lock = threading.RLock()  # guards the two lists above and skopeo's home
_environment_lock = threading.Lock()  # guards the singleton below


def make_tempdir(prefix: str = "hammal-it-") -> str:
    """A new temporary directory, removed at exit."""
    path = tempfile.mkdtemp(prefix=prefix)
    with _lock:
        _tempdirs.append(path)
    return path


def _cleanup_at_exit() -> None:
    with _lock:
        procs = list(_live_processes)
    for proc in reversed(procs):
        try:
            proc.stop(timeout=5)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
    if not _KEEP:
        with _lock:
            dirs = list(_tempdirs)
            _tempdirs.clear()
        for path in dirs:
            shutil.rmtree(path, ignore_errors=True)


atexit.register(_cleanup_at_exit)


def _die_with_parent() -> None:
    """``preexec_fn``: have the kernel SIGTERM the child if we die first."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux/glibc: atexit still runs
        pass


def clean_env(**extra: str) -> Dict[str, str]:
    """The test process's environment without proxies, plus *extra*."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
        and not k.startswith("REGISTRY_")
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


class ManagedProcess:
    """A child process whose stdout and stderr go to a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: str,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else clean_env()
        self.cwd = cwd
        self.popen: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> "ManagedProcess":
        """Start the process (appending to its log file)."""
        log = open(self.log_path, "ab")
        try:
            shown = [
                "***" if i and "password" in self.argv[i - 1].lower() else a
                for i, a in enumerate(self.argv)
            ]
            log.write(f"==> {time.strftime('%H:%M:%S')} {' '.join(shown)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                preexec_fn=_die_with_parent,
            )
        finally:
            log.close()
        with _lock:
            _live_processes.append(self)
        return self

    @property
    def pid(self) -> Optional[int]:
        """The process id, once started."""
        return self.popen.pid if self.popen else None

    def running(self) -> bool:
        """True while the process has not exited."""
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> Optional[int]:
        """Send *sig*, wait up to *timeout*, then SIGKILL; return the exit code."""
        popen = self.popen
        if popen is None:
            return None
        if popen.poll() is None:
            try:
                popen.send_signal(sig)
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(10)
            except ProcessLookupError:
                pass
        with _lock:
            if self in _live_processes:
                _live_processes.remove(self)
        return popen.returncode

    def kill(self) -> Optional[int]:
        """SIGKILL the process and reap it."""
        return self.stop(timeout=10, sig=signal.SIGKILL)

    def log_text(self) -> str:
        """Everything the process wrote so far."""
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 6000) -> str:
        """The last *chars* characters of :meth:`log_text`."""
        text = self.log_text()
        return text[-chars:]


# -- small network helpers -----------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Callable[[], bool],
    what: str,
    timeout: float = STARTUP_TIMEOUT,
    process: Optional[ManagedProcess] = None,
    interval: float = 0.05,
) -> None:
    """Poll *predicate* until it is true or *timeout* passes.

    :raises HarnessError: on timeout, or when *process* exits meanwhile.
    """
    deadline = time.monotonic() + timeout
    last_error: Optional[BaseException] = None
    while True:
        try:
            if predicate():
                return
        except Exception as e:  # noqa: BLE001 - keep polling
            last_error = e
        if process is not None and not process.running():
            raise HarnessError(
                f"{process.name} exited (code {process.popen and process.popen.returncode})"
                f" while waiting for {what}; its log:\n{process.log_tail()}"
            )
        if time.monotonic() > deadline:
            tail = f"; its log:\n{process.log_tail()}" if process else ""
            raise HarnessError(
                f"timed out after {timeout}s waiting for {what} (last error: {last_error!r}){tail}"
            )
        time.sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on *host*:*port*."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@dataclass
class HTTPResponse:
    """A fully read HTTP response."""

    status: int
    reason: str
    headers: List[Tuple[str, str]]
    body: bytes
    url: str = ""

    def header(self, name: str, default: Optional[str] = None) -> Optional[str]:
        """The first value of header *name* (case-insensitive)."""
        lname = name.lower()
        for k, v in self.headers:
            if k.lower() == lname:
                return v
        return default

    def header_all(self, name: str) -> List[str]:
        """Every value of header *name*."""
        lname = name.lower()
        return [v for k, v in self.headers if k.lower() == lname]

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body.decode("utf-8"))

    def describe(self) -> str:
        """A short human-readable dump for failure messages."""
        heads = "\n".join(f"  {k}: {v}" for k, v in self.headers)
        body = self.body[:800].decode("utf-8", "replace")
        return f"{self.status} {self.reason} from {self.url}\n{heads}\n  body: {body!r}"


def http_request(
    method: str,
    url: str,
    headers: Optional[Iterable[Tuple[str, str]]] = None,
    body: Optional[bytes] = None,
    timeout: float = 30.0,
    follow_redirects: bool = False,
    max_body: Optional[int] = None,
) -> HTTPResponse:
    """One plain-HTTP request with no proxy; repeated headers are allowed.

    :param follow_redirects: follow 301/302/303/307/308 (dropping the
        ``Authorization`` header when the host changes, as clients do).
    :param max_body: read at most this many body bytes.
    """
    hdrs = list(headers or [])
    for _ in range(10):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http":
            raise ValueError(f"only http:// URLs here: {url}")
        conn = http.client.HTTPConnection(
            parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout
        )
        try:
            target = parts.path or "/"
            if parts.query:
                target += "?" + parts.query
            conn.putrequest(method, target, skip_accept_encoding=True)
            for k, v in hdrs:
                conn.putheader(k, v)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            data = resp.read(max_body) if max_body is not None else resp.read()
            result = HTTPResponse(resp.status, resp.reason, list(resp.getheaders()), data, url)
        finally:
            conn.close()
        location = result.header("Location")
        if follow_redirects and result.status in (301, 302, 303, 307, 308) and location:
            new_url = urllib.parse.urljoin(url, location)
            if urllib.parse.urlsplit(new_url).netloc != parts.netloc:
                hdrs = [(k, v) for k, v in hdrs if k.lower() != "authorization"]
            url = new_url
            continue
        return result
    raise HarnessError(f"too many redirects from {url}")


def http_get_digest(
    url: str,
    headers: Iterable[Tuple[str, str]] = (),
    timeout: float = 60.0,
) -> Tuple[HTTPResponse, str, int]:
    """GET *url* hashing the body as it streams (for large blobs).

    :return: (the response with an empty body, ``sha256:<hex>``, body size).
    """
    import hashlib

    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(
        parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout
    )
    try:
        target = parts.path + ("?" + parts.query if parts.query else "")
        conn.putrequest("GET", target, skip_accept_encoding=True)
        for k, v in headers:
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        h = hashlib.sha256()
        size = 0
        while True:
            chunk = resp.read(1 << 20)
            if not chunk:
                break
            h.update(chunk)
            size += len(chunk)
        result = HTTPResponse(resp.status, resp.reason, list(resp.getheaders()), b"", url)
    finally:
        conn.close()
    return result, "sha256:" + h.hexdigest(), size


def _get_json(url: str, method: str = "GET") -> Any:
    return http_request(method, url, timeout=10).json()


def missing_binaries() -> List[str]:
    """The system programs the environment needs that are not installed."""
    return [b for b in (REGISTRY_BIN, SKOPEO_BIN, REDIS_BIN) if not os.access(b, os.X_OK)]


# -- skopeo ---------------------------------------------------------------------

_skopeo_home: Optional[str] = None


def _skopeo_env() -> Dict[str, str]:
    """An isolated HOME / runtime dir / auth file / registries.conf for skopeo."""
    global _skopeo_home
    with _lock:
        if _skopeo_home is None:
            home = make_tempdir("hammal-it-skopeo-")
            os.makedirs(os.path.join(home, "run"), mode=0o700)
            with open(os.path.join(home, "auth.json"), "w") as f:
                f.write('{"auths": {}}')
            with open(os.path.join(home, "registries.conf"), "w") as f:
                f.write("unqualified-search-registries = []\n")
            _skopeo_home = home
        home = _skopeo_home
    return clean_env(
        HOME=home,
        XDG_RUNTIME_DIR=os.path.join(home, "run"),
        XDG_CONFIG_HOME=os.path.join(home, "config"),
        REGISTRY_AUTH_FILE=os.path.join(home, "auth.json"),
        CONTAINERS_REGISTRIES_CONF=os.path.join(home, "registries.conf"),
        TMPDIR=home,
    )


def skopeo(args: Sequence[str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run ``skopeo --insecure-policy ARGS`` in an isolated environment.

    Does not raise on failure: check ``returncode`` (and show ``stderr``).
    """
    argv = [SKOPEO_BIN, "--insecure-policy", *args]
    return subprocess.run(
        argv,
        env=_skopeo_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_die_with_parent,
    )


def skopeo_pull(
    source: str,
    dest_dir: str,
    all_platforms: bool = False,
    creds: Optional[Tuple[str, str]] = None,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """``skopeo copy docker://SOURCE dir:DEST_DIR`` over plain HTTP.

    *source* is ``HOST:PORT/name:tag``; anonymous unless *creds* is given.
    """
    args = ["copy", "--src-tls-verify=false"]
    if creds:
        args += ["--src-creds", f"{creds[0]}:{creds[1]}"]
    else:
        args += ["--src-no-creds"]
    if all_platforms:
        args.append("--all")
    args += [f"docker://{source}", f"dir:{dest_dir}"]
    return skopeo(args, timeout=timeout)


# -- redis ----------------------------------------------------------------------


class RedisServer:
    """A throwaway ``redis-server`` that can be killed and restarted in place."""

    def __init__(self, workdir: str, port: Optional[int] = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.process: Optional[ManagedProcess] = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        """Start redis-server (no RDB, no AOF) and return without waiting."""
        argv = [
            REDIS_BIN,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.workdir,
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
        ]
        self.process = ManagedProcess(
            "redis-server",
            argv,
            os.path.join(self.workdir, "redis.log"),
            cwd=self.workdir,
        ).start()
        return self

    def ping(self) -> bool:
        """True when the server answers ``PING`` with ``+PONG``."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """Send one command, return the raw first reply chunk (for tests)."""
        payload = f"*{len(args)}\r\n".encode()
        for a in args:
            b = a.encode()
            payload += b"$%d\r\n%s\r\n" % (len(b), b)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(payload)
            return s.recv(65536)

    def keys(self, pattern: str = "*") -> List[str]:
        """``KEYS pattern`` (the reply parsed; fine for a test-sized db)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            args = [b"KEYS", pattern.encode()]
            s.sendall(b"*2\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args))
            f = s.makefile("rb")
            header = f.readline()
            if not header.startswith(b"*"):
                raise HarnessError(f"unexpected redis reply {header!r}")
            out = []
            for _ in range(int(header[1:])):
                length = int(f.readline()[1:])
                out.append(f.read(length + 2)[:-2].decode("utf-8", "replace"))
            return out

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Block until :meth:`ping` succeeds."""
        wait_until(self.ping, "redis-server to answer PING", timeout, self.process)

    def kill(self) -> None:
        """SIGKILL the server and wait until its port is closed."""
        if self.process is not None:
            self.process.kill()
        wait_until(lambda: not port_open(self.port), "redis port to close", 10)

    def restart(self) -> None:
        """Start a fresh (empty) server on the same port and wait for it."""
        if self.process is not None and self.process.running():
            self.process.stop()
        self.start()
        self.wait_ready()

    def stop(self) -> None:
        """Stop the server."""
        if self.process is not None:
            self.process.stop()


# -- the upstream ---------------------------------------------------------------


def _registry_config(
    port: int,
    storage_root: str,
    auth: Optional[Dict[str, Any]],
    redirect_baseurl: Optional[str],
) -> str:
    """Distribution's YAML configuration (as JSON, which YAML accepts)."""
    config: Dict[str, Any] = {
        "version": "0.1",
        "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": storage_root},
            "cache": {"blobdescriptor": "inmemory"},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {
            "addr": f"127.0.0.1:{port}",
            "secret": "hammal-integration-tests",
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
        "health": {"storagedriver": {"enabled": False}},
    }
    if auth:
        config["auth"] = {"token": auth}
    if redirect_baseurl:
        config["middleware"] = {
            "storage": [{"name": "redirect", "options": {"baseurl": redirect_baseurl}}]
        }
    return json.dumps(config, indent=2)


class UpstreamEnvironment:
    """Redis, token server, CDN and a seeded token-auth Distribution."""

    def __init__(self) -> None:
        self.workdir = make_tempdir("hammal-it-upstream-")
        self.logdir = os.path.join(self.workdir, "logs")
        self.storage_root = os.path.join(self.workdir, "storage")
        os.makedirs(self.logdir)
        os.makedirs(self.storage_root)
        self.images: Dict[str, TestImage] = {}
        self.pki: Optional[PKIFiles] = None
        self.token_port = free_port()
        self.cdn_port = free_port()
        self.registry_port = free_port()
        self.redis = RedisServer(os.path.join(self.workdir, "redis"))
        os.makedirs(self.redis.workdir)
        self.token_server: Optional[ManagedProcess] = None
        self.cdn: Optional[ManagedProcess] = None
        self.registry: Optional[ManagedProcess] = None
        self.timings: Dict[str, float] = {}
        self.users: Dict[str, Any] = {
            PRIVATE_USER: PRIVATE_PASSWORD,
            ADMIN_USER: ADMIN_PASSWORD,
            OTHER_USER: {"password": OTHER_PASSWORD, "private": [OTHER_PRIVATE_REPOSITORY]},
        }

    # -- URLs --------------------------------------------------------------

    @property
    def registry_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the token-auth registry."""
        return f"http://127.0.0.1:{self.registry_port}"

    @property
    def registry_host(self) -> str:
        """``127.0.0.1:PORT`` of the registry (for skopeo references)."""
        return f"127.0.0.1:{self.registry_port}"

    @property
    def token_url(self) -> str:
        """Base URL of the token server."""
        return f"http://127.0.0.1:{self.token_port}"

    @property
    def realm(self) -> str:
        """The token endpoint (the registry's ``realm``)."""
        return f"{self.token_url}/token"

    @property
    def cdn_url(self) -> str:
        """Base URL of the CDN."""
        return f"http://127.0.0.1:{self.cdn_port}"

    def image(self, reference: str) -> TestImage:
        """The seeded image ``repo:tag``."""
        return self.images[reference]

    # -- lifecycle ---------------------------------------------------------

    def _mark(self, what: str, since: float) -> None:
        self.timings[what] = round(time.monotonic() - since, 2)

    def start(self) -> "UpstreamEnvironment":
        """Bring everything up and seed the registry (blocking)."""
        missing = missing_binaries()
        if missing:
            raise HarnessError(f"missing system binaries: {missing}")
        t0 = time.monotonic()
        pki_dir = os.path.join(self.workdir, "pki")
        os.makedirs(pki_dir)
        self.pki = generate_pki(pki_dir)
        self._mark("pki", t0)

        py = sys.executable
        self.token_server = ManagedProcess(
            "tokenserver",
            [
                py,
                os.path.join(HERE, "tokenserver.py"),
                "--port",
                str(self.token_port),
                "--key",
                self.pki.signing_key,
                "--cert",
                self.pki.signing_cert,
                "--issuer",
                TOKEN_ISSUER,
                "--service",
                REGISTRY_SERVICE,
                "--users",
                json.dumps(self.users),
            ],
            os.path.join(self.logdir, "tokenserver.log"),
            env=clean_env(PYTHONUNBUFFERED="1"),
        ).start()
        self.cdn = ManagedProcess(
            "cdn",
            [
                py,
                os.path.join(HERE, "cdn.py"),
                "--port",
                str(self.cdn_port),
                "--root",
                self.storage_root,
            ],
            os.path.join(self.logdir, "cdn.log"),
            env=clean_env(PYTHONUNBUFFERED="1"),
        ).start()
        self.redis.start()

        t1 = time.monotonic()
        self.images = build_images(os.path.join(self.workdir, "images"))
        self._mark("build_images", t1)

        t1 = time.monotonic()
        self._seed()
        self._mark("seed", t1)

        self.registry = self._start_registry(
            "registry",
            self.registry_port,
            auth={
                "realm": self.realm,
                "service": REGISTRY_SERVICE,
                "issuer": TOKEN_ISSUER,
                "rootcertbundle": self.pki.ca_cert,
            },
            redirect_baseurl=self.cdn_url + "/",
        )
        wait_until(
            lambda: isinstance(_get_json(self.token_url + "/_admin/log"), list),
            "token server",
            process=self.token_server,
        )
        wait_until(
            lambda: isinstance(_get_json(self.cdn_url + "/_admin/log"), list),
            "CDN",
            process=self.cdn,
        )
        self.redis.wait_ready()
        wait_until(
            lambda: http_request("GET", self.registry_url + "/v2/", timeout=2).status == 401,
            "registry /v2/ to answer 401",
            process=self.registry,
        )
        self._mark("total", t0)
        return self

    def _start_registry(
        self,
        name: str,
        port: int,
        auth: Optional[Dict[str, Any]],
        redirect_baseurl: Optional[str],
    ) -> ManagedProcess:
        config_path = os.path.join(self.workdir, f"{name}.yml")
        with open(config_path, "w") as f:
            f.write(_registry_config(port, self.storage_root, auth, redirect_baseurl))
        return ManagedProcess(
            name,
            [REGISTRY_BIN, "serve", config_path],
            os.path.join(self.logdir, f"{name}.log"),
            env=clean_env(HOME=self.workdir),
            cwd=self.workdir,
        ).start()

    def _seed(self) -> None:
        """Push every image through an auth-less, redirect-less registry."""
        seed_port = free_port()
        seeder = self._start_registry("seed-registry", seed_port, None, None)
        try:
            wait_until(
                lambda: (
                    http_request("GET", f"http://127.0.0.1:{seed_port}/v2/", timeout=2).status
                    == 200
                ),
                "seeding registry",
                process=seeder,
            )

            def push(img: TestImage) -> None:
                args = ["copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false"]
                if img.is_index:
                    args.append("--all")
                args += [img.skopeo_source, f"docker://127.0.0.1:{seed_port}/{img.reference}"]
                result = skopeo(args, timeout=180)
                if result.returncode != 0:
                    raise HarnessError(
                        f"seeding {img.reference} failed: skopeo {' '.join(args)}\n"
                        f"{result.stderr}\nregistry log:\n{seeder.log_tail()}"
                    )

            with ThreadPoolExecutor(max_workers=3) as pool:
                for fut in [pool.submit(push, img) for img in self.images.values()]:
                    fut.result()
        finally:
            seeder.stop()

    def stop(self) -> None:
        """Stop every process of the environment."""
        for proc in (self.registry, self.cdn, self.token_server):
            if proc is not None:
                proc.stop()
        self.redis.stop()

    # -- token server and CDN control ----------------------------------------

    def token_log(self) -> List[Dict[str, Any]]:
        """The token server's request log."""
        return list(_get_json(self.token_url + "/_admin/log"))

    def cdn_log(self) -> List[Dict[str, Any]]:
        """The CDN's request log."""
        return list(_get_json(self.cdn_url + "/_admin/log"))

    def reset_logs(self) -> None:
        """Clear both logs and switch the token server's rate limit off."""
        _get_json(self.token_url + "/_admin/reset", "POST")
        _get_json(self.cdn_url + "/_admin/reset", "POST")

    def set_ratelimit(self, on: bool, user: Optional[str] = None) -> None:
        """Make the token server answer 429 (``on``) or tokens (``off``),
        to everyone or only to the Basic *user*'s token requests."""
        only = f"&user={urllib.parse.quote(user)}" if user is not None else ""
        _get_json(f"{self.token_url}/_admin/ratelimit?on={1 if on else 0}{only}", "POST")

    # -- direct access to the upstream ---------------------------------------------

    def token(
        self,
        repo: str,
        actions: str = "pull",
        creds: Optional[Tuple[str, str]] = None,
    ) -> str:
        """A registry token for ``repository:REPO:ACTIONS``."""
        query = urllib.parse.urlencode(
            {"service": REGISTRY_SERVICE, "scope": f"repository:{repo}:{actions}"}
        )
        headers = []
        if creds:
            raw = base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
            headers.append(("Authorization", f"Basic {raw}"))
        resp = http_request("GET", f"{self.realm}?{query}", headers, timeout=10)
        if resp.status != 200:
            raise HarnessError(f"token request failed: {resp.describe()}")
        return str(resp.json()["token"])

    def upstream_request(
        self,
        method: str,
        repo: str,
        kind: str,
        reference: str,
        accept: Sequence[str] = ALL_MANIFEST_TYPES,
        creds: Optional[Tuple[str, str]] = None,
        follow_redirects: bool = False,
        extra_headers: Sequence[Tuple[str, str]] = (),
    ) -> HTTPResponse:
        """``METHOD /v2/REPO/KIND/REFERENCE`` on the registry, with a token.

        :param kind: ``manifests``, ``blobs`` or ``tags`` (reference ``list``).
        :param accept: ``Accept`` values, one header each.
        """
        token = self.token(repo, creds=creds)
        headers = [("Authorization", f"Bearer {token}")]
        headers += [("Accept", a) for a in accept]
        headers += list(extra_headers)
        return http_request(
            method,
            f"{self.registry_url}/v2/{repo}/{kind}/{reference}",
            headers,
            follow_redirects=follow_redirects,
        )

    def logs_summary(self) -> str:
        """The tails of every upstream process's log (for failure messages)."""
        out = []
        for proc in (self.registry, self.token_server, self.cdn, self.redis.process):
            if proc is not None:
                out.append(f"--- {proc.name} ---\n{proc.log_tail(2000)}")
        return "\n".join(out)


_environment: Optional[UpstreamEnvironment] = None
_environment_error: Optional[BaseException] = None


def get_environment() -> UpstreamEnvironment:
    """The process-wide :class:`UpstreamEnvironment`, started on first use.

    A failed start is remembered and re-raised, not retried for every test.
    """
    global _environment, _environment_error
    with _environment_lock:
        if _environment is not None:
            return _environment
        if _environment_error is not None:
            raise HarnessError(
                f"the upstream environment failed to start earlier: {_environment_error}"
            )
        env = UpstreamEnvironment()
        try:
            env.start()
        except BaseException as e:
            _environment_error = e
            env.stop()
            raise
        _environment = env
        return env


# -- hammal -------------------------------------------------------------------


class HammalProcess:
    """A running hammal (``twistd -n hammal``) on 127.0.0.1."""

    def __init__(
        self,
        process: ManagedProcess,
        port: int,
        argv: List[str],
        owned_cache_dir: Optional[str] = None,
    ) -> None:
        self.process = process
        self.port = port
        self.argv = argv
        self.owned_cache_dir = owned_cache_dir

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT`` (for skopeo references)."""
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stop hammal (SIGTERM, then SIGKILL after 10 s) and remove the
        cache directory made for it (its log stays until exit); idempotent."""
        self.process.stop(timeout=10)
        if self.owned_cache_dir and not _KEEP:
            shutil.rmtree(self.owned_cache_dir, ignore_errors=True)

    def running(self) -> bool:
        """True while hammal has not exited."""
        return self.process.running()

    def log_text(self) -> str:
        """hammal's stdout and stderr so far."""
        return self.process.log_text()

    def log_tail(self, chars: int = 6000) -> str:
        """The end of :meth:`log_text`."""
        return self.process.log_tail(chars)

    def request(
        self,
        method: str,
        path: str,
        headers: Iterable[Tuple[str, str]] = (),
        timeout: float = 60.0,
        follow_redirects: bool = False,
    ) -> HTTPResponse:
        """One request to hammal (*path* starts with ``/``)."""
        return http_request(
            method,
            self.url + path,
            list(headers),
            timeout=timeout,
            follow_redirects=follow_redirects,
        )


def twistd_path() -> str:
    """The ``twistd`` next to the running Python (the venv's)."""
    return os.path.join(os.path.dirname(sys.executable), "twistd")


def hammal_argv(
    port: int,
    upstream: str,
    blob_redirect: str = "follow",
    library_prefix: bool = True,
    redis: Optional[str] = None,
    upstream_username: Optional[str] = None,
    upstream_password: Optional[str] = None,
    retries: int = 2,
    retry_backoff: float = 0.05,
    connect_timeout: float = 2,
    read_timeout: float = 5,
    cache_dir: Optional[str] = None,
    idle_timeout: Optional[float] = None,
    extra_args: Sequence[str] = (),
) -> List[str]:
    """hammal's command line: the agreed contract, plus optionally
    ``--cache-dir`` and ``--idle-timeout`` (see :func:`start_hammal`)."""
    argv = [
        twistd_path(),
        "--pidfile=",
        "-n",
        "hammal",
        "--port",
        f"tcp:{port}:interface=127.0.0.1",
        "--upstream",
        upstream,
    ]
    if library_prefix:
        argv.append("--library-prefix")
    argv += ["--blob-redirect", blob_redirect]
    if redis:
        argv += ["--redis", redis]
    if upstream_username is not None:
        argv += ["--upstream-username", upstream_username]
    if upstream_password is not None:
        argv += ["--upstream-password", upstream_password]
    argv += [
        "--retries",
        str(retries),
        "--retry-backoff",
        str(retry_backoff),
        "--connect-timeout",
        str(connect_timeout),
        "--read-timeout",
        str(read_timeout),
    ]
    if cache_dir is not None:
        argv += ["--cache-dir", cache_dir]
    if idle_timeout is not None:
        argv += ["--idle-timeout", str(idle_timeout)]
    argv += list(extra_args)
    return argv


#: ``--idle-timeout`` given to hammal unless a test says otherwise: none, so
#: pulls see hammal's real defaults. (skopeo with ``--src-tls-verify=false``
#: probes HTTPS first; hammal answers that ClientHello at once, which
#: ``test_errors.TLSProbeTests`` checks.)
DEFAULT_IDLE_TIMEOUT: Optional[float] = None


def _hammal_env() -> Dict[str, str]:
    env = {
        k: v
        for k, v in clean_env().items()
        if not k.startswith("HAMMAL_") and k not in ("DOCKER_USERNAME", "DOCKER_PASSWORD")
    }
    env["PYTHONPATH"] = REPO_ROOT
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_hammal(
    upstream: Optional[str] = None,
    redis: Any = None,
    ready_timeout: float = STARTUP_TIMEOUT,
    cache_dir: Optional[str] = None,
    idle_timeout: Optional[float] = DEFAULT_IDLE_TIMEOUT,
    **options: Any,
) -> HammalProcess:
    """Launch hammal on a free port and wait until ``GET /v2/`` gives 200.

    Runs ``twistd --pidfile= -n hammal ...`` from the repository root with
    ``PYTHONPATH`` set to it and no ``HAMMAL_*`` variables in its environment.

    :param upstream: upstream base URL; default: the environment's registry.
    :param redis: ``True`` for the environment's redis, or a ``redis://`` URL.
    :param cache_dir: hammal's ``--cache-dir``; default: a fresh temp dir, so
        no two hammals (nor a developer's ``var/cache``) share a cache.
    :param idle_timeout: ``--idle-timeout`` (``None``: hammal's default).
    :param options: the rest of :func:`hammal_argv`'s keywords
        (``blob_redirect``, ``upstream_username``, ``read_timeout``, ...).
    :raises HarnessError: hammal exited or never answered (with its log).
    """
    if upstream is None:
        upstream = get_environment().registry_url
    if redis is True:
        redis = get_environment().redis.url
    port = free_port()
    workdir = make_tempdir("hammal-it-hammal-")
    owned_cache_dir = None
    if cache_dir is None:
        cache_dir = owned_cache_dir = os.path.join(workdir, "cache")
    argv = hammal_argv(
        port,
        upstream,
        redis=redis or None,
        cache_dir=cache_dir,
        idle_timeout=idle_timeout,
        **options,
    )
    proc = ManagedProcess(
        "hammal",
        argv,
        os.path.join(workdir, "hammal.log"),
        env=_hammal_env(),
        cwd=REPO_ROOT,
    ).start()
    hammal = HammalProcess(proc, port, argv, owned_cache_dir)

    def ready() -> bool:
        return http_request("GET", hammal.url + "/v2/", timeout=2).status == 200

    try:
        wait_until(ready, f"hammal GET /v2/ -> 200 on port {port}", ready_timeout, proc)
    except BaseException:
        hammal.stop()
        raise
    return hammal


class SilentServer:
    """A TCP server on 127.0.0.1 that accepts connections, reads whatever
    comes, and never answers: an upstream that has gone silent."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.accepted = 0
        self.received = b""
        self._conns: List[socket.socket] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="silent-server", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import select

        while not self._closed.is_set():
            try:
                conn, _ = self.sock.accept()
                conn.setblocking(False)
                self._conns.append(conn)
                self.accepted += 1
            except (socket.timeout, BlockingIOError):
                pass
            except OSError:
                return
            readable = [c for c in self._conns if c.fileno() >= 0]
            if readable:
                ready, _, _ = select.select(readable, [], [], 0)
                for c in ready:
                    try:
                        data = c.recv(65536)
                    except OSError:
                        data = b""
                    if data:
                        self.received += data[:4096]
                    else:
                        c.close()
                        self._conns.remove(c)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        """Stop accepting and close every held connection."""
        self._closed.set()
        self._thread.join(5)
        self.sock.close()
        for c in self._conns:
            c.close()
        self._conns.clear()
