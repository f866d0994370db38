"""Shared test-case base and assertions for the integration tests."""

from __future__ import annotations

import hashlib
import os
import shutil
from typing import Any, Dict, List, Optional, Sequence, Tuple

from twisted.trial import unittest

from tests.integration.environment import (
    HammalProcess,
    HTTPResponse,
    UpstreamEnvironment,
    get_environment,
    make_tempdir,
    missing_binaries,
    skopeo_pull,
    start_hammal,
)
from tests.integration.images import TestImage

__all__ = ["IntegrationTestCase", "file_sha256", "check_pulled_dir"]


def file_sha256(path: str) -> str:
    """``sha256:<hex>`` of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def check_pulled_dir(dest: str, image: TestImage, all_platforms: bool) -> List[str]:
    """Compare a ``skopeo copy ... dir:DEST`` result with the seeded *image*.

    Every file must hash to its name (``<hex>``, ``<hex>.manifest.json``),
    ``manifest.json`` to the seeded manifest digest, and every seeded blob
    (and with *all_platforms*, every child manifest) must be there.

    :return: the problems found (empty when all is well).
    """
    problems: List[str] = []
    names = sorted(os.listdir(dest))
    for name in names:
        if name == "version":
            continue
        got = file_sha256(os.path.join(dest, name))
        if name == "manifest.json":
            want = image.manifest_digest
        elif name.endswith(".manifest.json"):
            want = "sha256:" + name[: -len(".manifest.json")]
        else:
            want = "sha256:" + name
        if got != want:
            problems.append(f"{name}: content hashes to {got}, expected {want}")
    if "manifest.json" not in names:
        problems.append("manifest.json missing")
    wanted_blobs = image.blob_digests
    if image.is_index and not all_platforms:
        wanted_blobs = image.children[0].blob_digests
    for digest in wanted_blobs:
        hexd = digest.split(":", 1)[1]
        if hexd not in names:
            problems.append(f"blob {digest} missing")
        elif os.path.getsize(os.path.join(dest, hexd)) != image.blob_sizes[digest]:
            problems.append(f"blob {digest} has the wrong size")
    if image.is_index and all_platforms:
        for child in image.children:
            hexd = child.digest.split(":", 1)[1]
            if f"{hexd}.manifest.json" not in names:
                problems.append(f"child manifest {child.digest} missing")
    return problems


class IntegrationTestCase(unittest.TestCase):
    """Base class: the shared upstream, temp dirs, hammal launch and pulls."""

    env: UpstreamEnvironment

    def setUp(self) -> None:
        missing = missing_binaries()
        if missing:
            if os.environ.get("CI"):
                # make test installs them: in CI a skip would hide a broken set-up.
                self.fail(f"system binaries not installed: {missing}")
            raise unittest.SkipTest(f"system binaries not installed: {missing}")
        self.env = get_environment()
        self.env.reset_logs()
        self._hammals: List[HammalProcess] = []

    def make_dir(self) -> str:
        """A fresh temp dir removed when the test ends."""
        path = make_tempdir("hammal-it-test-")
        self.addCleanup(shutil.rmtree, path, True)
        return path

    def start_hammal(self, **options: Any) -> HammalProcess:
        """:func:`environment.start_hammal`, stopped when the test ends."""
        hammal = start_hammal(**options)
        self.addCleanup(hammal.stop)
        self._hammals.append(hammal)
        return hammal

    def diagnostics(self) -> str:
        """hammal's log tail and the upstream's, for failure messages."""
        parts = []
        for h in self._hammals:
            parts.append(f"--- hammal {' '.join(h.argv[3:])} ---\n{h.log_tail(4000)}")
        parts.append(self.env.logs_summary())
        return "\n".join(parts)

    def pull(
        self,
        host: str,
        name: str,
        image: TestImage,
        all_platforms: Optional[bool] = None,
        creds: Optional[Tuple[str, str]] = None,
        reference: Optional[str] = None,
    ) -> str:
        """``skopeo copy docker://HOST/NAME:TAG dir:TMP``, then check every digest.

        :param name: the repository name as the client spells it (may differ
            from ``image.repo``, e.g. ``alpine`` for ``library/alpine``).
        :param reference: ``:tag`` or ``@digest`` suffix; default ``:TAG``.
        :return: the destination directory.
        """
        if all_platforms is None:
            all_platforms = image.is_index
        dest = self.make_dir()
        ref = reference if reference is not None else f":{image.tag}"
        result = skopeo_pull(f"{host}/{name}{ref}", dest, all_platforms, creds)
        if result.returncode != 0:
            self.fail(
                f"skopeo pull of {host}/{name}{ref} failed ({result.returncode}):\n"
                f"{result.stderr[-3000:]}\n{self.diagnostics()}"
            )
        problems = check_pulled_dir(dest, image, all_platforms)
        if problems:
            self.fail(
                f"pull of {host}/{name}{ref} gave wrong content:\n  "
                + "\n  ".join(problems)
                + f"\nfiles: {sorted(os.listdir(dest))}\n{self.diagnostics()}"
            )
        return dest

    def assertOCIError(
        self,
        response: HTTPResponse,
        status: int,
        code: Optional[str],
        message_contains: Sequence[str] = (),
    ) -> Dict[str, Any]:
        """Assert an OCI error response: status, JSON ``errors[]`` with *code*
        (``None``: any code) whose message (or detail) holds each of
        *message_contains*.

        :return: the matching error object.
        """
        context = f"\n{response.describe()}\n{self.diagnostics()}"
        self.assertEqual(response.status, status, f"wrong status{context}")
        ctype = response.header("Content-Type") or ""
        self.assertIn("json", ctype.lower(), f"error is not JSON{context}")
        try:
            body = response.json()
        except ValueError:
            self.fail(f"error body is not valid JSON{context}")
        errors = body.get("errors") if isinstance(body, dict) else None
        if not isinstance(errors, list) or not errors:
            self.fail(f"no errors[] list{context}")
        codes = [e.get("code") for e in errors if isinstance(e, dict)]
        if code is None:
            self.assertTrue(
                all(isinstance(c, str) and c for c in codes), f"error without a code{context}"
            )
            code = codes[0]
        self.assertIn(code, codes, f"error code {code} not in {codes}{context}")
        error = errors[codes.index(code)]
        self.assertIsInstance(error.get("message"), str, f"no message{context}")
        for fragment in message_contains:
            self.assertIn(
                fragment,
                error["message"] + " " + str(error.get("detail", "")),
                f"error does not mention {fragment!r}{context}",
            )
        return dict(error)
