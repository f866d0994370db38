"""``hammal prefetch`` against a mirror running with ``--auth`` (issue 13):
``--username`` with the password from ``--password-file`` or
``HAMMAL_PASSWORD``, for hammal's token flow over plain HTTP and for Basic
over TLS."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Dict

from tests.integration.environment import REPO_ROOT, clean_env
from tests.integration.support import IntegrationTestCase
from tests.integration.test_access import launch_hammal, write_htpasswd

USER, PASSWORD = "warmer", "warm-Pw-9"


class PrefetchWithAuthTests(IntegrationTestCase):
    def prefetch(
        self, mirror: str, *args: str, env: Dict[str, str] | None = None
    ) -> "subprocess.CompletedProcess[str]":
        return subprocess.run(
            [sys.executable, "-m", "hammal", "prefetch", *args, "--mirror", mirror],
            cwd=REPO_ROOT,
            env=clean_env(PYTHONPATH=REPO_ROOT, **(env or {})),
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )

    def password_file(self, password: str = PASSWORD) -> str:
        path = os.path.join(self.make_dir(), "password")
        with open(path, "w") as f:
            f.write(password + "\n")
        return path

    def test_token_auth_with_password_file(self) -> None:
        htpasswd = os.path.join(self.make_dir(), "htpasswd")
        write_htpasswd(htpasswd, {USER: PASSWORD})
        hammal = launch_hammal(self, ["--auth", "token", "--htpasswd", htpasswd])
        image = self.env.image("library/alpine:3.20")

        anonymous = self.prefetch(hammal.url, "library/alpine:3.20")
        self.assertEqual(anonymous.returncode, 1, anonymous.stderr)
        self.assertIn("401", anonymous.stderr)

        wrong = self.prefetch(
            hammal.url,
            "library/alpine:3.20",
            "--username",
            USER,
            "--password-file",
            self.password_file("not-it"),
        )
        self.assertEqual(wrong.returncode, 1, wrong.stderr)
        self.assertIn(f"refused the credentials of {USER}", wrong.stderr)
        self.assertNotIn("not-it", wrong.stdout + wrong.stderr)

        result = self.prefetch(
            hammal.url,
            "library/alpine:3.20",
            "--username",
            USER,
            "--password-file",
            self.password_file(),
        )
        self.assertEqual(
            result.returncode, 0, f"{result.stdout}\n{result.stderr}\n{self.diagnostics()}"
        )
        self.assertIn(f"{len(image.blob_digests)} blobs", result.stdout)
        self.assertNotIn(PASSWORD, result.stdout + result.stderr)

    def test_basic_auth_with_env_password(self) -> None:
        # Plain HTTP: prefetch over hammal's own TLS waits for the ALPN fix
        # (urllib offers ALPN http/1.1, which hammal's TLS listener refuses today).
        hammal = launch_hammal(
            self, ["--auth", "basic", "--auth-user", USER, "--auth-password", PASSWORD]
        )
        result = self.prefetch(
            hammal.url, "library/ociimg:1", "--username", USER, env={"HAMMAL_PASSWORD": PASSWORD}
        )
        self.assertEqual(
            result.returncode, 0, f"{result.stdout}\n{result.stderr}\n{self.diagnostics()}"
        )
        self.assertIn("library/ociimg:1 done", result.stdout)
        missing = self.prefetch(hammal.url, "library/ociimg:1", "--username", USER)
        self.assertEqual(missing.returncode, 2, missing.stderr)
        self.assertIn("--username needs a password", missing.stderr)
