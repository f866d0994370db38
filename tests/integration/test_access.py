"""Access control through real clients (issue 4): ``--auth basic|token|passthrough``
over plain HTTP and TLS, the access rules, the SSRF guard of ``?upstream=`` /
``?ns=``, the front page and the TLS certificate reload on SIGHUP.

The first section holds small helpers that ``test_routing`` and ``test_ops``
import too: a hammal launcher that does not need ``GET /v2/`` to answer 200
(authentication, TLS, ``--route`` without ``--upstream``), an HTTP(S) client
that can set any ``Host`` header, a Prometheus text parser, skopeo with TLS
certificate directories, and tiny local listeners.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import http.server
import json
import os
import re
import shutil
import signal
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.integration.environment import (
    PRIVATE_PASSWORD,
    PRIVATE_USER,
    REPO_ROOT,
    HammalProcess,
    HTTPResponse,
    ManagedProcess,
    _hammal_env,  # the env start_hammal uses
    free_port,
    hammal_argv,
    make_tempdir,
    skopeo,
    wait_until,
)
from tests.integration.images import ALL_MANIFEST_TYPES, TestImage
from tests.integration.pki import generate_pki
from tests.integration.support import IntegrationTestCase, check_pulled_dir

ACCEPT = [("Accept", t) for t in ALL_MANIFEST_TYPES]

#: ``upstream=`` default of :func:`launch_hammal`: the environment's registry.
ENV_REGISTRY = object()

JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")


# -- helpers shared by test_access, test_routing and test_ops --------------------


def ssl_context(*ca_files: str) -> ssl.SSLContext:
    """A client context trusting only *ca_files* (hostname checked)."""
    context = ssl.create_default_context(cafile=ca_files[0] if ca_files else None)
    for extra in ca_files[1:]:
        context.load_verify_locations(cafile=extra)
    return context


def fetch(
    url: str,
    headers: Iterable[Tuple[str, str]] = (),
    method: str = "GET",
    body: Optional[bytes] = None,
    ca: Optional[str] = None,
    timeout: float = 30.0,
) -> HTTPResponse:
    """One HTTP or HTTPS request, no proxy, no redirects; a ``Host`` in
    *headers* replaces the automatic one (instead of being sent twice)."""
    parts = urllib.parse.urlsplit(url)
    hdrs = list(headers)
    has_host = any(k.lower() == "host" for k, _ in hdrs)
    if parts.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname or "127.0.0.1",
            parts.port or 443,
            timeout=timeout,
            context=ssl_context(ca) if ca else ssl_context(),
        )
    else:
        conn = http.client.HTTPConnection(
            parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout
        )
    try:
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        conn.putrequest(method, target, skip_host=has_host, skip_accept_encoding=True)
        for k, v in hdrs:
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        return HTTPResponse(resp.status, resp.reason, list(resp.getheaders()), data, url)
    finally:
        conn.close()


def basic_header(user: str, password: str) -> Tuple[str, str]:
    raw = base64.b64encode(f"{user}:{password}".encode()).decode()
    return ("Authorization", f"Basic {raw}")


def jwt_payload(token: str) -> Dict[str, Any]:
    """The (unverified) claims of a JWT."""
    part = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))


def launch_hammal(
    test: IntegrationTestCase,
    extra_args: Sequence[str] = (),
    upstream: Any = ENV_REGISTRY,
    tls_ca: Optional[str] = None,
    cache_dir: Optional[str] = None,
    wait: bool = True,
    **options: Any,
) -> HammalProcess:
    """Start ``twistd -n hammal`` like :func:`environment.start_hammal`, but
    wait for ``/healthz`` (not gated by auth or access rules), over HTTPS
    when *tls_ca* is given; *upstream* ``None`` leaves out ``--upstream``
    (for ``--route``-only setups). Stopped when *test* ends."""
    env = test.env
    if upstream is ENV_REGISTRY:
        upstream = env.registry_url
    port = free_port()
    workdir = make_tempdir("hammal-it-hammal-")
    owned = None
    if cache_dir is None:
        cache_dir = owned = os.path.join(workdir, "cache")
    argv = hammal_argv(port, upstream or "http://unused.invalid", cache_dir=cache_dir, **options)
    if upstream is None:
        i = argv.index("--upstream")
        del argv[i : i + 2]
    argv += list(extra_args)
    proc = ManagedProcess(
        "hammal", argv, os.path.join(workdir, "hammal.log"), env=_hammal_env(), cwd=REPO_ROOT
    ).start()
    hammal = HammalProcess(proc, port, argv, owned)
    test.addCleanup(hammal.stop)
    test._hammals.append(hammal)
    if wait:
        scheme = "https" if tls_ca else "http"
        url = f"{scheme}://127.0.0.1:{port}/healthz"
        wait_until(
            lambda: fetch(url, ca=tls_ca, timeout=2).status == 200,
            f"hammal /healthz on port {port}",
            30,
            proc,
        )
    return hammal


def hammal_output(hammal: HammalProcess) -> str:
    """hammal's own stdout/stderr: the log without the harness's ``==>``
    command-line header (which masks passwords itself)."""
    # split("\n"), not splitlines(): JSON records are separated by \x1e.
    return "\n".join(line for line in hammal.log_text().split("\n") if not line.startswith("==> "))


def cert_dir_for(test: IntegrationTestCase, ca_file: str) -> str:
    """A skopeo ``--cert-dir`` trusting *ca_file* (as ``ca.crt``)."""
    path = test.make_dir()
    shutil.copy(ca_file, os.path.join(path, "ca.crt"))
    return path


def skopeo_copy(
    test: IntegrationTestCase,
    source: str,
    image: Optional[TestImage],
    src_args: Sequence[str],
    all_platforms: bool = False,
    expect_ok: bool = True,
) -> Tuple[str, Any]:
    """``skopeo copy SRC_ARGS docker://SOURCE dir:TMP``; with *expect_ok*
    assert success and, given *image*, that every digest is right."""
    dest = test.make_dir()
    args = ["copy", *src_args]
    if all_platforms:
        args.append("--all")
    args += [f"docker://{source}", f"dir:{dest}"]
    result = skopeo(args, timeout=120)
    if expect_ok:
        if result.returncode != 0:
            test.fail(
                f"skopeo {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stderr[-3000:]}\n{test.diagnostics()}"
            )
        if image is not None:
            problems = check_pulled_dir(dest, image, all_platforms)
            if problems:
                test.fail(
                    f"pull of {source} gave wrong content:\n  "
                    + "\n  ".join(problems)
                    + f"\n{test.diagnostics()}"
                )
    return dest, result


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class Metrics:
    """A parsed Prometheus text exposition."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: List[Tuple[str, Dict[str, str], float]] = []
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = _SAMPLE.match(line)
            if m:
                labels = dict(_LABEL.findall(m.group(3) or ""))
                self.samples.append((m.group(1), labels, float(m.group(4))))

    def get(self, name: str, **labels: str) -> float:
        """The sum of *name*'s samples whose labels include *labels*."""
        return sum(
            v
            for n, ls, v in self.samples
            if n == name and all(ls.get(k) == w for k, w in labels.items())
        )

    def names(self) -> List[str]:
        return sorted({n for n, _, _ in self.samples})


def scrape(url: str) -> Metrics:
    response = fetch(url, timeout=10)
    if response.status != 200:
        raise AssertionError(f"scrape of {url} failed: {response.describe()}")
    return Metrics(response.body.decode())


class FirstBytesListener:
    """A TCP listener on 127.0.0.1 that records the first bytes of every
    connection, then closes it: "an internal service" hammal must not reach,
    or an allowed host whose TLS ClientHello shows that hammal tried."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = int(self.sock.getsockname()[1])
        self.first_bytes: List[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    data = conn.recv(64)
                except OSError:
                    data = b""
                self.first_bytes.append(data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


# -- fixtures of this module ---------------------------------------------------------

CLIENT_USER = "puller"
CLIENT_PASSWORD = "Kx9-client-basic-pw-31337"


def write_htpasswd(path: str, users: Dict[str, str]) -> None:
    import bcrypt

    with open(path, "w") as f:
        f.write("# hammal integration tests\n")
        for user, password in users.items():
            hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
            f.write(f"{user}:{hashed}\n")


def tls_args(chain: str, key: str) -> List[str]:
    return ["--tls", "--tls-cert", chain, "--tls-key", key]


def _leaf_fingerprint_pem(pem: str) -> str:
    cert = x509.load_pem_x509_certificate(pem.encode())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def leaf_fingerprint_file(path: str) -> str:
    """The SHA-256 of the first certificate in a PEM file."""
    with open(path) as f:
        return _leaf_fingerprint_pem(f.read())


def served_fingerprint(port: int) -> str:
    """The SHA-256 of the certificate a new TLS connection is shown."""
    return _leaf_fingerprint_pem(ssl.get_server_certificate(("127.0.0.1", port), timeout=3))


# -- --auth basic, over TLS ---------------------------------------------------------


class BasicAuthTLSTests(IntegrationTestCase):
    """``--auth basic`` behind hammal's own TLS, verified by skopeo against the CA."""

    def setUp(self) -> None:
        super().setUp()
        assert self.env.pki is not None
        self.pki = self.env.pki
        self.cert_dir = cert_dir_for(self, self.pki.ca_cert)

    def _hammal(self, auth_args: Sequence[str]) -> HammalProcess:
        return launch_hammal(
            self,
            ["--auth", "basic", *auth_args, *tls_args(self.pki.tls_chain, self.pki.tls_key)],
            tls_ca=self.pki.ca_cert,
        )

    def _logout(self, host: str) -> None:
        skopeo(["logout", host])

    def test_single_user(self) -> None:
        hammal = self._hammal(["--auth-user", CLIENT_USER, "--auth-password", CLIENT_PASSWORD])
        base = f"https://{hammal.host}"
        response = fetch(base + "/v2/", ca=self.pki.ca_cert)
        self.assertOCIError(response, 401, "UNAUTHORIZED")
        self.assertEqual(response.header("WWW-Authenticate"), 'Basic realm="hammal"')
        ok = fetch(base + "/v2/", [basic_header(CLIENT_USER, CLIENT_PASSWORD)], ca=self.pki.ca_cert)
        self.assertEqual(ok.status, 200, ok.describe())

        image = self.env.image("library/alpine:3.20")
        cert = ["--src-cert-dir", self.cert_dir]
        skopeo_copy(
            self,
            f"{hammal.host}/alpine:3.20",
            image,
            cert + ["--src-creds", f"{CLIENT_USER}:{CLIENT_PASSWORD}"],
        )
        multi = self.env.image("library/multi:1")
        skopeo_copy(
            self,
            f"{hammal.host}/library/multi:1",
            multi,
            cert + ["--src-creds", f"{CLIENT_USER}:{CLIENT_PASSWORD}"],
            all_platforms=True,
        )

        for creds in (f"{CLIENT_USER}:wrong", f"nobody:{CLIENT_PASSWORD}"):
            _, result = skopeo_copy(
                self,
                f"{hammal.host}/alpine:3.20",
                None,
                cert + ["--src-creds", creds],
                expect_ok=False,
            )
            self.assertNotEqual(result.returncode, 0, f"{creds} was accepted")
            self.assertRegex(result.stderr.lower(), "unauthorized|401|authentication required")
        _, anonymous = skopeo_copy(
            self, f"{hammal.host}/alpine:3.20", None, cert + ["--src-no-creds"], expect_ok=False
        )
        self.assertNotEqual(anonymous.returncode, 0, "an anonymous client pulled")

        # The client's credentials never went upstream: hammal's own
        # (anonymous) token requests only.
        for entry in self.env.token_log():
            self.assertIsNone(entry["authorization"], entry)

    def test_untrusted_ca_is_refused_by_the_client(self) -> None:
        """Real verification: without the CA, skopeo refuses hammal's certificate."""
        hammal = self._hammal(["--auth-user", CLIENT_USER, "--auth-password", CLIENT_PASSWORD])
        other = cert_dir_for(self, generate_pki(self.make_dir()).ca_cert)
        _, result = skopeo_copy(
            self,
            f"{hammal.host}/alpine:3.20",
            None,
            ["--src-cert-dir", other, "--src-creds", f"{CLIENT_USER}:{CLIENT_PASSWORD}"],
            expect_ok=False,
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("certificate", result.stderr.lower())

    def test_htpasswd_login_then_pull(self) -> None:
        htpasswd = os.path.join(self.make_dir(), "htpasswd")
        write_htpasswd(htpasswd, {"carol": "carol-Pw-1", "dave": "dave-Pw-2"})
        hammal = self._hammal(["--htpasswd", htpasswd])
        self.addCleanup(self._logout, hammal.host)

        bad = skopeo(
            ["login", "--cert-dir", self.cert_dir, "-u", "carol", "-p", "nope", hammal.host]
        )
        self.assertNotEqual(bad.returncode, 0, "login with a wrong password succeeded")

        login = skopeo(
            ["login", "--cert-dir", self.cert_dir, "-u", "carol", "-p", "carol-Pw-1", hammal.host]
        )
        self.assertEqual(login.returncode, 0, f"{login.stderr}\n{self.diagnostics()}")
        image = self.env.image("library/ociimg:1")
        skopeo_copy(self, f"{hammal.host}/ociimg:1", image, ["--src-cert-dir", self.cert_dir])

        # The file is re-read when it changes: a new user can pull at once.
        # (Polled gently: ten failed logins from one address get 429.)
        write_htpasswd(htpasswd, {"carol": "carol-Pw-1", "erin": "erin-Pw-3"})
        url = f"https://{hammal.host}/v2/"
        wait_until(
            lambda: (
                fetch(url, [basic_header("erin", "erin-Pw-3")], ca=self.pki.ca_cert).status == 200
            ),
            "the new htpasswd user to be admitted",
            10,
            interval=0.4,
        )
        self.assertEqual(
            fetch(url, [basic_header("dave", "dave-Pw-2")], ca=self.pki.ca_cert).status,
            401,
            "a removed user still admitted",
        )
        bitnami = self.env.image("bitnami/redis:7")
        skopeo_copy(
            self,
            f"{hammal.host}/bitnami/redis:7",
            bitnami,
            ["--src-cert-dir", self.cert_dir, "--src-creds", "erin:erin-Pw-3"],
        )


# -- --auth token ----------------------------------------------------------------------


class TokenAuthTests(IntegrationTestCase):
    """hammal's own token flow: ``/v2/auth`` issues pull-only tokens."""

    def setUp(self) -> None:
        super().setUp()
        self.htpasswd = os.path.join(self.make_dir(), "htpasswd")
        write_htpasswd(self.htpasswd, {"alice": "alice-Pw-1", "bob": "bob-Pw-2"})
        self.hammal = launch_hammal(
            self, ["--auth", "token", "--htpasswd", self.htpasswd, "--allow-users", "alice"]
        )
        self.addCleanup(lambda: skopeo(["logout", self.hammal.host]))

    def _token(self, scope: str, user: str, password: str) -> Tuple[int, Dict[str, Any]]:
        """``GET /v2/auth`` with urllib and Basic credentials."""
        query = urllib.parse.urlencode({"service": "hammal", "scope": scope})
        request = urllib.request.Request(f"{self.hammal.url}/v2/auth?{query}")
        request.add_header(*basic_header(user, password))
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, {}

    def test_challenge(self) -> None:
        response = self.hammal.request("GET", "/v2/library/alpine/manifests/3.20", ACCEPT)
        self.assertOCIError(response, 401, "UNAUTHORIZED")
        self.assertEqual(
            response.header("WWW-Authenticate"),
            f'Bearer realm="http://{self.hammal.host}/v2/auth",service="hammal",'
            f'scope="repository:library/alpine:pull"',
        )

    def test_login_and_pull(self) -> None:
        login = skopeo(
            ["login", "--tls-verify=false", "-u", "alice", "-p", "alice-Pw-1", self.hammal.host]
        )
        self.assertEqual(login.returncode, 0, f"{login.stderr}\n{self.diagnostics()}")
        skopeo_copy(
            self,
            f"{self.hammal.host}/alpine:3.20",
            self.env.image("library/alpine:3.20"),
            ["--src-tls-verify=false"],
        )
        skopeo_copy(
            self,
            f"{self.hammal.host}/library/multi:1",
            self.env.image("library/multi:1"),
            ["--src-tls-verify=false"],
            all_platforms=True,
        )

    def test_token_grants_pull_only(self) -> None:
        status, document = self._token("repository:library/alpine:pull,push", "alice", "alice-Pw-1")
        self.assertEqual(status, 200, self.diagnostics())
        claims = jwt_payload(document["token"])
        self.assertTrue(claims["access"], claims)
        for grant in claims["access"]:
            self.assertEqual(grant["actions"], ["pull"], claims)
        self.assertEqual([g["name"] for g in claims["access"]], ["library/alpine"], claims)
        _, push_only = self._token("repository:library/alpine:push", "alice", "alice-Pw-1")
        for grant in jwt_payload(push_only["token"]).get("access", []):
            self.assertNotIn("push", grant["actions"])

        bearer = ("Authorization", f"Bearer {document['token']}")
        image = self.env.image("library/alpine:3.20")
        ok = self.hammal.request("GET", "/v2/library/alpine/manifests/3.20", [bearer, *ACCEPT])
        self.assertEqual(ok.status, 200, ok.describe())
        self.assertEqual(ok.header("Docker-Content-Digest"), image.manifest_digest)
        other = self.hammal.request("GET", "/v2/bitnami/redis/manifests/7", [bearer, *ACCEPT])
        # As Distribution answers a token without the scope (issue 10).
        self.assertOCIError(other, 401, "UNAUTHORIZED")
        self.assertIn('error="insufficient_scope"', other.header("WWW-Authenticate") or "")
        put = self.hammal.request("PUT", "/v2/library/alpine/manifests/3.20", [bearer])
        self.assertOCIError(put, 405, "UNSUPPORTED")
        forged = document["token"][:-4] + (
            "AAAA" if not document["token"].endswith("AAAA") else "BBBB"
        )
        refused = self.hammal.request(
            "GET",
            "/v2/library/alpine/manifests/3.20",
            [("Authorization", f"Bearer {forged}"), *ACCEPT],
        )
        self.assertOCIError(refused, 401, "UNAUTHORIZED")

    def test_allow_users_refuses_bob(self) -> None:
        status, _ = self._token("repository:library/alpine:pull", "bob", "bob-Pw-2")
        self.assertEqual(status, 401, "bob (valid htpasswd user, not allowed) got a token")
        status, _ = self._token("repository:library/alpine:pull", "alice", "wrong")
        self.assertEqual(status, 401)
        login = skopeo(
            ["login", "--tls-verify=false", "-u", "bob", "-p", "bob-Pw-2", self.hammal.host]
        )
        self.assertNotEqual(login.returncode, 0, "bob could log in")
        _, result = skopeo_copy(
            self,
            f"{self.hammal.host}/alpine:3.20",
            None,
            ["--src-tls-verify=false", "--src-creds", "bob:bob-Pw-2"],
            expect_ok=False,
        )
        self.assertNotEqual(result.returncode, 0, "bob could pull")
        self.assertIn("not in the allowed users", hammal_output(self.hammal))


# -- --auth passthrough --------------------------------------------------------------


class PassthroughTests(IntegrationTestCase):
    """Clients log in to the upstream through hammal; the cache leaks nothing."""

    def setUp(self) -> None:
        super().setUp()
        self.hammal = launch_hammal(self, ["--auth", "passthrough", "--debug"])
        fresh = os.path.join(self.make_dir(), "auth.json")
        with open(fresh, "w") as f:
            f.write('{"auths": {}}')
        #: an anonymous skopeo: a fresh auth file and no credentials; it does
        #: the anonymous token flow through hammal's /v2/auth.
        self.anonymous = ["--src-tls-verify=false", "--src-authfile", fresh, "--src-no-creds"]

    def _hammal_token(self, authorization: Optional[Tuple[str, str]]) -> str:
        query = urllib.parse.urlencode({"scope": "repository:private/secret:pull"})
        login = self.hammal.request(
            "GET", f"/v2/auth?{query}", [authorization] if authorization else []
        )
        self.assertEqual(login.status, 200, login.describe())
        return str(login.json()["token"])

    def _check_no_secrets_logged(self) -> None:
        out = hammal_output(self.hammal)
        self.assertNotIn(PRIVATE_PASSWORD, out)
        self.assertNotIn(basic_header(PRIVATE_USER, PRIVATE_PASSWORD)[1].split()[1], out)
        self.assertEqual(JWT_RE.findall(out), [], "a bearer token was logged")

    def test_private_pull_with_client_credentials(self) -> None:
        """skopeo with the private user's credentials pulls ``private/secret:1``
        (an OCI image) through hammal."""
        image = self.env.image("private/secret:1")
        skopeo_copy(
            self,
            f"{self.hammal.host}/private/secret:1",
            image,
            ["--src-tls-verify=false", "--src-creds", f"{PRIVATE_USER}:{PRIVATE_PASSWORD}"],
        )
        tokens = self.env.token_log()
        self.assertIn(
            (PRIVATE_USER, "basic", 200),
            {(e["user"], e["authorization"], e["status"]) for e in tokens},
            f"the client's login was not forwarded to the token server: {tokens}",
        )
        # Then an anonymous client is refused although everything is cached.
        _, refused = skopeo_copy(
            self, f"{self.hammal.host}/private/secret:1", None, self.anonymous, expect_ok=False
        )
        self.assertNotEqual(refused.returncode, 0, "an anonymous client pulled the private image")
        self._check_no_secrets_logged()

    def test_anonymous_public_pulls(self) -> None:
        """An anonymous client pulls public images: Docker schema2 and OCI."""
        skopeo_copy(
            self,
            f"{self.hammal.host}/alpine:3.20",
            self.env.image("library/alpine:3.20"),
            self.anonymous,
        )
        skopeo_copy(
            self, f"{self.hammal.host}/ociimg:1", self.env.image("library/ociimg:1"), self.anonymous
        )

    def test_oci_manifest_with_client_token(self) -> None:
        """The smallest reproduction: an anonymous token for a public OCI image,
        then ``GET manifests/1`` accepting every manifest type."""
        image = self.env.image("library/ociimg:1")
        query = urllib.parse.urlencode({"scope": "repository:library/ociimg:pull"})
        login = self.hammal.request("GET", f"/v2/auth?{query}")
        self.assertEqual(login.status, 200, login.describe())
        bearer = ("Authorization", f"Bearer {login.json()['token']}")
        response = self.hammal.request("GET", "/v2/library/ociimg/manifests/1", [bearer, *ACCEPT])
        self.assertEqual(response.status, 200, f"{response.describe()}\n{self.diagnostics()}")
        self.assertEqual(response.header("Docker-Content-Digest"), image.manifest_digest)

    def test_cached_private_blobs_not_served_to_others(self) -> None:
        """Blobs fetched by the private user (with its token from hammal's
        /v2/auth) stay in the cache, yet an anonymous client is refused."""
        image = self.env.image("private/secret:1")
        alice = (
            "Authorization",
            "Bearer " + self._hammal_token(basic_header(PRIVATE_USER, PRIVATE_PASSWORD)),
        )
        for digest in image.blob_digests:
            response = self.hammal.request("GET", f"/v2/private/secret/blobs/{digest}", [alice])
            self.assertEqual(response.status, 200, f"{response.describe()}\n{self.diagnostics()}")
            self.assertEqual(hashlib.sha256(response.body).hexdigest(), digest[7:])
        cache = self.hammal.owned_cache_dir or ""
        for digest in image.blob_digests:
            path = os.path.join(cache, "blobs", "sha256", digest[7:9], digest[7:])
            # The store gets a blob just after its client (after fdatasync).
            deadline = time.monotonic() + 10
            while not os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.02)
            self.assertTrue(os.path.exists(path), f"{digest} is not in hammal's cache")

        anonymous = ("Authorization", "Bearer " + self._hammal_token(None))
        # A token without the scope: 401 insufficient_scope, as Distribution.
        for digest in image.blob_digests:
            response = self.hammal.request("GET", f"/v2/private/secret/blobs/{digest}", [anonymous])
            self.assertOCIError(response, 401, "UNAUTHORIZED")
            head = self.hammal.request("HEAD", f"/v2/private/secret/blobs/{digest}", [anonymous])
            self.assertEqual(head.status, 401, head.describe())
        manifest = self.hammal.request(
            "GET", "/v2/private/secret/manifests/1", [anonymous, *ACCEPT]
        )
        self.assertOCIError(manifest, 401, "UNAUTHORIZED")
        self.assertIn('error="insufficient_scope"', manifest.header("WWW-Authenticate") or "")
        no_token = self.hammal.request("GET", f"/v2/private/secret/blobs/{image.blob_digests[0]}")
        self.assertOCIError(no_token, 401, "UNAUTHORIZED")

        _, refused = skopeo_copy(
            self, f"{self.hammal.host}/private/secret:1", None, self.anonymous, expect_ok=False
        )
        self.assertNotEqual(refused.returncode, 0, "an anonymous client pulled the private image")
        self.assertRegex(refused.stderr.lower(), "denied|unauthorized|403|401")
        # The anonymous client can still pull a public image.
        skopeo_copy(
            self,
            f"{self.hammal.host}/alpine:3.20",
            self.env.image("library/alpine:3.20"),
            self.anonymous,
        )
        self._check_no_secrets_logged()


# -- access rules ---------------------------------------------------------------------


class AccessRuleTests(IntegrationTestCase):
    """Each refusal is a 403 DENIED OCI error, before any upstream work."""

    MANIFEST = "/v2/library/alpine/manifests/3.20"

    def _get(
        self, hammal: HammalProcess, path: str = MANIFEST, headers: Sequence[Tuple[str, str]] = ()
    ) -> HTTPResponse:
        return fetch(hammal.url + path, headers=[*ACCEPT, *headers])

    def test_deny_ip(self) -> None:
        hammal = launch_hammal(self, ["--deny-ip", "127.0.0.0/8"])
        for path in ("/v2/", self.MANIFEST, "/v2/library/alpine/tags/list"):
            error = self.assertOCIError(self._get(hammal, path), 403, "DENIED")
            self.assertIn("127.0.0.1", error["message"])
        self.assertEqual(self.env.token_log(), [], "a denied client caused upstream work")
        self.assertIn("--deny-ip 127.0.0.0/8", hammal_output(hammal))
        self.assertEqual(fetch(hammal.url + "/healthz").status, 200)
        dest = self.make_dir()
        result = skopeo(
            [
                "copy",
                "--src-tls-verify=false",
                "--src-no-creds",
                f"docker://{hammal.host}/alpine:3.20",
                f"dir:{dest}",
            ]
        )
        self.assertNotEqual(result.returncode, 0)

    def test_forwarded_for_only_from_trusted_proxy(self) -> None:
        trusted = launch_hammal(
            self, ["--trusted-proxy", "127.0.0.1/32", "--deny-ip", "203.0.113.0/24"]
        )
        xff = ("X-Forwarded-For", "203.0.113.9")
        self.assertOCIError(self._get(trusted, headers=[xff]), 403, "DENIED", ["203.0.113.9"])
        self.assertOCIError(self._get(trusted, "/v2/", [xff]), 403, "DENIED")
        # The right-most untrusted hop is the client; what it wrote to the left is ignored.
        self.assertOCIError(
            self._get(trusted, headers=[("X-Forwarded-For", "198.51.100.1, 203.0.113.9")]),
            403,
            "DENIED",
        )
        self.assertEqual(
            self._get(trusted, headers=[("X-Forwarded-For", "203.0.113.9, 198.51.100.1")]).status,
            200,
        )
        self.assertEqual(self._get(trusted).status, 200)
        self.assertEqual(
            self._get(trusted, headers=[("X-Forwarded-For", "198.51.100.7")]).status, 200
        )

        untrusted = launch_hammal(self, ["--deny-ip", "203.0.113.0/24"])
        response = self._get(untrusted, headers=[xff])
        self.assertEqual(
            response.status,
            200,
            f"X-Forwarded-For believed from an untrusted peer\n{response.describe()}",
        )

    def test_deny_user_agent(self) -> None:
        hammal = launch_hammal(self, ["--deny-ua", "^curl/"])
        self.assertOCIError(
            self._get(hammal, headers=[("User-Agent", "curl/8.5.0")]), 403, "DENIED", ["curl/8.5.0"]
        )
        self.assertEqual(self._get(hammal, headers=[("User-Agent", "containerd/1.7")]).status, 200)
        self.assertEqual(self._get(hammal, headers=[("User-Agent", "my curl/8")]).status, 200)
        skopeo_copy(
            self,
            f"{hammal.host}/alpine:3.20",
            self.env.image("library/alpine:3.20"),
            ["--src-tls-verify=false", "--src-no-creds"],
        )

    def test_allow_path(self) -> None:
        hammal = launch_hammal(self, ["--allow-path", r"^/v2/(library/alpine/.*)?$"])
        self.assertEqual(self._get(hammal, "/v2/").status, 200)
        self.assertEqual(self._get(hammal).status, 200)
        self.assertOCIError(
            self._get(hammal, "/v2/bitnami/redis/manifests/7"),
            403,
            "DENIED",
            ["/v2/bitnami/redis/manifests/7"],
        )
        skopeo_copy(
            self,
            f"{hammal.host}/library/alpine:3.20",
            self.env.image("library/alpine:3.20"),
            ["--src-tls-verify=false", "--src-no-creds"],
        )
        _, result = skopeo_copy(
            self,
            f"{hammal.host}/bitnami/redis:7",
            None,
            ["--src-tls-verify=false", "--src-no-creds"],
            expect_ok=False,
        )
        self.assertNotEqual(result.returncode, 0)

    def test_deny_region(self) -> None:
        hammal = launch_hammal(self, ["--region-header", "CF-IPCountry", "--deny-region", "XX"])
        self.assertOCIError(
            self._get(hammal, headers=[("CF-IPCountry", "XX")]), 403, "DENIED", ["region XX"]
        )
        self.assertOCIError(self._get(hammal, headers=[("CF-IPCountry", "xx")]), 403, "DENIED")
        self.assertOCIError(
            self._get(hammal, headers=[("CF-IPCountry", "DE"), ("CF-IPCountry", "XX")]),
            403,
            "DENIED",
        )
        self.assertEqual(self._get(hammal, headers=[("CF-IPCountry", "DE")]).status, 200)
        self.assertEqual(self._get(hammal).status, 200)

    def test_push_methods_refused(self) -> None:
        hammal = launch_hammal(self)
        image = self.env.image("library/alpine:3.20")
        blob = image.blob_digests[0]
        paths = [
            "/v2/",
            self.MANIFEST,
            f"/v2/library/alpine/manifests/{image.manifest_digest}",
            f"/v2/library/alpine/blobs/{blob}",
            "/v2/library/alpine/blobs/uploads/",
            "/v2/library/alpine/blobs/uploads/some-uuid",
            "/v2/library/alpine/tags/list",
        ]
        for method in ("PUT", "POST", "DELETE", "PATCH"):
            for path in paths:
                response = fetch(hammal.url + path, method=method, body=b"{}")
                self.assertOCIError(response, 405, "UNSUPPORTED")
        self.assertEqual(self.env.token_log(), [], "a push request caused upstream work")
        # A real push is refused too. (skopeo's HEADs of blobs are pulls and
        # may go upstream; no write method ever does.)
        assert self.env.registry is not None
        registry_log_start = len(self.env.registry.log_text())
        result = skopeo(
            [
                "copy",
                "--dest-tls-verify=false",
                "--dest-no-creds",
                image.skopeo_source,
                f"docker://{hammal.host}/library/pushed:1",
            ]
        )
        self.assertNotEqual(result.returncode, 0, "skopeo pushed through hammal")
        self.assertRegex(hammal_output(hammal), r'"(POST|PUT|PATCH) /v2/library/pushed/[^"]*" 405')
        upstream_writes = re.findall(
            r'"(?:POST|PUT|PATCH|DELETE) /v2/[^"]*"',
            self.env.registry.log_text()[registry_log_start:],
        )
        self.assertEqual(upstream_writes, [], "a write reached the upstream registry")


# -- SSRF guard --------------------------------------------------------------------------


class _RedirectingMirror:
    """An HTTPS "mirror" (the environment's TLS leaf) that answers ``/v2/``
    with 200 and every blob GET with a 307 to a signed URL."""

    LOCATION = (
        "https://cdn.mirror.test/blobs/{digest}/data"
        "?X-Amz-Signature=ab%2Fcd%3D%3D&X-Amz-Expires=60&sig=%7Eq"
    )

    def __init__(self, chain: str, key: str) -> None:
        seen: List[Tuple[str, str, Optional[str]]] = []
        location = self.LOCATION

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                seen.append((self.command, self.path, self.headers.get("Authorization")))
                path = self.path.split("?")[0]
                if "/blobs/" in path:
                    digest = path.rsplit("/", 1)[1]
                    self.send_response(307)
                    self.send_header("Location", location.format(digest=digest))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = (
                    b"{}" if path == "/v2/" else b'{"errors":[{"code":"NOT_FOUND","message":"no"}]}'
                )
                self.send_response(200 if path == "/v2/" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = _answer

        self.seen = seen
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(chain, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


class SSRFGuardTests(IntegrationTestCase):
    """Nothing a client sends becomes a host hammal connects to, unless listed."""

    def setUp(self) -> None:
        super().setUp()
        self.internal = FirstBytesListener()
        self.addCleanup(self.internal.close)

    def _refused(self, hammal: HammalProcess, query: str) -> None:
        for path in (
            "/v2/",
            "/v2/library/alpine/manifests/3.20",
            "/v2/library/alpine/blobs/" + self.env.image("library/alpine:3.20").blob_digests[0],
        ):
            response = fetch(f"{hammal.url}{path}?{query}", headers=ACCEPT)
            self.assertOCIError(response, 403, "DENIED")

    def test_unlisted_hosts_are_refused_without_connecting(self) -> None:
        hammal = launch_hammal(self)
        for query in (
            "upstream=169.254.169.254",
            f"upstream=127.0.0.1:{self.env.registry_port}",
            f"upstream={self.internal.address}",
            "upstream=localhost",
            "ns=evil.example.com",
            f"ns={self.internal.address}",
            "ns=169.254.169.254",
            f"upstream=evil.example.com&ns={self.env.registry_host}",
        ):
            self._refused(hammal, query)
        # A path prefix naming the listener is not a registry either.
        response = fetch(f"{hammal.url}/v2/{self.internal.address}/x/manifests/1", headers=ACCEPT)
        self.assertIn(response.status, (400, 404), response.describe())
        time.sleep(0.3)
        self.assertEqual(
            self.internal.first_bytes,
            [],
            f"hammal connected to an address a client named\n{self.diagnostics()}",
        )
        self.assertEqual(self.env.token_log(), [])
        # The configured registry may be named with ?ns=.
        ok = fetch(
            f"{hammal.url}/v2/library/alpine/manifests/3.20?ns={self.env.registry_host}",
            headers=ACCEPT,
        )
        self.assertEqual(ok.status, 200, ok.describe())

    def test_allowed_upstream_is_used(self) -> None:
        assert self.env.pki is not None
        mirror = _RedirectingMirror(self.env.pki.tls_chain, self.env.pki.tls_key)
        self.addCleanup(mirror.close)
        hammal = launch_hammal(
            self,
            [
                "--allow-upstream",
                self.internal.address,
                "--allow-upstream",
                f"127.0.0.1:{mirror.port}",
                "--upstream-ca",
                self.env.pki.ca_cert,
            ],
            retries=0,
        )
        digest = self.env.image("library/alpine:3.20").blob_digests[0]

        # An allowed host is reached with https://HOST: the listener sees a ClientHello.
        response = fetch(
            f"{hammal.url}/v2/library/alpine/blobs/{digest}?upstream={self.internal.address}"
        )
        self.assertIn(response.status, (502, 504), response.describe())
        self.assertTrue(self.internal.first_bytes, "hammal never contacted the allowed host")
        self.assertEqual(
            self.internal.first_bytes[0][:1],
            b"\x16",
            f"not a TLS ClientHello: {self.internal.first_bytes[0]!r}",
        )

        # An allowed HTTPS mirror's 307 reaches the client unchanged.
        response = fetch(
            f"{hammal.url}/v2/library/alpine/blobs/{digest}?upstream=127.0.0.1:{mirror.port}"
        )
        self.assertEqual(response.status, 307, f"{response.describe()}\n{self.diagnostics()}")
        self.assertEqual(
            response.header("Location"), _RedirectingMirror.LOCATION.format(digest=digest)
        )
        blob_requests = [s for s in mirror.seen if "/blobs/" in s[1]]
        self.assertTrue(blob_requests, mirror.seen)
        self.assertEqual(blob_requests[0][1].split("?")[0], f"/v2/library/alpine/blobs/{digest}")
        # Such requests are not cached: asked again, hammal asks the mirror again.
        before = len(blob_requests)
        again = fetch(
            f"{hammal.url}/v2/library/alpine/blobs/{digest}?upstream=127.0.0.1:{mirror.port}"
        )
        self.assertEqual(again.status, 307, again.describe())
        self.assertGreater(len([s for s in mirror.seen if "/blobs/" in s[1]]), before)
        # The environment's upstream was not involved.
        self.assertEqual(self.env.cdn_log(), [])


# -- front page -----------------------------------------------------------------------


class FrontPageTests(IntegrationTestCase):
    def test_hostile_host_header_is_escaped(self) -> None:
        hammal = launch_hammal(self)
        for host in (
            "<script>alert(1)</script>",
            'x"><img src=x onerror=alert(1)>',
            "hammal.example.com<script>",
        ):
            response = fetch(hammal.url + "/", headers=[("Host", host)])
            self.assertEqual(response.status, 200, response.describe())
            self.assertIn("text/html", response.header("Content-Type", ""))
            self.assertEqual(response.header("X-Content-Type-Options"), "nosniff")
            body = response.body.decode()
            self.assertNotIn("<script", body.lower())
            self.assertNotIn("onerror=alert", body)
        good = fetch(hammal.url + "/", headers=[("Host", "mirror.corp.example:8443")])
        self.assertIn("mirror.corp.example:8443", good.body.decode())
        self.assertIn("http://mirror.corp.example:8443", good.body.decode())

    def test_url302(self) -> None:
        hammal = launch_hammal(self, ["--url302", "https://example.com/"])
        response = fetch(hammal.url + "/")
        self.assertEqual(response.status, 302, response.describe())
        self.assertEqual(response.header("Location"), "https://example.com/")
        self.assertEqual(fetch(hammal.url + "/v2/").status, 200)


# -- TLS certificate reload --------------------------------------------------------------


class TLSReloadTests(IntegrationTestCase):
    """``kill -HUP`` swaps the certificate for new connections only."""

    def test_sighup_reloads_certificate(self) -> None:
        assert self.env.pki is not None
        first = self.env.pki
        second = generate_pki(self.make_dir())
        live = self.make_dir()
        chain, key = os.path.join(live, "chain.pem"), os.path.join(live, "key.pem")
        shutil.copy(first.tls_chain, chain)
        shutil.copy(first.tls_key, key)
        hammal = launch_hammal(self, tls_args(chain, key), tls_ca=first.ca_cert)
        pid = hammal.process.pid
        assert pid is not None
        old_fp, new_fp = (
            leaf_fingerprint_file(first.tls_cert),
            leaf_fingerprint_file(second.tls_cert),
        )
        self.assertEqual(served_fingerprint(hammal.port), old_fp)

        keep = http.client.HTTPSConnection(
            "127.0.0.1", hammal.port, timeout=10, context=ssl_context(first.ca_cert)
        )
        self.addCleanup(keep.close)
        keep.request("GET", "/v2/")
        first_answer = keep.getresponse()
        first_answer.read()
        self.assertEqual(first_answer.status, 200)
        sock = keep.sock

        # A broken pair (new key, old certificate) is refused; the old one stays.
        shutil.copy(second.tls_key, key)
        os.kill(pid, signal.SIGHUP)
        wait_until(
            lambda: "TLS certificate not reloaded" in hammal.log_text(),
            "hammal to refuse the mismatched pair",
            10,
            hammal.process,
        )
        self.assertEqual(served_fingerprint(hammal.port), old_fp)

        shutil.copy(second.tls_chain, chain)
        shutil.copy(second.tls_key, key)
        os.kill(pid, signal.SIGHUP)
        wait_until(
            lambda: served_fingerprint(hammal.port) == new_fp,
            "new connections to present the new certificate",
            10,
            hammal.process,
        )
        self.assertTrue(hammal.running())

        # The connection opened before the reload still works, on the same socket.
        keep.request("GET", "/v2/")
        again = keep.getresponse()
        again.read()
        self.assertEqual(again.status, 200)
        self.assertIs(keep.sock, sock, "the keep-alive connection was dropped and reopened")
        der = sock.getpeercert(binary_form=True)
        assert der is not None
        self.assertEqual(hashlib.sha256(der).hexdigest(), old_fp)

        # New connections verify against the new CA only.
        self.assertEqual(fetch(f"https://{hammal.host}/v2/", ca=second.ca_cert).status, 200)
        with self.assertRaises(ssl.SSLError):
            fetch(f"https://{hammal.host}/v2/", ca=first.ca_cert)
        skopeo_copy(
            self,
            f"{hammal.host}/ociimg:1",
            self.env.image("library/ociimg:1"),
            ["--src-cert-dir", cert_dir_for(self, second.ca_cert), "--src-no-creds"],
        )
