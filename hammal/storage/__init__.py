"""
Where verified blobs can live besides the local cache directory: an
S3-compatible object store (L{hammal.storage.s3}).
"""
