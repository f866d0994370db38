"""Tenant isolation in ``--auth passthrough`` over real TCP (issue 10).

The upstream is the environment's token-auth Distribution; its token server
grants per repository: ``alice`` (the owner) may pull ``private/secret``,
``bob`` only his own ``private/bob``, anonymous clients only public
repositories. Alice pulls her private image through hammal; then bob and an
anonymous client try every way of reading it from hammal's cache (by digest
under a repository they may read, by name, through ``?ns=`` and the path
prefix). Every attempt is refused, and Alice is still served from the cache.
"""

from __future__ import annotations

import hashlib
import os
import time
import urllib.parse
from typing import List, Optional, Tuple

from tests.integration.environment import (
    OTHER_PASSWORD,
    OTHER_USER,
    PRIVATE_PASSWORD,
    PRIVATE_USER,
    HammalProcess,
    HTTPResponse,
)
from tests.integration.support import IntegrationTestCase
from tests.integration.test_access import (
    ACCEPT,
    basic_header,
    launch_hammal,
    skopeo_copy,
)

Header = Tuple[str, str]


class _Passthrough(IntegrationTestCase):
    hammal: HammalProcess

    def login(self, scope: str, who: Optional[Tuple[str, str]], query: str = "") -> Header:
        """A bearer header from hammal's ``/v2/auth`` for *scope*."""
        params = urllib.parse.urlencode({"scope": scope}) + query
        response = self.hammal.request(
            "GET", f"/v2/auth?{params}", [basic_header(*who)] if who else []
        )
        self.assertEqual(response.status, 200, response.describe())
        return ("Authorization", f"Bearer {response.json()['token']}")

    def get(self, path: str, bearer: Optional[Header], method: str = "GET") -> HTTPResponse:
        headers: List[Header] = list(ACCEPT)
        if bearer is not None:
            headers.append(bearer)
        return self.hammal.request(method, path, headers)

    def skopeo_args(self, who: Optional[Tuple[str, str]]) -> List[str]:
        fresh = os.path.join(self.make_dir(), "auth.json")
        with open(fresh, "w") as f:
            f.write('{"auths": {}}')
        args = ["--src-tls-verify=false", "--src-authfile", fresh]
        return args + (["--src-creds", f"{who[0]}:{who[1]}"] if who else ["--src-no-creds"])


class CrossTenantTests(_Passthrough):
    def setUp(self) -> None:
        super().setUp()
        self.hammal = launch_hammal(self, ["--auth", "passthrough"])

    def _wait_cached(self, digests: List[str]) -> None:
        cache = self.hammal.owned_cache_dir or ""
        for digest in digests:
            path = os.path.join(cache, "blobs", "sha256", digest[7:9], digest[7:])
            deadline = time.monotonic() + 10
            while not os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.02)
            self.assertTrue(os.path.exists(path), f"{digest} is not in hammal's cache")

    def _refused(self, response: HTTPResponse, what: str) -> None:
        self.assertIn(response.status, (401, 403, 404), f"{what}: {response.describe()}")
        self.assertIsNone(response.header("Cache-Status"), f"{what} came from the cache")

    def test_every_cross_tenant_attempt_refused(self) -> None:
        owner = (PRIVATE_USER, PRIVATE_PASSWORD)
        secret = self.env.image("private/secret:1")
        public = self.env.image("library/alpine:3.20")
        private_only = [d for d in secret.blob_digests if d not in public.blob_digests]
        self.assertTrue(private_only)
        registry = self.env.registry_host

        # The owner pulls: everything is cached.
        skopeo_copy(self, f"{self.hammal.host}/private/secret:1", secret, self.skopeo_args(owner))
        self._wait_cached(private_only)

        for who in ((OTHER_USER, OTHER_PASSWORD), None):
            name = who[0] if who else "anonymous"
            # A repository this client may read, confirmed by upstream...
            readable = self.login("repository:alpine:pull", who)
            self.assertEqual(self.get("/v2/alpine/manifests/3.20", readable).status, 200, name)
            # ...unlocks none of the owner's cached objects named under it,
            # by any route to the same upstream. (A path prefix cannot name
            # a host with a port: tests/test_passthrough.py covers it.)
            for prefix, query in (("/v2/alpine", ""), ("/v2/alpine", f"?ns={registry}")):
                for digest in private_only:
                    for method in ("GET", "HEAD"):
                        self._refused(
                            self.get(f"{prefix}/blobs/{digest}{query}", readable, method),
                            f"{name}: {method} {prefix}/blobs/{digest}{query}",
                        )
                self._refused(
                    self.get(f"{prefix}/manifests/{secret.manifest_digest}{query}", readable),
                    f"{name}: {prefix}/manifests/<secret digest>{query}",
                )
            # The private repository itself, with a token asked for it.
            asked = self.login("repository:private/secret:pull", who)
            paths = [f"/v2/private/secret/blobs/{d}" for d in private_only]
            paths += [
                "/v2/private/secret/manifests/1",
                f"/v2/private/secret/manifests/{secret.manifest_digest}",
                "/v2/private/secret/tags/list",
            ]
            for path in paths:
                response = self.get(path, asked)
                self.assertOCIError(response, 401, "UNAUTHORIZED")
                challenge = response.header("WWW-Authenticate") or ""
                self.assertIn('error="insufficient_scope"', challenge, f"{name}: {path}")
                self.assertIn(f'realm="{self.hammal.url}/v2/auth"', challenge)
            # And through a real client.
            _, refused = skopeo_copy(
                self,
                f"{self.hammal.host}/private/secret:1",
                None,
                self.skopeo_args(who),
                expect_ok=False,
            )
            self.assertNotEqual(refused.returncode, 0, f"{name} pulled the private image")

        # A token upstream does not take: 401 and hammal's challenge, so the
        # client logs in again.
        forged = ("Authorization", "Bearer eyJhbGciOiJSUzI1NiJ9.eyJleHAiOjF9.c2ln")
        response = self.get(f"/v2/private/secret/blobs/{private_only[0]}", forged)
        self.assertOCIError(response, 401, "UNAUTHORIZED")
        self.assertIn('error="invalid_token"', response.header("WWW-Authenticate") or "")

        # The owner is still served, from the cache.
        alice = self.login("repository:private/secret:pull", owner)
        for digest in private_only:
            response = self.get(f"/v2/private/secret/blobs/{digest}", alice)
            self.assertEqual(response.status, 200, response.describe())
            self.assertEqual(response.header("Cache-Status"), "hammal; hit")
            self.assertEqual("sha256:" + hashlib.sha256(response.body).hexdigest(), digest)
        skopeo_copy(self, f"{self.hammal.host}/private/secret:1", secret, self.skopeo_args(owner))
        tags = self.get("/v2/private/secret/tags/list", alice)
        self.assertEqual(tags.status, 200, tags.describe())
        self.assertIn("1", tags.json()["tags"])

    def test_realm_carries_the_route(self) -> None:
        """A client pulling through ``?ns=`` (containerd) logs in to that
        registry, and the login works."""
        registry = self.env.registry_host
        encoded = urllib.parse.quote(registry, safe="")
        path = f"/v2/alpine/manifests/3.20?ns={registry}"
        response = self.get(path, None)
        self.assertEqual(response.status, 401, response.describe())
        challenge = response.header("WWW-Authenticate") or ""
        self.assertIn(f'realm="{self.hammal.url}/v2/auth?ns={encoded}"', challenge)
        bearer = self.login("repository:alpine:pull", None, f"&ns={encoded}")
        response = self.get(path, bearer)
        self.assertEqual(response.status, 200, response.describe())


class AllowUsersTests(_Passthrough):
    """``--allow-users`` in passthrough: the name given at hammal's ``/v2/auth``."""

    def setUp(self) -> None:
        super().setUp()
        self.hammal = launch_hammal(self, ["--auth", "passthrough", "--allow-users", PRIVATE_USER])

    def test_only_listed_users(self) -> None:
        skopeo_copy(
            self,
            f"{self.hammal.host}/alpine:3.20",
            self.env.image("library/alpine:3.20"),
            self.skopeo_args((PRIVATE_USER, PRIVATE_PASSWORD)),
        )
        for who in ((OTHER_USER, OTHER_PASSWORD), None):
            _, refused = skopeo_copy(
                self,
                f"{self.hammal.host}/alpine:3.20",
                None,
                self.skopeo_args(who),
                expect_ok=False,
            )
            self.assertNotEqual(refused.returncode, 0, f"{who} pulled through --allow-users")
        # A token fetched from upstream's realm directly names nobody.
        direct = self.env.token("library/alpine")
        response = self.get("/v2/alpine/manifests/3.20", ("Authorization", f"Bearer {direct}"))
        self.assertOCIError(response, 401, "UNAUTHORIZED")


class LoginThrottleTests(IntegrationTestCase):
    """Repeated failed logins from one address get 429 for a while."""

    def test_429_after_repeated_failures(self) -> None:
        hammal = launch_hammal(self, ["--auth-user", "carol", "--auth-password", "carol-Pw-1"])
        good = basic_header("carol", "carol-Pw-1")
        self.assertEqual(hammal.request("GET", "/v2/", [good]).status, 200)
        for attempt in range(10):
            response = hammal.request("GET", "/v2/", [basic_header("carol", f"guess-{attempt}")])
            self.assertEqual(response.status, 401, response.describe())
        for headers in ([basic_header("carol", "guess-11")], [good]):
            refused = hammal.request("GET", "/v2/", headers)
            self.assertOCIError(refused, 429, "TOOMANYREQUESTS")
            self.assertEqual(refused.header("Retry-After"), "60")
        # Asking without credentials is no failed login: still a challenge.
        self.assertEqual(hammal.request("GET", "/v2/").status, 401)
