"""
What the cache-hit path remembers between requests instead of redoing:
labelled metric children, parsed ``Accept`` lists, parsed tag digests.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from hammal import metrics
from hammal.cache import manifests
from hammal.cache.manifests import accepted_types

V2 = "application/vnd.docker.distribution.manifest.v2+json"
OCI = "application/vnd.oci.image.manifest.v1+json"


class LabelledTests(SynchronousTestCase):
    def test_same_child_as_labels(self) -> None:
        child = metrics.labelled(metrics.requests, "hitpath-test", "200")
        self.assertIs(child, metrics.requests.labels("hitpath-test", "200"))
        self.assertIs(metrics.labelled(metrics.requests, "hitpath-test", "200"), child)
        before = child._value.get()
        metrics.labelled(metrics.requests, "hitpath-test", "200").inc()
        self.assertEqual(metrics.requests.labels("hitpath-test", "200")._value.get(), before + 1)

    def test_other_labels_other_child(self) -> None:
        self.assertIsNot(
            metrics.labelled(metrics.requests, "hitpath-test", "200"),
            metrics.labelled(metrics.requests, "hitpath-test", "404"),
        )


class AcceptedTypesTests(SynchronousTestCase):
    def test_parsed_and_remembered(self) -> None:
        given = [f"{V2};q=0.9, text/html".encode(), OCI.upper().encode()]
        first = accepted_types(given)
        self.assertEqual(first, frozenset({V2, OCI}))
        self.assertIs(accepted_types(list(given)), first)
        self.assertEqual(accepted_types([]), frozenset())

    def test_bounded(self) -> None:
        self.patch(manifests, "_ACCEPTED", {})
        self.patch(manifests, "_ACCEPTED_KEPT", 3)
        for index in range(10):
            self.assertEqual(accepted_types([f"{V2}, x/{index}".encode()]), frozenset({V2}))
            self.assertLessEqual(len(manifests._ACCEPTED), 3)


class TagDigestTests(SynchronousTestCase):
    def test_parsed_once(self) -> None:
        text = "sha256:" + "ab" * 32
        self.assertIs(manifests._digest(text), manifests._digest(text))
        self.assertEqual(str(manifests._digest(text)), text)
