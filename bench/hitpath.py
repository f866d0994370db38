"""The CPU cost of one manifest-by-tag cache hit, in process.

    PYTHONPATH=. .venv/bin/python -m bench.hitpath [--requests 2000] [--rounds 9] [--profile]

hammal as the unit tests wire it (``tests.test_v2.Mirror``: ``build_app``
over an in-memory upstream, a cache directory), the tag fetched once, then
the same raw HTTP/1.1 request (``Accept`` listing the four manifest types,
as the benchmark's wrk sends it) fed again and again into one keep-alive
connection of the site (a ``StringTransport``): parsing, routing, the cache
lookup, the response and the access-log event, without the kernel. It
prints the CPU microseconds per request (``time.process_time``), the
minimum and median over the rounds: the minimum is the figure to compare
between two trees on a busy machine. ``--profile``: one more round under
cProfile, hammal's functions by cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from typing import Optional, Sequence

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from tests.test_v2 import Mirror

_ACCEPT = (
    b"application/vnd.docker.distribution.manifest.v2+json,"
    b" application/vnd.docker.distribution.manifest.list.v2+json,"
    b" application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"
)
_REQUEST = (
    b"GET /v2/alpine/manifests/3.20 HTTP/1.1\r\nHost: 127.0.0.1:5000\r\nAccept: "
    + _ACCEPT
    + b"\r\n\r\n"
)
_MANIFEST = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)

    mirror = Mirror(cache_dir=tempfile.mkdtemp(prefix="hammal-hitpath-"))
    mirror.world.add_image("library/alpine", "3.20", _MANIFEST)
    first = mirror.request(b"GET", "/v2/alpine/manifests/3.20", {b"accept": [_ACCEPT]})
    if first.code != 200:
        print(f"the first GET answered {first.code}")
        return 1
    protocol = mirror.app.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    protocol.makeConnection(transport)

    def serve(count: int) -> bytes:
        for _ in range(count):
            protocol.dataReceived(_REQUEST)
            mirror.clock.advance(0)
        answered = transport.value()
        transport.clear()
        return answered

    warm = serve(50)
    if warm.count(b"HTTP/1.1 200 OK") != 50 or warm.count(b"Cache-Status: hammal; hit") != 50:
        print("not 50 cache hits:", warm[:600].decode("latin-1"))
        return 1
    costs = []
    for _ in range(args.rounds):
        started = time.process_time()
        serve(args.requests)
        costs.append((time.process_time() - started) / args.requests * 1e6)
    print(
        f"manifest by tag, cache hit, in process: min {min(costs):.1f} us/request,"
        f" median {statistics.median(costs):.1f} ({args.rounds} rounds of {args.requests})"
    )
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        serve(args.requests)
        profile.disable()
        pstats.Stats(profile).sort_stats("cumulative").print_stats("hammal/", 30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
