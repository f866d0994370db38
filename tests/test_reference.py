"""
Tests for L{hammal.reference}: the OCI distribution-spec grammar
of repository names, tags and digests, and the ``library/`` rewrite.
"""

from __future__ import annotations

import hashlib

from twisted.trial.unittest import SynchronousTestCase

from hammal.errors import DigestInvalid, NameInvalid, RegistryError, TagInvalid
from hammal.reference import (
    MAX_NAME_LENGTH,
    Digest,
    is_docker_hub,
    parse_reference,
    parse_tag,
    pull_scope,
    rewrite_scope,
    upstream_name,
    validate_name,
)

SHA256_HEX = hashlib.sha256(b"hammal").hexdigest()
SHA512_HEX = hashlib.sha512(b"hammal").hexdigest()


class ValidateNameTests(SynchronousTestCase):
    """L{validate_name} accepts the spec's names and nothing else."""

    def assertValid(self, name: str) -> None:
        self.assertEqual(validate_name(name), name)

    def assertInvalid(self, name: str) -> NameInvalid:
        error = self.assertRaises(NameInvalid, validate_name, name)
        self.assertEqual(error.code, "NAME_INVALID")
        self.assertEqual(error.status, 400)
        return error

    def test_simple(self) -> None:
        for name in ("alpine", "library/alpine", "a", "0", "a/b/c/d", "x1/y2"):
            self.assertValid(name)

    def test_separators(self) -> None:
        """``.``, ``_``, ``__`` and runs of ``-`` separate alphanumerics."""
        for name in ("a.b", "a_b", "a__b", "a-b", "a--b", "a---b", "my.org/my_repo-x__y"):
            self.assertValid(name)

    def test_bad_separators(self) -> None:
        """
        Three underscores, doubled dots, mixed separators, and separators at
        either end of a component are all rejected.
        """
        for name in ("a___b", "a..b", "a._b", "a-.b", "a_-b", "-a", "a-", "_a", "a_", ".a", "a."):
            self.assertInvalid(name)

    def test_traversal(self) -> None:
        for name in ("..", ".", "../etc", "a/../b", "a/./b", "a/..", "../../../etc/passwd"):
            self.assertInvalid(name)

    def test_empty_components(self) -> None:
        for name in ("a//b", "/a", "a/", "/", "//"):
            self.assertInvalid(name)

    def test_empty(self) -> None:
        error = self.assertInvalid("")
        self.assertIn("empty", error.message)

    def test_uppercase(self) -> None:
        for name in ("Alpine", "library/Alpine", "ALPINE"):
            self.assertInvalid(name)

    def test_url_syntax(self) -> None:
        """Nothing that could change the meaning of a URL passes."""
        for name in (
            "a%2fb",
            "a%2e%2e",
            "a?b",
            "a#b",
            "a b",
            "a:b",
            "a@b",
            "a\\b",
            "a\nb",
            "alpine\n",
            "a\x00b",
            "host:5000/a",
        ):
            self.assertInvalid(name)

    def test_non_ascii(self) -> None:
        for name in ("caf\u00e9", "\u0430lpine", "a/\u2024\u2024", "\uff41"):
            self.assertInvalid(name)

    def test_length_limit(self) -> None:
        """255 characters pass; 256 do not, whatever they are made of."""
        self.assertEqual(MAX_NAME_LENGTH, 255)
        self.assertValid("a" * 255)
        self.assertValid("a/" * 127 + "a")
        error = self.assertInvalid("a" * 256)
        self.assertIn("255", error.message)

    def test_huge_name_message_bounded(self) -> None:
        """A huge invalid name does not end up whole in the error."""
        error = self.assertInvalid("A" * 10000)
        self.assertLess(len(error.message), 300)

    def test_detail_names_the_name(self) -> None:
        """A grammar failure carries the offending name as its detail."""
        error = self.assertInvalid("a/B")
        self.assertEqual(error.detail, {"name": "a/B"})
        self.assertEqual(error.as_dict()["detail"], {"name": "a/B"})


class ParseTagTests(SynchronousTestCase):
    """L{parse_tag} enforces ``[A-Za-z0-9_][A-Za-z0-9._-]{0,127}``."""

    def test_valid(self) -> None:
        for tag in ("latest", "3.19", "v1.2.3-rc.1", "_private", "UPPER", "a", "0", "x__y--z.."):
            self.assertEqual(parse_tag(tag), tag)

    def test_length(self) -> None:
        self.assertEqual(parse_tag("a" * 128), "a" * 128)
        error = self.assertRaises(TagInvalid, parse_tag, "a" * 129)
        self.assertEqual((error.code, error.status), ("TAG_INVALID", 400))

    def test_invalid(self) -> None:
        for tag in (
            "",
            ".hidden",
            "-dash",
            "..",
            "a/b",
            "a:b",
            "a b",
            "a%2f",
            "latest\n",
            "t\u00e4g",
            "\uff11",
        ):
            self.assertRaises(TagInvalid, parse_tag, tag)

    def test_message_bounded(self) -> None:
        error = self.assertRaises(TagInvalid, parse_tag, "!" * 5000)
        self.assertLess(len(error.message), 200)


class DigestTests(SynchronousTestCase):
    """L{Digest.parse} accepts lower-case sha256 and sha512 digests only."""

    def test_sha256(self) -> None:
        digest = Digest.parse("sha256:" + SHA256_HEX)
        self.assertEqual(digest, Digest("sha256", SHA256_HEX))
        self.assertEqual(str(digest), "sha256:" + SHA256_HEX)

    def test_sha512(self) -> None:
        digest = Digest.parse("sha512:" + SHA512_HEX)
        self.assertEqual((digest.algorithm, digest.hex), ("sha512", SHA512_HEX))

    def test_wrong_length(self) -> None:
        for text in (
            "sha256:" + SHA256_HEX[:-1],
            "sha256:" + SHA256_HEX + "0",
            "sha256:" + SHA512_HEX,
            "sha512:" + SHA256_HEX,
            "sha256:",
        ):
            self.assertRaises(DigestInvalid, Digest.parse, text)

    def test_uppercase_hex(self) -> None:
        error = self.assertRaises(DigestInvalid, Digest.parse, "sha256:" + SHA256_HEX.upper())
        self.assertIn("lower-case", error.message)

    def test_non_hex(self) -> None:
        for bad in ("g" * 64, "=" * 64, "_" * 64, "-" * 64):
            self.assertRaises(DigestInvalid, Digest.parse, "sha256:" + bad)

    def test_unknown_algorithm(self) -> None:
        for text in (
            "md5:" + "0" * 32,
            "sha1:" + "0" * 40,
            "sha384:" + "0" * 96,
            "SHA256:" + SHA256_HEX,
        ):
            self.assertRaises(DigestInvalid, Digest.parse, text)
        error = self.assertRaises(DigestInvalid, Digest.parse, "blake3:" + "0" * 64)
        self.assertIn("unsupported", error.message)

    def test_malformed(self) -> None:
        for text in (
            "",
            ":",
            SHA256_HEX,
            ":" + SHA256_HEX,
            "sha256::" + SHA256_HEX,
            "sha256:" + SHA256_HEX + "\n",
            "sha256:" + SHA256_HEX[:63] + "\u0661",
            "sha256:../../" + SHA256_HEX[:58],
            "sha256:" + SHA256_HEX[:60] + "%2e%2e",
        ):
            error = self.assertRaises(DigestInvalid, Digest.parse, text)
            self.assertEqual((error.code, error.status), ("DIGEST_INVALID", 400))

    def test_message_bounded(self) -> None:
        error = self.assertRaises(DigestInvalid, Digest.parse, "x" * 10000)
        self.assertLess(len(error.message), 300)

    def test_of_and_matches(self) -> None:
        digest = Digest.of(b"hammal")
        self.assertEqual(digest, Digest("sha256", SHA256_HEX))
        hasher = digest.hasher()
        self.assertFalse(digest.matches(hasher))
        hasher.update(b"hammal")
        self.assertTrue(digest.matches(hasher))
        self.assertEqual(Digest.of(b"hammal", "sha512").hex, SHA512_HEX)
        self.assertTrue(Digest.parse("sha512:" + SHA512_HEX).matches(hashlib.sha512(b"hammal")))


class ParseReferenceTests(SynchronousTestCase):
    """L{parse_reference} tells tags from digests by the colon."""

    def test_tag(self) -> None:
        self.assertEqual(parse_reference("latest"), "latest")

    def test_digest(self) -> None:
        self.assertEqual(parse_reference("sha256:" + SHA256_HEX), Digest("sha256", SHA256_HEX))

    def test_colon_means_digest(self) -> None:
        """Anything with a colon is judged as a digest, never as a tag."""
        self.assertRaises(DigestInvalid, parse_reference, "latest:x")

    def test_bad_tag(self) -> None:
        self.assertRaises(TagInvalid, parse_reference, "..")

    def test_errors_are_registry_errors(self) -> None:
        for text in ("", "x:y", "/"):
            self.assertRaises(RegistryError, parse_reference, text)


class LibraryPrefixTests(SynchronousTestCase):
    """One-part names live under ``library/`` on Docker Hub."""

    def test_is_docker_hub(self) -> None:
        for host in (
            "registry-1.docker.io",
            "docker.io",
            "index.docker.io",
            "REGISTRY-1.Docker.IO",
        ):
            self.assertTrue(is_docker_hub(host), host)
        for host in ("ghcr.io", "quay.io", "docker.io.evil.test", "registry.test", ""):
            self.assertFalse(is_docker_hub(host), host)

    def test_upstream_name(self) -> None:
        self.assertEqual(upstream_name("alpine", True), "library/alpine")
        self.assertEqual(upstream_name("alpine", False), "alpine")
        self.assertEqual(upstream_name("bitnami/redis", True), "bitnami/redis")
        self.assertEqual(upstream_name("library/alpine", True), "library/alpine")

    def test_pull_scope(self) -> None:
        self.assertEqual(pull_scope("library/alpine"), "repository:library/alpine:pull")

    def test_rewrite_scope(self) -> None:
        self.assertEqual(
            rewrite_scope("repository:alpine:pull", True), "repository:library/alpine:pull"
        )
        self.assertEqual(
            rewrite_scope("repository:alpine:pull,push", True),
            "repository:library/alpine:pull,push",
        )
        self.assertEqual(rewrite_scope("repository:alpine:pull", False), "repository:alpine:pull")
        self.assertEqual(
            rewrite_scope("repository:bitnami/redis:pull", True), "repository:bitnami/redis:pull"
        )

    def test_rewrite_other_scopes(self) -> None:
        """Non-repository scopes and malformed ones pass unchanged."""
        for scope in (
            "registry:catalog:*",
            "repository:alpine",
            "alpine",
            "",
            "repository(plugin):x:pull",
        ):
            self.assertEqual(rewrite_scope(scope, True), scope)
