"""
The twistd plugin's options and service: ``twistd -n hammal ...``.

Every option falls back to an environment variable (``HAMMAL_<NAME>``) so
that hammal runs configured from a container's environment; the command
line wins.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Mapping

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet import abstract, tcp
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Site

from hammal import metrics
from hammal.accept import FairListening
from hammal.app import build_app
from hammal.classpoll import ConnectionClasses
from hammal.collector import CollectorTuning
from hammal.config import FLAGS, LISTS, PARAMETERS, REGEX_LISTS, ConfigError, Settings, env_flag
from hammal.fairpoll import FairPolling
from hammal.listen import dual_stack_endpoint
from hammal.logs import Destination, observer_name, set_destination
from hammal.selfsigned import ensure_self_signed, listening_names, listening_port, tls_directory
from hammal.tls import ReloadingServerTLS, ReloadOnHangup
from hammal.web.limits import ConnectionLimit
from hammal.web.status import add_status
from hammal.worker_metrics import METRICS_DIR_ENV, MetricsSnapshots, metrics_dir
from hammal.workers import (
    AdoptedPort,
    ParentWatch,
    WorkerPool,
    inherited_socket,
    reuseport_sockets,
    tcp_address,
    worker_argv,
    worker_index,
)

_log = Logger()


def _parameter_help(spec: Any) -> str:
    names = ", ".join([spec.env, *spec.extra_env])
    return f"{spec.help} [env: {names}]"


def _flag_help(name: str, text: str) -> str:
    return f"{text} [env: HAMMAL_{name.upper().replace('-', '_')}]"


class Options(usage.Options):
    """Command-line options of ``twistd hammal``."""

    synopsis = "[options]"
    longdesc = "A high-concurrency Docker/OCI registry pull-through mirror."
    optParameters = [[spec.name, None, spec.default, _parameter_help(spec)] for spec in PARAMETERS]
    optFlags = [[name, None, _flag_help(name, text)] for name, text in FLAGS]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._environ = os.environ if environ is None else environ
        #: The arguments given (``--workers`` passes them on to the workers).
        self.arguments: list[str] = []
        self._given_lists: set[str] = set()
        for spec in LISTS:
            self[spec.name] = []
        self.settings: Settings | None = None
        try:
            self._apply_environment()
        except ConfigError as failure:
            self._environment_error: ConfigError | None = failure
        else:
            self._environment_error = None

    def parseOptions(self, options: Any = None) -> None:
        self.arguments = list(options) if options is not None else []
        super().parseOptions(options)

    def _add_to_list(self, name: str, value: str) -> None:
        """Repeatable options: the command line replaces the environment's list."""
        if name not in self._given_lists:
            self._given_lists.add(name)
            self[name] = []
        self[name].append(value)

    def opt_route(self, value: str) -> None:
        self._add_to_list("route", value)

    def opt_route_credentials(self, value: str) -> None:
        self._add_to_list("route-credentials", value)

    def opt_mirror(self, value: str) -> None:
        self._add_to_list("mirror", value)

    def opt_mirror_credentials(self, value: str) -> None:
        self._add_to_list("mirror-credentials", value)

    def opt_trusted_realm(self, value: str) -> None:
        self._add_to_list("trusted-realm", value)

    def opt_upstream_credentials_file(self, value: str) -> None:
        self._add_to_list("upstream-credentials-file", value)

    def opt_allow_upstream(self, value: str) -> None:
        self._add_to_list("allow-upstream", value)

    def opt_allow_ip(self, value: str) -> None:
        self._add_to_list("allow-ip", value)

    def opt_deny_ip(self, value: str) -> None:
        self._add_to_list("deny-ip", value)

    def opt_trusted_proxy(self, value: str) -> None:
        self._add_to_list("trusted-proxy", value)

    def opt_allow_ua(self, value: str) -> None:
        self._add_to_list("allow-ua", value)

    def opt_deny_ua(self, value: str) -> None:
        self._add_to_list("deny-ua", value)

    def opt_allow_path(self, value: str) -> None:
        self._add_to_list("allow-path", value)

    def opt_allow_region(self, value: str) -> None:
        self._add_to_list("allow-region", value)

    def opt_deny_region(self, value: str) -> None:
        self._add_to_list("deny-region", value)

    for _spec in LISTS:
        locals()["opt_" + _spec.name.replace("-", "_")].__doc__ = _parameter_help(_spec)
    del _spec

    def _apply_environment(self) -> None:
        for spec in LISTS:
            listed = self._environ.get(spec.env)
            if listed and spec.name in REGEX_LISTS:
                self[spec.name] = [line for line in listed.splitlines() if line.strip()]
            elif listed:
                self[spec.name] = listed.replace(",", " ").split()
        for spec in PARAMETERS:
            for variable in (spec.env, *spec.extra_env):
                if self._environ.get(variable):
                    self[spec.name] = self._environ[variable]
                    break
        for name, _ in FLAGS:
            value = env_flag(self._environ, "HAMMAL_" + name.upper().replace("-", "_"))
            if value is None:
                continue
            if name == "library-prefix":
                # false means "never", like --no-library-prefix
                self["library-prefix"], self["no-library-prefix"] = int(value), int(not value)
            else:
                self[name] = int(value)

    def opt_library_prefix(self) -> None:
        self["library-prefix"], self["no-library-prefix"] = 1, 0

    def opt_no_library_prefix(self) -> None:
        self["library-prefix"], self["no-library-prefix"] = 0, 1

    opt_library_prefix.__doc__ = _flag_help("library-prefix", dict(FLAGS)["library-prefix"])
    opt_no_library_prefix.__doc__ = _flag_help(
        "no-library-prefix", dict(FLAGS)["no-library-prefix"]
    )

    def postOptions(self) -> None:
        if self._environment_error is not None:
            raise usage.UsageError(str(self._environment_error))
        try:
            self.settings = Settings.from_options(self, self._environ)
        except ConfigError as failure:
            raise usage.UsageError(str(failure))
        if self.parent is not None and self.parent.get("logger") is None:
            # hammal's observer, on the destination twistd's own options chose.
            try:
                set_destination(Destination.from_twistd(self.parent))
            except ValueError as failure:
                raise usage.UsageError(str(failure))
            self.parent["logger"] = observer_name(self.settings.log_format, self.settings.debug)


def _tune_buffers(size: int) -> None:
    """
    Read and write in C{size} chunks: Twisted's 64 KiB default costs about
    two thirds of the streaming throughput on large blobs.
    """
    tcp.Connection.bufferSize = size
    abstract.FileDescriptor.bufferSize = size
    abstract.FileDescriptor.SEND_LIMIT = size


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """Build hammal's service tree from parsed C{options}: the app and its listeners."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    settings = options.settings or Settings.from_options(options)
    _tune_buffers(settings.buffer_size)
    if settings.workers > 1 and inherited_socket() is None:
        _tcp_endpoint(reactor, settings.port)  # --workers needs one: say so before anything
        if metrics_dir() is None:
            # Before the app: its /metrics serves every worker's series.
            os.environ[METRICS_DIR_ENV] = tempfile.mkdtemp(prefix="hammal-metrics-")
    try:
        app = build_app(settings, reactor)
    except ConfigError as failure:
        raise usage.UsageError(str(failure))

    service = MultiService()
    CollectorTuning(reactor).setServiceParent(service)
    # The epoll reactor handles a bounded number of ready sockets per turn.
    FairPolling(reactor).setServiceParent(service)
    # ... and requests on open connections before arrivals and blob streams.
    ConnectionClasses(reactor).setServiceParent(service)
    factory: Any = ConnectionLimit(app.site, settings.max_connections)
    if settings.tls:
        cert_path, key_path = settings.tls_cert, settings.tls_key
        if cert_path is None or key_path is None:
            cert_path, key_path = _self_signed_tls(settings)
        try:
            tls = ReloadingServerTLS(cert_path, key_path)
        except ConfigError as failure:
            raise usage.UsageError(str(failure))
        factory = TLSMemoryBIOFactory(tls, False, factory)
        ReloadOnHangup(tls, reactor).setServiceParent(service)
    inherited = inherited_socket()
    if inherited is not None:
        # A worker: serve the main process's socket; stop when it goes.
        AdoptedPort(reactor, inherited, factory).setServiceParent(service)
        left = metrics_dir()
        ParentWatch(
            reactor,
            orphaned=None if left is None else lambda: shutil.rmtree(left, ignore_errors=True),
        ).setServiceParent(service)
    elif settings.workers > 1:
        _workers(reactor, options, settings, factory, service)
    else:
        _listen(reactor, settings.port, factory, service)
    snapshots = metrics_dir()
    if snapshots is not None:
        MetricsSnapshots(metrics.REGISTRY, snapshots, worker_index(), reactor).setServiceParent(
            service
        )
    if settings.metrics_port is not None and inherited is None:
        metrics_root = Resource()
        metrics_root.putChild(b"metrics", app.metrics_resource)
        add_status(metrics_root, app.status_report, app.status_rules)
        _listen(reactor, settings.metrics_port, _QuietSite(metrics_root), service)
    for part in app.services:
        part.setServiceParent(service)
    return service


def _workers(
    reactor: Any, options: Options, settings: Settings, factory: Any, parent: MultiService
) -> None:
    """
    ``--workers N``: one listening socket per process on the same address
    (this process serves the first), N-1 workers on the same command line,
    and a shared directory of metrics snapshots.
    """
    endpoint = _tcp_endpoint(reactor, settings.port)
    environ = dict(os.environ)
    snapshots = metrics_dir(environ)
    WorkerPool(
        reactor,
        lambda: reuseport_sockets(endpoint, settings.workers),
        factory,
        settings.workers,
        lambda index: worker_argv(options.arguments, options.parent, index),
        environ,
        settings.drain_timeout,
        after_stop=None
        if snapshots is None
        else lambda: shutil.rmtree(snapshots, ignore_errors=True),
    ).setServiceParent(parent)


def _self_signed_tls(settings: Settings) -> tuple[str, str]:
    """
    ``--tls`` without files: the kept self-signed certificate (made on the
    first start), logged with what a client needs to trust it.
    """
    directory = tls_directory(settings.cache_dir)
    names, addresses = listening_names(settings.port)
    try:
        made = ensure_self_signed(directory, names, addresses)
    except OSError as failure:
        raise usage.UsageError(
            f"--tls without --tls-cert/--tls-key: cannot write {directory}: {failure.strerror}"
        )
    port = listening_port(settings.port)
    host_port = f"{names[0]}:{port}" if port and port != "443" else names[0]
    _log.warn(
        "serving a self-signed TLS certificate ({state}) {path}, SHA-256 fingerprint"
        " {fingerprint}, for {names}; to trust it on a client: {command}",
        state="new" if made.created else "kept",
        path=made.cert_path,
        fingerprint=made.fingerprint,
        names=", ".join([*names, *addresses]),
        command=made.trust_command(host_port),
    )
    return made.cert_path, made.key_path


class _QuietSite(Site):
    """The metrics listener: scrapes are not traffic worth a log line."""

    noisy = False

    def log(self, request: http.Request) -> None:
        pass


#: Pending connections the kernel queues: Twisted's default of 50 makes a
#: burst of clients wait for SYN retries.
LISTEN_BACKLOG = 1024


def with_backlog(description: str) -> str:
    """A TCP endpoint description with hammal's listen backlog, unless it sets one."""
    kind = description.split(":", 1)[0]
    if kind in ("tcp", "tcp6") and "backlog=" not in description:
        return f"{description}:backlog={LISTEN_BACKLOG}"
    return description


def _tcp_endpoint(reactor: Any, description: str) -> Any:
    """The endpoint of C{description}, which must be TCP (for ``--workers``)."""
    endpoint = _endpoint(reactor, description)
    try:
        tcp_address(endpoint)
    except ValueError as failure:
        raise usage.UsageError(str(failure))
    return endpoint


def _endpoint(reactor: Any, description: str) -> Any:
    # TCP ports accept a bounded number of connections per reactor turn.
    listening = FairListening(reactor)
    try:
        described = with_backlog(description)
        return dual_stack_endpoint(listening, described) or serverFromString(listening, described)
    except (ValueError, KeyError, TypeError) as failure:
        raise usage.UsageError(f"{description!r} is not a valid endpoint: {failure}")


def _listen(reactor: Any, description: str, factory: Any, parent: MultiService) -> None:
    StreamServerEndpointService(_endpoint(reactor, description), factory).setServiceParent(parent)
