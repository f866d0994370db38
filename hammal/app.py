"""
The composition root: the one place that knows every part of hammal.

L{build_app} turns validated L{Settings} into the object graph a request
walks: the resource tree (C{web}) over the pull services (C{proxy},
C{upstreams}), which read through the caches (C{cache}) and talk to
registries (C{registry}). L{hammal.tap} adds only the listeners; tests build
the same graph with an in-memory HTTP client and a fake clock.
"""

from __future__ import annotations

from typing import Any, Callable
from urllib.parse import urlsplit

import attrs
from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web.resource import Resource

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
from hammal.cache.blobs import BlobCache
from hammal.cache.coordinate import LockFileCoordinator
from hammal.cache.fetch import Offload
from hammal.cache.manifests import DiskTagStore, ManifestCache, ManifestStore, RemoteManifests
from hammal.cache.pump import BodyPumps
from hammal.cache.shared_room import SharedRoom
from hammal.cache.sources import ReadThrough
from hammal.cache.storage import BlobStorage
from hammal.cache.store import BlobStore
from hammal.cache.sweep import CacheSweep
from hammal.cache.threads import DedicatedThread
from hammal.cache.writes import WriteErrors
from hammal.cluster.peer import mount_peer_endpoint
from hammal.cluster.setup import build_cluster
from hammal.cluster.setup import cluster_http as make_cluster_http
from hammal.config import ConfigError, Settings
from hammal.drain import DrainService
from hammal.pull.referrers import ReferrersCache
from hammal.pull.service import ManifestCacheFactory, PullService
from hammal.pull.upstreams import FailoverClient, UpstreamSelector
from hammal.reference import is_docker_hub
from hammal.status.recorder import StatusRecorder
from hammal.status.report import RouteSource, StatusReport
from hammal.storage.blobs import S3BlobStorage
from hammal.storage.health import StoreHealth
from hammal.storage.manifests import SharedManifests, SharedManifestStore
from hammal.storage.objects import ObjectStore
from hammal.storage.s3 import S3Credentials, S3Store
from hammal.tls import upstream_tls_policy
from hammal.ttlstore import (
    TAG_KEY_PREFIX,
    MemoryTtlStore,
    RedisTtlStore,
    ResilientTtlStore,
    TtlStore,
)
from hammal.upstream.accounts import AccountsFile, AccountsFileError
from hammal.upstream.addresses import PeerZones
from hammal.upstream.auth import Credentials
from hammal.upstream.client import RegistryClient, Upstream, UpstreamClient, make_http_client
from hammal.upstream.credentials import CredentialPolicy, load_suffix_list
from hammal.upstream.quota import QUOTAS
from hammal.upstream.retry import RetryPolicy
from hammal.upstream.warmup import UpstreamWarmUp
from hammal.web.forwarded import ForwardedHeaders
from hammal.web.front import FrontPage
from hammal.web.gate import Gate
from hammal.web.health import Readiness, ReadyResource, cache_dir_writable, redis_answers
from hammal.web.root import MetricsResource, address_guard, build_root
from hammal.web.site import HammalSite
from hammal.web.snippets import ServedRegistry
from hammal.web.status import add_status
from hammal.web.v2 import V2Resource
from hammal.worker_metrics import registry_for
from hammal.workers import worker_index

_log = Logger()

#: L{build_app}'s C{gate} when the settings decide (the usual case).
FROM_SETTINGS: Any = object()


@attrs.define
class App:
    """
    hammal's object graph, ready for listeners.

    @ivar root: the resource tree of the main port.
    @ivar site: the main port's HTTP factory (access log, header limits).
    @ivar services: what runs beside the listeners (password hashing,
        draining, the cache sweep); start them with the process.
    @ivar readiness: what C{/readyz} reports.
    @ivar metrics_resource: C{/metrics}, on the main port or its own.
    @ivar status_report: what C{/status} shows.
    @ivar status_rules: the address rules C{/status} obeys.
    @ivar selector: which pull service answers a request.
    @ivar default: the default upstream's pull service, if any.
    @ivar blobs: the blob cache, without C{--cache-dir} L{None}.
    """

    root: Resource
    site: HammalSite
    services: list[IService]
    readiness: Readiness
    metrics_resource: MetricsResource
    status_report: StatusReport
    status_rules: AccessRules | None
    selector: UpstreamSelector
    default: PullService | None
    blobs: BlobCache | None


def build_app(
    settings: Settings,
    reactor: Any,
    *,
    http_client: Any = None,
    redirect_client: Any = None,
    offload: Offload | None = None,
    gate: Gate | None = FROM_SETTINGS,
    retry_random: Callable[[], float] | None = None,
    cluster_http: Any = None,
) -> App:
    """
    Build hammal's object graph from C{settings}.

    @param reactor: the reactor (or a fake clock in tests) everything uses.
    @param http_client: the treq-like client for upstream requests; by
        default a pooled one on C{reactor}.
    @param redirect_client: the client for redirects to public addresses;
        by default one that refuses internal addresses.
    @param offload: where cache writes, hashing and fdatasync run; by default the
        reactor's thread pool.
    @param gate: the access gate; by default the one the settings describe.
    @param retry_random: the retry jitter's source (tests pin it).
    @param cluster_http: the treq-like client for peers and the object
        store; by default a pooled one on C{reactor}.
    @raise ConfigError: when the settings name something unusable.
    """
    redis = _redis(settings)
    zones = PeerZones()
    if http_client is None or redirect_client is None:
        tls_policy = None
        if settings.upstream_ca is not None:
            tls_policy = upstream_tls_policy(settings.upstream_ca)
        if http_client is None:
            http_client = make_http_client(
                reactor,
                settings.connect_timeout,
                settings.max_upstream_connections,
                tls_policy,
                zones=zones,
                proxies=settings.proxies,
            )
        if redirect_client is None:
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
    hash_thread: DedicatedThread | None = None
    pumps: BodyPumps | None = None
    if offload is None:
        offload = _thread_pool_offload(reactor)
        # Long upstream bodies on plain TCP read off the event loop.
        pumps = BodyPumps(reactor)
        if settings.no_hold_tail:
            # Nobody waits for the hash but the commit: a thread of its own,
            # below the transfer's priority.
            hash_thread = DedicatedThread(reactor, "hammal-fill-hash")
    tokens = _token_cache(redis, reactor)
    policy = (
        RetryPolicy(retries=settings.retries, base=settings.retry_backoff)
        if retry_random is None
        else RetryPolicy(retries=settings.retries, base=settings.retry_backoff, random=retry_random)
    )
    write_errors = WriteErrors(reactor)  # one warning a minute for the whole cache
    if cluster_http is None and (settings.storage or settings.cluster_advertise):
        cluster_http = make_cluster_http(reactor, settings.connect_timeout)
    objects = _object_store(settings, reactor, cluster_http)
    store_health = StoreHealth(reactor)
    local_blobs = _local_blobs(settings, offload)
    blobs = (
        _blob_cache(
            settings,
            reactor,
            offload,
            _blob_storage(local_blobs, objects, store_health),
            write_errors,
            hash_thread,
            pumps,
        )
        if local_blobs is not None
        else None
    )
    shared_manifests = SharedManifests(objects, store_health) if objects is not None else None
    manifests = _manifest_cache(settings, redis, reactor, write_errors, shared_manifests)
    referrers = (
        ReferrersCache(reactor, settings.manifest_ttl, settings.stale_if_error)
        if settings.cache_dir is not None
        else None
    )

    credential_policy = CredentialPolicy(settings.trusted_realms, settings.plain_http_credentials)
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

    def proxy_for(host: str | None, url: str, credentials: Credentials | None) -> PullService:
        members = [client_for(url, credentials, accounts=account_files.get(host))]
        # A mirror gets only its own credentials: never the upstream's, nor
        # the upstream's account pool.
        members += [
            client_for(m, mirror_credentials.get(urlsplit(m).netloc.lower()), url)
            for h, m in settings.mirrors
            if h == host
        ]
        client: RegistryClient = (
            members[0] if len(members) == 1 else FailoverClient(members, reactor)
        )
        return PullService(
            client,
            settings.library_prefix_for(url),
            settings.blob_redirect,
            reactor,
            blobs,
            manifests,
            referrers,
            resumes=settings.retries,
            min_rate=settings.upstream_min_rate,
        )

    def adhoc(host: str) -> PullService:
        """?upstream=HOST: speed-testing a mirror; its redirects are passed on."""
        url = f"https://{host}"
        return PullService(
            client_for(url, None),
            settings.library_prefix_for(url),
            "pass",
            reactor,
            resumes=settings.retries,
            min_rate=settings.upstream_min_rate,
        )

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
        _blob_metrics(blobs)
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
    if gate is FROM_SETTINGS:
        gate = _gate(settings, reactor, rules, tokens, hashing)
    metrics_resource = MetricsResource(registry=registry_for(metrics.REGISTRY, worker_index()))
    root = build_root(
        V2Resource(selector, gate),
        ReadyResource(readiness),
        metrics_resource if settings.metrics_port is None else None,
        FrontPage(settings.url302, _served_registries(settings)),
        guard=None if rules is None else address_guard(rules),
    )
    if blobs is not None and objects is not None:
        # Fills read through the bucket and are kept there (in a cluster,
        # with the fill lease between the bucket and upstream).
        blobs.fill_sources = ReadThrough(blobs.store)
    cluster = build_cluster(settings, reactor, redis, blobs, cluster_http) if blobs else None
    if cluster is not None and cluster.peer_endpoint is not None:
        mount_peer_endpoint(root, cluster.peer_endpoint)
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
        show_repositories=settings.status_repositories_shown,
    )
    status_rules = _address_rules(settings)
    if settings.metrics_port is None:
        add_status(root, status_report, status_rules)
    trusted = settings.rules.get("trusted-proxy", ())
    site = HammalSite(
        root,
        reactor,
        forwarded=ForwardedHeaders(trusted, settings.forwarded_header) if trusted else None,
        max_headers=settings.max_headers,
        max_header_bytes=settings.max_header_bytes,
        timeout=settings.idle_timeout,
    )
    site.displayTracebacks = False
    site.status = recorder

    services: list[IService] = [
        hashing,
        DrainService(readiness, lambda: site.active_requests, reactor, settings.drain_timeout),
    ]
    if local_blobs is not None:
        services.append(CacheSweep(local_blobs, reactor, offload=offload))
    if hash_thread is not None:
        services.append(hash_thread)
    if pumps is not None and blobs is not None:
        services.append(pumps)
    # The upstreams' challenges known before the first pull (time to first byte).
    services.append(
        UpstreamWarmUp([member for route in status_routes for member in _members(route.client)])
    )
    return App(
        root,
        site,
        services,
        readiness,
        metrics_resource,
        status_report,
        status_rules,
        selector,
        default,
        blobs,
    )


def _blob_metrics(blobs: BlobCache) -> None:
    """The blob cache's gauges, read when Prometheus scrapes."""
    metrics.blob_cache_size.set_function(lambda: blobs.store.total_size)
    metrics.blob_cache_blobs.set_function(lambda: len(blobs.store))
    metrics.coalesced_readers.set_function(lambda: blobs.readers)
    metrics.blob_fills_in_flight.set_function(lambda: len(blobs.transfers()))


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


def _token_cache(redis: Any, reactor: Any) -> TtlStore:
    local = MemoryTtlStore(reactor)
    if redis is None:
        return local
    return ResilientTtlStore(RedisTtlStore(redis, reactor), local, reactor)


def _manifest_cache(
    settings: Settings,
    redis: Any,
    reactor: Any,
    write_errors: WriteErrors | None = None,
    shared_manifests: SharedManifests | None = None,
) -> ManifestCacheFactory | None:
    """
    Tag entries in Redis when configured (shared), else on disk; manifests
    by digest also in the object store with C{--storage s3://...}.
    """
    if settings.cache_dir is None:
        return None
    store = (
        ManifestStore(settings.cache_dir)
        if shared_manifests is None
        else SharedManifestStore(settings.cache_dir, shared_manifests)
    )
    disk_tags = DiskTagStore(settings.cache_dir, reactor)
    try:
        store.open()
        disk_tags.open()
    except OSError as failure:
        raise ConfigError(f"cannot use --cache-dir {settings.cache_dir}: {failure.strerror}")
    tags: TtlStore = disk_tags
    if redis is not None:
        shared = RedisTtlStore(redis, reactor, prefix=TAG_KEY_PREFIX)
        tags = ResilientTtlStore(shared, disk_tags, reactor)

    def build(upstream: str, remote: RemoteManifests) -> ManifestCache:
        return ManifestCache(
            store,
            tags,
            reactor,
            upstream,
            remote if shared_manifests is None else shared_manifests.remote_through(remote),
            ttl=settings.manifest_ttl,
            stale_if_error=settings.stale_if_error,
            negative_ttl=settings.negative_ttl,
            deadline=settings.upstream_deadline,
            write_errors=write_errors,
        )

    return build


def _object_store(settings: Settings, reactor: Any, http: Any) -> S3Store | None:
    """
    The object store of C{--storage s3://...}, or L{None} for C{file}.

    @raise ConfigError: when the S3 credentials are missing.
    """
    if settings.storage is None:
        return None
    if settings.s3_endpoint is None:
        raise ConfigError("--storage s3://... needs --s3-endpoint URL")
    try:
        credentials = S3Credentials.from_environ()
    except ValueError as failure:
        raise ConfigError(f"--storage s3://{settings.storage.bucket}: {failure}")
    return S3Store(
        settings.s3_endpoint,
        settings.storage,
        credentials,
        http,
        reactor,
        timeout=settings.read_timeout,
    )


def _blob_storage(
    local: BlobStore, objects: ObjectStore | None, health: StoreHealth
) -> BlobStorage:
    """
    Where the blob cache keeps verified blobs: the local directory alone
    (C{--storage file}), or it as the serving tier over C{objects}.
    """
    if objects is None:
        return local
    return S3BlobStorage(local, objects, health)


def _local_blobs(settings: Settings, offload: Offload) -> BlobStore | None:
    """The blobs of --cache-dir (opened), or L{None} without one."""
    if settings.cache_dir is None:
        return None
    store = BlobStore(settings.cache_dir, settings.cache_max_size, settings.cache_min_free)
    # --cache-max-size for every process using the directory (--workers, or not)
    store.shared = SharedRoom(settings.cache_dir, offload=offload)
    try:
        store.shared.open()
        store.open()
    except OSError as failure:
        raise ConfigError(f"cannot use --cache-dir {settings.cache_dir}: {failure.strerror}")
    return store


def _blob_cache(
    settings: Settings,
    reactor: Any,
    offload: Offload,
    storage: BlobStorage,
    write_errors: WriteErrors | None = None,
    hash_offload: Offload | None = None,
    pumps: BodyPumps | None = None,
) -> BlobCache:
    """The blob cache over C{storage}, sharing fills with the directory's other processes."""
    if settings.cache_dir is None:
        raise RuntimeError("a blob cache is built without --cache-dir")
    coordinator = LockFileCoordinator(settings.cache_dir)  # fills shared with other processes
    try:
        coordinator.open()
    except OSError as failure:
        raise ConfigError(f"cannot use --cache-dir {settings.cache_dir}: {failure.strerror}")
    return BlobCache(
        storage,
        reactor,
        settings.read_timeout,
        resumes=settings.retries,
        chunk_size=settings.buffer_size,
        offload=offload,
        deadline=settings.upstream_deadline,
        write_errors=write_errors,
        hold_tail=not settings.no_hold_tail,
        coordinator=coordinator,
        hash_offload=hash_offload,
        pumps=pumps,
        min_rate=settings.upstream_min_rate,
    )


def _thread_pool_offload(reactor: Any) -> Offload:
    """Cache writes, hashing and fdatasync on the reactor's thread pool, off the event loop."""

    def offload(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    return offload


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
            forwarded_header=settings.forwarded_header,
            allow_ua=r.get("allow-ua", ()),
            deny_ua=r.get("deny-ua", ()),
            allow_path=r.get("allow-path", ()),
            region_header=settings.region_header,
            allow_region=[c for item in r.get("allow-region", ()) for c in item.split(",") if c],
            deny_region=[c for item in r.get("deny-region", ()) for c in item.split(",") if c],
        )
    except ValueError as failure:
        raise ConfigError(str(failure))


def _gate(
    settings: Settings,
    reactor: Any,
    rules: AccessRules | None,
    tokens: TtlStore,
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
            checker=None
            if users is None
            else CredentialChecker(users, reactor, reactor, hashing.pool),
        )
    except (ValueError, ConfigError) as failure:
        raise ConfigError(str(failure))


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
            forwarded_header=settings.forwarded_header,
        )
    except ValueError as failure:
        raise ConfigError(str(failure))


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
        if url is None:
            raise RuntimeError("hammal bug: expected url is not None")
        try:
            files[host] = AccountsFile.load(path, reactor, urlsplit(url).netloc)
        except AccountsFileError as failure:
            raise ConfigError(f"--upstream-credentials-file: {failure}")
    return files
