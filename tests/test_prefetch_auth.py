"""
Tests for ``hammal prefetch`` logging in to a mirror that runs with
``--auth``: the challenge answers (L{hammal.ops.prefetch.MirrorAuth}), where
credentials may go, and the command-line options.
"""

from __future__ import annotations

import base64
import io
import json
from email.message import Message
from typing import Any
from unittest import mock

from twisted.trial.unittest import SynchronousTestCase

from hammal.ops.cli import main
from hammal.ops.prefetch import MirrorAuth, MirrorLogin, PrefetchError, _scope

LOGIN = MirrorLogin("warmer", "s3cret-pw")


def challenge(value: str) -> Message:
    headers = Message()
    headers["WWW-Authenticate"] = value
    return headers


class FakeOpener:
    """Answers token requests with a token naming the scope asked for."""

    def __init__(self) -> None:
        self.requests: list[Any] = []

    def open(self, request: Any, timeout: float) -> Any:
        self.requests.append(request)
        query = request.full_url.partition("?")[2]
        return io.BytesIO(json.dumps({"token": f"tok[{query}]"}).encode())


class MirrorAuthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.opener = FakeOpener()
        self.auth = MirrorAuth(LOGIN, "http://mirror.test:5000", self.opener, 5)

    def test_scope(self) -> None:
        self.assertEqual(
            _scope("/v2/library/alpine/manifests/3.20"), "repository:library/alpine:pull"
        )
        self.assertEqual(_scope("/v2/a/b/blobs/sha256:x"), "repository:a/b:pull")
        self.assertEqual(_scope("/v2/"), "")

    def test_basic(self) -> None:
        self.assertIsNone(self.auth.authorization("/v2/"))
        answer = self.auth.answer(challenge('Basic realm="hammal"'), "/v2/", None)
        self.assertEqual(answer, "Basic " + base64.b64encode(b"warmer:s3cret-pw").decode())
        self.assertEqual(self.auth.authorization("/v2/x/manifests/1"), answer)
        error = self.assertRaises(
            PrefetchError, self.auth.answer, challenge('Basic realm="hammal"'), "/v2/", answer
        )
        self.assertIn("refused the credentials of warmer", str(error))
        self.assertNotIn("s3cret", str(error))

    def test_bearer_from_own_realm_cached_per_scope(self) -> None:
        bearer = challenge('Bearer realm="http://mirror.test:5000/v2/auth",service="hammal"')
        path = "/v2/library/alpine/manifests/3.20"
        answer = self.auth.answer(bearer, path, None)
        self.assertIn("scope=repository%3Alibrary%2Falpine%3Apull", answer)
        self.assertTrue(answer.startswith("Bearer tok["))
        self.assertEqual(self.auth.authorization("/v2/library/alpine/blobs/sha256:1"), answer)
        self.assertIsNone(self.auth.authorization("/v2/other/manifests/1"))
        (request,) = self.opener.requests
        self.assertEqual(request.get_header("Authorization"), LOGIN.basic())
        # A refused token is fetched again, once.
        again = self.auth.answer(bearer, path, answer)
        self.assertEqual(len(self.opener.requests), 2)
        self.assertEqual(again, answer)

    def test_no_credentials_to_a_foreign_plain_http_realm(self) -> None:
        foreign = challenge('Bearer realm="http://auth.elsewhere.test/token",service="x"')
        error = self.assertRaises(PrefetchError, self.auth.answer, foreign, "/v2/", None)
        self.assertIn("plain HTTP", str(error))
        self.assertEqual(self.opener.requests, [])
        https = challenge('Bearer realm="https://auth.elsewhere.test/token",service="x"')
        self.auth.answer(https, "/v2/", None)
        self.assertEqual(len(self.opener.requests), 1)


class OptionTests(SynchronousTestCase):
    def run_cli(self, *argv: str, environ: dict[str, str] | None = None) -> tuple[int, str]:
        err = io.StringIO()
        with mock.patch.dict("os.environ", environ or {}, clear=False):
            status = main(
                ["prefetch", "alpine", "--mirror", "http://127.0.0.1:9", *argv], io.StringIO(), err
            )
        return status, err.getvalue()

    def test_username_needs_password(self) -> None:
        status, err = self.run_cli("--username", "warmer", environ={"HAMMAL_PASSWORD": ""})
        self.assertEqual(status, 2)
        self.assertIn("--username needs a password", err)

    def test_password_file_needs_username(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("pw\n")
        status, err = self.run_cli("--password-file", path)
        self.assertEqual(status, 2)
        self.assertIn("--password-file needs --username", err)

    def test_unreadable_or_empty_password_file(self) -> None:
        status, err = self.run_cli("--username", "u", "--password-file", "/nonexistent/pw")
        self.assertEqual(status, 2)
        self.assertIn("cannot read --password-file", err)
        path = self.mktemp()
        open(path, "w").close()
        status, err = self.run_cli("--username", "u", "--password-file", path)
        self.assertEqual(status, 2)
        self.assertIn("is empty", err)
