"""
hammal's settings: the command-line option table (each option with an
environment fallback) and the typed, validated L{Settings} built from it
once at start-up.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from typing import TYPE_CHECKING, Callable, Mapping, TypeVar
from urllib.parse import unquote, urlsplit

import attrs

from hammal.access.forwarding import FORWARDED_HEADERS
from hammal.cache.store import FreeSpaceFloor
from hammal.keyfile import ClusterKeyError, load_cluster_key
from hammal.minrate import DEFAULT_MIN_RATE
from hammal.reference import is_docker_hub, registry_names
from hammal.upstream.auth import Credentials
from hammal.upstream.proxy_rules import ProxyRules

if TYPE_CHECKING:
    from hammal.storage.s3 import S3Location

DEFAULT_PORT = "tcp:5000:interface=127.0.0.1"
AUTH_MODES = ("none", "basic", "token", "passthrough")
DEFAULT_UPSTREAM = "https://registry-1.docker.io"


T = TypeVar("T")


class ConfigError(ValueError):
    """An option value that hammal cannot start with; one line for ops."""


@attrs.frozen
class OptionSpec:
    """One C{--name VALUE} option: default, help, and its env variable."""

    name: str
    default: str | None
    help: str
    extra_env: tuple[str, ...] = ()

    @property
    def env(self) -> str:
        return "HAMMAL_" + self.name.upper().replace("-", "_")


#: Every valued option, in --help order.
PARAMETERS: tuple[OptionSpec, ...] = (
    OptionSpec(
        "port",
        DEFAULT_PORT,
        "Port number (every IPv6 and IPv4 address) or Twisted server endpoint string to listen on.",
    ),
    OptionSpec("tls-cert", None, "PEM certificate chain for --tls (leaf first)."),
    OptionSpec("tls-key", None, "PEM private key for --tls."),
    OptionSpec(
        "upstream",
        None,
        f"[REGISTRY=]URL of the registry to mirror (default {DEFAULT_UPSTREAM} unless --route"
        " is given); REGISTRY names the registry URL stands for, e.g. docker.io=https://mirror.gcr.io.",
    ),
    OptionSpec(
        "upstream-username",
        None,
        "User name for upstream tokens (never logged).",
        ("DOCKER_USERNAME",),
    ),
    OptionSpec(
        "upstream-password",
        None,
        "Password or access token for upstream tokens (never logged).",
        ("DOCKER_PASSWORD",),
    ),
    OptionSpec(
        "upstream-password-file",
        None,
        "File holding the upstream password, instead of --upstream-password (which ps shows).",
    ),
    OptionSpec(
        "redis",
        None,
        "redis://[:password@]host[:port][/db] shared by instances: upstream tokens, tag"
        " entries, --auth passthrough logins, cluster fill leases.",
    ),
    OptionSpec(
        "storage",
        "file",
        "Where verified blobs live: file (--cache-dir) or s3://BUCKET/PREFIX (with --s3-endpoint;"
        " --cache-dir becomes a bounded read-through cache in front of it).",
    ),
    OptionSpec(
        "s3-endpoint",
        None,
        "The S3 API's base URL for --storage s3://... (path-style addressing); credentials from"
        " AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION.",
    ),
    OptionSpec(
        "cluster-advertise",
        None,
        "How other instances reach this one (http://IP:PORT): with --redis, a fill lease per"
        " blob lets one instance fetch it while the others stream it from that one.",
    ),
    OptionSpec(
        "cluster-key-file",
        None,
        "File with the cluster key (at least 32 bytes, the same on every instance) that signs"
        " peer requests; needed with --cluster-advertise.",
    ),
    OptionSpec("connect-timeout", "10", "Seconds to wait for an upstream connection."),
    OptionSpec("read-timeout", "30", "Seconds of upstream silence before giving up."),
    OptionSpec(
        "upstream-min-rate",
        str(DEFAULT_MIN_RATE),
        "Bytes per second a blob body from upstream must bring over each --read-timeout"
        " window, else it is given up like silence; 0 turns it off.",
    ),
    OptionSpec(
        "upstream-deadline",
        "120",
        "Seconds an upstream answer (token, manifest, tag list, error) or a shared fetch"
        " may take in all.",
    ),
    OptionSpec("retries", "3", "Retries of a failed upstream GET/HEAD."),
    OptionSpec("retry-backoff", "0.5", "Base seconds of the exponential retry backoff."),
    OptionSpec(
        "blob-redirect",
        "follow",
        "follow: stream blobs from upstream's CDN; pass: redirect clients.",
    ),
    OptionSpec("log-format", "text", "text or json."),
    OptionSpec("buffer-size", "256K", "Socket read/write buffer per connection (e.g. 64K, 1M)."),
    OptionSpec("max-upstream-connections", "64", "Persistent connections kept per upstream host."),
    OptionSpec("cache-dir", "var/cache", "Directory of the pull-through cache."),
    OptionSpec(
        "cache-max-size",
        None,
        "Largest size of the cache directory (e.g. 50G); LRU eviction past it.",
    ),
    OptionSpec(
        "cache-min-free",
        None,
        "Free space the cache leaves on its disk: a size (10G) or a share (5%);"
        " default the smaller of 2G and 5%.",
    ),
    OptionSpec(
        "manifest-ttl", "300", "Seconds a tag's digest is trusted before a HEAD revalidates it."
    ),
    OptionSpec(
        "stale-if-error", "86400", "Seconds a known tag may still be served when upstream fails."
    ),
    OptionSpec("negative-ttl", "30", "Seconds an upstream 404 for a tag or digest is remembered."),
    OptionSpec(
        "auth",
        None,
        "Client authentication: none, basic, token or passthrough"
        " (default: basic when users are given, else none).",
    ),
    OptionSpec(
        "auth-user", None, "The user for --auth basic/token (never logged).", ("REGISTRY_USERNAME",)
    ),
    OptionSpec("auth-password", None, "Its password (never logged).", ("REGISTRY_PASSWORD",)),
    OptionSpec(
        "auth-password-file",
        None,
        "File holding --auth-user's password, instead of --auth-password.",
    ),
    OptionSpec(
        "htpasswd",
        None,
        "bcrypt htpasswd file of users for --auth basic/token (re-read on change).",
    ),
    OptionSpec("allow-users", None, "a,b: only these users may pull, whatever their credentials."),
    OptionSpec(
        "token-key-file",
        None,
        "Secret (32+ bytes) signing --auth token tokens; share it between instances.",
    ),
    OptionSpec("token-lifetime", "300", "Seconds a token from /v2/auth is valid."),
    OptionSpec(
        "forwarded-header",
        "x-forwarded",
        "Which headers a --trusted-proxy writes: x-forwarded (X-Forwarded-For/-Proto/-Host/"
        "-Port) or forwarded (RFC 7239 Forwarded); the other kind is the client's and ignored.",
    ),
    OptionSpec(
        "region-header", None, "Request header holding the client's country code (set by a CDN)."
    ),
    OptionSpec(
        "upstream-ca",
        None,
        "PEM CA certificate(s) trusted for upstreams besides the system's roots.",
    ),
    OptionSpec(
        "upstream-proxy",
        None,
        "http://[user:password@]host:port forward proxy for upstream, token and CDN traffic"
        " (wins over HTTP(S)_PROXY; NO_PROXY still exempts hosts; none: no proxy).",
    ),
    OptionSpec("url302", None, "Redirect / to this URL instead of showing the usage page."),
    OptionSpec(
        "metrics-port", None, "Serve /metrics on this port or endpoint only (not on --port)."
    ),
    OptionSpec("drain-timeout", "30", "Seconds to let in-flight transfers finish on SIGTERM."),
    OptionSpec(
        "max-connections",
        "10000",
        "Client connections beyond this are refused with 503 (0: no limit).",
    ),
    OptionSpec("idle-timeout", "300", "Seconds an idle client connection is kept."),
    OptionSpec("max-headers", "100", "Most request headers accepted per request."),
    OptionSpec("max-header-bytes", "16384", "Most bytes of request line and headers."),
    OptionSpec(
        "ready-window",
        "60",
        "/readyz: upstream must have answered within this many seconds (else it is probed).",
    ),
    OptionSpec(
        "workers",
        "1",
        "Processes serving --port: a number, or auto (one per core); they share the port,"
        " the cache directory and /metrics.",
    ),
)

#: Repeatable options: given several times, or space-separated in the env variable.
LISTS: tuple[OptionSpec, ...] = (
    OptionSpec(
        "route",
        None,
        "HOST=[REGISTRY=]UPSTREAM_URL: requests for Host HOST go to UPSTREAM_URL (repeatable).",
    ),
    OptionSpec(
        "route-credentials",
        None,
        "HOST=USER:PASSWORD_FILE: upstream credentials for a --route (repeatable).",
    ),
    OptionSpec(
        "mirror",
        None,
        "[HOST=|REGISTRY=]URL: a mirror of the upstream (of --route HOST, or of the upstream"
        " standing for REGISTRY) tried when it fails (repeatable).",
    ),
    OptionSpec(
        "upstream-credentials-file",
        None,
        "[HOST=]FILE: a pool of upstream accounts, USER:PASSWORD a line, for the upstream"
        " (or --route HOST); re-read on change (repeatable).",
    ),
    OptionSpec(
        "mirror-credentials",
        None,
        "MIRROR=USER:PASSWORD_FILE: credentials for the --mirror at host[:port] MIRROR"
        " (repeatable); a mirror gets no other credentials.",
    ),
    OptionSpec(
        "trusted-realm",
        None,
        "HOST: a token realm that may get upstream credentials although it is not"
        " on the upstream's registrable domain (repeatable).",
    ),
    OptionSpec("allow-upstream", None, "HOST that ?upstream=HOST may name (repeatable)."),
    OptionSpec("allow-ip", None, "CIDR allowed to pull; others are refused (repeatable)."),
    OptionSpec("deny-ip", None, "CIDR refused (repeatable)."),
    OptionSpec(
        "trusted-proxy",
        None,
        "CIDR of reverse proxies whose --forwarded-header headers are believed (repeatable).",
    ),
    OptionSpec("allow-ua", None, "REGEX a User-Agent must match (repeatable; env: one per line)."),
    OptionSpec("deny-ua", None, "REGEX of refused User-Agents (repeatable; env: one per line)."),
    OptionSpec(
        "allow-path", None, "REGEX a request path must match (repeatable; env: one per line)."
    ),
    OptionSpec("allow-region", None, "Country codes allowed by --region-header (repeatable)."),
    OptionSpec("deny-region", None, "Country codes refused by --region-header (repeatable)."),
)

#: The repeatable options that are access rules.
RULE_LISTS = (
    "allow-ip",
    "deny-ip",
    "trusted-proxy",
    "allow-ua",
    "deny-ua",
    "allow-path",
    "allow-region",
    "deny-region",
)

#: Repeatable options whose values are regular expressions: in the env, one per line.
REGEX_LISTS = frozenset({"allow-ua", "deny-ua", "allow-path"})

#: Every flag: name, help.
FLAGS: tuple[tuple[str, str], ...] = (
    (
        "tls",
        "Serve HTTPS (TLS 1.2+) with --tls-cert and --tls-key, or a self-signed"
        " certificate kept in var/tls/ (next to --cache-dir).",
    ),
    ("library-prefix", "Rewrite one-part names to library/NAME (default: on for Docker Hub)."),
    ("no-library-prefix", "Never rewrite one-part names."),
    ("no-cache", "Run as a pure proxy: cache nothing on disk."),
    ("debug", "Log upstream exchanges (never secrets)."),
    (
        "plain-http-credentials",
        "Send upstream credentials over plain HTTP to hosts that are not loopback (unsafe).",
    ),
    (
        "status-show-clients",
        "Show full client addresses on /status (default: masked to /24 or /48).",
    ),
    (
        "status-show-repositories",
        "Show repository names on /status with --auth passthrough (default: a keyed digest"
        " in their place: each tenant's repositories are its own).",
    ),
    (
        "no-hold-tail",
        "Send a cold blob's every byte as it arrives, before its digest is checked"
        " (a mismatch is still never cached).",
    ),
)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_SIZE = re.compile(r"(\d+)\s*([KMGT]?)(?:I?B)?\Z", re.IGNORECASE)


def env_flag(env: Mapping[str, str], name: str) -> bool | None:
    """The boolean an environment variable sets, L{None} if unset."""
    value = env.get(name)
    if value is None:
        return None
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{name} must be true or false, not {value!r}")


def parse_size(text: str, what: str) -> int:
    """C{"256K"} → 262144."""
    match = _SIZE.match(text.strip())
    if match is None:
        raise ConfigError(f"{what} must be a size like 256K or 1M, not {text!r}")
    number, unit = int(match.group(1)), match.group(2).upper()
    return number * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[unit]


def parse_free_space(text: str | None) -> FreeSpaceFloor:
    """C{"10G"} or C{"5%"} (L{None}: the default floor) for C{--cache-min-free}."""
    if not text:
        return FreeSpaceFloor()
    text = text.strip()
    if text.endswith("%"):
        share = _number(text[:-1], "--cache-min-free", 0)
        if share >= 100:
            raise ConfigError("--cache-min-free must be below 100%")
        return FreeSpaceFloor(fraction=share / 100)
    return FreeSpaceFloor(size=parse_size(text, "--cache-min-free"))


def _number(text: str, what: str, minimum: float, integer: bool = False) -> float:
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise ConfigError(f"{what} must be a number, not {text!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number, not {text!r}")
    if value < minimum:
        raise ConfigError(f"{what} must be at least {minimum:g}")
    return value


def _min_rate(text: str) -> int:
    """C{--upstream-min-rate}: a whole number of bytes per second, 0 (off) or more."""
    value = text.strip()
    if not (value.isascii() and value.isdigit()):
        raise ConfigError(
            "--upstream-min-rate must be a whole number of bytes per second (0 turns it off),"
            f" not {text[:40]!r}"
        )
    return int(value)


def port_description(text: str) -> str:
    """A port number becomes a TCP endpoint on all interfaces."""
    text = text.strip()
    if text.isdigit():
        if not 0 < int(text) < 65536:
            raise ConfigError(f"--port {text} is not a valid port number")
        return f"tcp:{text}"
    if not text:
        raise ConfigError("--port must not be empty")
    return text


def _choice(value: str, what: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{what} must be one of {', '.join(choices)}, not {value[:40]!r}")
    return value


def _secret(value: str | None, path: str | None, what: str) -> str | None:
    """
    A password given inline (C{--X-password}) or in a file
    (C{--X-password-file}, not visible in ``ps``); never both.
    """
    if path is None:
        return value
    if value is not None:
        raise ConfigError(f"give {what} or {what}-file, not both")
    return _read_secret(path, f"{what}-file")


def _read_secret(path: str, what: str) -> str:
    """The secret in C{path}, without surrounding white space or line ending."""
    try:
        with open(path, encoding="utf-8") as secret:
            password = secret.read().strip()
    except OSError as failure:
        raise ConfigError(f"{what}: cannot read {path}: {failure.strerror}")
    except UnicodeDecodeError:
        raise ConfigError(f"{what}: {path} is not UTF-8 text")
    if not password:
        raise ConfigError(f"{what}: {path} is empty")
    return password


def _realm_host(text: str) -> str:
    """A --trusted-realm value: a host name or address, no scheme or port."""
    host = text.strip().lower().rstrip(".").strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not re.fullmatch(r"[a-z0-9]([a-z0-9.\-]*[a-z0-9])?", host):
            raise ConfigError(f"--trusted-realm takes a host name, not {text[:100]!r}")
    return host


def _auth_user(user: str | None, password: str | None) -> Credentials | None:
    if (user is None) != (password is None):
        raise ConfigError("--auth-user and --auth-password go together")
    return Credentials(user, password) if user and password else None


def _auth_mode(
    given: str | None, user: Credentials | None, htpasswd: str | None, allow_users: str | None
) -> str:
    """
    The client authentication mode. Users (C{--auth-user}, also
    C{REGISTRY_USERNAME}; C{--htpasswd}; C{--allow-users}) without
    C{--auth} mean C{basic}, as the seed's C{REGISTRY_USERNAME} did: a
    mirror must never stay open while its operator believes it closed.
    Users that the chosen mode would ignore are an error.
    """
    mode = _choice(given, "--auth", AUTH_MODES) if given else None
    users = [
        name
        for name, value in (
            ("--auth-user", user),
            ("--htpasswd", htpasswd),
            ("--allow-users", allow_users),
        )
        if value
    ]
    if mode is None:
        mode = "basic" if users else "none"
    if mode == "none" and users:
        raise ConfigError(
            f"--auth none leaves the mirror open, yet {' and '.join(users)} given:"
            " use --auth basic or token, or drop them"
        )
    ignored = [name for name in users if name != "--allow-users"]
    if mode == "passthrough" and ignored:
        raise ConfigError(
            f"--auth passthrough checks credentials upstream and ignores {' and '.join(ignored)}:"
            " drop them (--allow-users does apply)"
        )
    if mode in ("basic", "token") and user is None and not htpasswd:
        raise ConfigError(f"--auth {mode} needs --auth-user and --auth-password, or --htpasswd")
    return mode


def _redirect_url(text: str | None) -> str | None:
    if text is None:
        return None
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc or any(c in text for c in "\r\n"):
        raise ConfigError("--url302 must be an http(s) URL")
    return text


def base_url(text: str, what: str) -> str:
    """Validate a registry base URL (``https://host[:port]``, nothing more)."""
    url = text.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{what} must be an http(s) URL, not {url[:200]!r}")
    if parts.path or parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(f"{what} must be a bare base URL like https://registry-1.docker.io")
    return url


def _items(options: Mapping[str, object], name: str) -> list[str]:
    value = options.get(name) or []
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    return [str(item) for item in value]  # type: ignore[attr-defined]


def _pair(item: str, what: str, parse_value: Callable[[str, str], T]) -> tuple[str, T]:
    host, separator, value = item.partition("=")
    host = host.strip().lower()
    if not separator or not host or not value:
        raise ConfigError(f"{what} takes HOST=VALUE, not {item.split('=')[0][:100]!r}...")
    return host, parse_value(value, what)


_REGISTRY_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:\d{1,5})?\Z")


def registry_url(text: str, what: str) -> tuple[str | None, str]:
    """
    C{[REGISTRY=]URL}: a base URL, and the registry it stands for if named
    (``docker.io=https://mirror.gcr.io`` is a mirror of Docker Hub).
    """
    text = text.strip()
    if "=" in text and not text.lower().startswith(("http://", "https://")):
        registry, _, url = text.partition("=")
        registry = registry.strip().lower()
        if not _REGISTRY_NAME.match(registry):
            raise ConfigError(f"{what}: {registry[:100]!r} is not a registry host name")
        return registry, base_url(url, what)
    return None, base_url(text, what)


def _mirror(item: str) -> tuple[str | None, str]:
    key, url = registry_url(item, "--mirror")
    return key, url


def _credentials_from_file(value: str, what: str) -> Credentials:
    user, separator, path = value.partition(":")
    if not separator or not user or not path:
        raise ConfigError(f"{what} takes HOST=USER:PASSWORD_FILE")
    return Credentials(user, _read_secret(path, what))


def _attach_mirrors(
    given: list[tuple[str | None, str]],
    upstream: str | None,
    routes: tuple[tuple[str, str], ...],
    stands_for: list[tuple[str, str]],
) -> tuple[tuple[str | None, str], ...]:
    """
    Each C{--mirror [KEY=]URL} with the C{--route} host it backs (L{None}
    for the default upstream). KEY is a route host, or a registry that the
    default upstream or a route stands for (``docker.io``).
    """
    route_hosts = {host for host, _ in routes}
    registries = dict(stands_for)
    owners: list[tuple[str | None, str]] = []
    if upstream is not None:
        owners.append((None, upstream))
    owners += list(routes)
    attached: list[tuple[str | None, str]] = []
    for key, url in given:
        if key is None or key in route_hosts:
            attached.append((key, url))
            continue
        for host, owner_url in owners:
            if key in registry_names(owner_url, registries.get(owner_url)):
                attached.append((host, url))
                break
        else:
            raise ConfigError(f"--mirror {key}=... names no --route host nor a registry served")
    return tuple(attached)


def _credentials_files(
    items: list[str], route_hosts: set[str]
) -> tuple[tuple[str | None, str], ...]:
    """C{[HOST=]FILE} items: at most one file per upstream."""
    files: list[tuple[str | None, str]] = []
    for item in items:
        host, separator, path = item.partition("=")
        key: str | None = None
        if separator and host.strip().lower() in route_hosts:
            key = host.strip().lower()
        elif separator and "/" not in host and "." in host:
            raise ConfigError(f"--upstream-credentials-file {host[:100]}=... names no --route host")
        else:
            path = item
        if not path.strip():
            raise ConfigError("--upstream-credentials-file needs a file name")
        if key in {k for k, _ in files}:
            raise ConfigError("--upstream-credentials-file: one file per upstream")
        files.append((key, path.strip()))
    return tuple(files)


@attrs.frozen
class RedisAddress:
    host: str
    port: int
    db: int
    password: str | None = attrs.field(default=None, repr=False)


def parse_redis_url(url: str) -> RedisAddress:
    """Parse C{redis://[:password@]host[:port][/db]}."""
    parts = urlsplit(url)
    # The URL may hold a password: never quote it back.
    if parts.scheme != "redis" or not parts.hostname:
        raise ConfigError("--redis must look like redis://[:password@]host:6379/0")
    try:
        port = parts.port if parts.port is not None else 6379
    except ValueError:
        raise ConfigError("--redis has an invalid port")
    if not 0 < port < 65536:
        raise ConfigError("--redis has an invalid port")
    db_text = parts.path.lstrip("/") or "0"
    if not db_text.isdigit():
        raise ConfigError(f"--redis database must be a number, not {db_text!r}")
    password = unquote(parts.password) if parts.password else None
    return RedisAddress(parts.hostname, port, int(db_text), password)


def _storage(
    value: str | None, endpoint: str | None, cache_dir: str | None
) -> tuple[S3Location | None, str | None]:
    """--storage and --s3-endpoint: the S3 location and endpoint, or (None, None) for file."""
    if value in (None, "file"):
        if endpoint is not None:
            raise ConfigError("--s3-endpoint needs --storage s3://BUCKET/PREFIX")
        return None, None
    from hammal.storage.s3 import S3Location  # botocore: only when S3 is asked for

    try:
        location = S3Location.parse(value)
    except ValueError:
        raise ConfigError(f"--storage must be file or s3://BUCKET/PREFIX, not {value!r}")
    if endpoint is None:
        raise ConfigError("--storage s3://... needs --s3-endpoint URL")
    if cache_dir is None:
        raise ConfigError("--storage s3://... needs a local cache directory (not --no-cache)")
    return location, base_url(endpoint, "--s3-endpoint")


def _cluster(
    advertise: str | None, key_file: str | None, redis_url: str | None, cache_dir: str | None
) -> tuple[str | None, str | None]:
    """--cluster-advertise and --cluster-key-file, checked together (the key is read now)."""
    if advertise is None:
        if key_file is not None:
            raise ConfigError("--cluster-key-file needs --cluster-advertise")
        return None, None
    url = base_url(advertise, "--cluster-advertise")
    if redis_url is None:
        raise ConfigError("--cluster-advertise needs --redis (where the fill leases live)")
    if cache_dir is None:
        raise ConfigError("--cluster-advertise needs a cache directory (not --no-cache)")
    if key_file is None:
        raise ConfigError("--cluster-advertise needs --cluster-key-file")
    try:
        load_cluster_key(key_file)
    except ClusterKeyError as failure:
        raise ConfigError(str(failure))
    return url, key_file


@attrs.frozen
class Settings:
    """Everything hammal runs with, validated."""

    port: str = DEFAULT_PORT
    tls: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    upstream: str | None = DEFAULT_UPSTREAM
    routes: tuple[tuple[str, str], ...] = ()
    #: (URL, registry) for each upstream given as ``REGISTRY=URL``.
    stands_for: tuple[tuple[str, str], ...] = ()
    route_credentials: tuple[tuple[str, Credentials], ...] = ()
    #: (route host or None for the default upstream, accounts file).
    credentials_files: tuple[tuple[str | None, str], ...] = ()
    mirrors: tuple[tuple[str | None, str], ...] = ()
    mirror_credentials: tuple[tuple[str, Credentials], ...] = ()
    trusted_realms: frozenset[str] = frozenset()
    plain_http_credentials: bool = False
    allow_upstream: frozenset[str] = frozenset()
    library_prefix: bool = True
    force_library_prefix: bool | None = None
    credentials: Credentials | None = None
    redis: RedisAddress | None = None
    #: --storage s3://...: the bucket and prefix (None: blobs in --cache-dir only).
    storage: S3Location | None = None
    s3_endpoint: str | None = None
    cluster_advertise: str | None = None
    cluster_key_file: str | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    #: Bytes per second a blob body must bring per read-timeout window (0: off).
    upstream_min_rate: int = DEFAULT_MIN_RATE
    upstream_deadline: float = 120.0
    retries: int = 3
    retry_backoff: float = 0.5
    blob_redirect: str = "follow"
    log_format: str = "text"
    buffer_size: int = 256 * 1024
    max_upstream_connections: int = 64
    cache_dir: str | None = "var/cache"
    cache_max_size: int | None = None
    cache_min_free: FreeSpaceFloor = FreeSpaceFloor()
    manifest_ttl: float = 300.0
    stale_if_error: float = 86400.0
    negative_ttl: float = 30.0
    metrics_port: str | None = None
    auth: str = "none"
    auth_user: Credentials | None = None
    htpasswd: str | None = None
    allow_users: str | None = None
    token_key_file: str | None = None
    token_lifetime: float = 300.0
    rules: dict[str, tuple[str, ...]] = attrs.field(factory=dict)
    forwarded_header: str = "x-forwarded"
    region_header: str | None = None
    upstream_ca: str | None = None
    proxies: ProxyRules = ProxyRules()
    url302: str | None = None
    drain_timeout: float = 30.0
    max_connections: int | None = 10000
    idle_timeout: float = 300.0
    max_headers: int = 100
    max_header_bytes: int = 16384
    ready_window: float = 60.0
    workers: int = 1
    debug: bool = False
    status_show_clients: bool = False
    status_show_repositories: bool = False
    #: Cold blobs: send the last chunk before the digest matched (--no-hold-tail).
    no_hold_tail: bool = False

    @property
    def status_repositories_shown(self) -> bool:
        """
        Whether /status names repositories: unless --auth passthrough, where
        each tenant's repositories are its own, without
        --status-show-repositories.
        """
        return self.status_show_repositories or self.auth != "passthrough"

    def registry_for(self, url: str) -> str | None:
        """The registry C{url} was configured to stand for, if any."""
        return dict(self.stands_for).get(url)

    def library_prefix_for(self, url: str) -> bool:
        """Whether names get ``library/`` at the upstream C{url}."""
        if self.force_library_prefix is not None:
            return self.force_library_prefix
        registry = self.registry_for(url)
        if registry is not None:
            return is_docker_hub(registry.rsplit(":", 1)[0])
        return is_docker_hub(urlsplit(url).hostname or "")

    @classmethod
    def from_options(
        cls, options: Mapping[str, object], environ: Mapping[str, str] | None = None
    ) -> Settings:
        """
        Validate parsed options (after env fallbacks were applied);
        C{environ} holds the proxy variables (C{HTTPS_PROXY}, ...).

        @raise ConfigError: with a one-line explanation.
        """

        def text(name: str) -> str | None:
            value = options.get(name)
            return None if value in (None, "") else str(value)

        stands_for: list[tuple[str, str]] = []
        routes_given = [_pair(item, "--route", registry_url) for item in _items(options, "route")]
        routes = tuple((host, url) for host, (_, url) in routes_given)
        stands_for += [(url, registry) for _, (registry, url) in routes_given if registry]
        given = text("upstream")
        upstream: str | None = None
        if given:
            upstream_registry, upstream = registry_url(given, "--upstream")
            if upstream_registry:
                stands_for.insert(0, (upstream, upstream_registry))
        elif not routes:
            upstream = DEFAULT_UPSTREAM
        mirrors = _attach_mirrors(
            [_mirror(item) for item in _items(options, "mirror")], upstream, routes, stands_for
        )
        route_hosts = {host for host, _ in routes}
        route_credentials = tuple(
            _pair(item, "--route-credentials", _credentials_from_file)
            for item in _items(options, "route-credentials")
        )
        for host, _ in route_credentials:
            if host not in route_hosts:
                raise ConfigError(f"--route-credentials {host}=... names no --route host")
        mirror_hosts = {urlsplit(url).netloc.lower() for _, url in mirrors}
        mirror_credentials = tuple(
            _pair(item, "--mirror-credentials", _credentials_from_file)
            for item in _items(options, "mirror-credentials")
        )
        for host, _ in mirror_credentials:
            if host not in mirror_hosts:
                raise ConfigError(f"--mirror-credentials {host}=... names no --mirror host[:port]")
        trusted_realms = frozenset(_realm_host(item) for item in _items(options, "trusted-realm"))
        credentials_files = _credentials_files(
            _items(options, "upstream-credentials-file"), route_hosts
        )
        allow_upstream = frozenset(
            item.strip().lower() for item in _items(options, "allow-upstream")
        )
        if options.get("library-prefix") and options.get("no-library-prefix"):
            raise ConfigError("--library-prefix and --no-library-prefix exclude each other")
        forced: bool | None = None
        if options.get("library-prefix"):
            forced = True
        elif options.get("no-library-prefix"):
            forced = False
        first = upstream or routes[0][1]
        registry = dict(stands_for).get(first) or urlsplit(first).hostname or ""
        library_prefix = forced if forced is not None else is_docker_hub(registry.rsplit(":", 1)[0])

        username = text("upstream-username")
        password = _secret(
            text("upstream-password"), text("upstream-password-file"), "--upstream-password"
        )
        if (username is None) != (password is None):
            raise ConfigError("--upstream-username and --upstream-password go together")
        credentials = Credentials(username, password) if username and password else None
        for owner, _ in credentials_files:
            if owner is None and upstream is None:
                raise ConfigError(
                    "--upstream-credentials-file FILE needs --upstream (or HOST=FILE)"
                )
            if owner is None and credentials is not None:
                raise ConfigError(
                    "--upstream-credentials-file and --upstream-username exclude each other"
                )
            if owner is not None and owner in dict(route_credentials):
                raise ConfigError(
                    f"--upstream-credentials-file {owner}=... and --route-credentials"
                    f" {owner}=... exclude each other"
                )

        tls = bool(options.get("tls"))
        tls_cert, tls_key = text("tls-cert"), text("tls-key")
        if bool(tls_cert) != bool(tls_key):
            raise ConfigError("--tls-cert and --tls-key go together")

        blob_redirect = text("blob-redirect") or "follow"
        if blob_redirect not in ("follow", "pass"):
            raise ConfigError(f"--blob-redirect must be follow or pass, not {blob_redirect!r}")
        log_format = text("log-format") or "text"
        if log_format not in ("text", "json"):
            raise ConfigError(f"--log-format must be text or json, not {log_format!r}")
        buffer_size = parse_size(text("buffer-size") or "256K", "--buffer-size")
        if not 4096 <= buffer_size <= 64 * 1024**2:
            raise ConfigError("--buffer-size must be between 4K and 64M")
        auth_user = _auth_user(
            text("auth-user"),
            _secret(text("auth-password"), text("auth-password-file"), "--auth-password"),
        )
        auth = _auth_mode(text("auth"), auth_user, text("htpasswd"), text("allow-users"))
        redis_url = text("redis")
        cache_dir = None if options.get("no-cache") else (text("cache-dir") or "var/cache")
        max_size_text = text("cache-max-size")
        try:
            proxies = ProxyRules.from_environment(environ or {}, text("upstream-proxy"))
        except ValueError as failure:
            raise ConfigError(str(failure))
        cache_max_size = parse_size(max_size_text, "--cache-max-size") if max_size_text else None
        cache_min_free = parse_free_space(text("cache-min-free"))
        storage, s3_endpoint = _storage(text("storage"), text("s3-endpoint"), cache_dir)
        cluster_advertise, cluster_key_file = _cluster(
            text("cluster-advertise"), text("cluster-key-file"), redis_url, cache_dir
        )

        return cls(
            port=port_description(text("port") or DEFAULT_PORT),
            tls=tls,
            tls_cert=tls_cert,
            tls_key=tls_key,
            upstream=upstream,
            routes=routes,
            stands_for=tuple(stands_for),
            route_credentials=route_credentials,
            credentials_files=credentials_files,
            mirrors=mirrors,
            mirror_credentials=mirror_credentials,
            trusted_realms=trusted_realms,
            plain_http_credentials=bool(options.get("plain-http-credentials")),
            allow_upstream=allow_upstream,
            library_prefix=library_prefix,
            force_library_prefix=forced,
            credentials=credentials,
            redis=parse_redis_url(redis_url) if redis_url else None,
            storage=storage,
            s3_endpoint=s3_endpoint,
            cluster_advertise=cluster_advertise,
            cluster_key_file=cluster_key_file,
            connect_timeout=_number(text("connect-timeout") or "10", "--connect-timeout", 0.001),
            read_timeout=_number(text("read-timeout") or "30", "--read-timeout", 0.001),
            upstream_min_rate=_min_rate(text("upstream-min-rate") or str(DEFAULT_MIN_RATE)),
            upstream_deadline=_number(
                text("upstream-deadline") or "120", "--upstream-deadline", 0.001
            ),
            retries=int(_number(text("retries") or "3", "--retries", 0, integer=True)),
            retry_backoff=_number(text("retry-backoff") or "0.5", "--retry-backoff", 0),
            blob_redirect=blob_redirect,
            log_format=log_format,
            buffer_size=buffer_size,
            cache_dir=cache_dir,
            manifest_ttl=_number(text("manifest-ttl") or "300", "--manifest-ttl", 0),
            stale_if_error=_number(text("stale-if-error") or "86400", "--stale-if-error", 0),
            negative_ttl=_number(text("negative-ttl") or "30", "--negative-ttl", 0),
            auth=auth,
            auth_user=auth_user,
            htpasswd=text("htpasswd"),
            allow_users=text("allow-users"),
            token_key_file=text("token-key-file"),
            token_lifetime=_number(text("token-lifetime") or "300", "--token-lifetime", 1),
            rules={
                name: tuple(_items(options, name)) for name in RULE_LISTS if _items(options, name)
            },
            forwarded_header=_choice(
                text("forwarded-header") or "x-forwarded", "--forwarded-header", FORWARDED_HEADERS
            ),
            region_header=text("region-header"),
            upstream_ca=text("upstream-ca"),
            proxies=proxies,
            url302=_redirect_url(text("url302")),
            metrics_port=port_description(text("metrics-port") or "")
            if text("metrics-port")
            else None,
            drain_timeout=_number(text("drain-timeout") or "30", "--drain-timeout", 0),
            max_connections=int(
                _number(text("max-connections") or "10000", "--max-connections", 0, integer=True)
            )
            or None,
            idle_timeout=_number(text("idle-timeout") or "300", "--idle-timeout", 1),
            max_headers=int(
                _number(text("max-headers") or "100", "--max-headers", 10, integer=True)
            ),
            max_header_bytes=int(
                _number(
                    text("max-header-bytes") or "16384", "--max-header-bytes", 1024, integer=True
                )
            ),
            ready_window=_number(text("ready-window") or "60", "--ready-window", 1),
            workers=parse_workers(text("workers") or "1"),
            debug=bool(options.get("debug")),
            status_show_clients=bool(options.get("status-show-clients")),
            status_show_repositories=bool(options.get("status-show-repositories")),
            no_hold_tail=bool(options.get("no-hold-tail")),
            cache_max_size=cache_max_size,
            cache_min_free=cache_min_free,
            max_upstream_connections=int(
                _number(
                    text("max-upstream-connections") or "64",
                    "--max-upstream-connections",
                    1,
                    integer=True,
                )
            ),
        )


def parse_workers(text: str) -> int:
    """C{--workers}: a count of at least 1, or C{auto} for one per usable core."""
    if text.strip().lower() == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            return max(1, os.cpu_count() or 1)
    return int(_number(text, "--workers", 1, integer=True))
