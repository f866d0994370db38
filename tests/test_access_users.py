"""
Tests for L{hammal.access.users}: the single user, htpasswd files, allow
lists and the Basic header parser.

bcrypt hashes are made at cost 4 so the tests stay fast; the thread pool is
a synchronous fake, so "in a thread" is observable without threads.
"""

from __future__ import annotations

import base64
import hmac
import os
from typing import Any, Callable, cast

import bcrypt
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from hammal.access import users
from hammal.access.users import (
    AllowList,
    HtpasswdFile,
    SingleUser,
    UserDirectory,
    check_in_thread,
    parse_basic,
    parse_user_list,
)


class FakeThreadPool:
    """
    Runs "threaded" calls at once, recording the name of each function run,
    so a test can see that work was handed to the pool.
    """

    def __init__(self) -> None:
        self.ran: list[str] = []

    def callInThreadWithCallback(
        self, onResult: Callable[[bool, Any], None], f: Callable[..., Any], *a: Any, **kw: Any
    ) -> None:
        self.ran.append(getattr(f, "__name__", repr(f)))
        try:
            result = f(*a, **kw)
        except BaseException as failure:
            onResult(False, failure)
        else:
            onResult(True, result)


class FakeThreadReactor:
    """The parts of a reactor that C{deferToThreadPool} uses."""

    def __init__(self) -> None:
        self.pool = FakeThreadPool()

    def getThreadPool(self) -> FakeThreadPool:
        return self.pool

    def callFromThread(self, f: Callable[..., Any], *a: Any, **kw: Any) -> None:
        f(*a, **kw)


def bcrypt_hash(password: str, prefix: str = "2b", cost: int = 4) -> str:
    """A bcrypt hash of C{password} with the given prefix (cheap cost)."""
    hashed = bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(cost)).decode("ascii")
    return f"${prefix}$" + hashed[4:]


def capture(testcase: SynchronousTestCase, owner: Any, name: str = "log") -> list[dict[str, Any]]:
    """Replace C{owner.name} with a logger that keeps its events."""
    events: list[dict[str, Any]] = []
    testcase.patch(owner, name, Logger(observer=cast(ILogObserver, events.append)))
    return events


def basic(value: bytes) -> bytes:
    return b"Basic " + base64.b64encode(value)


class SingleUserTests(SynchronousTestCase):
    """L{SingleUser} checks the one configured user in constant time."""

    def setUp(self) -> None:
        self.user = SingleUser("alice", "s3cret:with colon")

    def test_right_credentials(self) -> None:
        self.assertTrue(self.user.check("alice", "s3cret:with colon"))

    def test_wrong_password(self) -> None:
        self.assertFalse(self.user.check("alice", "s3cret"))

    def test_wrong_username(self) -> None:
        self.assertFalse(self.user.check("bob", "s3cret:with colon"))
        self.assertFalse(self.user.check("Alice", "s3cret:with colon"))

    def test_both_wrong(self) -> None:
        self.assertFalse(self.user.check("", ""))

    def test_unicode(self) -> None:
        user = SingleUser("jürgen", "pässwört✓")
        self.assertTrue(user.check("jürgen", "pässwört✓"))
        self.assertFalse(user.check("jurgen", "pässwört✓"))

    def test_invalid_unicode_does_not_raise(self) -> None:
        self.assertFalse(self.user.check("alice\udcff", "x\ud800"))

    def test_constant_time_comparison_of_both(self) -> None:
        """
        Both the username and the password go through
        L{hmac.compare_digest} as UTF-8 bytes, even when the username is
        already wrong.
        """
        calls: list[tuple[bytes, bytes]] = []
        real = hmac.compare_digest

        def recording(a: Any, b: Any) -> bool:
            calls.append((a, b))
            return real(a, b)

        self.patch(hmac, "compare_digest", recording)
        user = SingleUser("ünï", "pw")
        self.assertFalse(user.check("mallory", "guess"))
        self.assertEqual(
            sorted(calls),
            sorted([(b"mallory", "ünï".encode()), (b"guess", b"pw")]),
        )
        calls.clear()
        self.assertTrue(user.check("ünï", "pw"))
        self.assertEqual(len(calls), 2)
        for a, b in calls:
            self.assertIsInstance(a, bytes)
            self.assertIsInstance(b, bytes)

    def test_check_in_thread(self) -> None:
        reactor = FakeThreadReactor()
        d = self.user.check_in_thread("alice", "s3cret:with colon", reactor)  # type: ignore[arg-type]
        self.assertIs(self.successResultOf(d), True)
        d = self.user.check_in_thread("alice", "nope", reactor)  # type: ignore[arg-type]
        self.assertIs(self.successResultOf(d), False)

    def test_invalid_configuration(self) -> None:
        self.assertRaises(ValueError, SingleUser, "", "pw")
        self.assertRaises(ValueError, SingleUser, "alice", "")
        self.assertRaises(ValueError, SingleUser, "al:ice", "pw")

    def test_is_a_user_directory(self) -> None:
        directory: UserDirectory = self.user
        self.assertTrue(directory.check("alice", "s3cret:with colon"))


class HtpasswdFileTests(SynchronousTestCase):
    """L{HtpasswdFile} reads bcrypt users and follows changes to the file."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.path = self.mktemp()
        self.events = capture(self, HtpasswdFile)
        self.mtime = 1_600_000_000

    def write(self, *lines: str) -> None:
        """
        Write the file with a modification time that differs from the last
        write's, whatever the filesystem's timestamp resolution.
        """
        with open(self.path, "w", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in lines))
        self.mtime += 10
        os.utime(self.path, (self.mtime, self.mtime))

    def load(self, *lines: str) -> HtpasswdFile:
        self.write(*lines)
        return HtpasswdFile(self.path, self.clock)

    def messages(self, level: LogLevel | None = None) -> list[str]:
        return [
            formatEvent(event)
            for event in self.events
            if level is None or event["log_level"] == level
        ]

    def test_bcrypt_users(self) -> None:
        directory = self.load(
            "alice:" + bcrypt_hash("wonderland"),
            "bob:" + bcrypt_hash("builder", prefix="2y"),
            "carol:" + bcrypt_hash("singer", prefix="2a"),
        )
        self.assertTrue(directory.check("alice", "wonderland"))
        self.assertTrue(directory.check("bob", "builder"))
        self.assertTrue(directory.check("carol", "singer"))
        self.assertFalse(directory.check("alice", "builder"))
        self.assertFalse(directory.check("alice", ""))
        self.assertEqual(directory.usernames, {"alice", "bob", "carol"})
        self.assertEqual(self.messages(LogLevel.warn), [])

    def test_password_with_colon_and_unicode(self) -> None:
        directory = self.load("dave:" + bcrypt_hash("a:b:ç✓"))
        self.assertTrue(directory.check("dave", "a:b:ç✓"))
        self.assertFalse(directory.check("dave", "a:b:c"))

    def test_long_password_is_cut_at_72_bytes(self) -> None:
        """
        Passwords longer than bcrypt's 72 bytes are checked on their first
        72 bytes, as the tools that made the hash did; they do not raise.
        """
        long = "x" * 72 + "tail"
        directory = self.load("eve:" + bcrypt_hash("x" * 72))
        self.assertTrue(directory.check("eve", long))
        self.assertFalse(directory.check("eve", "x" * 71))

    def test_whitespace_comments_and_blank_lines(self) -> None:
        directory = self.load(
            "# users of the mirror",
            "",
            "   ",
            "  alice:" + bcrypt_hash("pw") + "  ",
        )
        self.assertEqual(directory.usernames, {"alice"})
        self.assertTrue(directory.check("alice", "pw"))
        self.assertEqual(self.messages(LogLevel.warn), [])

    def test_duplicate_user_last_wins(self) -> None:
        directory = self.load("alice:" + bcrypt_hash("old"), "alice:" + bcrypt_hash("new"))
        self.assertTrue(directory.check("alice", "new"))
        self.assertFalse(directory.check("alice", "old"))

    def test_non_bcrypt_lines_ignored_with_one_warning_each(self) -> None:
        """
        MD5, SHA-1, crypt and plain-text lines are ignored; each gets one
        warning that names the user and not the hash.
        """
        md5 = "$apr1$r31.....$HqJZimcKQFAMYayBlzkrA/"
        sha = "{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g="
        crypt = "rqXexS6ZhobKA"
        directory = self.load(
            "md5user:" + md5,
            "shauser:" + sha,
            "cryptuser:" + crypt,
            "plainuser:hunter2",
            "truncated:$2y$05$tooshort",
            "alice:" + bcrypt_hash("pw"),
        )
        self.assertEqual(directory.usernames, {"alice"})
        self.assertFalse(directory.check("plainuser", "hunter2"))
        self.assertFalse(directory.check("shauser", "password"))
        warnings = self.messages(LogLevel.warn)
        self.assertEqual(len(warnings), 5)
        for user, secret, warning in zip(
            ["md5user", "shauser", "cryptuser", "plainuser", "truncated"],
            [md5, sha, crypt, "hunter2", "tooshort"],
            warnings,
        ):
            self.assertIn(user, warning)
            self.assertNotIn(secret, warning)
        # Checking again does not warn again.
        directory.check("alice", "pw")
        self.assertEqual(len(self.messages(LogLevel.warn)), 5)

    def test_line_without_colon(self) -> None:
        """A line that is not C{user:hash} is ignored, its text not logged."""
        directory = self.load("justapassword", ":" + bcrypt_hash("x"), "a:" + bcrypt_hash("pw"))
        self.assertEqual(directory.usernames, {"a"})
        warnings = self.messages(LogLevel.warn)
        self.assertEqual(len(warnings), 2)
        self.assertNotIn("justapassword", warnings[0])
        self.assertIn("line 1", warnings[0])

    def test_no_users_warns(self) -> None:
        directory = self.load("# nobody")
        self.assertEqual(directory.usernames, frozenset())
        self.assertFalse(directory.check("alice", "pw"))
        self.assertEqual(len(self.messages(LogLevel.warn)), 1)

    def test_user_name_not_utf8_never_matches(self) -> None:
        hashed = bcrypt_hash("pw").encode("ascii")
        with open(self.path, "wb") as handle:
            handle.write(b"caf\xe9:" + hashed + b"\n")
        directory = HtpasswdFile(self.path, self.clock)
        self.assertFalse(directory.check("caf\ufffd", "pw"))
        self.assertFalse(directory.check("café", "pw"))

    def test_missing_file(self) -> None:
        error = self.assertRaises(ValueError, HtpasswdFile, self.path, self.clock)
        message = str(error)
        self.assertIn(self.path, message)
        self.assertNotIn("\n", message)

    def test_directory_instead_of_file(self) -> None:
        os.mkdir(self.path)
        error = self.assertRaises(ValueError, HtpasswdFile, self.path, self.clock)
        self.assertIn(self.path, str(error))

    def test_unknown_user_runs_one_dummy_check(self) -> None:
        """
        An unknown user costs one bcrypt check, at the cost of the file's
        users, like a wrong password does.
        """
        directory = self.load("alice:" + bcrypt_hash("pw", cost=5))
        checked: list[bytes] = []
        real = bcrypt.checkpw

        def recording(password: bytes, hashed: bytes) -> bool:
            checked.append(hashed)
            return real(password, hashed)

        self.patch(users.bcrypt, "checkpw", recording)
        self.assertFalse(directory.check("mallory", "pw"))
        self.assertEqual(len(checked), 1)
        self.assertTrue(checked[0].startswith(b"$2b$05$"))
        checked.clear()
        self.assertFalse(directory.check("alice", "wrong"))
        self.assertEqual(len(checked), 1)

    def test_dummy_hash_never_matches(self) -> None:
        """The dummy hash is a well-formed hash of no sendable password."""
        directory = self.load("alice:" + bcrypt_hash("pw"))
        for password in ["", "pw", "dummy", "x" * 100]:
            self.assertFalse(directory.check("nobody", password))

    def test_no_reload_before_interval(self) -> None:
        directory = self.load("alice:" + bcrypt_hash("one"))
        self.write("alice:" + bcrypt_hash("two"))
        self.clock.advance(0.5)
        self.assertTrue(directory.check("alice", "one"))
        self.assertFalse(directory.check("alice", "two"))

    def test_reload_on_change(self) -> None:
        directory = self.load("alice:" + bcrypt_hash("one"))
        self.write("alice:" + bcrypt_hash("two"), "bob:" + bcrypt_hash("three"))
        self.clock.advance(1.01)
        self.assertTrue(directory.check("alice", "two"))
        self.assertFalse(directory.check("alice", "one"))
        self.assertTrue(directory.check("bob", "three"))
        self.assertEqual(directory.usernames, {"alice", "bob"})
        self.assertTrue(any("reloaded" in message for message in self.messages(LogLevel.info)))

    def test_reload_interval_is_configurable(self) -> None:
        self.write("alice:" + bcrypt_hash("one"))
        directory = HtpasswdFile(self.path, self.clock, reload_interval=30)
        self.write("alice:" + bcrypt_hash("two"))
        self.clock.advance(29)
        self.assertTrue(directory.check("alice", "one"))
        self.clock.advance(1)
        self.assertTrue(directory.check("alice", "two"))

    def test_unchanged_file_is_not_read_again(self) -> None:
        directory = self.load("alice:" + bcrypt_hash("pw"))
        reads: list[str] = []
        self.patch(directory, "_load", lambda: reads.append("read"))
        self.clock.advance(5)
        self.assertTrue(directory.check("alice", "pw"))
        self.assertEqual(reads, [])

    def test_stat_at_most_once_per_interval(self) -> None:
        directory = self.load("alice:" + bcrypt_hash("pw"))
        stats: list[str] = []
        real = os.stat

        def counting(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
            if path == self.path:
                stats.append(path)
            return real(path, *args, **kwargs)

        self.patch(users.os, "stat", counting)
        self.clock.advance(1)
        for _ in range(5):
            directory.check("alice", "pw")
        self.assertEqual(len(stats), 1)
        self.clock.advance(0.9)
        directory.check("alice", "pw")
        self.assertEqual(len(stats), 1)
        self.clock.advance(0.1)
        directory.check("alice", "pw")
        self.assertEqual(len(stats), 2)

    def test_read_error_keeps_last_good_content(self) -> None:
        """
        When the file disappears, the users read before stay; one warning is
        logged until it can be read again.
        """
        directory = self.load("alice:" + bcrypt_hash("pw"))
        os.remove(self.path)
        self.clock.advance(1)
        self.assertTrue(directory.check("alice", "pw"))
        self.clock.advance(1)
        self.assertTrue(directory.check("alice", "pw"))
        warnings = self.messages(LogLevel.warn)
        self.assertEqual(len(warnings), 1)
        self.assertIn(self.path, warnings[0])
        self.write("bob:" + bcrypt_hash("new"))
        self.clock.advance(1)
        self.assertTrue(directory.check("bob", "new"))
        self.assertFalse(directory.check("alice", "pw"))
        self.assertTrue(
            any("readable again" in message for message in self.messages(LogLevel.info))
        )

    def test_check_in_thread(self) -> None:
        """The bcrypt work runs on the reactor's thread pool."""
        directory = self.load("alice:" + bcrypt_hash("pw"))
        reactor = FakeThreadReactor()
        d = directory.check_in_thread("alice", "pw", reactor)  # type: ignore[arg-type]
        self.assertIs(self.successResultOf(d), True)
        d = directory.check_in_thread("alice", "nope", reactor)  # type: ignore[arg-type]
        self.assertIs(self.successResultOf(d), False)
        d = directory.check_in_thread("mallory", "pw", reactor)  # type: ignore[arg-type]
        self.assertIs(self.successResultOf(d), False)
        self.assertEqual(reactor.pool.ran, ["_bcrypt_matches"] * 3)

    def test_check_in_thread_reloads(self) -> None:
        directory = self.load("alice:" + bcrypt_hash("one"))
        self.write("alice:" + bcrypt_hash("two"))
        self.clock.advance(2)
        d = directory.check_in_thread("alice", "two", FakeThreadReactor())  # type: ignore[arg-type]
        self.assertIs(self.successResultOf(d), True)


class RecordingDirectory:
    """A L{UserDirectory} without C{check_in_thread} that records checks."""

    def __init__(self, good: dict[str, str]) -> None:
        self.good = good
        self.checked: list[str] = []

    def check(self, username: str, password: str) -> bool:
        self.checked.append(username)
        return self.good.get(username) == password


class AllowListTests(SynchronousTestCase):
    """L{AllowList} admits only listed users, with valid credentials."""

    def setUp(self) -> None:
        self.inner = RecordingDirectory({"alice": "a", "bob": "b"})
        self.events = capture(self, AllowList)

    def test_listed_user(self) -> None:
        directory = AllowList(self.inner, {"alice"})
        self.assertTrue(directory.check("alice", "a"))
        self.assertFalse(directory.check("alice", "b"))

    def test_unlisted_user_refused_with_valid_credentials(self) -> None:
        directory = AllowList(self.inner, ["alice"])
        self.assertFalse(directory.check("bob", "b"))
        # The password is still checked, so the refusal takes as long.
        self.assertEqual(self.inner.checked, ["bob"])
        messages = [formatEvent(event) for event in self.events]
        self.assertEqual(len(messages), 1)
        self.assertIn("bob", messages[0])
        self.assertNotIn("'b'", messages[0])

    def test_unlisted_user_wrong_password_not_logged(self) -> None:
        directory = AllowList(self.inner, ["alice"])
        self.assertFalse(directory.check("mallory", "x"))
        self.assertEqual(self.events, [])

    def test_no_list_admits_all(self) -> None:
        directory = AllowList(self.inner)
        self.assertTrue(directory.check("alice", "a"))
        self.assertTrue(directory.check("bob", "b"))
        self.assertFalse(directory.check("bob", "a"))

    def test_empty_list_is_an_error(self) -> None:
        self.assertRaises(ValueError, AllowList, self.inner, [])

    def test_check_in_thread_without_threaded_inner(self) -> None:
        """A directory with only C{check} is run on the thread pool."""
        reactor = FakeThreadReactor()
        directory = AllowList(self.inner, ["alice"])
        d = directory.check_in_thread("alice", "a", reactor)  # type: ignore[arg-type]
        self.assertIs(self.successResultOf(d), True)
        d = directory.check_in_thread("bob", "b", reactor)  # type: ignore[arg-type]
        self.assertIs(self.successResultOf(d), False)
        self.assertEqual(reactor.pool.ran, ["check", "check"])

    def test_check_in_thread_over_htpasswd(self) -> None:
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write(f"alice:{bcrypt_hash('a')}\nbob:{bcrypt_hash('b')}\n")
        directory = AllowList(HtpasswdFile(path, Clock()), parse_user_list("alice"))
        reactor = FakeThreadReactor()
        self.assertIs(
            self.successResultOf(directory.check_in_thread("alice", "a", reactor)),  # type: ignore[arg-type]
            True,
        )
        self.assertIs(
            self.successResultOf(directory.check_in_thread("bob", "b", reactor)),  # type: ignore[arg-type]
            False,
        )
        self.assertEqual(reactor.pool.ran, ["_bcrypt_matches", "_bcrypt_matches"])

    def test_check_in_thread_helper(self) -> None:
        reactor = FakeThreadReactor()
        d = check_in_thread(SingleUser("u", "p"), "u", "p", reactor)  # type: ignore[arg-type]
        self.assertIs(self.successResultOf(d), True)
        self.assertEqual(reactor.pool.ran, [])

    def test_parse_user_list(self) -> None:
        self.assertEqual(parse_user_list("a,b"), {"a", "b"})
        self.assertEqual(parse_user_list(" a , b ,, "), {"a", "b"})
        self.assertEqual(parse_user_list(""), frozenset())


class ParseBasicTests(SynchronousTestCase):
    """L{parse_basic} reads Basic credentials and never raises."""

    def test_valid(self) -> None:
        self.assertEqual(parse_basic(basic(b"alice:secret")), ("alice", "secret"))

    def test_scheme_case_insensitive(self) -> None:
        value = base64.b64encode(b"alice:secret")
        for scheme in [b"basic", b"BASIC", b"bAsIc"]:
            self.assertEqual(parse_basic(scheme + b" " + value), ("alice", "secret"))

    def test_extra_whitespace(self) -> None:
        value = base64.b64encode(b"alice:secret")
        self.assertEqual(parse_basic(b"  Basic   " + value + b"  "), ("alice", "secret"))

    def test_password_split_on_first_colon(self) -> None:
        self.assertEqual(parse_basic(basic(b"alice:a:b:c")), ("alice", "a:b:c"))

    def test_empty_password(self) -> None:
        self.assertEqual(parse_basic(basic(b"alice:")), ("alice", ""))

    def test_utf8(self) -> None:
        self.assertEqual(parse_basic(basic("jürgen:pässwört".encode())), ("jürgen", "pässwört"))

    def test_missing(self) -> None:
        self.assertIsNone(parse_basic(None))
        self.assertIsNone(parse_basic(b""))
        self.assertIsNone(parse_basic(b"   "))

    def test_scheme_only(self) -> None:
        self.assertIsNone(parse_basic(b"Basic"))
        self.assertIsNone(parse_basic(b"Basic "))

    def test_no_colon(self) -> None:
        self.assertIsNone(parse_basic(basic(b"alicesecret")))

    def test_empty_username(self) -> None:
        self.assertIsNone(parse_basic(basic(b":secret")))
        self.assertIsNone(parse_basic(basic(b"")))

    def test_bad_base64(self) -> None:
        for value in [
            b"Basic !!!!",
            b"Basic YWxpY2U6cw",  # missing padding
            b"Basic YWxpY2U6cw==YQ==",  # data after padding
            b"Basic YWxp Y2U6",
            b"Basic YWxp\tY2U6",
            b"Basic a",
        ]:
            self.assertIsNone(parse_basic(value), value)

    def test_not_utf8(self) -> None:
        self.assertIsNone(parse_basic(basic(b"al\xffce:secret")))
        self.assertIsNone(parse_basic(basic(b"alice:\xc3")))

    def test_wrong_scheme(self) -> None:
        value = base64.b64encode(b"alice:secret")
        for scheme in [b"Bearer", b"Digest", b"Basicx", b"Negotiate"]:
            self.assertIsNone(parse_basic(scheme + b" " + value))
        self.assertIsNone(parse_basic(value))

    def test_non_ascii_header_bytes(self) -> None:
        self.assertIsNone(parse_basic(b"Basic \xff\xfe"))
        self.assertIsNone(parse_basic(b"\xffBasic YWxpY2U6c2VjcmV0"))
