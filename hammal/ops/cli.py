"""
``hammal``: the operator's command-line tool.

* ``hammal prefetch IMAGE... --mirror URL``: warm a running mirror's cache.
* ``hammal cache stats``: what a cache directory holds.
* ``hammal cache gc --max-size SIZE``: evict down to a size, drop abandoned
  temporaries.

This module is the output layer: argument parsing, progress display and
exit statuses. The work is done in L{hammal.ops.prefetch} and
L{hammal.ops.cachetool}. Exit statuses: 0 success, 1 an operation failed
(a pull, a digest, the mirror, the disk), 2 a usage error, 130 interrupted.
Every error is one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
from typing import IO, Any, NoReturn, Sequence

from hammal import __version__
from hammal.config import PARAMETERS, ConfigError, parse_size
from hammal.ops.cachetool import CacheStats, GcResult, NotACache, gc, stats
from hammal.ops.prefetch import (
    Blob,
    ImageResult,
    Manifest,
    MirrorClient,
    MirrorLogin,
    MirrorUnreachable,
    Prefetcher,
    Reporter,
    UsageError,
    parse_image,
    parse_mirror,
    parse_platforms,
)
from hammal.upstream.proxy_rules import ProxyRules

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: The server's own default, so that ``hammal cache ...`` inside the
#: container (or with the service's environment) needs no arguments.
DEFAULT_CACHE_DIR = next(str(spec.default) for spec in PARAMETERS if spec.name == "cache-dir")


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors raised as one line instead of printed with usage."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hammal",
        description=(
            "Operate a hammal registry mirror. The server itself runs as `twistd -n hammal`."
        ),
    )
    parser.add_argument("--version", action="version", version=f"hammal {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_prefetch(commands)
    _add_cache(commands)
    return parser


def _add_prefetch(commands: Any) -> None:
    prefetch = commands.add_parser(
        "prefetch",
        help="warm a running mirror's cache with images",
        description=(
            "Pull images through a running hammal mirror so that it caches them, "
            "verifying every digest and discarding the bytes."
        ),
    )
    prefetch.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="NAME[:TAG][@DIGEST], e.g. alpine:3.20 (sent as given: the mirror adds library/)",
    )
    prefetch.add_argument(
        "--mirror", required=True, metavar="URL", help="e.g. http://127.0.0.1:5000"
    )
    prefetch.add_argument(
        "--platform",
        action="append",
        default=[],
        metavar="OS/ARCH[/VARIANT]",
        help=(
            "only these platforms of a multi-platform image (repeatable, or comma-separated);"
            " default: all"
        ),
    )
    prefetch.add_argument(
        "--parallel", type=int, default=4, metavar="N", help="blobs fetched at once (default: 4)"
    )
    prefetch.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="socket timeout (default: 60)",
    )
    prefetch.add_argument(
        "--username",
        default=os.environ.get("HAMMAL_USERNAME"),
        metavar="USER",
        help="log in to a mirror running with --auth (env: HAMMAL_USERNAME); the password"
        " comes from --password-file or HAMMAL_PASSWORD, never the command line",
    )
    prefetch.add_argument(
        "--password-file",
        metavar="FILE",
        help="file holding the --username's password (first line)",
    )
    prefetch.add_argument(
        "--insecure",
        action="store_true",
        help="do not verify the mirror's TLS certificate (better: SSL_CERT_FILE=its-ca.pem)",
    )
    prefetch.add_argument(
        "--proxy",
        metavar="URL",
        help="http://[user:password@]host:port forward proxy to the mirror (wins over"
        " HTTP(S)_PROXY; NO_PROXY still exempts hosts; none: direct)",
    )
    prefetch.set_defaults(run=_prefetch)


def _add_cache(commands: Any) -> None:
    cache = commands.add_parser(
        "cache",
        help="inspect or collect a cache directory",
        description="Work on a cache directory directly (on the mirror's host).",
    )
    actions = cache.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    cache_dir = os.environ.get("HAMMAL_CACHE_DIR") or DEFAULT_CACHE_DIR
    stats_parser = actions.add_parser("stats", help="count blobs, manifests and temporaries")
    gc_parser = actions.add_parser(
        "gc",
        help="evict least recently used blobs down to a size; remove abandoned temporaries",
        description=(
            "Evict least recently used blobs until the rest fit in --max-size, and remove "
            "temporaries abandoned by a crash. A running server does not see blobs removed "
            "behind its back: use its --cache-max-size for routine eviction, and gc while it "
            "is stopped."
        ),
    )
    for action in (stats_parser, gc_parser):
        action.add_argument(
            "--cache-dir",
            default=cache_dir,
            metavar="DIR",
            help=(
                f"the cache directory (default: $HAMMAL_CACHE_DIR or {DEFAULT_CACHE_DIR};"
                f" now {cache_dir})"
            ),
        )
    stats_parser.set_defaults(run=_cache_stats)
    gc_parser.add_argument(
        "--max-size",
        default=os.environ.get("HAMMAL_CACHE_MAX_SIZE") or None,
        metavar="SIZE",
        help="e.g. 50G (default: $HAMMAL_CACHE_MAX_SIZE; without either only temporaries go)",
    )
    gc_parser.add_argument(
        "--dry-run", action="store_true", help="say what would go, remove nothing"
    )
    gc_parser.set_defaults(run=_cache_gc)


def main(
    argv: Sequence[str] | None = None, stdout: IO[str] | None = None, stderr: IO[str] | None = None
) -> int:
    """Run the tool; returns the exit status (see the module docstring)."""
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    try:
        args = _parse(build_parser(), sys.argv[1:] if argv is None else argv, out, err)
        return int(args.run(args, out, err))
    except _Exit as done:
        return done.status
    except UsageError as failure:
        _error(err, str(failure))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _error(err, "interrupted")
        return EXIT_INTERRUPTED


class _Exit(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str], out: IO[str], err: IO[str]) -> Any:
    """Parse, with --help and --version written to C{out} (argparse writes to sys.*)."""
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            args = parser.parse_args(list(argv))
    except SystemExit as done:  # --help, --version
        raise _Exit(int(done.code or 0))
    if getattr(args, "run", None) is None:
        what = (
            "hammal cache: choose an action: stats, gc"
            if args.command
            else "hammal: choose a command: prefetch, cache"
        )
        raise UsageError(f"{what} (see --help)")
    return args


def _error(err: IO[str], message: str) -> None:
    """One line on stderr, prefixed so that it reads well in logs."""
    if not message.startswith("hammal"):
        message = f"hammal: {message}"
    print(message, file=err, flush=True)


# prefetch


def _prefetch(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    images = [parse_image(text) for text in args.images]
    mirror = parse_mirror(args.mirror)
    platforms = parse_platforms(args.platform)
    if not 1 <= args.parallel <= 64:
        raise UsageError("--parallel must be between 1 and 64")
    if not args.timeout > 0:
        raise UsageError("--timeout must be positive")
    try:
        proxies = ProxyRules.from_environment(os.environ, args.proxy, "--proxy")
    except ValueError as failure:
        raise UsageError(str(failure))
    client = MirrorClient(
        mirror,
        timeout=args.timeout,
        insecure=args.insecure,
        login=_login(args, os.environ),
        proxies=proxies,
    )
    try:
        client.ping()
    except MirrorUnreachable as failure:
        _error(err, str(failure))
        return EXIT_FAILED
    reporter = _reporter(out, err)
    ok = Prefetcher(client, reporter, args.parallel, platforms).run(images)
    return EXIT_OK if ok else EXIT_FAILED


def _login(args: argparse.Namespace, environ: Any) -> MirrorLogin | None:
    """The mirror login from --username and --password-file or HAMMAL_PASSWORD."""
    username = args.username
    password: str | None = None
    if args.password_file is not None:
        try:
            with open(args.password_file, encoding="utf-8") as secret:
                password = secret.readline().rstrip("\r\n")
        except OSError as failure:
            raise UsageError(
                f"cannot read --password-file {args.password_file}: {_os_error(failure)}"
            )
        if not password:
            raise UsageError(f"--password-file {args.password_file} is empty")
    elif environ.get("HAMMAL_PASSWORD"):
        password = environ["HAMMAL_PASSWORD"]
    if username is None:
        if args.password_file is not None:
            raise UsageError("--password-file needs --username")
        return None
    if password is None:
        raise UsageError("--username needs a password: --password-file FILE or HAMMAL_PASSWORD")
    return MirrorLogin(username, password)


def _reporter(out: IO[str], err: IO[str]) -> Reporter:
    """A progress bar per image on a terminal; plain lines for logs and pipes."""
    if _isatty(out):
        try:
            return BarReporter(out, err)
        except ImportError:
            pass  # tqdm not installed: lines are still correct output
    return LineReporter(out, err)


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def short_digest(digest: object) -> str:
    """C{sha256:0123456789ab…}: enough to tell blobs apart in a listing."""
    algorithm, _, value = str(digest).partition(":")
    return f"{algorithm}:{value[:12]}…" if value else str(digest)


def human_size(size: int) -> str:
    """Decimal units, as docker shows them: C{3.2 MB}."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


class LineReporter:
    """One line per manifest and blob on stdout, failures on stderr."""

    def __init__(self, out: IO[str], err: IO[str]) -> None:
        self._out = out
        self._err = err
        self._lock = threading.Lock()

    def _line(self, stream: IO[str], text: str) -> None:
        with self._lock:
            print(text, file=stream, flush=True)

    def manifest_done(self, image: str, manifest: Manifest) -> None:
        self._line(
            self._out, f"{image} {short_digest(manifest.digest)} {human_size(manifest.size)} ok"
        )

    def blobs_started(self, image: str, count: int, total: int) -> None:
        pass

    def advanced(self, image: str, count: int) -> None:
        pass

    def blob_done(self, image: str, blob: Blob) -> None:
        self._line(self._out, f"{image} {short_digest(blob.digest)} {human_size(blob.size)} ok")

    def failed(self, image: str, what: str, reason: str) -> None:
        self._line(self._err, f"hammal: {image} {short_digest(what)}: {reason}")

    def image_done(self, image: str, result: ImageResult) -> None:
        self._line(self._out, f"{image} {_summary(result)}")


def _summary(result: ImageResult) -> str:
    text = f"{result.manifests} manifests, {result.blobs} blobs, {human_size(result.bytes)}"
    return f"done: {text}" if result.ok else f"FAILED ({result.failures} errors): {text}"


class BarReporter:
    """
    A tqdm bar per image, counting blob bytes; failures and the summary are
    written above the bars so that nothing is lost when a bar redraws.

    @raise ImportError: when tqdm is not installed.
    """

    def __init__(self, out: IO[str], err: IO[str]) -> None:
        from tqdm import tqdm  # type: ignore[import-untyped]

        class Bar(tqdm):
            monitor_interval = 0  # no monitor thread left behind

        self._bar_class = Bar
        self._out = out
        self._err = err
        self._bars: dict[str, Any] = {}
        self._lock = threading.Lock()

    def manifest_done(self, image: str, manifest: Manifest) -> None:
        pass

    def blobs_started(self, image: str, count: int, total: int) -> None:
        with self._lock:
            self._bars[image] = self._bar_class(
                total=total, desc=image, unit="B", unit_scale=True, file=self._out, leave=True
            )

    def advanced(self, image: str, count: int) -> None:
        with self._lock:
            self._bars[image].update(count)

    def blob_done(self, image: str, blob: Blob) -> None:
        pass

    def failed(self, image: str, what: str, reason: str) -> None:
        with self._lock:
            self._bar_class.write(f"hammal: {image} {short_digest(what)}: {reason}", file=self._err)

    def image_done(self, image: str, result: ImageResult) -> None:
        with self._lock:
            bar = self._bars.pop(image, None)
            if bar is not None:
                bar.close()
            self._bar_class.write(f"{image} {_summary(result)}", file=self._out)


# cache


def _cache_stats(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    try:
        result = stats(args.cache_dir)
    except NotACache as failure:
        raise UsageError(str(failure))
    except OSError as failure:
        _error(err, f"cache stats: {_os_error(failure)}")
        return EXIT_FAILED
    for line in _stats_lines(args.cache_dir, result):
        print(line, file=out)
    return EXIT_OK


def _stats_lines(root: str, result: CacheStats) -> list[str]:
    return [
        f"cache directory: {root}",
        f"blobs: {result.blobs}",
        f"blob bytes: {result.blob_bytes} ({human_size(result.blob_bytes)})",
        f"manifests: {result.manifests}",
        f"tag entries: {result.tags}",
        f"temporaries: {result.temporaries} ({human_size(result.temporary_bytes)}), "
        f"{result.stale_temporaries} abandoned",
    ]


def _cache_gc(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    try:
        max_size = parse_size(args.max_size, "--max-size") if args.max_size else None
    except ConfigError as failure:
        raise UsageError(str(failure))
    try:
        result = gc(args.cache_dir, max_size, dry_run=args.dry_run)
    except NotACache as failure:
        raise UsageError(str(failure))
    except OSError as failure:
        _error(err, f"cache gc: {_os_error(failure)}")
        return EXIT_FAILED
    for line in _gc_lines(result, max_size):
        print(line, file=out)
    return EXIT_OK


def _gc_lines(result: GcResult, max_size: int | None) -> list[str]:
    verb = "would evict" if result.dry_run else "evicted"
    lines = [
        f"{verb} {short_digest(blob.digest)} {human_size(blob.size)}" for blob in result.evicted
    ]
    removal = "would remove" if result.dry_run else "removed"
    lines += [
        f"{removal} abandoned temporary {temporary.name}"
        for temporary in result.removed_temporaries
    ]
    limit = human_size(max_size) if max_size is not None else "no size limit"
    lines.append(
        f"{'dry run: ' if result.dry_run else ''}{verb} {len(result.evicted)} blobs "
        f"({human_size(result.evicted_bytes)}), "
        f"{removal} {len(result.removed_temporaries)} temporaries; "
        f"{result.remaining_blobs} blobs ({human_size(result.remaining_bytes)}) remain, {limit}"
    )
    return lines


def _os_error(failure: OSError) -> str:
    where = f": {failure.filename}" if failure.filename else ""
    return f"{failure.strerror or failure}{where}"
