"""
Tests for how L{hammal.app.build_app} puts the blob cache on its storage:
the local directory alone, or over the bucket of C{--storage s3://...},
with the fill sources each needs (the blob cache itself never knows).
"""

from __future__ import annotations

import os
from typing import Any
from unittest import mock

from treq.testing import StubTreq
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from hammal.app import App, build_app
from hammal.cache.fetch import run_here
from hammal.cache.sources import ReadThrough
from hammal.cache.store import BlobStore
from hammal.cluster.fill import ClusterFills
from hammal.config import ConfigError, Settings
from hammal.storage.blobs import S3BlobStorage
from hammal.storage.s3 import S3Location
from tests.fakes import REGISTRY, FakeUpstream, stub_for

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "secret"}


class StorageWiringTests(SynchronousTestCase):
    def app(self, environ: dict[str, str] | None = None, **settings: Any) -> App:
        stub = stub_for(FakeUpstream())
        with mock.patch.dict(os.environ, environ or {}, clear=True):
            return build_app(
                Settings(upstream=f"https://{REGISTRY}", cache_dir=self.mktemp(), **settings),
                MemoryReactorClock(),
                http_client=stub,
                redirect_client=stub,
                offload=run_here,
                cluster_http=StubTreq(Resource()),
            )

    def test_local_directory(self) -> None:
        """--storage file: the directory alone, every fill straight upstream."""
        app = self.app()
        assert app.blobs is not None
        self.assertIsInstance(app.blobs.store, BlobStore)
        self.assertIsNone(app.blobs.fill_sources)

    def test_bucket_alone(self) -> None:
        """--storage s3 without a cluster: fills read through the bucket and are kept there."""
        app = self.app(CREDENTIALS, storage=S3Location("b", "p/"), s3_endpoint="http://s3.test")
        assert app.blobs is not None
        storage = app.blobs.store
        self.assertIsInstance(storage, S3BlobStorage)
        assert isinstance(storage, S3BlobStorage)
        self.assertIsInstance(storage.local, BlobStore)
        sources = app.blobs.fill_sources
        self.assertIsInstance(sources, ReadThrough)
        assert isinstance(sources, ReadThrough)
        self.assertIs(sources.storage, storage)

    def test_bucket_in_a_cluster(self) -> None:
        """In a cluster the fills ask the bucket, the lease holder, then upstream."""
        key_file = self.mktemp()
        with open(key_file, "wb") as f:
            f.write(b"k" * 40)
        app = self.app(
            CREDENTIALS,
            storage=S3Location("b", "p/"),
            s3_endpoint="http://s3.test",
            cluster_advertise="http://10.0.0.1:5000",
            cluster_key_file=key_file,
        )
        assert app.blobs is not None
        sources = app.blobs.fill_sources
        self.assertIsInstance(sources, ClusterFills)
        assert isinstance(sources, ClusterFills)
        self.assertIs(sources.storage, app.blobs.store)
        self.assertIsInstance(sources.storage, S3BlobStorage)

    def test_bucket_needs_credentials(self) -> None:
        """--storage s3://... without AWS keys is a start-up error, not a failing pull."""
        with self.assertRaises(ConfigError) as raised:
            self.app(storage=S3Location("b", "p/"), s3_endpoint="http://s3.test")
        self.assertIn("AWS_ACCESS_KEY_ID", str(raised.exception))

    def test_bucket_needs_an_endpoint(self) -> None:
        with self.assertRaises(ConfigError) as raised:
            self.app(CREDENTIALS, storage=S3Location("b", "p/"))
        self.assertIn("--s3-endpoint", str(raised.exception))
