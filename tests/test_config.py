"""
Tests for L{hammal.config} and the twistd plugin's L{hammal.tap.Options}:
environment fallbacks, command-line precedence and validation.
"""

from __future__ import annotations

import io
import json
import sys
from typing import Any, Mapping, Sequence

from twisted.logger import LogLevel
from twisted.python.reflect import namedAny
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from hammal.config import (
    DEFAULT_PORT,
    DEFAULT_UPSTREAM,
    FLAGS,
    PARAMETERS,
    ConfigError,
    RedisAddress,
    Settings,
    env_flag,
    parse_redis_url,
    parse_size,
    port_description,
)
from hammal.tap import Options
from hammal.upstream.auth import Credentials


def parse(argv: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> Options:
    """Options parsed from C{argv} in the explicit environment C{environ}."""
    options = Options(environ={} if environ is None else environ)
    options.parseOptions(list(argv))
    return options


def settings(argv: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> Settings:
    """The validated L{Settings} for C{argv} and C{environ}."""
    result = parse(argv, environ).settings
    assert result is not None
    return result


class RawOptions(Options):
    """L{Options} without validation, to see raw option precedence."""

    def postOptions(self) -> None:
        pass


def flag_env(name: str) -> str:
    return "HAMMAL_" + name.upper().replace("-", "_")


#: A full, valid, non-default environment and the settings it gives.
FULL_ENVIRONMENT = {
    "HAMMAL_PORT": "8080",
    "HAMMAL_TLS": "yes",
    "HAMMAL_TLS_CERT": "/etc/hammal/cert.pem",
    "HAMMAL_TLS_KEY": "/etc/hammal/key.pem",
    "HAMMAL_UPSTREAM": "https://ghcr.io",
    "HAMMAL_LIBRARY_PREFIX": "on",
    "HAMMAL_UPSTREAM_USERNAME": "alice",
    "HAMMAL_UPSTREAM_PASSWORD": "s3cret",
    "HAMMAL_REDIS": "redis://cache.internal:6380/2",
    "HAMMAL_CONNECT_TIMEOUT": "2.5",
    "HAMMAL_READ_TIMEOUT": "12",
    "HAMMAL_RETRIES": "5",
    "HAMMAL_RETRY_BACKOFF": "0.25",
    "HAMMAL_BLOB_REDIRECT": "pass",
    "HAMMAL_LOG_FORMAT": "json",
    "HAMMAL_BUFFER_SIZE": "1M",
    "HAMMAL_MAX_UPSTREAM_CONNECTIONS": "8",
}
FULL_SETTINGS = Settings(
    port="tcp:8080",
    tls=True,
    tls_cert="/etc/hammal/cert.pem",
    tls_key="/etc/hammal/key.pem",
    upstream="https://ghcr.io",
    library_prefix=True,
    force_library_prefix=True,
    credentials=Credentials("alice", "s3cret"),
    redis=RedisAddress("cache.internal", 6380, 2),
    connect_timeout=2.5,
    read_timeout=12.0,
    retries=5,
    retry_backoff=0.25,
    blob_redirect="pass",
    log_format="json",
    buffer_size=1024**2,
    max_upstream_connections=8,
)


class DefaultsTests(SynchronousTestCase):
    """With nothing set, hammal mirrors Docker Hub on localhost:5000."""

    def test_defaults(self) -> None:
        self.assertEqual(settings(), Settings())
        self.assertEqual(Settings().port, DEFAULT_PORT)
        self.assertEqual(Settings().upstream, DEFAULT_UPSTREAM)

    def test_explicit_environment_used(self) -> None:
        """An explicit C{environ} is the only environment consulted."""
        given = {"HAMMAL_RETRIES": "7"}
        options = Options(environ=given)
        self.assertIs(options._environ, given)
        self.assertEqual(options["retries"], "7")
        self.assertIsNone(options["upstream"])
        self.assertEqual(Settings.from_options(options).upstream, DEFAULT_UPSTREAM)


class EnvironmentTests(SynchronousTestCase):
    """Every option falls back to C{HAMMAL_<NAME>}; the command line wins."""

    def test_every_parameter_has_env(self) -> None:
        for spec in PARAMETERS:
            self.assertEqual(spec.env, "HAMMAL_" + spec.name.upper().replace("-", "_"))
            for variable in (spec.env, *spec.extra_env):
                options = RawOptions(environ={variable: "from-env"})
                options.parseOptions([])
                self.assertEqual(options[spec.name], "from-env", variable)

    def test_command_line_wins_for_every_parameter(self) -> None:
        for spec in PARAMETERS:
            environ = {variable: "from-env" for variable in (spec.env, *spec.extra_env)}
            options = RawOptions(environ=environ)
            options.parseOptions([f"--{spec.name}", "from-cli"])
            self.assertEqual(options[spec.name], "from-cli", spec.name)

    def test_every_flag_has_env(self) -> None:
        for name, _ in FLAGS:
            options = RawOptions(environ={flag_env(name): "true"})
            options.parseOptions([])
            self.assertTrue(options[name], name)
            options = RawOptions(environ={flag_env(name): "false"})
            options.parseOptions([])
            self.assertFalse(options[name], name)

    def test_help_names_env(self) -> None:
        helps = {row[0]: row[3] for row in Options.optParameters}
        for spec in PARAMETERS:
            for variable in (spec.env, *spec.extra_env):
                self.assertIn(variable, helps[spec.name])
        flag_helps = {row[0]: row[2] for row in Options.optFlags}
        for name, _ in FLAGS:
            self.assertIn(flag_env(name), flag_helps[name])

    def test_full_environment(self) -> None:
        self.assertEqual(settings(environ=FULL_ENVIRONMENT), FULL_SETTINGS)

    def test_full_command_line_over_environment(self) -> None:
        argv = [
            "--port", "tcp:9090:interface=::1",
            "--tls-cert", "/c2.pem",
            "--tls-key", "/k2.pem",
            "--upstream", "http://registry.test:5000/",
            "--upstream-username", "bob",
            "--upstream-password", "hunter2",
            "--redis", "redis://:pw@other",
            "--connect-timeout", "1",
            "--read-timeout", "2",
            "--retries", "0",
            "--retry-backoff", "0",
            "--blob-redirect", "follow",
            "--log-format", "text",
            "--buffer-size", "64K",
            "--max-upstream-connections", "1",
        ]  # fmt: skip
        self.assertEqual(
            settings(argv, FULL_ENVIRONMENT),
            Settings(
                port="tcp:9090:interface=::1",
                tls=True,
                tls_cert="/c2.pem",
                tls_key="/k2.pem",
                upstream="http://registry.test:5000",
                library_prefix=True,
                force_library_prefix=True,
                credentials=Credentials("bob", "hunter2"),
                redis=RedisAddress("other", 6379, 0, "pw"),
                connect_timeout=1.0,
                read_timeout=2.0,
                retries=0,
                retry_backoff=0.0,
                blob_redirect="follow",
                log_format="text",
                buffer_size=64 * 1024,
                max_upstream_connections=1,
            ),
        )

    def test_empty_env_ignored(self) -> None:
        """An empty variable (C{FOO=} in a compose file) means unset."""
        self.assertEqual(
            settings(environ={"HAMMAL_PORT": "", "HAMMAL_UPSTREAM": "", "HAMMAL_TLS": ""}),
            Settings(),
        )

    def test_docker_credentials(self) -> None:
        result = settings(environ={"DOCKER_USERNAME": "carol", "DOCKER_PASSWORD": "pat-1"})
        self.assertEqual(result.credentials, Credentials("carol", "pat-1"))

    def test_hammal_credentials_over_docker(self) -> None:
        environ = {
            "DOCKER_USERNAME": "carol",
            "DOCKER_PASSWORD": "pat-1",
            "HAMMAL_UPSTREAM_USERNAME": "alice",
            "HAMMAL_UPSTREAM_PASSWORD": "s3cret",
        }
        self.assertEqual(settings(environ=environ).credentials, Credentials("alice", "s3cret"))

    def test_command_line_credentials_over_docker(self) -> None:
        environ = {"DOCKER_USERNAME": "carol", "DOCKER_PASSWORD": "pat-1"}
        argv = ["--upstream-username", "dave", "--upstream-password", "pw"]
        self.assertEqual(settings(argv, environ).credentials, Credentials("dave", "pw"))

    def test_no_credentials(self) -> None:
        self.assertIsNone(settings().credentials)

    def _secret_file(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_upstream_password_file(self) -> None:
        """The password can come from a file (command lines show in ps)."""
        path = self._secret_file("pat-from-file\n")
        argv = ["--upstream-username", "dave", "--upstream-password-file", path]
        self.assertEqual(settings(argv).credentials, Credentials("dave", "pat-from-file"))
        environ = {"HAMMAL_UPSTREAM_USERNAME": "dave", "HAMMAL_UPSTREAM_PASSWORD_FILE": path}
        self.assertEqual(
            settings(environ=environ).credentials, Credentials("dave", "pat-from-file")
        )

    def test_auth_password_file(self) -> None:
        path = self._secret_file("hunter2\n")
        argv = ["--auth", "basic", "--auth-user", "ops", "--auth-password-file", path]
        self.assertEqual(settings(argv).auth_user, Credentials("ops", "hunter2"))

    def test_password_file_problems(self) -> None:
        """Both forms, a missing or empty file: one-line errors that never quote a secret."""
        path = self._secret_file("from-file")
        empty = self._secret_file("\n")
        for argv, message in (
            (
                [
                    "--upstream-username",
                    "u",
                    "--upstream-password",
                    "inline",
                    "--upstream-password-file",
                    path,
                ],
                "not both",
            ),
            (
                ["--upstream-username", "u", "--upstream-password-file", "/nonexistent/pw"],
                "cannot read",
            ),
            (["--upstream-username", "u", "--upstream-password-file", empty], "is empty"),
            (["--upstream-password-file", path], "go together"),
            (
                ["--auth-user", "u", "--auth-password", "inline", "--auth-password-file", path],
                "not both",
            ),
        ):
            with self.assertRaises(UsageError) as raised:
                parse(argv)
            self.assertIn(message, str(raised.exception))
            self.assertNotIn("from-file", str(raised.exception))
            self.assertNotIn("inline", str(raised.exception))

    def test_flag_values(self) -> None:
        for value in ("1", "true", "TRUE", " yes ", "On"):
            self.assertIs(env_flag({"X": value}, "X"), True, value)
        for value in ("0", "false", "No", "off", ""):
            self.assertIs(env_flag({"X": value}, "X"), False, value)
        self.assertIsNone(env_flag({}, "X"))
        error = self.assertRaises(ConfigError, env_flag, {"X": "maybe"}, "X")
        self.assertIn("X", str(error))

    def test_bad_env_flag_is_usage_error(self) -> None:
        options = Options(environ={"HAMMAL_TLS": "maybe"})
        error = self.assertRaises(UsageError, options.parseOptions, [])
        self.assertIn("HAMMAL_TLS", str(error))
        self.assertNotIn("\n", str(error))

    def test_env_library_prefix_overridden_on_command_line(self) -> None:
        """C{--no-library-prefix} beats C{HAMMAL_LIBRARY_PREFIX=true}."""
        result = settings(["--no-library-prefix"], {"HAMMAL_LIBRARY_PREFIX": "true"})
        self.assertFalse(result.library_prefix)

    def test_env_no_library_prefix_overridden_on_command_line(self) -> None:
        result = settings(
            ["--library-prefix"],
            {"HAMMAL_NO_LIBRARY_PREFIX": "1", "HAMMAL_UPSTREAM": "https://ghcr.io"},
        )
        self.assertTrue(result.library_prefix)


class LibraryPrefixTests(SynchronousTestCase):
    """C{library/} rewriting is on by default for Docker Hub only."""

    def test_docker_hub_default_on(self) -> None:
        for upstream in (
            "https://registry-1.docker.io",
            "https://index.docker.io/",
            "https://REGISTRY-1.DOCKER.IO",
            "https://docker.io:443",
        ):
            self.assertTrue(settings(["--upstream", upstream]).library_prefix, upstream)

    def test_other_default_off(self) -> None:
        for upstream in ("https://ghcr.io", "http://localhost:5000", "https://docker.io.evil.test"):
            self.assertFalse(settings(["--upstream", upstream]).library_prefix, upstream)

    def test_forced(self) -> None:
        self.assertTrue(
            settings(["--upstream", "https://ghcr.io", "--library-prefix"]).library_prefix
        )
        self.assertFalse(settings(["--no-library-prefix"]).library_prefix)
        self.assertFalse(settings(environ={"HAMMAL_NO_LIBRARY_PREFIX": "true"}).library_prefix)

    def test_both_last_wins(self) -> None:
        """Given both flags, the last one on the command line counts."""
        self.assertFalse(settings(["--library-prefix", "--no-library-prefix"]).library_prefix)
        self.assertTrue(settings(["--no-library-prefix", "--library-prefix"]).library_prefix)


class PortTests(SynchronousTestCase):
    """A port number becomes C{tcp:N}; endpoint strings pass through."""

    def test_number(self) -> None:
        self.assertEqual(settings(["--port", "8080"]).port, "tcp:8080")
        self.assertEqual(settings(environ={"HAMMAL_PORT": "5001"}).port, "tcp:5001")
        self.assertEqual(port_description(" 443 "), "tcp:443")
        self.assertEqual(port_description("1"), "tcp:1")
        self.assertEqual(port_description("65535"), "tcp:65535")

    def test_endpoint(self) -> None:
        for endpoint in (
            "tcp:5000:interface=127.0.0.1",
            "unix:/run/hammal.sock",
            "systemd:domain=INET:index=0",
        ):
            self.assertEqual(settings(["--port", endpoint]).port, endpoint)

    def test_out_of_range(self) -> None:
        for port in ("0", "65536", "99999"):
            error = self.assertRaises(UsageError, parse, ["--port", port])
            self.assertIn(port, str(error))


class ValidationTests(SynchronousTestCase):
    """Invalid values raise L{UsageError} with a one-line message."""

    def assertUsageError(
        self, argv: Sequence[str], mentions: str, environ: Mapping[str, str] | None = None
    ) -> UsageError:
        error = self.assertRaises(UsageError, parse, argv, environ)
        message = str(error)
        self.assertNotIn("\n", message)
        self.assertIn(mentions, message)
        self.assertLess(len(message), 200)
        return error

    def test_invalid_values(self) -> None:
        cases: list[tuple[list[str], str]] = [
            (["--upstream", "ftp://registry.test"], "--upstream"),
            (["--upstream", "registry.test"], "--upstream"),
            (["--upstream", "https://"], "--upstream"),
            (["--upstream", "https://registry.test/v2"], "--upstream"),
            (["--upstream", "https://registry.test?x=1"], "--upstream"),
            (["--upstream", "https://user@registry.test"], "--upstream"),
            (["--retries", "-1"], "--retries"),
            (["--retries", "1.5"], "--retries"),
            (["--retries", "many"], "--retries"),
            (["--connect-timeout", "0"], "--connect-timeout"),
            (["--connect-timeout", "soon"], "--connect-timeout"),
            (["--read-timeout", "-1"], "--read-timeout"),
            (["--retry-backoff", "-0.5"], "--retry-backoff"),
            (["--max-upstream-connections", "0"], "--max-upstream-connections"),
            (["--max-upstream-connections", "2.5"], "--max-upstream-connections"),
            (["--blob-redirect", "bounce"], "--blob-redirect"),
            (["--log-format", "xml"], "--log-format"),
            (["--buffer-size", "lots"], "--buffer-size"),
            (["--buffer-size", "4095"], "--buffer-size"),
            (["--buffer-size", "65M"], "--buffer-size"),
            (["--buffer-size", "1G"], "--buffer-size"),
            (["--redis", "http://cache"], "--redis"),
            (["--redis", "redis://"], "--redis"),
            (["--redis", "redis://cache:port"], "--redis"),
            (["--redis", "redis://cache/zero"], "--redis"),
            (["--tls", "--tls-cert", "/c.pem"], "--tls-key"),
            (["--upstream-username", "alice"], "--upstream-password"),
            (["--upstream-password", "s3cret"], "--upstream-username"),
        ]
        for argv, mentions in cases:
            self.assertUsageError(argv, mentions)

    def test_invalid_environment_value(self) -> None:
        self.assertUsageError([], "--retries", {"HAMMAL_RETRIES": "-3"})
        self.assertUsageError([], "--upstream-password", {"DOCKER_USERNAME": "carol"})

    def test_command_line_fixes_environment(self) -> None:
        self.assertEqual(settings(["--retries", "2"], {"HAMMAL_RETRIES": "-3"}).retries, 2)

    def test_limits_accepted(self) -> None:
        result = settings(
            [
                "--retries",
                "0",
                "--retry-backoff",
                "0",
                "--buffer-size",
                "4K",
                "--connect-timeout",
                "0.001",
            ]
        )
        self.assertEqual((result.retries, result.retry_backoff, result.buffer_size), (0, 0.0, 4096))
        self.assertEqual(settings(["--buffer-size", "64M"]).buffer_size, 64 * 1024**2)

    def test_not_a_number(self) -> None:
        """C{nan} is not a timeout, a backoff or a count."""
        for option in ("--connect-timeout", "--read-timeout", "--retry-backoff"):
            self.assertUsageError([option, "nan"], option)

    def test_redis_password_not_echoed(self) -> None:
        """A rejected C{--redis} URL does not put its password in the message."""
        for url in ("rediss://:hunter2@cache", "redis://:hunter2@cache:port"):
            error = self.assertRaises(UsageError, parse, ["--redis", url])
            self.assertNotIn("hunter2", str(error))


class LogFormatTests(SynchronousTestCase):
    """The options install hammal's log observer on twistd's options."""

    def observe(self, args: list[str], environ: dict[str, str] | None = None) -> str:
        """Parse C{args}, build the observer, send it two events, return what it wrote."""
        options = Options(environ=environ or {})
        parent: dict[str, Any] = {}
        options.parent = parent  # type: ignore[assignment]
        options.parseOptions(args)
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        observer = namedAny(parent["logger"])()
        for level in (LogLevel.debug, LogLevel.info):
            observer(
                {
                    "log_level": level,
                    "log_format": "event {n}",
                    "log_namespace": "test",
                    "log_time": 0.0,
                    "n": level.name,
                }
            )
        return out.getvalue()

    def test_json(self) -> None:
        lines = self.observe(["--log-format", "json"]).strip().splitlines()
        self.assertEqual(len(lines), 1)
        self.assertEqual(json.loads(lines[0].strip("\x1e"))["n"], "info")

    def test_json_from_environment(self) -> None:
        output = self.observe([], {"HAMMAL_LOG_FORMAT": "json"})
        self.assertIn('"n": "info"', output)

    def test_text_filters_debug(self) -> None:
        output = self.observe([])
        self.assertIn("event info", output)
        self.assertNotIn("event debug", output)

    def test_debug_shows_debug(self) -> None:
        output = self.observe(["--debug"])
        self.assertIn("event debug", output)
        self.assertIn("event info", output)

    def test_access_lines_written_as_built(self) -> None:
        options = Options(environ={})
        parent: dict[str, Any] = {}
        options.parent = parent  # type: ignore[assignment]
        options.parseOptions([])
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        observer = namedAny(parent["logger"])()
        observer(
            {
                "log_level": LogLevel.info,
                "log_format": "{access}",
                "log_namespace": "hammal.access",
                "log_time": 0.0,
                "access": '127.0.0.1 "GET /v2/" 200 2 0.1ms {not a field}',
            }
        )
        line = out.getvalue()
        self.assertTrue(
            line.endswith('[hammal.access#info] 127.0.0.1 "GET /v2/" 200 2 0.1ms {not a field}\n')
        )
        self.assertTrue(line.startswith("19"), line)

    def test_json_without_parent(self) -> None:
        self.assertEqual(settings(["--log-format", "json"]).log_format, "json")


class CacheOptionsTests(SynchronousTestCase):
    """The on-disk cache's directory, size bound and off switch."""

    def test_defaults(self) -> None:
        result = settings()
        self.assertEqual((result.cache_dir, result.cache_max_size), ("var/cache", None))

    def test_set(self) -> None:
        result = settings(["--cache-dir", "/srv/hammal"], {"HAMMAL_CACHE_MAX_SIZE": "50G"})
        self.assertEqual((result.cache_dir, result.cache_max_size), ("/srv/hammal", 50 * 1024**3))

    def test_no_cache(self) -> None:
        self.assertIsNone(settings(["--no-cache"]).cache_dir)
        self.assertIsNone(settings(environ={"HAMMAL_NO_CACHE": "yes"}).cache_dir)

    def test_min_free(self) -> None:
        """--cache-min-free takes a size or a share of the disk; default 2G or 5%."""
        default = settings().cache_min_free
        self.assertEqual(default.bytes_for(10 * 1024**3), 512 * 1024**2)
        self.assertEqual(default.bytes_for(1024**4), 2 * 1024**3)
        sized = settings(["--cache-min-free", "10G"]).cache_min_free
        self.assertEqual(sized.bytes_for(1024**4), 10 * 1024**3)
        share = settings(environ={"HAMMAL_CACHE_MIN_FREE": "10%"}).cache_min_free
        self.assertEqual(share.bytes_for(1000), 100)
        for bad in ("lots", "100%", "-1%"):
            error = self.assertRaises(UsageError, parse, ["--cache-min-free", bad])
            self.assertIn("--cache-min-free", str(error))

    def test_invalid_max_size(self) -> None:
        error = self.assertRaises(UsageError, parse, ["--cache-max-size", "lots"])
        self.assertIn("--cache-max-size", str(error))
        self.assertNotIn("\n", str(error))


class ParseSizeTests(SynchronousTestCase):
    """L{parse_size} reads byte counts with optional K/M/G units."""

    def test_sizes(self) -> None:
        for text, expected in (
            ("4096", 4096),
            ("64K", 65536),
            ("64k", 65536),
            ("256KB", 262144),
            ("1M", 1048576),
            ("1MiB", 1048576),
            ("1mb", 1048576),
            (" 2 M ", 2 * 1048576),
            ("1G", 1024**3),
            ("2T", 2 * 1024**4),
        ):
            self.assertEqual(parse_size(text, "--x"), expected, text)

    def test_invalid(self) -> None:
        for text in ("", "K", "1P", "1.5M", "-1K", "1 K B x", "ten"):
            error = self.assertRaises(ConfigError, parse_size, text, "--buffer-size")
            self.assertIn("--buffer-size", str(error))


class RedisUrlTests(SynchronousTestCase):
    """L{parse_redis_url} reads C{redis://[:password@]host[:port][/db]}."""

    def test_defaults(self) -> None:
        self.assertEqual(parse_redis_url("redis://cache"), RedisAddress("cache", 6379, 0, None))

    def test_full(self) -> None:
        address = parse_redis_url("redis://:p%40ss%3Aword@cache.internal:6380/3")
        self.assertEqual(address, RedisAddress("cache.internal", 6380, 3, "p@ss:word"))

    def test_password_not_in_repr(self) -> None:
        address = parse_redis_url("redis://:hunter2@cache")
        self.assertNotIn("hunter2", repr(address))
        self.assertNotIn("s3cret", repr(FULL_SETTINGS))

    def test_invalid(self) -> None:
        for url in (
            "cache:6379",
            "rediss://cache",
            "redis:///0",
            "redis://cache:99999",
            "redis://cache/-1",
        ):
            self.assertRaises(ConfigError, parse_redis_url, url)


class BacklogTests(SynchronousTestCase):
    """TCP listeners get a deep accept queue unless the operator set one."""

    def test_backlog_added(self) -> None:
        from hammal.tap import with_backlog

        self.assertEqual(with_backlog("tcp:5000"), "tcp:5000:backlog=1024")
        self.assertEqual(
            with_backlog("tcp:5000:interface=127.0.0.1"),
            "tcp:5000:interface=127.0.0.1:backlog=1024",
        )
        self.assertEqual(with_backlog("tcp:5000:backlog=10"), "tcp:5000:backlog=10")
        self.assertEqual(with_backlog("unix:/run/hammal.sock"), "unix:/run/hammal.sock")


class ClusterOptionTests(SynchronousTestCase):
    """--storage, --s3-endpoint, --cluster-advertise and --cluster-key-file."""

    def key_file(self, content: bytes = b"k" * 40) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(content)
        return path

    def test_defaults(self) -> None:
        """Without the options, blobs live in --cache-dir and no cluster is formed."""
        result = settings()
        self.assertIsNone(result.storage)
        self.assertIsNone(result.cluster_advertise)

    def test_from_environment(self) -> None:
        """The HAMMAL_* variables deploy/cluster uses configure a cluster node."""
        key = self.key_file()
        result = settings(
            environ={
                "HAMMAL_STORAGE": "s3://hammal-blobs/mirror",
                "HAMMAL_S3_ENDPOINT": "http://seaweedfs:8333",
                "HAMMAL_REDIS": "redis://redis:6379/0",
                "HAMMAL_CLUSTER_ADVERTISE": "http://10.0.3.7:5000",
                "HAMMAL_CLUSTER_KEY_FILE": key,
            }
        )
        assert result.storage is not None
        self.assertEqual(
            (result.storage.bucket, result.storage.prefix), ("hammal-blobs", "mirror/")
        )
        self.assertEqual(result.s3_endpoint, "http://seaweedfs:8333")
        self.assertEqual(result.cluster_advertise, "http://10.0.3.7:5000")
        self.assertEqual(result.cluster_key_file, key)

    def test_invalid(self) -> None:
        """Each unusable combination is a one-line usage error naming the option."""
        short = self.key_file(b"short")
        cases = [
            (["--storage", "ftp://x"], "--storage must be file or s3"),
            (["--storage", "s3://bucket"], "needs --s3-endpoint"),
            (["--s3-endpoint", "http://s3:9000"], "--s3-endpoint needs --storage"),
            (["--storage", "s3://b", "--s3-endpoint", "s3:9000"], "--s3-endpoint must be"),
            (["--storage", "s3://b", "--s3-endpoint", "http://s3", "--no-cache"], "--no-cache"),
            (["--cluster-advertise", "http://a:5000"], "needs --redis"),
            (
                ["--cluster-advertise", "http://a:5000", "--redis", "redis://r"],
                "--cluster-key-file",
            ),
            (["--cluster-key-file", short], "needs --cluster-advertise"),
            (
                [
                    "--cluster-advertise",
                    "http://a:5000",
                    "--redis",
                    "redis://r",
                    "--cluster-key-file",
                    short,
                ],
                "at least 32",
            ),
            (
                [
                    "--cluster-advertise",
                    "http://a:5000",
                    "--redis",
                    "redis://r",
                    "--cluster-key-file",
                    "/nonexistent/key",
                ],
                "cannot read the cluster key",
            ),
        ]
        for argv, expected in cases:
            with self.assertRaises(UsageError, msg=argv) as raised:
                parse(argv)
            self.assertIn(expected, str(raised.exception), argv)


class NoHoldTailTests(SynchronousTestCase):
    def test_flag(self) -> None:
        """--no-hold-tail, or HAMMAL_NO_HOLD_TAIL; off by default."""
        self.assertFalse(settings().no_hold_tail)
        self.assertTrue(settings(["--no-hold-tail"]).no_hold_tail)
        self.assertTrue(settings(environ={"HAMMAL_NO_HOLD_TAIL": "yes"}).no_hold_tail)


class UpstreamMinRateTests(SynchronousTestCase):
    """--upstream-min-rate: bytes per second a blob body must bring; 0 turns it off."""

    def test_default(self) -> None:
        self.assertEqual(settings().upstream_min_rate, 1024)
        self.assertEqual(Settings().upstream_min_rate, 1024)

    def test_command_line_and_environment(self) -> None:
        self.assertEqual(settings(["--upstream-min-rate", "0"]).upstream_min_rate, 0)
        self.assertEqual(settings(["--upstream-min-rate", "65536"]).upstream_min_rate, 65536)
        environ = {"HAMMAL_UPSTREAM_MIN_RATE": "4096"}
        self.assertEqual(settings(environ=environ).upstream_min_rate, 4096)
        self.assertEqual(settings(["--upstream-min-rate", "10"], environ).upstream_min_rate, 10)
        self.assertEqual(settings(environ={"HAMMAL_UPSTREAM_MIN_RATE": ""}).upstream_min_rate, 1024)

    def test_invalid(self) -> None:
        """Not a whole number of bytes per second, or below 0: a one-line usage error."""
        for value in ("-1", "1.5", "fast", "nan", "1e3", "1K"):
            for argv, environ in (
                (["--upstream-min-rate", value], {}),
                ([], {"HAMMAL_UPSTREAM_MIN_RATE": value}),
            ):
                error = self.assertRaises(UsageError, parse, argv, environ)
                message = str(error)
                self.assertNotIn("\n", message)
                self.assertIn("--upstream-min-rate must be a whole number of bytes", message)
                self.assertIn(repr(value), message)
