"""hammal with ``--redis``: it uses redis, survives its loss and comes back."""

from __future__ import annotations

import itertools
import time

from tests.integration.environment import PRIVATE_PASSWORD, PRIVATE_USER
from tests.integration.images import ALL_MANIFEST_TYPES
from tests.integration.support import IntegrationTestCase


class RedisTests(IntegrationTestCase):
    """The shared redis is flushed before each test and restarted if killed."""

    def setUp(self) -> None:
        super().setUp()
        redis = self.env.redis
        if not redis.ping():
            redis.restart()
        self.assertEqual(redis.command("FLUSHALL")[:3], b"+OK")
        self.addCleanup(self._revive)

    def _revive(self) -> None:
        if not self.env.redis.ping():
            self.env.redis.restart()

    def test_pull_while_redis_dies_and_returns(self) -> None:
        redis = self.env.redis
        hammal = self.start_hammal(redis=True)
        self.pull(hammal.host, "alpine", self.env.image("library/alpine:3.20"))
        keys = redis.keys("*")
        self.assertTrue(keys, f"hammal wrote nothing to redis\n{self.diagnostics()}")

        redis.kill()
        self.assertFalse(redis.ping())
        self.pull(hammal.host, "library/ociimg", self.env.image("library/ociimg:1"))
        self.assertTrue(hammal.running(), "hammal died with redis")

        redis.restart()
        self.pull(hammal.host, "bitnami/redis", self.env.image("bitnami/redis:7"))
        self.pull(hammal.host, "alpine", self.env.image("library/alpine:3.20"))

    def test_reconnects_after_redis_restart(self) -> None:
        """After a restart hammal writes to redis again (within 20 s).

        With ``--manifest-ttl 0`` every tag request revalidates upstream and
        rewrites its tag entry, so hammal has something to write each time.
        """
        redis = self.env.redis
        hammal = self.start_hammal(redis=True, extra_args=["--manifest-ttl", "0"])
        self.pull(hammal.host, "library/ociimg", self.env.image("library/ociimg:1"))
        self.assertTrue(redis.keys("*"), "hammal wrote nothing to redis")
        redis.kill()
        redis.restart()
        self.assertEqual(redis.keys("*"), [])
        # Each tag-map entry is keyed by the Accept set, so varying Accept
        # makes hammal write new keys until it has reconnected.
        subsets = itertools.cycle(
            [c for n in (1, 2, 3, 4) for c in itertools.combinations(ALL_MANIFEST_TYPES, n)]
        )
        deadline = time.monotonic() + 20
        statuses = []
        while time.monotonic() < deadline and not redis.keys("*"):
            accept = [("Accept", t) for t in next(subsets)] + [
                ("Accept", "application/vnd.oci.image.manifest.v1+json")
            ]
            statuses.append(hammal.request("GET", "/v2/library/ociimg/manifests/1", accept).status)
            time.sleep(0.2)
        self.assertTrue(
            redis.keys("*"),
            f"hammal never wrote to the restarted redis; statuses {statuses}\n{self.diagnostics()}",
        )
        self.assertEqual(set(statuses) - {200}, set())

    def test_shared_cache_keeps_credentials_apart(self) -> None:
        """A hammal without credentials must not use tokens that one with
        credentials left in the shared redis."""
        image = self.env.image("private/secret:1")
        with_creds = self.start_hammal(
            redis=True,
            upstream_username=PRIVATE_USER,
            upstream_password=PRIVATE_PASSWORD,
        )
        self.pull(with_creds.host, "private/secret", image)
        self.assertTrue(self.env.redis.keys("*"))
        anonymous = self.start_hammal(redis=True)
        response = anonymous.request(
            "GET", "/v2/private/secret/manifests/1", [("Accept", image.media_type)]
        )
        self.assertOCIError(response, 403, "DENIED")
        response = anonymous.request(
            "GET",
            f"/v2/private/secret/manifests/{image.manifest_digest}",
            [("Accept", image.media_type)],
        )
        self.assertOCIError(response, 403, "DENIED")
        # ...while public images still work for it.
        self.pull(anonymous.host, "alpine", self.env.image("library/alpine:3.20"))
