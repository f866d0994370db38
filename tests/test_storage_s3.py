"""
Tests for L{hammal.storage.s3} against an in-memory S3 endpoint served by
L{treq.testing.StubTreq} (the real thing, SeaweedFS, is in
L{tests.cluster.test_s3_seaweedfs}).
"""

from __future__ import annotations

import hashlib
from typing import Any

import treq
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hammal.storage.objects import object_key
from hammal.storage.s3 import (
    MIN_PART_SIZE,
    S3Credentials,
    S3Error,
    S3Location,
    S3NotFound,
    S3Store,
    S3Unavailable,
)
from tests.cluster.fakes import FakeS3

ENDPOINT = "http://s3.test:8333"
MiB = 1024 * 1024


class LocationTests(SynchronousTestCase):
    def test_bucket_and_prefix(self) -> None:
        self.assertEqual(S3Location.parse("s3://blobs/hammal"), S3Location("blobs", "hammal/"))
        self.assertEqual(S3Location.parse("s3://blobs/a/b/"), S3Location("blobs", "a/b/"))
        self.assertEqual(S3Location.parse("s3://blobs"), S3Location("blobs", ""))

    def test_not_s3(self) -> None:
        for value in ("file", "http://x/y", "s3:///prefix", "s3://b/p?x=1"):
            self.assertRaises(ValueError, S3Location.parse, value)


class CredentialTests(SynchronousTestCase):
    def test_from_environ(self) -> None:
        creds = S3Credentials.from_environ(
            {"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK", "AWS_REGION": "eu-west-3"}
        )
        self.assertEqual(
            (creds.access_key, creds.secret_key, creds.region, creds.session_token),
            ("AK", "SK", "eu-west-3", None),
        )

    def test_default_region(self) -> None:
        env = {"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK"}
        self.assertEqual(S3Credentials.from_environ(env).region, "us-east-1")
        env["AWS_DEFAULT_REGION"] = "ca-central-1"
        self.assertEqual(S3Credentials.from_environ(env).region, "ca-central-1")

    def test_missing(self) -> None:
        self.assertRaises(ValueError, S3Credentials.from_environ, {"AWS_ACCESS_KEY_ID": "AK"})

    def test_secret_not_in_repr(self) -> None:
        creds = S3Credentials("AK", "very-secret", "us-east-1", "token-secret")
        self.assertNotIn("secret", repr(creds))


class StoreTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.s3 = FakeS3("blobs")
        self.stub = StubTreq(self.s3)
        self.clock = Clock()
        self.store = S3Store(
            ENDPOINT,
            S3Location("blobs", "hammal/"),
            S3Credentials("AKIDEXAMPLE", "secret", "eu-west-3"),
            self.stub,
            self.clock,
            timeout=30.0,
        )

    def done(self, d: Any) -> Any:
        self.stub.flush()
        return self.successResultOf(d)

    def failed(self, d: Any, *types: type) -> Any:
        self.stub.flush()
        return self.failureResultOf(d, *types).value

    def body(self, response: Any) -> bytes:
        return self.done(treq.content(response))  # type: ignore[no-any-return]


class RequestTests(StoreTestCase):
    def test_path_style_url(self) -> None:
        self.assertEqual(
            self.store.url("blobs/sha256:ab cd"),
            "http://s3.test:8333/blobs/hammal/blobs/sha256%3Aab%20cd",
        )
        self.assertEqual(
            self.store.url("k", [("partNumber", "2"), ("uploadId", "a+b/=")]),
            "http://s3.test:8333/blobs/hammal/k?partNumber=2&uploadId=a%2Bb%2F%3D",
        )

    def test_signed_by_sigv4(self) -> None:
        self.done(self.store.size("x"))
        _method, uri, headers, _ = self.s3.requests[-1]
        self.assertEqual(uri, "/blobs/hammal/x")
        authorization = headers["authorization"]
        self.assertTrue(
            authorization.startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"),
            authorization,
        )
        self.assertIn("/eu-west-3/s3/aws4_request", authorization)
        self.assertIn("SignedHeaders=host;x-amz-content-sha256;x-amz-date", authorization)
        self.assertEqual(headers["x-amz-content-sha256"], hashlib.sha256(b"").hexdigest())
        self.assertNotIn("secret", repr(self.s3.requests))

    def test_session_token_sent(self) -> None:
        store = S3Store(
            ENDPOINT,
            S3Location("blobs"),
            S3Credentials("AK", "SK", "us-east-1", "TOKEN"),
            self.stub,
            self.clock,
        )
        self.done(store.size("x"))
        self.assertEqual(self.s3.requests[-1][2]["x-amz-security-token"], "TOKEN")

    def test_endpoint_must_be_http(self) -> None:
        for endpoint in ("s3.test", "ftp://s3.test"):
            self.assertRaises(
                ValueError,
                S3Store,
                endpoint,
                S3Location("b"),
                S3Credentials("a", "b"),
                self.stub,
                self.clock,
            )

    def test_parts_at_least_8_mib(self) -> None:
        self.assertRaises(
            ValueError,
            S3Store,
            ENDPOINT,
            S3Location("b"),
            S3Credentials("a", "b"),
            self.stub,
            self.clock,
            part_size=5 * MiB,
        )

    def test_timeout(self) -> None:
        """A store that never answers fails the call after C{timeout}."""
        self.s3.hold = True
        d = self.store.size("x")
        self.stub.flush()
        self.assertNoResult(d)
        self.clock.advance(30.0)
        error = self.failureResultOf(d, S3Unavailable).value
        self.assertIn("no answer within 30s", error.message)


class ReadTests(StoreTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.data = bytes(range(256)) * 40
        self.s3.objects["hammal/blob"] = self.data

    def test_head(self) -> None:
        self.assertEqual(self.done(self.store.size("blob")), len(self.data))
        self.assertTrue(self.done(self.store.exists("blob")))
        self.assertIsNone(self.done(self.store.size("nope")))
        self.assertFalse(self.done(self.store.exists("nope")))
        self.assertEqual(self.s3.requests[-1][0], "HEAD")

    def test_whole(self) -> None:
        response = self.done(self.store.read("blob"))
        self.assertEqual(response.code, 200)
        self.assertNotIn("range", self.s3.requests[-1][2])
        self.assertEqual(self.body(response), self.data)

    def test_range(self) -> None:
        response = self.done(self.store.read("blob", 100, 1100))
        self.assertEqual(response.code, 206)
        self.assertEqual(self.s3.requests[-1][2]["range"], "bytes=100-1099")
        self.assertEqual(self.body(response), self.data[100:1100])

    def test_open_range(self) -> None:
        response = self.done(self.store.read("blob", 10000))
        self.assertEqual(self.s3.requests[-1][2]["range"], "bytes=10000-")
        self.assertEqual(self.body(response), self.data[10000:])

    def test_range_past_the_end(self) -> None:
        error = self.failed(self.store.read("blob", len(self.data)), S3Error)
        self.assertEqual((error.status, error.code), (416, "InvalidRange"))

    def test_missing(self) -> None:
        error = self.failed(self.store.read("nope"), S3NotFound)
        self.assertEqual(error.code, "NoSuchKey")

    def test_bad_range(self) -> None:
        self.assertRaises(ValueError, self.store.read, "blob", 10, 10)
        self.assertRaises(ValueError, self.store.read, "blob", -1)

    def test_streams(self) -> None:
        """The response comes before the body: nothing is buffered."""
        self.s3.hold = True
        d = self.store.read("blob")
        self.stub.flush()
        (request,) = self.s3.held
        request.setResponseCode(200)
        request.write(b"first")
        self.stub.flush()
        response = self.successResultOf(d)
        chunks: list[bytes] = []
        done = treq.collect(response, chunks.append)
        self.stub.flush()
        self.assertEqual(b"".join(chunks), b"first")
        self.assertNoResult(done)
        request.write(b"second")
        request.finish()
        self.stub.flush()
        self.successResultOf(done)
        self.assertEqual(b"".join(chunks), b"firstsecond")

    def test_delete(self) -> None:
        self.done(self.store.delete("blob"))
        self.assertNotIn("hammal/blob", self.s3.objects)


class UploadTests(StoreTestCase):
    def write_all(self, upload: Any, data: bytes, chunk: int = MiB) -> None:
        for offset in range(0, len(data), chunk):
            self.done(upload.write(data[offset : offset + chunk]))

    def test_small_blob_is_one_put_at_completion(self) -> None:
        upload = self.store.open_upload("small")
        self.write_all(upload, b"x" * 1000, chunk=100)
        self.assertEqual(self.s3.requests, [])
        self.assertNotIn("hammal/small", self.s3.objects)
        self.done(upload.complete())
        self.assertEqual(self.s3.objects["hammal/small"], b"x" * 1000)
        self.assertEqual([r[0] for r in self.s3.requests], ["PUT"])
        # A small body's payload hash is signed.
        self.assertEqual(
            self.s3.requests[0][2]["x-amz-content-sha256"],
            hashlib.sha256(b"x" * 1000).hexdigest(),
        )

    def test_empty_blob(self) -> None:
        upload = self.store.open_upload("empty")
        self.done(upload.complete())
        self.assertEqual(self.s3.objects["hammal/empty"], b"")

    def test_large_blob_uploads_parts_while_streaming(self) -> None:
        data = hashlib.sha256(b"seed").digest() * (20 * MiB // 32 + 1000)
        upload = self.store.open_upload("large")
        self.write_all(upload, data[: 17 * MiB])
        # Two full parts are out before the blob has finished arriving ...
        self.assertEqual(upload.parts, 2)
        # ... but no object exists until the digest is known to match.
        self.assertNotIn("hammal/large", self.s3.objects)
        self.write_all(upload, data[17 * MiB :])
        self.done(upload.complete())
        self.assertEqual(self.s3.objects["hammal/large"], data)
        self.assertEqual(self.s3.uploads, {})
        sizes = [size for method, uri, _, size in self.s3.requests if "partNumber" in uri]
        self.assertEqual(len(sizes), 3)
        self.assertTrue(all(size >= MIN_PART_SIZE for size in sizes[:-1]), sizes)
        self.assertEqual(sum(sizes), len(data))
        # Part bodies are not hashed on the reactor thread.
        part_headers = [h for _, uri, h, _ in self.s3.requests if "partNumber" in uri]
        self.assertEqual({h["x-amz-content-sha256"] for h in part_headers}, {"UNSIGNED-PAYLOAD"})

    def test_write_waits_for_the_part(self) -> None:
        """A write that fills a part fires once that part is stored: backpressure."""
        upload = self.store.open_upload("slow")
        self.s3.hold = True
        d = upload.write(b"p" * MIN_PART_SIZE)
        self.stub.flush()
        self.assertNoResult(d)
        # The held request was the upload's creation; let the store answer.
        self.s3.hold = False
        (create,) = self.s3.held
        create.write(
            b"<InitiateMultipartUploadResult><UploadId>u1</UploadId>"
            b"</InitiateMultipartUploadResult>"
        )
        self.s3.uploads["u1"] = {}
        create.finish()
        self.stub.flush()
        self.successResultOf(d)
        self.assertEqual(upload.parts, 1)
        self.assertEqual(len(self.s3.uploads["u1"][1]), MIN_PART_SIZE)

    def test_abort_leaves_nothing(self) -> None:
        upload = self.store.open_upload("bad")
        self.write_all(upload, b"y" * (9 * MiB))
        self.assertEqual(len(self.s3.uploads), 1)
        self.done(upload.abort())
        self.assertEqual(self.s3.uploads, {})
        self.assertNotIn("hammal/bad", self.s3.objects)
        self.assertRaises(RuntimeError, upload.write, b"more")
        self.assertRaises(RuntimeError, upload.complete)
        self.done(upload.abort())

    def test_abort_small(self) -> None:
        upload = self.store.open_upload("bad")
        self.write_all(upload, b"y" * 10)
        self.done(upload.abort())
        self.assertEqual(self.s3.requests, [])
        self.assertEqual(self.s3.objects, {})

    def test_failed_part(self) -> None:
        self.s3.fail_parts = 500
        upload = self.store.open_upload("broken")
        d = upload.write(b"z" * (8 * MiB))
        error = self.failed(d, S3Error)
        self.assertEqual(error.status, 500)
        self.assertRaises(S3Error, upload.write, b"more")
        self.assertRaises(S3Error, upload.complete)
        self.done(upload.abort())
        self.assertEqual(self.s3.uploads, {})
        self.assertEqual(self.s3.objects, {})

    def test_completion_error_in_a_200(self) -> None:
        """S3 may fail a completion inside a 200 answer: that is a failure."""
        self.s3.complete_error = True
        upload = self.store.open_upload("late")
        self.write_all(upload, b"w" * (8 * MiB + 5))
        error = self.failed(upload.complete(), S3Error)
        self.assertEqual(error.code, "InternalError")
        self.assertEqual(self.s3.uploads, {})
        self.assertEqual(self.s3.objects, {})


class ObjectKeyTests(SynchronousTestCase):
    def test_layout(self) -> None:
        digest = "sha256:" + "ab" * 32
        self.assertEqual(object_key("blobs", digest), "blobs/sha256/ab/" + "ab" * 32)
        self.assertEqual(object_key("manifests", digest), "manifests/sha256/ab/" + "ab" * 32)

    def test_refuses_non_digests(self) -> None:
        for kind, digest in (
            ("blobs", "sha256:short"),
            ("blobs", "../../etc/passwd"),
            ("blobs", "sha256:" + "a" * 63 + "/"),
            ("tags", "sha256:" + "ab" * 32),
        ):
            self.assertRaises(ValueError, object_key, kind, digest)
