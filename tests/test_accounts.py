"""
Tests for L{hammal.upstream.accounts}: a pool of upstream accounts that
rest when their pull limit is spent, the file they come from, and the hook
through which token requests and registry responses use them.
"""

from __future__ import annotations

import base64
import os
from typing import Any

from prometheus_client import generate_latest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from hammal import metrics
from hammal.errors import TooManyRequests
from hammal.tap import Options
from hammal.ttlstore import MemoryTtlStore
from hammal.upstream.accounts import (
    DEFAULT_REST,
    AccountPool,
    AccountsFile,
    AccountsFileError,
    parse_accounts,
)
from hammal.upstream.auth import Credentials
from hammal.upstream.client import Trace, Upstream, UpstreamClient
from hammal.upstream.quota import QuotaBoard
from hammal.upstream.retry import RetryPolicy
from tests.fakes import REALM, REGISTRY, FakeUpstream, stub_for
from tests.test_client import TRUST_FAKE_REALM

UPSTREAM = "pool.test"


def gauge(name: str, account: str, upstream: str = UPSTREAM) -> float | None:
    return metrics.REGISTRY.get_sample_value(name, {"upstream": upstream, "account": account})


class ParseTests(SynchronousTestCase):
    def test_lines(self) -> None:
        accounts = parse_accounts("# pool\nalice:pw1\n\n  bob:dckr_pat_x:y  \n")
        self.assertEqual(
            [(a.username, a.password) for a in accounts],
            [("alice", "pw1"), ("bob", "dckr_pat_x:y")],
        )

    def test_bad_line_named_by_number_only(self) -> None:
        error = self.assertRaises(
            AccountsFileError, parse_accounts, "alice:pw\nsecretwithoutuser\n", "f"
        )
        self.assertIn("line 2", str(error))
        self.assertNotIn("secretwithoutuser", str(error))
        self.assertRaises(AccountsFileError, parse_accounts, "alice:\n")
        self.assertRaises(AccountsFileError, parse_accounts, "a:1\na:2\n")


def headers(**values: str) -> Headers:
    return Headers({k.replace("_", "-").encode(): [v.encode()] for k, v in values.items()})


class PoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.a, self.b = Credentials("acct-a", "secret-a"), Credentials("acct-b", "secret-b")
        self.pool = AccountPool([self.a, self.b], self.clock, UPSTREAM)

    def test_first_account_first(self) -> None:
        self.assertEqual(self.pool.current(), self.a)

    def test_status_page_sees_every_account_and_its_rest(self) -> None:
        """The quota board (/status) lists each account by identity and shows when it rests."""
        board = QuotaBoard()
        pool = AccountPool([self.a, self.b], self.clock, UPSTREAM, board)

        def resting() -> dict[str, float | None]:
            return {q.account: q.resting_until for q in board.quotas() if q.upstream == UPSTREAM}

        self.assertEqual(resting(), {self.a.identity: None, self.b.identity: None})
        pool.observe(self.a, 429, headers(retry_after="120"))
        self.assertEqual(resting()[self.a.identity], 120.0)
        self.clock.advance(121)
        self.assertEqual(pool.current(), self.a)
        self.assertIsNone(resting()[self.a.identity])
        self.assertNotIn("secret-a", repr(board.quotas()))

    def test_429_rests_until_retry_after(self) -> None:
        self.assertTrue(self.pool.observe(self.a, 429, headers(retry_after="120")))
        self.assertEqual(self.pool.current(), self.b)
        self.assertEqual(gauge("hammal_upstream_account_resting", "acct-a"), 1)
        self.clock.advance(119)
        self.assertEqual(self.pool.current(), self.b)
        self.clock.advance(1)
        self.assertEqual(self.pool.current(), self.a)
        self.assertEqual(gauge("hammal_upstream_account_resting", "acct-a"), 0)

    def test_remaining_zero_rests_for_window(self) -> None:
        self.assertFalse(self.pool.observe(self.a, 200, headers(ratelimit_remaining="3;w=21600")))
        self.assertEqual(gauge("hammal_upstream_account_remaining", "acct-a"), 3)
        self.assertTrue(self.pool.observe(self.a, 200, headers(ratelimit_remaining="0;w=21600")))
        self.assertEqual(gauge("hammal_upstream_account_remaining", "acct-a"), 0)
        self.clock.advance(21599)
        self.assertEqual(self.pool.current(), self.b)
        self.clock.advance(1)
        self.assertEqual(self.pool.current(), self.a)

    def test_ratelimit_reset_header(self) -> None:
        self.pool.observe(self.a, 429, headers(ratelimit_reset="30", ratelimit_limit="100;w=3600"))
        self.clock.advance(29)
        self.assertEqual(self.pool.current(), self.b)
        self.clock.advance(1)
        self.assertEqual(self.pool.current(), self.a)

    def test_no_hint_rests_default(self) -> None:
        self.pool.observe(self.a, 429, Headers())
        self.clock.advance(DEFAULT_REST - 1)
        self.assertEqual(self.pool.current(), self.b)
        self.clock.advance(1)
        self.assertEqual(self.pool.current(), self.a)

    def test_all_resting_means_anonymous(self) -> None:
        self.pool.observe(self.a, 429, headers(retry_after="60"))
        self.pool.observe(self.b, 429, headers(retry_after="10"))
        self.assertIsNone(self.pool.current())
        self.clock.advance(10)
        self.assertEqual(self.pool.current(), self.b)

    def test_metrics_never_show_secrets(self) -> None:
        self.pool.observe(self.a, 200, headers(ratelimit_remaining="7;w=21600"))
        text = generate_latest(metrics.REGISTRY).decode()
        self.assertIn('account="acct-a"', text)
        self.assertNotIn("secret-a", text)


class FileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.path = self.mktemp()
        self.write("alice:one\nbob:two\n")

    def write(self, text: str) -> None:
        with open(self.path + ".new", "w") as f:
            f.write(text)
        os.replace(self.path + ".new", self.path)

    def names(self, accounts: AccountsFile) -> list[str]:
        return [a.username for a in accounts.pool.accounts]

    def test_reread_on_change(self) -> None:
        accounts = AccountsFile.load(self.path, self.clock, UPSTREAM)
        self.assertEqual(accounts.current(), Credentials("alice", "one"))
        self.write("carol:three\n")
        self.assertEqual(
            accounts.current(), Credentials("alice", "one"), "checked at most once a second"
        )
        self.clock.advance(1)
        self.assertEqual(accounts.current(), Credentials("carol", "three"))

    def test_resting_kept_across_reload(self) -> None:
        accounts = AccountsFile.load(self.path, self.clock, UPSTREAM)
        accounts.observe(Credentials("alice", "one"), 429, headers(retry_after="600"))
        self.write("alice:one\nbob:two\ndave:four\n")
        self.clock.advance(1)
        self.assertEqual(accounts.current(), Credentials("bob", "two"))
        self.assertEqual(self.names(accounts), ["alice", "bob", "dave"])

    def test_broken_new_version_keeps_old(self) -> None:
        accounts = AccountsFile.load(self.path, self.clock, UPSTREAM)
        for broken in ("garbage-line\n", "# nothing\n"):
            self.write(broken)
            self.clock.advance(1)
            self.assertEqual(self.names(accounts), ["alice", "bob"])
        os.remove(self.path)
        self.clock.advance(1)
        self.assertEqual(self.names(accounts), ["alice", "bob"])

    def test_unusable_at_start(self) -> None:
        self.assertRaises(
            AccountsFileError, AccountsFile.load, self.path + ".missing", self.clock, UPSTREAM
        )
        self.write("# empty\n")
        self.assertRaises(AccountsFileError, AccountsFile.load, self.path, self.clock, UPSTREAM)


class LimitedUpstream(FakeUpstream):
    """
    L{FakeUpstream} with per-account pull limits: token requests of users in
    C{token_limited} get 429; registry requests made with a token of a user
    in C{spent} get 429 with ``ratelimit-remaining: 0``; others see their
    C{remaining} count.
    """

    def __init__(self) -> None:
        super().__init__()
        self.token_limited: set[str] = set()
        self.spent: set[str] = set()
        self.remaining: dict[str, int] = {}

    def _token(self, request: Request) -> bytes:
        authorization = request.getHeader(b"authorization")
        if authorization:
            user = base64.b64decode(authorization.split(b" ", 1)[1]).decode().partition(":")[0]
            if user in self.token_limited:
                request.setHeader(b"retry-after", b"300")
                return self._json(
                    request, 429, {"errors": [{"code": "TOOMANYREQUESTS", "message": "limit"}]}
                )
        elif "anonymous" in self.token_limited:
            return self._json(
                request, 429, {"errors": [{"code": "TOOMANYREQUESTS", "message": "limit"}]}
            )
        return super()._token(request)

    def _registry(self, request: Request) -> Any:
        authorization = (request.getHeader(b"authorization") or b"").decode()
        user = authorization.split("-")[2] if authorization.startswith("Bearer tok-") else None
        if user is not None and user in self.spent:
            request.setHeader(b"ratelimit-remaining", b"0;w=21600")
            request.setHeader(b"retry-after", b"900")
            return self._json(
                request, 429, {"errors": [{"code": "TOOMANYREQUESTS", "message": "limit"}]}
            )
        if user in self.remaining:
            request.setHeader(b"ratelimit-remaining", f"{self.remaining[user]};w=21600".encode())
        return super()._registry(request)


class PooledClientTests(SynchronousTestCase):
    """Token requests and registry requests through L{UpstreamClient} with a pool."""

    def setUp(self) -> None:
        self.world = LimitedUpstream()
        self.world.users.update({"alice": "pw-a", "bob": "pw-b"})
        self.world.add_image("library/alpine", "3.20", b'{"schemaVersion":2}')
        self.stub = stub_for(self.world)
        self.clock = Clock()
        self.pool = AccountPool(
            [Credentials("alice", "pw-a"), Credentials("bob", "pw-b")], self.clock, REGISTRY
        )
        self.client = UpstreamClient(
            Upstream(f"https://{REGISTRY}", library_prefix=True),
            self.stub,  # type: ignore[arg-type]
            self.clock,
            MemoryTtlStore(self.clock),
            RetryPolicy(retries=0, base=1.0, random=lambda: 0.5),
            read_timeout=10,
            credential_policy=TRUST_FAKE_REALM,
            accounts=self.pool,
        )

    def get(self) -> Any:
        d = Deferred.fromCoroutine(
            self.client.request(b"GET", "library/alpine", "manifests/3.20", Headers(), Trace())
        )
        self.stub.flush()
        return d

    def token_users(self) -> list[str | None]:
        users: list[str | None] = []
        for hit in self.world.hits(REALM):
            value = hit.header("authorization")
            users.append(
                base64.b64decode(value.split(" ", 1)[1]).decode().partition(":")[0]
                if value
                else None
            )
        return users

    def test_first_account_used(self) -> None:
        self.world.remaining["alice"] = 99
        self.assertEqual(self.successResultOf(self.get()).code, 200)
        self.assertEqual(self.token_users(), ["alice"])
        self.assertEqual(gauge("hammal_upstream_account_remaining", "alice", REGISTRY), 99)

    def test_token_429_moves_to_next_account(self) -> None:
        self.world.token_limited.add("alice")
        self.assertEqual(self.successResultOf(self.get()).code, 200)
        self.assertEqual(self.token_users(), ["alice", "bob"])
        self.assertEqual(self.pool.current(), Credentials("bob", "pw-b"))
        self.clock.advance(300)
        self.assertEqual(self.pool.current(), Credentials("alice", "pw-a"))

    def test_all_accounts_limited_falls_back_to_anonymous(self) -> None:
        self.world.token_limited.update({"alice", "bob"})
        self.assertEqual(self.successResultOf(self.get()).code, 200)
        self.assertEqual(self.token_users(), ["alice", "bob", None])

    def test_everyone_limited_is_too_many_requests(self) -> None:
        self.world.token_limited.update({"alice", "bob", "anonymous"})
        self.failureResultOf(self.get(), TooManyRequests)

    def test_spent_account_on_registry_retries_as_next(self) -> None:
        """A 429 with ratelimit-remaining 0 rests the account; the retry goes at once as bob."""
        self.world.spent.add("alice")
        response = self.successResultOf(self.get())
        self.assertEqual(response.code, 200)
        self.assertEqual(self.token_users(), ["alice", "bob"])
        self.assertEqual(gauge("hammal_upstream_account_remaining", "alice", REGISTRY), 0)
        self.assertEqual(gauge("hammal_upstream_account_resting", "alice", REGISTRY), 1)
        self.clock.advance(900)
        self.assertEqual(self.pool.current(), Credentials("alice", "pw-a"))


class OptionTests(SynchronousTestCase):
    def parse(self, argv: list[str], environ: dict[str, str] | None = None) -> Any:
        options = Options(environ=environ or {})
        options.parseOptions(argv)
        return options.settings

    def test_default_and_route(self) -> None:
        settings = self.parse(
            [
                "--route",
                "q.example.com=https://quay.io",
                "--upstream",
                "https://registry-1.docker.io",
                "--upstream-credentials-file",
                "/run/secrets/hub",
                "--upstream-credentials-file",
                "q.example.com=/run/secrets/quay",
            ]
        )
        self.assertEqual(
            settings.credentials_files,
            ((None, "/run/secrets/hub"), ("q.example.com", "/run/secrets/quay")),
        )

    def test_environment(self) -> None:
        settings = self.parse([], {"HAMMAL_UPSTREAM_CREDENTIALS_FILE": "/etc/hammal/accounts"})
        self.assertEqual(settings.credentials_files, ((None, "/etc/hammal/accounts"),))

    def test_conflicts(self) -> None:
        for argv in (
            [
                "--upstream-credentials-file",
                "f",
                "--upstream-username",
                "u",
                "--upstream-password",
                "p",
            ],
            ["--upstream-credentials-file", "nohost.example.com=/f"],
            ["--upstream-credentials-file", "a", "--upstream-credentials-file", "b"],
            ["--route", "q.example.com=https://quay.io", "--upstream-credentials-file", "/f"],
        ):
            self.assertRaises(UsageError, self.parse, argv)
