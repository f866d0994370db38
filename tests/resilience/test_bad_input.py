"""Bad input to a running hammal, over raw sockets.

Property-based (hypothesis, derandomized, bounded example counts) over
paths, repository names, references, digests and the ``Accept``, ``Range``,
``Authorization`` and ``Host`` headers, plus a fixed list of oversized and
malformed requests. For every one: never a ``500`` (nor any 5xx: the
upstream here is healthy), never a traceback in hammal's log, never a file
written outside ``--cache-dir``, and hammal stays up.
"""

from __future__ import annotations

import os
import random
import socket
import string
import time
from typing import Dict, List, Optional, Sequence, Tuple

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.resilience.support import (
    FixtureCase,
    RawResponse,
    ResilienceCase,
    Sandbox,
    cache_problems,
    raw_exchange,
    sha256,
    start_sandboxed_hammal,
    tree_snapshot,
)
from tests.resilience.upstream import OCI_MANIFEST, FaultyRegistry, Image

#: hypothesis settings: reproducible, bounded, no example database on disk.
BOUNDED = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
CACHE_ENTRIES = {"blobs", "manifests", "tags", "tmp", "locks", "reservations"}

_image: Optional[Image] = None


def _known() -> Image:
    assert _image is not None
    return _image


# -- strategies -----------------------------------------------------------------

_hex = st.text("0123456789abcdef", min_size=0, max_size=70)
_nasty_segments = st.sampled_from(
    [
        "..",
        ".",
        "%2e%2e",
        "%2E%2E%2F",
        "..%2f",
        "%00",
        "%0d%0a",
        "\\..\\",
        "~",
        "/",
        "//",
        "a" * 300,
        "A",
        "-a",
        "a-",
        "a..b",
        "a__b",
        "a/../b",
        "tmp",
        "blobs",
        "manifests",
        "tags",
        "cache",
        "sha256:" + "0" * 64,
        "%ff",
        "\u00e9",
        "\u202e",
        "\x7f",
        "*",
        "?",
        "#",
    ]
)
_name = st.one_of(
    st.just("res/known"),
    st.from_regex(r"[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*){0,3}", fullmatch=True),
    st.lists(
        st.one_of(_nasty_segments, st.text(min_size=0, max_size=12)), min_size=1, max_size=5
    ).map("/".join),
)
_digest = st.one_of(
    st.builds(lambda h: "sha256:" + h, _hex),
    st.builds(
        lambda a, h: f"{a}:{h}",
        st.sampled_from(["sha512", "SHA256", "md5", "sha256+b64", "", "sha256:sha256", "../.."]),
        _hex,
    ),
    st.sampled_from(
        [
            "sha256:../../../../../etc/passwd",
            "sha256:" + "A" * 64,
            "sha256:" + "0" * 64,
            "sha256:" + "0" * 63,
            "sha256:" + "0" * 65,
            "sha256:%2e%2e%2f" + "0" * 55,
        ]
    ),
    st.text(max_size=80),
)
_tag = st.one_of(
    st.just("latest"),
    st.text(max_size=140),
    st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,140}", fullmatch=True),
)
_media = st.sampled_from(
    [
        OCI_MANIFEST,
        "application/vnd.docker.distribution.manifest.v2+json",
        "*/*",
        "application/json",
        "text/html;q=0.1",
        "",
        ";",
        ",,,",
        "application/vnd.oci.image.index.v1+json; q=2",
        "x" * 2000,
        "\u00e9/\u00e9",
    ]
)
_accept = st.one_of(st.lists(_media, max_size=8).map(", ".join), st.text(max_size=200))
_range = st.one_of(
    st.builds(
        lambda a, b: f"bytes={a}-{b}",
        st.integers(-5, 10**20).map(str) | st.just(""),
        st.integers(-5, 10**20).map(str) | st.just(""),
    ),
    st.builds(lambda n: "bytes=" + ",".join(f"{i}-{i}" for i in range(n)), st.integers(0, 300)),
    st.sampled_from(
        [
            "bytes=",
            "bytes=-",
            "bytes=--1",
            "items=0-1",
            "bytes=1-0",
            "bytes = 0 - 1",
            "bytes=0-0,-1",
            "bytes=99999999999999999999999999-",
        ]
    ),
    st.text(max_size=60),
)
_authorization = st.one_of(
    st.builds(lambda t: "Bearer " + t, st.text(max_size=300)),
    st.builds(
        lambda t: "Basic " + t, st.text(string.ascii_letters + string.digits + "+/=", max_size=120)
    ),
    st.sampled_from(
        [
            "Basic",
            "Bearer",
            "Basic ===",
            "Basic Og==",
            "Basic " + "QQ==" * 3000,
            "Bearer a.b.c",
            "Digest x",
            "basic YTpi",
            "Bearer  ",
            "Negotiate abc",
        ]
    ),
    st.text(max_size=120),
)
_host = st.one_of(
    st.sampled_from(
        [
            "127.0.0.1",
            "localhost",
            "",
            "[::1]:5000",
            "evil.example:80",
            "127.0.0.1:99999",
            "a" * 3000,
            "host with space",
            "h\u00e9st",
            "127.0.0.1:5000, other",
            "::::",
            "-.-",
        ]
    ),
    st.text(max_size=100),
)


def _header_value(value: str) -> bytes:
    """Header bytes as a client might send them: latin-1 where possible,
    UTF-8 otherwise; CR and LF removed (those are tested on their own)."""
    text = value.replace("\r", "").replace("\n", "")
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def _target(text: str) -> bytes:
    """A request target: no spaces, CR or LF (else it is another request
    line entirely, tested on its own); the rest sent raw, UTF-8."""
    return text.replace(" ", "%20").replace("\r", "").replace("\n", "").encode("utf-8") or b"/"


class BadInputTests(FixtureCase):
    registry: FaultyRegistry
    sandbox: Sandbox
    outside_before: Dict[str, Tuple[int, int]] = {}

    @classmethod
    def start_fixture(cls) -> None:
        global _image
        cls.registry = FaultyRegistry()
        _image = cls.registry.add_image("res/known", [4096, 70000], seed=5)
        cls.sandbox = start_sandboxed_hammal(cls.registry.url, read_timeout=5)
        cls.outside_before = tree_snapshot(cls.sandbox.root, skip=[cls.sandbox.cache_dir])

    @classmethod
    def stop_fixture(cls) -> None:
        cls._stop_shared("sandbox", "registry")

    def setUp(self) -> None:
        super().setUp()
        self.log_offset = len(self.sandbox.hammal.log_text())

    def tearDown(self) -> None:
        self.assertAlive(self.sandbox)
        self.assertNoTraceback(self.sandbox, self.log_offset)
        self.assertFilesOnlyInCache()

    def assertFilesOnlyInCache(self) -> None:
        sandbox = self.sandbox
        after = tree_snapshot(sandbox.root, skip=[sandbox.cache_dir])
        # hammal's working directory (and the temp tree around it) is unchanged
        changed = {k: v for k, v in after.items() if self.outside_before.get(k) != v}
        gone = set(self.outside_before) - set(after)
        self.assertEqual(
            (changed, gone), ({}, set()), "files appeared or changed outside the cache dir"
        )
        if os.path.isdir(sandbox.cache_dir):
            self.assertLessEqual(set(os.listdir(sandbox.cache_dir)), CACHE_ENTRIES)
        self.assertEqual(cache_problems(sandbox.cache_dir), [])

    # -- the exchange -------------------------------------------------------------

    def exchange(
        self,
        method: bytes,
        target: bytes,
        headers: Sequence[Tuple[bytes, bytes]] = (),
        timeout: float = 10,
    ) -> RawResponse:
        port = self.sandbox.hammal.port
        lines = [method + b" " + target + b" HTTP/1.1"]
        if not any(k.lower() == b"host" for k, _ in headers):
            lines.append(b"Host: 127.0.0.1:%d" % port)
        lines += [k + b": " + v for k, v in headers]
        lines.append(b"Connection: close")
        payload = b"\r\n".join(lines) + b"\r\n\r\n"
        return raw_exchange(port, payload, timeout, method_head=method == b"HEAD")

    def assertSane(self, resp: RawResponse, what: object) -> None:
        if not self.sandbox.hammal.running():
            self.fail(f"hammal died on {what!r}:\n{self.sandbox.hammal.log_tail()}")
        if resp.status is None:
            # no response at all is acceptable only as a refusal to parse:
            # the connection closed, not timed out
            self.assertNotEqual(resp.error, "timeout", f"no answer to {what!r}")
            return
        if resp.status == 100:  # "Expect: 100-continue" answered first: fine
            return
        if resp.status == 501 and isinstance(what, tuple) and what[0] not in (b"GET", b"HEAD"):
            # Twisted's own "501 Huh?" for a method a non-/v2/ page lacks:
            # not an error of hammal's (405 would be nicer)
            return
        self.assertLess(resp.status, 500, f"{resp.status} for {what!r}: {resp.body[:300]!r}")
        self.assertGreaterEqual(resp.status, 200, f"{resp.status} for {what!r}")
        text = self.sandbox.hammal.log_text()[self.log_offset :]
        self.assertNotIn("Traceback (most recent call last)", text, f"after {what!r}")

    # -- properties -----------------------------------------------------------------

    @BOUNDED
    @given(
        kind=st.sampled_from(["manifests", "blobs", "tags"]),
        name=_name,
        digest=_digest,
        tag=_tag,
        use_tag=st.booleans(),
        method=st.sampled_from([b"GET", b"HEAD"]),
    )
    def test_names_references_digests(
        self, kind: str, name: str, digest: str, tag: str, use_tag: bool, method: bytes
    ) -> None:
        if kind == "tags":
            path = f"/v2/{name}/tags/list"
        elif kind == "blobs":
            path = f"/v2/{name}/blobs/{digest}"
        else:
            path = f"/v2/{name}/manifests/{tag if use_tag else digest}"
        resp = self.exchange(method, _target(path), [(b"Accept", OCI_MANIFEST.encode())])
        self.assertSane(resp, path)
        if resp.status == 200 and method == b"GET" and kind != "tags":
            # a 200 must carry exactly what was asked for
            wanted = digest if kind == "blobs" or not use_tag else _known().digest
            self.assertEqual(sha256(resp.body), wanted, path)

    @BOUNDED
    @given(
        path=st.one_of(
            st.lists(st.one_of(_nasty_segments, st.text(max_size=20)), max_size=8).map(
                lambda parts: "/" + "/".join(parts)
            ),
            st.builds(
                lambda q: f"/v2/res/known/blobs/{_known().layers[0].digest}?{q}",
                st.text(max_size=100),
            ),
            st.sampled_from(
                [
                    "/v2/res/known/blobs/uploads/",
                    "/v2/_catalog",
                    "/v2/auth",
                    "/v2/token",
                    "/v2/res/known/referrers/x",
                    "/metrics",
                    "/readyz",
                    "/healthz",
                    "/",
                    "/v2/res/known/manifests/latest?ns=../..",
                    "/v2/?upstream=127.0.0.1:1",
                    "/v2/res/known/tags/list?n=-1&last=%00",
                    "/v2/res/known/tags/list?n=" + "9" * 50,
                    "*",
                    "http://127.0.0.1/v2/",
                    "//v2//res//known//blobs//x",
                ]
            ),
        ),
        method=st.sampled_from(
            [
                b"GET",
                b"HEAD",
                b"POST",
                b"PUT",
                b"DELETE",
                b"PATCH",
                b"OPTIONS",
                b"TRACE",
                b"BREW",
                b"get",
            ]
        ),
    )
    def test_paths_and_methods(self, path: str, method: bytes) -> None:
        resp = self.exchange(method, _target(path))
        self.assertSane(resp, (method, path))

    @BOUNDED
    @given(
        accept=_accept,
        rng=_range,
        auth=_authorization,
        host=_host,
        blob=st.booleans(),
        by_tag=st.booleans(),
    )
    def test_headers(
        self, accept: str, rng: str, auth: str, host: str, blob: bool, by_tag: bool
    ) -> None:
        img = _known()
        if blob:
            path = f"/v2/{img.name}/blobs/{img.layers[1].digest}"
        else:
            path = f"/v2/{img.name}/manifests/{'latest' if by_tag else img.digest}"
        headers = [
            (b"Host", _header_value(host)),
            (b"Accept", _header_value(accept)),
            (b"Range", _header_value(rng)),
            (b"Authorization", _header_value(auth)),
        ]
        resp = self.exchange(b"GET", path.encode(), headers)
        self.assertSane(resp, headers)
        if resp.status == 200:
            want = img.layers[1].digest if blob else img.digest
            self.assertEqual(sha256(resp.body), want, headers)
        elif resp.status == 206:
            self.assertTrue(blob, "a 206 for a manifest")
            content_range = resp.header("content-range") or ""
            first, last = content_range.split(" ", 1)[1].split("/", 1)[0].split("-")
            self.assertEqual(
                resp.body,
                img.layers[1].data[int(first) : int(last) + 1],
                f"a 206 whose bytes are not the blob's {content_range}",
            )

    @BOUNDED
    @given(
        names=st.lists(
            st.text(string.ascii_letters + "-_", min_size=1, max_size=30), min_size=1, max_size=6
        ),
        values=st.lists(st.binary(max_size=200), min_size=1, max_size=6),
    )
    def test_arbitrary_header_bytes(self, names: List[str], values: List[bytes]) -> None:
        img = _known()
        headers = [
            (n.encode(), v.replace(b"\r", b"").replace(b"\n", b"")) for n, v in zip(names, values)
        ]
        resp = self.exchange(b"GET", f"/v2/{img.name}/manifests/latest".encode(), headers)
        self.assertSane(resp, headers)

    # -- oversized and malformed ----------------------------------------------------------

    def test_malformed_and_oversized_requests(self) -> None:
        port = self.sandbox.hammal.port
        img = _known()
        blob = f"/v2/{img.name}/blobs/{img.layers[0].digest}".encode()
        host = b"Host: 127.0.0.1:%d\r\n" % port
        rnd = random.Random(1234)
        cases: Dict[str, bytes] = {
            "long request line": b"GET /v2/"
            + b"a" * 100_000
            + b"/blobs/x HTTP/1.1\r\n"
            + host
            + b"\r\n",
            "one huge header": b"GET /v2/ HTTP/1.1\r\n"
            + host
            + b"X-Big: "
            + b"b" * 70_000
            + b"\r\n\r\n",
            "headers over the byte limit": b"GET /v2/ HTTP/1.1\r\n"
            + host
            + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 500) for i in range(60))
            + b"\r\n",
            "too many headers": b"GET /v2/ HTTP/1.1\r\n"
            + host
            + b"".join(b"X-H%d: v\r\n" % i for i in range(500))
            + b"\r\n",
            "huge Accept": b"GET "
            + blob
            + b" HTTP/1.1\r\n"
            + host
            + b"Accept: "
            + b", ".join([OCI_MANIFEST.encode()] * 800)
            + b"\r\n\r\n",
            "garbage": bytes(rnd.getrandbits(8) for _ in range(4096)),
            "TLS ClientHello": bytes.fromhex("16030100a5010000a10303")
            + bytes(rnd.getrandbits(8) for _ in range(160)),
            "HTTP/0.9": b"GET /v2/\r\n\r\n",
            "HTTP/9.9": b"GET /v2/ HTTP/9.9\r\n" + host + b"\r\n",
            "no version": b"GET /v2/\r\n" + host + b"\r\n",
            "NUL in method": b"G\x00T /v2/ HTTP/1.1\r\n" + host + b"\r\n",
            "NUL in path": b"GET /v2/res/known\x00/blobs/x HTTP/1.1\r\n" + host + b"\r\n",
            "NUL in header": b"GET /v2/ HTTP/1.1\r\n" + host + b"Accept: a\x00b\r\n\r\n",
            "CR in header value": b"GET /v2/ HTTP/1.1\r\n"
            + host
            + b"Accept: a\rX-Injected: 1\r\n\r\n",
            "LF-only line ends": b"GET " + blob + b" HTTP/1.1\n" + host.replace(b"\r", b"") + b"\n",
            "header without colon": b"GET /v2/ HTTP/1.1\r\n" + host + b"Nonsense\r\n\r\n",
            "space before colon": b"GET /v2/ HTTP/1.1\r\n" + host + b"Accept : x\r\n\r\n",
            "obs-fold": b"GET /v2/ HTTP/1.1\r\n" + host + b"Accept: a\r\n b\r\n\r\n",
            "no Host": b"GET /v2/ HTTP/1.1\r\n\r\n",
            "two Hosts": b"GET /v2/ HTTP/1.1\r\n" + host + b"Host: evil\r\n\r\n",
            "absolute-form": b"GET http://evil.example/v2/ HTTP/1.1\r\n" + host + b"\r\n",
            "absolute-form blob": b"GET http://127.0.0.1:1"
            + blob
            + b" HTTP/1.1\r\n"
            + host
            + b"\r\n",
            "CONNECT": b"CONNECT 127.0.0.1:22 HTTP/1.1\r\n" + host + b"\r\n",
            "OPTIONS *": b"OPTIONS * HTTP/1.1\r\n" + host + b"\r\n",
            "negative Content-Length": b"POST /v2/ HTTP/1.1\r\n"
            + host
            + b"Content-Length: -1\r\n\r\n",
            "huge Content-Length": b"PUT "
            + blob
            + b" HTTP/1.1\r\n"
            + host
            + b"Content-Length: 99999999999999999999999\r\n\r\nabc",
            "two Content-Lengths": b"POST /v2/ HTTP/1.1\r\n"
            + host
            + b"Content-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
            "bad chunked": b"POST /v2/ HTTP/1.1\r\n"
            + host
            + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
            "huge chunk size": b"PATCH /v2/ HTTP/1.1\r\n"
            + host
            + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\nabc\r\n",
            "chunked and length": b"POST /v2/ HTTP/1.1\r\n"
            + host
            + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
            "unknown Transfer-Encoding": b"POST /v2/ HTTP/1.1\r\n"
            + host
            + b"Transfer-Encoding: gzip, identity\r\n\r\n",
            "Expect 100-continue": b"PUT "
            + blob
            + b" HTTP/1.1\r\n"
            + host
            + b"Expect: 100-continue\r\nContent-Length: 10\r\n\r\n0123456789",
            "many ranges": b"GET "
            + blob
            + b" HTTP/1.1\r\n"
            + host
            + b"Range: bytes="
            + b",".join(b"%d-%d" % (i, i) for i in range(2000))
            + b"\r\n\r\n",
            "percent-encoded traversal": b"GET /v2/..%2f..%2f..%2ftmp/blobs/sha256:"
            + b"0" * 64
            + b" HTTP/1.1\r\n"
            + host
            + b"\r\n",
            "backslash traversal": b"GET /v2/..\\..\\x/manifests/latest HTTP/1.1\r\n"
            + host
            + b"\r\n",
            "UTF-8 path": "GET /v2/r\u00e9s/known/manifests/\u00e9 HTTP/1.1\r\n".encode()
            + host
            + b"\r\n",
            "overlong UTF-8": b"GET /v2/\xc0\xae\xc0\xae/blobs/x HTTP/1.1\r\n" + host + b"\r\n",
            "pipelined 100": (b"GET /v2/ HTTP/1.1\r\n" + host + b"\r\n") * 100,
            "HEAD with body": b"HEAD "
            + blob
            + b" HTTP/1.1\r\n"
            + host
            + b"Content-Length: 3\r\n\r\nabc",
            "lower-case method": b"get /v2/ HTTP/1.1\r\n" + host + b"\r\n",
            "tab separators": b"GET\t/v2/\tHTTP/1.1\r\n" + host + b"\r\n",
            "only CRLFs": b"\r\n" * 1000,
        }
        #: requests hammal may rightly keep waiting on (they are not over
        #: yet for an HTTP parser): a quick answer or silence are both fine
        unfinished = {"garbage", "LF-only line ends", "huge Content-Length", "huge chunk size"}
        for what, payload in cases.items():
            wait = what in unfinished
            resp = raw_exchange(
                port,
                payload,
                timeout=1.0 if wait else 10.0,
                method_head=payload.startswith(b"HEAD "),
            )
            if wait and resp.status is None and resp.error.endswith("timed out"):
                resp.error = "closed before a response"  # still waiting for more: fine
            self.assertSane(resp, what)
        # half a request, then the client leaves (slowloris, one round)
        for what, payload in (
            ("half a request line", b"GET /v2/res/kn"),
            ("half the headers", b"GET /v2/ HTTP/1.1\r\n" + host + b"Accept: x"),
        ):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(payload)
        resp = raw_exchange(port, b"GET /v2/ HTTP/1.1\r\n" + host + b"Connection: close\r\n\r\n")
        self.assertEqual(resp.status, 200, "hammal no longer answers after the bad requests")


class RequestBodyTests(ResilienceCase):
    """hammal is pull-only: request bodies are of no use to it."""

    def test_upload_body_is_not_spooled_to_disk(self) -> None:
        registry = FaultyRegistry()
        self.addCleanup(registry.stop)
        sandbox = start_sandboxed_hammal(registry.url)
        self.addCleanup(sandbox.stop)
        port = sandbox.hammal.port
        sent = 0
        answer = b""
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(
                b"PUT /v2/res/x/blobs/uploads/ HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: 10000000000\r\n\r\n"
            )
            chunk = b"x" * (1 << 20)
            s.setblocking(False)
            deadline = time.monotonic() + 10
            while sent < 64 * (1 << 20) and time.monotonic() < deadline and not answer:
                try:
                    sent += s.send(chunk)
                except BlockingIOError:
                    time.sleep(0.01)
                except OSError:
                    break
                try:
                    answer += s.recv(65536)
                except (BlockingIOError, OSError):
                    pass
            spooled = _spool_files(sandbox)
        self.assertAlive(sandbox)
        self.assertEqual(
            spooled,
            [],
            f"hammal took {sent >> 20} MiB of request body into"
            f" {spooled} (answer so far: {answer[:120]!r})",
        )


def _spool_files(sandbox: Sandbox) -> List[Tuple[str, int]]:
    """Regular files hammal holds open outside its cache dir and log, over 1 MiB."""
    out = []
    base = f"/proc/{sandbox.pid}/fd"
    for fd in os.listdir(base):
        try:
            target = os.readlink(os.path.join(base, fd))
            st = os.stat(os.path.join(base, fd))
        except OSError:
            continue
        if not target.startswith("/") or target.startswith("/dev/"):
            continue
        if target.startswith(sandbox.cache_dir) or target.endswith("hammal.log"):
            continue
        if st.st_size > (1 << 20):
            out.append((target, st.st_size))
    return out
