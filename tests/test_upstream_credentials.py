"""
Tests for L{hammal.upstream.credentials}: which hosts may receive upstream
credentials.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from hammal.upstream.credentials import (
    CredentialPolicy,
    is_loopback_host,
    registrable_domain,
    same_site,
)


class RegistrableDomainTests(SynchronousTestCase):
    def test_docker_hub(self) -> None:
        """The Hub's registry and its token service are one site."""
        self.assertEqual(registrable_domain("registry-1.docker.io"), "docker.io")
        self.assertTrue(same_site("registry-1.docker.io", "auth.docker.io"))

    def test_public_suffix_is_not_a_site(self) -> None:
        """Two sites under a public suffix (github.io, co.uk) are not one."""
        self.assertFalse(same_site("alice.github.io", "bob.github.io"))
        self.assertFalse(same_site("registry.example.co.uk", "auth.other.co.uk"))
        self.assertTrue(same_site("registry.example.co.uk", "auth.example.co.uk"))

    def test_other_site(self) -> None:
        self.assertFalse(same_site("registry-1.docker.io", "auth.docker.io.evil.example"))
        self.assertFalse(same_site("ghcr.io", "quay.io"))

    def test_ip_addresses_match_only_themselves(self) -> None:
        """An address has no registrable domain: 10.0.0.1 and 10.0.0.2 are strangers."""
        self.assertIsNone(registrable_domain("10.0.0.1"))
        self.assertFalse(same_site("10.0.0.1", "10.0.0.2"))
        self.assertFalse(same_site("127.0.0.1", "0.0.1"))
        self.assertTrue(same_site("127.0.0.1", "127.0.0.1"))

    def test_case_and_trailing_dot(self) -> None:
        self.assertTrue(same_site("Registry-1.Docker.IO.", "auth.docker.io"))


class LoopbackTests(SynchronousTestCase):
    def test_loopback(self) -> None:
        for host in (
            "localhost",
            "LOCALHOST",
            "a.localhost",
            "127.0.0.1",
            "127.3.2.1",
            "::1",
            "[::1]",
        ):
            self.assertTrue(is_loopback_host(host), host)

    def test_not_loopback(self) -> None:
        for host in ("10.0.0.1", "registry.test", "localhost.example.com", "169.254.169.254", ""):
            self.assertFalse(is_loopback_host(host), host)


class CredentialPolicyTests(SynchronousTestCase):
    def test_realm_trust(self) -> None:
        policy = CredentialPolicy()
        self.assertTrue(policy.realm_trusted("registry-1.docker.io", "auth.docker.io"))
        self.assertFalse(policy.realm_trusted("registry.test", "auth.test"))
        listed = CredentialPolicy(trusted_realms=frozenset({"auth.test"}))
        self.assertTrue(listed.realm_trusted("registry.test", "AUTH.test"))
        self.assertFalse(listed.realm_trusted("registry.test", "other.test"))

    def test_plain_http_only_to_loopback_by_default(self) -> None:
        policy = CredentialPolicy()
        self.assertTrue(policy.transport_allowed("https://registry.test/v2/"))
        self.assertTrue(policy.transport_allowed("http://127.0.0.1:5000/token"))
        self.assertTrue(policy.transport_allowed("http://localhost:5000/token"))
        self.assertFalse(policy.transport_allowed("http://registry.test/token"))
        self.assertFalse(policy.transport_allowed("http://10.1.2.3/token"))

    def test_plain_http_opt_in(self) -> None:
        policy = CredentialPolicy(plain_http=True)
        self.assertTrue(policy.transport_allowed("http://registry.test/token"))
