"""Credentials go only where they belong (issue 10), with a real hammal
(``twistd``) and recording servers on 127.0.0.1 that keep every
``Authorization`` header they receive:

* a failover ``--mirror`` (the upstream is down): it never sees the
  upstream's password, nor a passthrough client's token; with
  ``--mirror-credentials`` it sees its own, and only those;
* an upstream whose token realm is on another host: the realm is asked
  anonymously (one warning in the log) unless ``--trusted-realm`` names it.

The upstream's password is given with ``--upstream-password-file``, so it is
not on hammal's command line either.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import threading
from typing import Any, List, Optional, Tuple

from tests.integration.environment import HammalProcess, free_port
from tests.integration.support import IntegrationTestCase
from tests.integration.test_access import ACCEPT, fetch, hammal_output, launch_hammal

UPSTREAM_USER = "hammal-robot"
UPSTREAM_SECRET = "upstream-Secret-7f3a9c"
MIRROR_USER = "mirror-robot"
MIRROR_SECRET = "mirror-Secret-51d2e0"
CLIENT_TOKEN = "client-token-for-the-upstream-e8b1"


class RecordingRegistry:
    """
    A registry and token realm in one plain-HTTP server that records every
    request's ``Authorization``. Registry requests without its own token get a
    ``Bearer`` challenge naming C{realm} (by default its own ``/token``);
    ``/token`` issues that token to anyone.
    """

    TOKEN = "recorder-issued-token"

    def __init__(self, realm: Optional[str] = None) -> None:
        seen: List[Tuple[str, Optional[str]]] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(
                self, status: int, document: Any, headers: Tuple[Tuple[str, str], ...] = ()
            ) -> None:
                body = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self) -> None:
                seen.append((self.path, self.headers.get("Authorization")))
                if self.path.startswith("/token"):
                    self._send(200, {"token": RecordingRegistry.TOKEN, "expires_in": 300})
                    return
                if self.headers.get("Authorization") != f"Bearer {RecordingRegistry.TOKEN}":
                    challenge = f'Bearer realm="{recorder.realm}",service="recorder"'
                    self._send(
                        401,
                        {"errors": [{"code": "UNAUTHORIZED", "message": "login"}]},
                        (("WWW-Authenticate", challenge),),
                    )
                    return
                self._send(404, {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "none here"}]})

            do_HEAD = do_GET

        self.seen = seen
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.realm = realm or f"{self.url}/token"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def authorizations(self) -> List[str]:
        """Every Authorization value received, Basic ones decoded too."""
        values = []
        for _, value in self.seen:
            if value is None:
                continue
            values.append(value)
            scheme, _, rest = value.partition(" ")
            if scheme.lower() == "basic":
                values.append(base64.b64decode(rest).decode("utf-8", "replace"))
        return values

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


class _CredentialsTestCase(IntegrationTestCase):
    def recorder(self, realm: Optional[str] = None) -> RecordingRegistry:
        recorder = RecordingRegistry(realm)
        self.addCleanup(recorder.close)
        return recorder

    def secret_file(self, secret: str) -> str:
        path = os.path.join(self.make_dir(), "password")
        with open(path, "w") as f:
            f.write(secret + "\n")
        return path

    def upstream_credentials(self) -> List[str]:
        return [
            "--upstream-username",
            UPSTREAM_USER,
            "--upstream-password-file",
            self.secret_file(UPSTREAM_SECRET),
        ]

    def assertSecretNeverSent(self, recorder: RecordingRegistry, secret: str) -> None:
        for value in recorder.authorizations():
            self.assertNotIn(secret, value, f"{secret!r} reached {recorder.url}: {recorder.seen}")

    def assertNothingLogged(self, hammal: HammalProcess, *secrets: str) -> None:
        out = hammal_output(hammal)
        for secret in secrets:
            self.assertNotIn(secret, out)
        self.assertNotIn(UPSTREAM_SECRET, " ".join(hammal.argv))


class FailoverMirrorCredentialsTests(_CredentialsTestCase):
    """The upstream is down; every request fails over to a recording mirror."""

    def _hammal(self, mirror: RecordingRegistry, *extra: str) -> HammalProcess:
        closed = free_port()
        return launch_hammal(
            self,
            [*self.upstream_credentials(), "--mirror", mirror.url, *extra],
            upstream=f"http://127.0.0.1:{closed}",
            retries=0,
        )

    def _pull(self, hammal: HammalProcess, headers: List[Tuple[str, str]] = []) -> None:
        response = fetch(hammal.url + "/v2/library/alpine/manifests/3.20", [*headers, *ACCEPT])
        self.assertEqual(response.status, 404, f"{response.describe()}\n{self.diagnostics()}")

    def test_mirror_never_gets_the_upstreams_credentials(self) -> None:
        mirror = self.recorder()
        hammal = self._hammal(mirror)
        self._pull(hammal)
        self.assertTrue(
            any(p.startswith("/token") for p, _ in mirror.seen),
            f"the mirror's realm was never asked: {mirror.seen}\n{self.diagnostics()}",
        )
        self.assertSecretNeverSent(mirror, UPSTREAM_SECRET)
        self.assertSecretNeverSent(mirror, UPSTREAM_USER)
        self.assertEqual([v for p, v in mirror.seen if p.startswith("/token")], [None])
        self.assertNothingLogged(hammal, UPSTREAM_SECRET)

    def test_mirror_gets_only_its_own_credentials(self) -> None:
        mirror = self.recorder()
        hammal = self._hammal(
            mirror,
            "--mirror-credentials",
            f"127.0.0.1:{mirror.port}=robot-of-mirror:{self.secret_file(MIRROR_SECRET)}",
        )
        self._pull(hammal)
        self.assertSecretNeverSent(mirror, UPSTREAM_SECRET)
        self.assertIn(
            f"robot-of-mirror:{MIRROR_SECRET}",
            mirror.authorizations(),
            f"the mirror did not get its own credentials: {mirror.seen}",
        )
        self.assertNothingLogged(hammal, UPSTREAM_SECRET, MIRROR_SECRET)

    def test_mirror_never_gets_a_passthrough_clients_token(self) -> None:
        """--auth passthrough: the client's token is for the upstream only."""
        mirror = self.recorder()
        hammal = self._hammal(mirror, "--auth", "passthrough")
        response = fetch(
            hammal.url + "/v2/library/alpine/manifests/3.20",
            [("Authorization", f"Bearer {CLIENT_TOKEN}"), *ACCEPT],
        )
        self.assertIn(response.status, (401, 403, 404), response.describe())
        self.assertTrue(mirror.seen, f"the mirror was never asked\n{self.diagnostics()}")
        self.assertSecretNeverSent(mirror, CLIENT_TOKEN)
        self.assertSecretNeverSent(mirror, UPSTREAM_SECRET)
        self.assertNothingLogged(hammal, CLIENT_TOKEN, UPSTREAM_SECRET)


class ForeignRealmTests(_CredentialsTestCase):
    """The upstream (127.0.0.1) names a token realm on another host (localhost)."""

    def setUp(self) -> None:
        super().setUp()
        self.realm = self.recorder()
        self.upstream = self.recorder(realm=f"http://localhost:{self.realm.port}/token")

    def _pull(self, hammal: HammalProcess) -> None:
        for name in ("library/alpine", "library/busybox"):
            response = fetch(f"{hammal.url}/v2/{name}/manifests/1", ACCEPT)
            self.assertEqual(response.status, 404, f"{response.describe()}\n{self.diagnostics()}")

    def test_foreign_realm_is_asked_anonymously(self) -> None:
        hammal = launch_hammal(self, self.upstream_credentials(), upstream=self.upstream.url)
        self._pull(hammal)
        tokens = [v for p, v in self.realm.seen if p.startswith("/token")]
        self.assertEqual(tokens, [None, None], f"{self.realm.seen}\n{self.diagnostics()}")
        self.assertSecretNeverSent(self.realm, UPSTREAM_SECRET)
        self.assertSecretNeverSent(self.upstream, UPSTREAM_SECRET)
        warnings = [
            line
            for line in hammal_output(hammal).splitlines()
            if "not sending the upstream credentials" in line
        ]
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("--trusted-realm localhost", warnings[0])
        self.assertNothingLogged(hammal, UPSTREAM_SECRET)

    def test_trusted_realm_gets_the_credentials(self) -> None:
        """The control: listed with --trusted-realm, the realm gets them."""
        hammal = launch_hammal(
            self,
            [*self.upstream_credentials(), "--trusted-realm", "localhost"],
            upstream=self.upstream.url,
        )
        self._pull(hammal)
        self.assertIn(
            f"{UPSTREAM_USER}:{UPSTREAM_SECRET}",
            self.realm.authorizations(),
            f"{self.realm.seen}\n{self.diagnostics()}",
        )
        self.assertSecretNeverSent(self.upstream, UPSTREAM_SECRET)
        self.assertNothingLogged(hammal, UPSTREAM_SECRET)
