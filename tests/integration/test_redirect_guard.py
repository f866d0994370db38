"""An upstream on a public address redirects to a loopback service (issue 10):
hammal refuses, serves nothing of it and caches nothing; an upstream on
loopback itself (same trust zone) is followed, as a control.

The public address is real: the scenario (``netns_redirect.py``) runs in a
network namespace of its own where ``lo`` also carries ``11.22.33.44``, so
hammal (a real ``twistd``) connects to its upstream at that address and
judges it by the connection it made. Nothing leaves the machine: the
namespace has no other interface. Needs ``unshare`` (util-linux) and ``ip``
(iproute2) and the right to create a network namespace (root).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any, Dict

from twisted.trial import unittest

from tests.integration.environment import REPO_ROOT, clean_env, make_tempdir
from tests.integration.netns_redirect import PUBLIC_ADDRESS


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    for directory in ("/usr/sbin", "/sbin", "/usr/bin"):
        if found is None and os.access(os.path.join(directory, name), os.X_OK):
            found = os.path.join(directory, name)
    return found


UNSHARE, IP = _binary("unshare"), _binary("ip")


def _namespace_problem() -> str | None:
    """Why a network namespace cannot be used here, or None."""
    if UNSHARE is None or IP is None:
        return "unshare (util-linux) and ip (iproute2) are needed (make system-deps)"
    probe = subprocess.run(
        [UNSHARE, "--net", "--", IP, "link", "set", "lo", "up"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.strip()[:200]}"
    return None


class RedirectToLoopbackTests(unittest.TestCase):
    def run_scenario(self) -> Dict[str, Any]:
        problem = _namespace_problem()
        if problem is not None:
            if os.environ.get("CI"):
                self.fail(problem)
            raise unittest.SkipTest(problem)
        workdir = make_tempdir("hammal-it-netns-")
        assert UNSHARE is not None and IP is not None
        script = (
            f"{IP} link set lo up && {IP} addr add {PUBLIC_ADDRESS}/32 dev lo && "
            f"exec {sys.executable} -m tests.integration.netns_redirect {workdir}"
        )
        env = clean_env(PYTHONPATH=REPO_ROOT)
        done = subprocess.run(
            [UNSHARE, "--net", "--", "sh", "-c", script],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        self.assertEqual(done.returncode, 0, f"scenario failed:\n{done.stderr[-4000:]}")
        report: Dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return report

    def test_public_upstream_redirect_to_loopback_refused(self) -> None:
        report = self.run_scenario()
        secret = report["secret"]
        public = report["results"]["public"]
        self.assertEqual(len(public), 4)
        for result in public:
            self.assertEqual(result["status"], 502, result)
            self.assertEqual(json.loads(result["body"])["errors"][0]["code"], "UNAVAILABLE", result)
            self.assertIn("internal address", result["body"])
            self.assertNotIn(secret, result["body"])
        self.assertEqual(
            [p for p in report["metadata_seen"] if PUBLIC_ADDRESS in p],
            [],
            "the loopback service was reached through the public upstream",
        )
        self.assertEqual(
            [f for f in report["cached"]["public"] if f.startswith("blobs/")],
            [],
            report["cached"]["public"],
        )
        self.assertNotIn(secret, json.dumps(report["cached"]["public"]))
        self.assertTrue(report["warnings"]["public"], "no warning was logged")
        self.assertNotIn("AKIA", "\n".join(report["warnings"]["public"]))

        # The control: the loopback upstream's redirects stay in its zone.
        internal = report["results"]["internal"]
        blobs = [r for r in internal if "/blobs/" in r["path"]]
        self.assertEqual([r["status"] for r in blobs], [200, 200], internal)
        self.assertEqual([r["body"] for r in blobs], [secret, secret])
        self.assertTrue([p for p in report["metadata_seen"] if "127.0.0.1" in p])
        self.assertEqual(report["warnings"]["internal"], [])
