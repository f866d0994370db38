"""
Over real TCP: which client address the access rules and the login
throttle judge behind a C{--trusted-proxy}, by the header family the
operator named with C{--forwarded-header}.

The test client on 127.0.0.1 plays the trusted proxy; the client behind it
is 203.0.113.9, outside C{--allow-ip 127.0.0.0/8}. A proxy writes one
family of headers and passes the other through from its client untouched,
so the other family is the client's own word and must not open the door.
"""

from __future__ import annotations

from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.python.usage import UsageError
from twisted.trial.unittest import TestCase

from hammal.app import build_app
from hammal.cache.fetch import run_here
from hammal.config import Settings
from hammal.tap import Options
from tests.fakes import REGISTRY, FakeUpstream, stub_for

OUTSIDE = "203.0.113.9"
INSIDE = "127.0.0.5"


class ForwardedAccessTests(TestCase):
    def serve(self, forwarded_header: str | None) -> str:
        """hammal on 127.0.0.1 port 0 with the rules above; its base URL."""
        extra = {} if forwarded_header is None else {"forwarded_header": forwarded_header}
        settings = Settings(
            upstream=f"https://{REGISTRY}",
            rules={"allow-ip": ("127.0.0.0/8",), "trusted-proxy": ("127.0.0.1/32",)},
            **extra,
        )
        app = build_app(settings, reactor, http_client=stub_for(FakeUpstream()), offload=run_here)
        port = reactor.listenTCP(0, app.site, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}"

    @inlineCallbacks
    def status(self, base: str, headers: dict[str, str]) -> Any:
        response = yield treq.get(f"{base}/v2/", headers=headers, persistent=False)
        yield response.content()
        return response.code

    @inlineCallbacks
    def test_x_forwarded_by_default(self) -> Any:
        """
        By default the proxy's X-Forwarded-For names the client; a Forwarded
        header the client wrote itself is not believed.
        """
        base = self.serve(None)
        self.assertEqual((yield self.status(base, {"X-Forwarded-For": OUTSIDE})), 403)
        self.assertEqual((yield self.status(base, {"X-Forwarded-For": INSIDE})), 200)
        self.assertEqual(
            (yield self.status(base, {"X-Forwarded-For": OUTSIDE, "Forwarded": f"for={INSIDE}"})),
            403,
        )

    @inlineCallbacks
    def test_forwarded_when_named(self) -> Any:
        """
        With --forwarded-header forwarded, RFC 7239's for= names the client:
        a client behind a proxy that writes only Forwarded is judged by its
        own address (not the proxy's, which the allow list admits), and an
        X-Forwarded-For it wrote itself is not believed.
        """
        base = self.serve("forwarded")
        self.assertEqual((yield self.status(base, {"Forwarded": f"for={OUTSIDE}"})), 403)
        self.assertEqual((yield self.status(base, {"Forwarded": f'for="{INSIDE}:4711"'})), 200)
        self.assertEqual(
            (yield self.status(base, {"Forwarded": f"for={OUTSIDE}", "X-Forwarded-For": INSIDE})),
            403,
        )


def settings(*argv: str) -> Settings:
    """Settings from C{argv} alone (an empty environment)."""
    options = Options(environ={})
    options.parseOptions(["--upstream", "https://r.example", *argv])
    return Settings.from_options(options)


class ForwardedHeaderOptionTests(TestCase):
    def test_values(self) -> None:
        """--forwarded-header takes x-forwarded (the default) or forwarded, nothing else."""
        self.assertEqual(settings().forwarded_header, "x-forwarded")
        self.assertEqual(settings("--forwarded-header", "forwarded").forwarded_header, "forwarded")
        error = self.assertRaises(UsageError, settings, "--forwarded-header", "x-real-ip")
        self.assertIn("--forwarded-header", str(error))
