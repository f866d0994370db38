"""A pool of upstream accounts (issue 13): ``--upstream-credentials-file``.

The environment's token server limits one account at a time
(``/_admin/ratelimit?user=``) the way Docker Hub answers an account whose
pull limit is spent: ``429`` with ``Retry-After``. hammal must move to the
next account, fall back to anonymous tokens when every account rests, pick
up a changed file, and export per-account gauges without secrets.
"""

from __future__ import annotations

import os
import time
from typing import List, Optional, Tuple

from tests.integration.environment import (
    ADMIN_PASSWORD,
    ADMIN_USER,
    PRIVATE_PASSWORD,
    PRIVATE_USER,
)
from tests.integration.support import IntegrationTestCase
from tests.integration.test_access import launch_hammal, scrape


class AccountPoolTests(IntegrationTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.addCleanup(self.env.reset_logs)
        self.accounts = os.path.join(self.make_dir(), "hub-accounts")

    def write_accounts(self, *lines: str) -> None:
        with open(self.accounts + ".new", "w") as f:
            f.write("# user:password, one a line\n" + "".join(line + "\n" for line in lines))
        os.replace(self.accounts + ".new", self.accounts)

    def token_requests(self) -> List[Tuple[Optional[str], int]]:
        return [(entry["user"], entry["status"]) for entry in self.env.token_log()]

    def test_limited_accounts_rest_and_file_is_reread(self) -> None:
        self.write_accounts(f"{PRIVATE_USER}:{PRIVATE_PASSWORD}")
        self.env.set_ratelimit(True, user=PRIVATE_USER)
        hammal = launch_hammal(self, extra_args=["--upstream-credentials-file", self.accounts])

        # Its only account is limited: it rests, and an anonymous token serves.
        self.pull(hammal.host, "library/alpine", self.env.image("library/alpine:3.20"))
        self.assertEqual(
            self.token_requests(), [(PRIVATE_USER, 429), (None, 200)], self.diagnostics()
        )

        # A second account appears in the file: it takes over while alice rests.
        self.write_accounts(f"{PRIVATE_USER}:{PRIVATE_PASSWORD}", f"{ADMIN_USER}:{ADMIN_PASSWORD}")
        time.sleep(1.1)  # the file is looked at no more than once a second
        self.env.reset_logs()
        self.env.set_ratelimit(True, user=PRIVATE_USER)
        self.pull(hammal.host, "library/ociimg", self.env.image("library/ociimg:1"))
        self.assertEqual(self.token_requests(), [(ADMIN_USER, 200)], self.diagnostics())

        metrics = scrape(hammal.url + "/metrics")
        upstream = self.env.registry_url.split("://", 1)[1]
        self.assertEqual(
            metrics.get("hammal_upstream_account_resting", upstream=upstream, account=PRIVATE_USER),
            1,
        )
        self.assertEqual(
            metrics.get("hammal_upstream_account_resting", upstream=upstream, account=ADMIN_USER), 0
        )
        for secret in (PRIVATE_PASSWORD, ADMIN_PASSWORD):
            self.assertNotIn(secret, metrics.text)
            self.assertNotIn(secret, hammal.log_text())

    def test_bad_file_refused_at_start(self) -> None:
        self.write_accounts("no-colon-here")
        hammal = launch_hammal(
            self, extra_args=["--upstream-credentials-file", self.accounts], wait=False
        )
        deadline = time.monotonic() + 30
        while hammal.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertFalse(hammal.running())
        self.assertIn("line 2: expected USER:PASSWORD", hammal.log_text())
        self.assertNotIn("no-colon-here", hammal.log_text())
