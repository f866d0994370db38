"""Deterministic test images, built without Docker.

Every image is written to disk in a layout ``skopeo copy`` can read:

* OCI images and indexes as an OCI image layout (``oci-layout``,
  ``index.json``, ``blobs/sha256/<hex>``), pushed from ``oci:DIR:TAG``;
* Docker schema2 images as skopeo's ``dir:`` layout (``version``,
  ``manifest.json``, one file per blob named by its hex digest), because
  skopeo 1.9 ignores Docker media types inside an OCI ``index.json``.

Layer contents are seeded pseudo-random bytes, tar headers have fixed times
and owners and gzip has ``mtime=0``, so every run yields the same digests.
The big image's 64 MiB layer is an *uncompressed* tar
(``application/vnd.oci.image.layer.v1.tar``) so no time goes into gzip.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import tarfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = [
    "BIG_LAYER_FILE_SIZE",
    "ChildManifest",
    "TestImage",
    "build_images",
    "sha256_digest",
    "DOCKER_MANIFEST",
    "DOCKER_CONFIG",
    "DOCKER_LAYER_GZIP",
    "OCI_MANIFEST",
    "OCI_INDEX",
    "OCI_CONFIG",
    "OCI_LAYER_GZIP",
    "OCI_LAYER_TAR",
    "ALL_MANIFEST_TYPES",
]

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"

#: Every manifest media type, for an ``Accept`` header that gets bytes as pushed.
ALL_MANIFEST_TYPES: Tuple[str, ...] = (
    DOCKER_MANIFEST,
    DOCKER_LIST,
    OCI_MANIFEST,
    OCI_INDEX,
)

#: Size of the random file inside ``library/big:1``'s large layer.
BIG_LAYER_FILE_SIZE = 64 * 1024 * 1024 + 12345

_EPOCH = 1704067200  # 2024-01-01T00:00:00Z
_CREATED = "2024-01-01T00:00:00Z"


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of *data*."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class ChildManifest:
    """One platform manifest of an image index."""

    digest: str
    media_type: str
    size: int
    platform: Dict[str, str]
    blob_digests: List[str]


@dataclass
class TestImage:
    """An image on disk, and what the registry must serve for it."""

    repo: str
    tag: str
    manifest_digest: str
    media_type: str
    manifest_bytes: bytes
    #: every blob: configs and layers, of the index's children too.
    blob_digests: List[str]
    blob_sizes: Dict[str, int]
    #: the manifests of an index (empty for a single image).
    children: List[ChildManifest] = field(default_factory=list)
    #: ``oci`` or ``dir``.
    layout: str = "oci"
    path: str = ""

    __test__ = False  # not a test case, whatever its name says

    @property
    def reference(self) -> str:
        """``repo:tag``."""
        return f"{self.repo}:{self.tag}"

    @property
    def is_index(self) -> bool:
        """True for a multi-platform image index / manifest list."""
        return self.media_type in (OCI_INDEX, DOCKER_LIST)

    @property
    def skopeo_source(self) -> str:
        """The ``skopeo copy`` source naming this image on disk."""
        if self.layout == "dir":
            return f"dir:{self.path}"
        return f"oci:{self.path}:{self.tag}"

    @property
    def all_manifest_digests(self) -> List[str]:
        """The top manifest's digest, then its children's."""
        return [self.manifest_digest] + [c.digest for c in self.children]


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _tar(files: Sequence[Tuple[str, bytes]]) -> bytes:
    """A deterministic tar archive of *files* (name, content)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        dirs = sorted({os.path.dirname(n) for n, _ in files if os.path.dirname(n)})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            info.mtime = _EPOCH
            info.uname = info.gname = "root"
            tar.addfile(info)
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = _EPOCH
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class _Layout:
    """Writes blobs into an OCI layout or a skopeo ``dir:`` layout."""

    def __init__(self, path: str, kind: str) -> None:
        self.path = path
        self.kind = kind
        os.makedirs(path, exist_ok=True)
        if kind == "oci":
            os.makedirs(os.path.join(path, "blobs", "sha256"), exist_ok=True)
            with open(os.path.join(path, "oci-layout"), "w") as f:
                f.write('{"imageLayoutVersion":"1.0.0"}')
        else:
            with open(os.path.join(path, "version"), "w") as f:
                f.write("Directory Transport Version: 1.1\n")
        self.blobs: List[str] = []
        self.sizes: Dict[str, int] = {}

    def put(self, data: bytes, media_type: str, record: bool = True) -> Dict[str, Any]:
        digest = sha256_digest(data)
        hexd = digest.split(":", 1)[1]
        if self.kind == "oci":
            target = os.path.join(self.path, "blobs", "sha256", hexd)
        else:
            target = os.path.join(self.path, hexd)
        with open(target, "wb") as f:
            f.write(data)
        if record and digest not in self.sizes:
            self.blobs.append(digest)
            self.sizes[digest] = len(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}


def _image(
    layout: _Layout,
    rng: random.Random,
    docker: bool,
    layer_files: Sequence[Sequence[Tuple[str, bytes]]],
    platform: Tuple[str, str] = ("linux", "amd64"),
    uncompressed: Sequence[bool] = (),
    label: str = "",
) -> Tuple[bytes, str, List[str]]:
    """Write one image's layers, config and manifest into *layout*.

    :return: (manifest bytes, manifest media type, blob digests in order).
    """
    layers = []
    diff_ids = []
    blob_digests = []
    for i, files in enumerate(layer_files):
        tar_bytes = _tar(files)
        diff_ids.append(sha256_digest(tar_bytes))
        raw = i < len(uncompressed) and uncompressed[i]
        if raw:
            media = OCI_LAYER_TAR
            blob = tar_bytes
        else:
            media = DOCKER_LAYER_GZIP if docker else OCI_LAYER_GZIP
            blob = gzip.compress(tar_bytes, compresslevel=6, mtime=0)
        desc = layout.put(blob, media)
        layers.append(desc)
        blob_digests.append(desc["digest"])
    os_name, arch = platform
    config = {
        "architecture": arch,
        "os": os_name,
        "created": _CREATED,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
            "Labels": {"org.hammal.test": label or "yes"},
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {"created": _CREATED, "created_by": f"hammal test layer {n}"}
            for n in range(len(layers))
        ],
    }
    cdesc = layout.put(_canonical(config), DOCKER_CONFIG if docker else OCI_CONFIG)
    blob_digests.insert(0, cdesc["digest"])
    mtype = DOCKER_MANIFEST if docker else OCI_MANIFEST
    manifest = {
        "schemaVersion": 2,
        "mediaType": mtype,
        "config": cdesc,
        "layers": layers,
    }
    return json.dumps(manifest, indent=3).encode(), mtype, blob_digests


def _small_files(rng: random.Random, prefix: str, count: int) -> List[Tuple[str, bytes]]:
    files = []
    for i in range(count):
        size = rng.randint(500, 40_000)
        files.append((f"{prefix}/file{i}.bin", rng.randbytes(size)))
    files.append((f"{prefix}/README", f"hammal test layer {prefix}\n".encode()))
    return files


def _write_index_json(layout: _Layout, manifest: bytes, media_type: str, tag: str) -> str:
    digest = sha256_digest(manifest)
    layout.put(manifest, media_type, record=False)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": media_type,
                "digest": digest,
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    with open(os.path.join(layout.path, "index.json"), "wb") as f:
        f.write(_canonical(index))
    return digest


def _single(
    root: str,
    repo: str,
    tag: str,
    seed: int,
    docker: bool,
    layer_count: int,
    big: bool = False,
) -> TestImage:
    rng = random.Random(seed)
    kind = "dir" if docker else "oci"
    path = os.path.join(root, repo.replace("/", "_") + "_" + tag)
    layout = _Layout(path, kind)
    layer_files: List[List[Tuple[str, bytes]]] = []
    uncompressed: List[bool] = []
    if big:
        layer_files.append([("big/random.bin", rng.randbytes(BIG_LAYER_FILE_SIZE))])
        uncompressed.append(True)
    for n in range(layer_count):
        layer_files.append(_small_files(rng, f"{repo.replace('/', '_')}/l{n}", 3))
        uncompressed.append(False)
    manifest, mtype, blobs = _image(
        layout, rng, docker, layer_files, uncompressed=uncompressed, label=repo
    )
    if docker:
        with open(os.path.join(path, "manifest.json"), "wb") as f:
            f.write(manifest)
        digest = sha256_digest(manifest)
    else:
        digest = _write_index_json(layout, manifest, mtype, tag)
    return TestImage(
        repo=repo,
        tag=tag,
        manifest_digest=digest,
        media_type=mtype,
        manifest_bytes=manifest,
        blob_digests=list(layout.blobs),
        blob_sizes=dict(layout.sizes),
        layout=kind,
        path=path,
    )


def _multi(root: str, repo: str, tag: str, seed: int) -> TestImage:
    rng = random.Random(seed)
    path = os.path.join(root, repo.replace("/", "_") + "_" + tag)
    layout = _Layout(path, "oci")
    children: List[ChildManifest] = []
    entries = []
    for arch, nlayers in (("amd64", 2), ("arm64", 1)):
        start = len(layout.blobs)
        files = [_small_files(rng, f"multi_{arch}/l{n}", 2) for n in range(nlayers)]
        manifest, mtype, _ = _image(layout, rng, False, files, platform=("linux", arch), label=arch)
        desc = layout.put(manifest, mtype, record=False)
        platform = {"architecture": arch, "os": "linux"}
        if arch == "arm64":
            platform["variant"] = "v8"
        desc["platform"] = platform
        entries.append(desc)
        children.append(
            ChildManifest(
                digest=desc["digest"],
                media_type=mtype,
                size=desc["size"],
                platform=platform,
                blob_digests=list(layout.blobs[start:]),
            )
        )
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    index_bytes = json.dumps(index, indent=3).encode()
    digest = _write_index_json(layout, index_bytes, OCI_INDEX, tag)
    return TestImage(
        repo=repo,
        tag=tag,
        manifest_digest=digest,
        media_type=OCI_INDEX,
        manifest_bytes=index_bytes,
        blob_digests=list(layout.blobs),
        blob_sizes=dict(layout.sizes),
        children=children,
        layout="oci",
        path=path,
    )


def build_images(directory: str) -> Dict[str, TestImage]:
    """Write every test image under *directory*.

    :return: the images keyed by ``repo:tag``:
        ``library/alpine:3.20`` (Docker schema2, 3 layers),
        ``library/ociimg:1`` (OCI, 2 layers),
        ``library/multi:1`` (OCI index: linux/amd64 and linux/arm64),
        ``bitnami/redis:7`` (Docker schema2, non-library repository),
        ``library/big:1`` (OCI, a 64 MiB uncompressed layer and a small one),
        ``private/secret:1`` (OCI, needs credentials upstream).
    """
    images: List[Optional[TestImage]] = [
        _single(directory, "library/alpine", "3.20", 1, docker=True, layer_count=3),
        _single(directory, "library/ociimg", "1", 2, docker=False, layer_count=2),
        _multi(directory, "library/multi", "1", 3),
        _single(directory, "bitnami/redis", "7", 4, docker=True, layer_count=2),
        _single(directory, "library/big", "1", 5, docker=False, layer_count=1, big=True),
        _single(directory, "private/secret", "1", 6, docker=False, layer_count=1),
    ]
    return {img.reference: img for img in images if img is not None}
