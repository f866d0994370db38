"""
Options that must never silently do nothing: users without C{--auth} turn
Basic auth on; users with a mode that would ignore them stop the start.
"""

from __future__ import annotations

from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from tests.test_config import parse, settings


class ImpliedAuthTests(SynchronousTestCase):
    def test_registry_username_turns_basic_on(self) -> None:
        """The seed's REGISTRY_USERNAME/REGISTRY_PASSWORD meant Basic auth."""
        result = settings(environ={"REGISTRY_USERNAME": "ops", "REGISTRY_PASSWORD": "pw"})
        self.assertEqual(result.auth, "basic")
        self.assertEqual(result.auth_user and result.auth_user.username, "ops")

    def test_auth_user_turns_basic_on(self) -> None:
        self.assertEqual(settings(["--auth-user", "ops", "--auth-password", "pw"]).auth, "basic")

    def test_htpasswd_turns_basic_on(self) -> None:
        self.assertEqual(settings(["--htpasswd", "/etc/hammal/htpasswd"]).auth, "basic")

    def test_no_users_no_auth(self) -> None:
        self.assertEqual(settings().auth, "none")

    def test_explicit_modes_kept(self) -> None:
        users = ["--htpasswd", "/etc/hammal/htpasswd"]
        self.assertEqual(settings(["--auth", "token", *users]).auth, "token")
        self.assertEqual(settings(["--auth", "passthrough"]).auth, "passthrough")
        self.assertEqual(
            settings(["--auth", "passthrough", "--allow-users", "alice"]).auth, "passthrough"
        )


class ContradictionTests(SynchronousTestCase):
    def assertRefused(
        self, argv: list[str], *words: str, environ: dict[str, str] | None = None
    ) -> None:
        with self.assertRaises(UsageError) as caught:
            parse(argv, environ)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        for word in words:
            self.assertIn(word, message)

    def test_none_with_users(self) -> None:
        self.assertRefused(
            ["--auth", "none", "--auth-user", "ops", "--auth-password", "pw"],
            "--auth none",
            "--auth-user",
        )
        self.assertRefused(["--auth", "none", "--htpasswd", "/f"], "--htpasswd")
        self.assertRefused(["--auth", "none", "--allow-users", "a"], "--allow-users")
        self.assertRefused(
            ["--auth", "none"],
            "--auth-user",
            environ={"REGISTRY_USERNAME": "u", "REGISTRY_PASSWORD": "p"},
        )
        self.assertRefused(
            [], "--auth none", environ={"HAMMAL_AUTH": "none", "HAMMAL_HTPASSWD": "/f"}
        )

    def test_allow_users_alone(self) -> None:
        """--allow-users picks among users; without any, nobody could log in."""
        self.assertRefused(["--allow-users", "alice"], "--auth basic needs")

    def test_passthrough_ignores_local_users(self) -> None:
        self.assertRefused(
            ["--auth", "passthrough", "--htpasswd", "/f"], "passthrough", "--htpasswd"
        )

    def test_basic_and_token_need_users(self) -> None:
        self.assertRefused(["--auth", "basic"], "--auth basic needs")
        self.assertRefused(["--auth", "token"], "--auth token needs")

    def test_password_never_echoed(self) -> None:
        with self.assertRaises(UsageError) as caught:
            parse(["--auth", "none", "--auth-user", "ops", "--auth-password", "hunter2"])
        self.assertNotIn("hunter2", str(caught.exception))
