"""
The twistd plugin's options and service: ``twistd -n hammal ...``.

Every option falls back to an environment variable (``HAMMAL_<NAME>``) so
that hammal runs configured from a container's environment; the command
line wins.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit
from typing import Any, Callable, Mapping

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet import abstract, tcp
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThreadPool
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.logger import Logger
from twisted.python import usage
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Site

from hammal import metrics
from hammal.access import (
    AccessRules,
    AllowList,
    HtpasswdFile,
    SingleUser,
    TokenIssuer,
    UserDirectory,
    parse_user_list,
)
from hammal.access.checks import CredentialChecker, PasswordHashingPool
from hammal.access.passthrough import Logins
from hammal.drain import DrainService

from hammal.cache.blobs import BlobCache
from hammal.cache.fetch import Offload
from hammal.cache.manifests import (
    DiskTagStore,
    FetchManifest,
    HeadDigest,
    ManifestCache,
    ManifestStore,
)
from hammal.cache.store import BlobStore
from hammal.cache.sweep import CacheSweep
from hammal.cache.writes import WriteErrors
from hammal.config import FLAGS, LISTS, PARAMETERS, REGEX_LISTS, ConfigError, Settings, env_flag
from hammal.listen import dual_stack_endpoint
from hammal.logs import Destination, observer_name, set_destination
from hammal.proxy import ManifestCacheFactory, PullProxy
from hammal.referrers import ReferrersCache
from hammal.registry.accounts import AccountsFile, AccountsFileError
from hammal.registry.auth import Credentials
from hammal.registry.reference import is_docker_hub
from hammal.registry.client import RegistryClient, Upstream, UpstreamClient, make_http_client
from hammal.upstreams import FailoverClient, UpstreamSelector
from hammal.registry.addresses import PeerZones
from hammal.registry.retry import RetryPolicy
from hammal.registry.trust import CredentialPolicy, load_suffix_list
from hammal.registry.tokens import (
    TAG_KEY_PREFIX,
    MemoryTokenCache,
    RedisTokenCache,
    ResilientTokenCache,
    TokenCache,
)
from hammal.selfsigned import ensure_self_signed, listening_names, listening_port, tls_directory
from hammal.tls import ReloadOnHangup, ReloadingServerTLS, upstream_tls_policy
from hammal.web.front import FrontPage
from hammal.web.snippets import ServedRegistry
from hammal.web.gate import Gate
from hammal.web.root import MetricsResource, address_guard, build_root
from hammal.web.health import ReadyResource, Readiness, cache_dir_writable, redis_answers
from hammal.web.limits import ConnectionLimit
from hammal.web.forwarded import ForwardedHeaders
from hammal.web.site import HammalSite
from hammal.web.status import add_status
from hammal.status.quota import QUOTAS
from hammal.status.recorder import StatusRecorder
from hammal.status.report import RouteSource, StatusReport
from hammal.web.v2 import V2Resource


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
    opt_no_library_prefix.__doc__ = _flag_help("no-library-prefix", dict(FLAGS)["no-library-prefix"])

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


def _redis(settings: Settings) -> Any:
    """A reconnecting txredisapi pool, or L{None} without --redis."""
    if settings.redis is None:
        return None
    import txredisapi

    address = settings.redis
    return txredisapi.lazyConnectionPool(
        host=address.host,
        port=address.port,
        dbid=address.db,
        poolsize=4,
        reconnect=True,
        password=address.password,
        connectTimeout=2,
        replyTimeout=2,
    )


def _token_cache(redis: Any, reactor: Any) -> TokenCache:
    local = MemoryTokenCache(reactor)
    if redis is None:
        return local
    return ResilientTokenCache(RedisTokenCache(redis, reactor), local, reactor)


def _manifest_cache(
    settings: Settings, redis: Any, reactor: Any, write_errors: WriteErrors | None = None
) -> ManifestCacheFactory | None:
    """Tag entries in Redis when configured (shared), else on disk."""
    if settings.cache_dir is None:
        return None
    store = ManifestStore(settings.cache_dir)
    disk_tags = DiskTagStore(settings.cache_dir, reactor)
    try:
        store.open()
        disk_tags.open()
    except OSError as failure:
        raise usage.UsageError(f"cannot use --cache-dir {settings.cache_dir}: {failure.strerror}")
    tags: TokenCache = disk_tags
    if redis is not None:
        shared = RedisTokenCache(redis, reactor, prefix=TAG_KEY_PREFIX)
        tags = ResilientTokenCache(shared, disk_tags, reactor)

    def build(upstream: str, fetch: FetchManifest, head_digest: HeadDigest) -> ManifestCache:
        return ManifestCache(
            store,
            tags,
            reactor,
            upstream,
            fetch,
            head_digest,
            ttl=settings.manifest_ttl,
            stale_if_error=settings.stale_if_error,
            negative_ttl=settings.negative_ttl,
            deadline=settings.upstream_deadline,
            write_errors=write_errors,
        )

    return build


def _blob_cache(
    settings: Settings, reactor: Any, write_errors: WriteErrors | None = None
) -> BlobCache | None:
    if settings.cache_dir is None:
        return None
    store = BlobStore(settings.cache_dir, settings.cache_max_size, settings.cache_min_free)
    try:
        store.open()
    except OSError as failure:
        raise usage.UsageError(f"cannot use --cache-dir {settings.cache_dir}: {failure.strerror}")
    return BlobCache(
        store,
        reactor,
        settings.read_timeout,
        resumes=settings.retries,
        chunk_size=settings.buffer_size,
        offload=_thread_pool_offload(reactor),
        deadline=settings.upstream_deadline,
        write_errors=write_errors,
    )


def _thread_pool_offload(reactor: Any) -> Offload:
    """Hashing and fdatasync on the reactor's thread pool, off the event loop."""

    def offload(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    return offload


def _tune_http_limits(settings: Settings) -> None:
    """Request header limits (process-wide, like the buffer sizes)."""
    http.HTTPChannel.maxHeaders = settings.max_headers
    http.HTTPChannel.totalHeadersSize = settings.max_header_bytes


def _rules(settings: Settings) -> AccessRules | None:
    """The access rules, or L{None} when none is configured."""
    if not any(settings.rules.values()):
        return None
    r = settings.rules
    try:
        return AccessRules(
            allow_ip=r.get("allow-ip", ()),
            deny_ip=r.get("deny-ip", ()),
            trusted_proxies=r.get("trusted-proxy", ()),
            allow_ua=r.get("allow-ua", ()),
            deny_ua=r.get("deny-ua", ()),
            allow_path=r.get("allow-path", ()),
            region_header=settings.region_header,
            allow_region=[c for item in r.get("allow-region", ()) for c in item.split(",") if c],
            deny_region=[c for item in r.get("deny-region", ()) for c in item.split(",") if c],
        )
    except ValueError as failure:
        raise usage.UsageError(str(failure))


def _gate(
    settings: Settings,
    reactor: Any,
    rules: AccessRules | None,
    tokens: TokenCache,
    hashing: PasswordHashingPool,
) -> Gate | None:
    """The access gate, or L{None} when nothing is restricted."""
    if settings.auth == "none" and rules is None:
        return None
    try:
        users: UserDirectory | None = None
        if settings.htpasswd is not None:
            users = HtpasswdFile(settings.htpasswd, reactor)
        elif settings.auth_user is not None:
            users = SingleUser(settings.auth_user.username, settings.auth_user.password)
        allowed = parse_user_list(settings.allow_users) if settings.allow_users else None
        if users is not None and allowed is not None:
            users = AllowList(users, allowed)
        issuer = None
        if settings.auth == "token":
            issuer = TokenIssuer(_token_key(settings), reactor, settings.token_lifetime)
        passthrough = settings.auth == "passthrough"
        return Gate(
            settings.auth,
            reactor,
            reactor,
            rules,
            users,
            issuer,
            allowed_users=allowed if passthrough else None,
            logins=Logins(tokens),
            checker=None if users is None else CredentialChecker(users, reactor, reactor, hashing.pool),
        )
    except (ValueError, ConfigError) as failure:
        raise usage.UsageError(str(failure))


def _address_rules(settings: Settings) -> AccessRules | None:
    """The address rules alone (for /status): --allow-ip, --deny-ip, --trusted-proxy."""
    rules = settings.rules
    if not (rules.get("allow-ip") or rules.get("deny-ip")):
        return None
    try:
        return AccessRules(
            allow_ip=rules.get("allow-ip", ()),
            deny_ip=rules.get("deny-ip", ()),
            trusted_proxies=rules.get("trusted-proxy", ()),
        )
    except ValueError as failure:
        raise usage.UsageError(str(failure))


def _members(client: Any) -> list[Any]:
    """The upstream clients behind C{client} (itself, or a failover's members)."""
    health = getattr(client, "health", None)
    return [member for member, _ in health()] if health is not None else [client]


def _token_key(settings: Settings) -> bytes:
    if settings.token_key_file is None:
        return TokenIssuer.generate_key()
    try:
        with open(settings.token_key_file, "rb") as key_file:
            return key_file.read().strip()
    except OSError as failure:
        raise ConfigError(f"cannot read --token-key-file: {failure.strerror}")


def _served_registries(settings: Settings) -> list[ServedRegistry]:
    """Every registry this mirror serves, as clients name them (front page)."""

    def name(url: str) -> str:
        given = settings.registry_for(url)
        if given is not None:
            return given
        parts = urlsplit(url)
        return "docker.io" if is_docker_hub(parts.hostname or "") else parts.netloc

    served = [ServedRegistry(name(settings.upstream))] if settings.upstream else []
    served += [ServedRegistry(name(url), host) for host, url in settings.routes]
    return served


def _account_files(settings: Settings, reactor: Any) -> dict[str | None, AccountsFile]:
    """The account pools of --upstream-credentials-file, by route host (None: default)."""
    urls = dict(settings.routes)
    files: dict[str | None, AccountsFile] = {}
    for host, path in settings.credentials_files:
        url = settings.upstream if host is None else urls[host]
        assert url is not None
        try:
            files[host] = AccountsFile.load(path, reactor, urlsplit(url).netloc)
        except AccountsFileError as failure:
            raise usage.UsageError(f"--upstream-credentials-file: {failure}")
    return files


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """Build hammal's service tree from parsed C{options}."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    settings = options.settings or Settings.from_options(options)
    _tune_buffers(settings.buffer_size)
    _tune_http_limits(settings)

    redis = _redis(settings)
    tls_policy = None
    if settings.upstream_ca is not None:
        try:
            tls_policy = upstream_tls_policy(settings.upstream_ca)
        except ConfigError as failure:
            raise usage.UsageError(str(failure))
    zones = PeerZones()
    http_client = make_http_client(
        reactor,
        settings.connect_timeout,
        settings.max_upstream_connections,
        tls_policy,
        zones=zones,
        proxies=settings.proxies,
    )
    # Redirects of upstreams on public addresses: never to internal ones.
    redirect_client = make_http_client(
        reactor,
        settings.connect_timeout,
        settings.max_upstream_connections,
        tls_policy,
        refuse_internal=True,
        proxies=settings.proxies,
    )
    if settings.proxies.active:
        _log.info("outbound proxy: {proxies}", proxies=settings.proxies.describe())
    tokens = _token_cache(redis, reactor)
    policy = RetryPolicy(retries=settings.retries, base=settings.retry_backoff)
    write_errors = WriteErrors(reactor)  # one warning a minute for the whole cache
    blobs = _blob_cache(settings, reactor, write_errors)
    manifests = _manifest_cache(settings, redis, reactor, write_errors)
    referrers = (
        ReferrersCache(reactor, settings.manifest_ttl, settings.stale_if_error)
        if settings.cache_dir is not None
        else None
    )

    credential_policy = CredentialPolicy(
        settings.trusted_realms, settings.plain_http_credentials
    )
    load_suffix_list()
    mirror_credentials = dict(settings.mirror_credentials)
    account_files = _account_files(settings, reactor)

    def client_for(
        url: str,
        credentials: Credentials | None,
        mirror_of: str | None = None,
        accounts: AccountsFile | None = None,
    ) -> UpstreamClient:
        upstream = Upstream(url, settings.library_prefix_for(url), credentials, mirror_of)
        return UpstreamClient(
            upstream,
            http_client,
            reactor,
            tokens,
            policy,
            settings.read_timeout,
            credential_policy,
            redirect_client,
            zones,
            accounts,
            deadline=settings.upstream_deadline,
        )

    def proxy_for(host: str | None, url: str, credentials: Credentials | None) -> PullProxy:
        members = [client_for(url, credentials, accounts=account_files.get(host))]
        # A mirror gets only its own credentials: never the upstream's, nor
        # the upstream's account pool.
        members += [
            client_for(m, mirror_credentials.get(urlsplit(m).netloc.lower()), url)
            for h, m in settings.mirrors
            if h == host
        ]
        client: RegistryClient = members[0] if len(members) == 1 else FailoverClient(members, reactor)
        return PullProxy(
            client,
            settings.library_prefix_for(url),
            settings.blob_redirect,
            reactor,
            blobs,
            manifests,
            referrers,
        )

    def adhoc(host: str) -> PullProxy:
        """?upstream=HOST: speed-testing a mirror; its redirects are passed on."""
        url = f"https://{host}"
        return PullProxy(client_for(url, None), settings.library_prefix_for(url), "pass", reactor)

    route_credentials = dict(settings.route_credentials)
    default = (
        proxy_for(None, settings.upstream, settings.credentials) if settings.upstream else None
    )
    routed = {
        host: proxy_for(host, url, route_credentials.get(host)) for host, url in settings.routes
    }
    registries = [(url, routed[host]) for host, url in settings.routes]
    if default is not None and settings.upstream is not None:
        registries.insert(0, (settings.upstream, default))
    selector = UpstreamSelector(
        default, routed, registries, settings.allow_upstream, adhoc, dict(settings.stands_for)
    )
    if blobs is not None:
        metrics.blob_cache_size.set_function(lambda: blobs.store.total_size)
        metrics.blob_cache_blobs.set_function(lambda: len(blobs.store))
        metrics.coalesced_readers.set_function(lambda: blobs.readers)
        metrics.blob_fills_in_flight.set_function(lambda: len(blobs.transfers()))
    probe = (default or next(iter(routed.values()))).client

    readiness = Readiness()
    if redis is not None:
        readiness.add("redis", redis_answers(redis, reactor))
    if settings.cache_dir is not None:
        # A full or read-only cache disk means "serving uncached", not "unready".
        readiness.add("cache", cache_dir_writable(settings.cache_dir), required=False)
    readiness.add("upstream", lambda: probe.reachable(settings.ready_window))

    hashing = PasswordHashingPool()
    rules = _rules(settings)
    metrics_resource = MetricsResource(registry=metrics.REGISTRY)
    root = build_root(
        V2Resource(selector, _gate(settings, reactor, rules, tokens, hashing)),
        ReadyResource(readiness),
        metrics_resource if settings.metrics_port is None else None,
        FrontPage(settings.url302, _served_registries(settings)),
        guard=None if rules is None else address_guard(rules),
    )
    recorder = StatusRecorder(reactor)
    status_routes = [RouteSource(host, url, routed[host].client) for host, url in settings.routes]
    if default is not None and settings.upstream is not None:
        status_routes.insert(0, RouteSource("default", settings.upstream, default.client))
    for route in status_routes:
        for member in _members(route.client):
            QUOTAS.register(member.upstream.host, member.account)
    status_report = StatusReport(
        recorder,
        QUOTAS,
        status_routes,
        blobs,
        settings.cache_max_size,
        settings.status_show_clients,
    )
    status_rules = _address_rules(settings)
    if settings.metrics_port is None:
        add_status(root, status_report, status_rules)
    trusted = settings.rules.get("trusted-proxy", ())
    site = HammalSite(
        root,
        reactor,
        forwarded=ForwardedHeaders(trusted) if trusted else None,
        timeout=settings.idle_timeout,
    )
    site.displayTracebacks = False
    site.status = recorder

    service = MultiService()
    hashing.setServiceParent(service)
    factory: Any = ConnectionLimit(site, settings.max_connections)
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
    _listen(reactor, settings.port, factory, service)
    if settings.metrics_port is not None:
        metrics_root = Resource()
        metrics_root.putChild(b"metrics", metrics_resource)
        add_status(metrics_root, status_report, status_rules)
        metrics_site = _QuietSite(metrics_root)
        _listen(reactor, settings.metrics_port, metrics_site, service)
    DrainService(readiness, lambda: site.active_requests, reactor, settings.drain_timeout).setServiceParent(service)
    if blobs is not None:
        CacheSweep(blobs.store, reactor, offload=_thread_pool_offload(reactor)).setServiceParent(service)
    return service


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


def _listen(reactor: Any, description: str, factory: Any, parent: MultiService) -> None:
    try:
        described = with_backlog(description)
        endpoint = dual_stack_endpoint(reactor, described) or serverFromString(reactor, described)
    except (ValueError, KeyError, TypeError) as failure:
        raise usage.UsageError(f"{description!r} is not a valid endpoint: {failure}")
    StreamServerEndpointService(endpoint, factory).setServiceParent(parent)
