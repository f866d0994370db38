"""
Where verified blobs and manifests live besides the local cache directory:
an S3-compatible object store.

- L{blobs}: L{blobs.S3BlobStorage}, the blob cache's storage
  (L{hammal.cache.storage.BlobStorage}) with the local directory as the
  serving tier over the bucket: a local miss is read through from the
  bucket, a fill that goes upstream is uploaded as it grows
  (L{follow}) and completed only once its digest matched.
- L{manifests}: manifests by digest in the bucket too.
- L{s3}: the S3 client (signed requests, ranged reads, multipart uploads);
  L{objects}: the object store's contract and key layout; L{health}: a
  failing store skipped for a while, never failing a pull.
"""
