"""
Tests for L{hammal.cluster.peerauth}: HMAC signatures for peer requests,
on a L{task.Clock}.
"""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hammal.cluster.peerauth import (
    MAX_LIFETIME,
    ClusterKeyError,
    PeerAuth,
    generate_key,
    load_cluster_key,
)

KEY = b"k" * 32
TARGET = b"/_hammal/peer/blobs/sha256:" + b"0" * 64


class SignatureTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.auth = PeerAuth(KEY, self.clock, lifetime=30)

    def test_round_trip(self) -> None:
        header = self.auth.sign(b"GET", TARGET)
        self.assertTrue(header.startswith(b"Hammal-Peer 1700000030:"))
        self.assertTrue(self.auth.check(b"GET", TARGET, header))
        # Another instance with the same key agrees.
        self.assertTrue(PeerAuth(KEY, self.clock).check(b"GET", TARGET, header))

    def test_expires(self) -> None:
        header = self.auth.sign(b"GET", TARGET)
        self.clock.advance(30)
        self.assertTrue(self.auth.check(b"GET", TARGET, header))
        self.clock.advance(1)
        self.assertFalse(self.auth.check(b"GET", TARGET, header))

    def test_no_long_lived_signatures(self) -> None:
        """A signature that expires too far ahead is refused, even if genuine."""
        later = Clock()
        later.advance(self.clock.seconds() + MAX_LIFETIME + 10)
        header = PeerAuth(KEY, later).sign(b"GET", TARGET)
        self.assertFalse(self.auth.check(b"GET", TARGET, header))

    def test_bound_to_method_and_target(self) -> None:
        header = self.auth.sign(b"GET", TARGET)
        self.assertFalse(self.auth.check(b"HEAD", TARGET, header))
        self.assertFalse(self.auth.check(b"GET", TARGET + b"1", header))
        self.assertFalse(self.auth.check(b"GET", TARGET + b"?x=1", header))

    def test_wrong_key(self) -> None:
        header = PeerAuth(b"x" * 32, self.clock).sign(b"GET", TARGET)
        self.assertFalse(self.auth.check(b"GET", TARGET, header))

    def test_tampered_expiry(self) -> None:
        header = self.auth.sign(b"GET", TARGET)
        tampered = header.replace(b"1700000030:", b"1700000040:")
        self.assertFalse(self.auth.check(b"GET", TARGET, tampered))

    def test_garbage(self) -> None:
        for header in (
            None,
            b"",
            b"Hammal-Peer",
            b"Hammal-Peer :",
            b"Bearer abc",
            b"Hammal-Peer x:y",
            b"Hammal-Peer 1700000010:",
            b"Hammal-Peer -5:ab",
            b"Hammal-Peer 99999999999999999999:ab",
        ):
            self.assertFalse(self.auth.check(b"GET", TARGET, header), header)

    def test_short_key_refused(self) -> None:
        self.assertRaises(ClusterKeyError, PeerAuth, b"short", self.clock)

    def test_lifetime_bounded(self) -> None:
        self.assertRaises(ValueError, PeerAuth, KEY, self.clock, MAX_LIFETIME + 1)

    def test_key_not_in_repr(self) -> None:
        self.assertNotIn("kkkk", repr(self.auth))


class KeyFileTests(SynchronousTestCase):
    def write(self, content: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(content)
        return path

    def test_load(self) -> None:
        key = generate_key()
        self.assertEqual(load_cluster_key(self.write(b"  " + key + b"\n")), key)

    def test_too_short(self) -> None:
        error = self.assertRaises(ClusterKeyError, load_cluster_key, self.write(b"abc\n"))
        self.assertIn("at least 32", str(error))

    def test_missing(self) -> None:
        path = os.path.join(self.mktemp(), "none")
        error = self.assertRaises(ClusterKeyError, load_cluster_key, path)
        self.assertIn("cannot read", str(error))

    def test_from_file(self) -> None:
        clock = Clock()
        auth = PeerAuth.from_file(self.write(KEY), clock)
        self.assertTrue(PeerAuth(KEY, clock).check(b"GET", b"/", auth.sign(b"GET", b"/")))
