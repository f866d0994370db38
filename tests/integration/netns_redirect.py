"""A redirect to a loopback service from an upstream on a public address,
run inside a network namespace of its own (``unshare --net``) where the
upstream really listens on a public-looking address (``PUBLIC_ADDRESS`` on
the namespace's ``lo``; nothing in the namespace reaches any other network).

Run by ``test_redirect_guard`` as::

    unshare --net -- sh -c 'ip link set lo up &&
        ip addr add 11.22.33.44/32 dev lo &&
        exec python -m tests.integration.netns_redirect WORKDIR'

It starts a "metadata service" on 127.0.0.1, one redirecting registry on
``PUBLIC_ADDRESS`` and one on 127.0.0.1, a real hammal (``twistd``) in front
of each, asks each hammal for a blob and a manifest whose upstream answer is
a 307 to the metadata service (by address and by the name ``localhost``),
and prints what happened as JSON for the test to judge: statuses, bodies,
which paths the metadata service saw, which files each hammal cached, and
hammal's warnings.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import sys
import threading
from typing import Any, Dict, List

from tests.integration.environment import (
    REPO_ROOT,
    ManagedProcess,
    _hammal_env,
    free_port,
    hammal_argv,
    http_request,
    wait_until,
)

PUBLIC_ADDRESS = "11.22.33.44"
SECRET = b"iam-role-credentials: AKIA-only-for-this-machine\n"
SECRET_DIGEST = "sha256:" + hashlib.sha256(SECRET).hexdigest()
MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"


def serve(address: str, handler: Any) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer((address, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main(workdir: str) -> None:
    seen: List[str] = []

    class Metadata(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            seen.append(self.path)
            manifest = self.path.endswith("/manifest")
            body = (
                json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_V2}).encode()
                if manifest
                else SECRET
            )
            self.send_response(200)
            self.send_header(
                "Content-Type", MANIFEST_V2 if manifest else "application/octet-stream"
            )
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    metadata = serve("127.0.0.1", Metadata)
    metadata_port = metadata.server_address[1]

    class Redirecting(http.server.BaseHTTPRequestHandler):
        """Repository ``byname/...`` redirects to ``localhost``, others to 127.0.0.1."""

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            if self.path == "/v2/":
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")
                return
            host = "localhost" if self.path.startswith("/v2/byname/") else "127.0.0.1"
            upstream = self.server.server_address[0]
            tail = "manifest" if "/manifests/" in self.path else self.path.rsplit("/", 1)[1]
            self.send_response(307)
            self.send_header("Location", f"http://{host}:{metadata_port}/from-{upstream}/{tail}")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET

    upstreams = {
        "public": serve(PUBLIC_ADDRESS, Redirecting),
        "internal": serve("127.0.0.1", Redirecting),
    }
    report: Dict[str, Any] = {"results": {}, "cached": {}, "warnings": {}}
    processes = []
    try:
        for zone, server in upstreams.items():
            address, port = server.server_address[:2]
            hammal_port = free_port()
            cache_dir = os.path.join(workdir, f"cache-{zone}")
            argv = hammal_argv(
                hammal_port, f"http://{address}:{port}", retries=0, cache_dir=cache_dir
            )
            process = ManagedProcess(
                f"hammal-{zone}",
                argv,
                os.path.join(workdir, f"hammal-{zone}.log"),
                env=_hammal_env(),
                cwd=REPO_ROOT,
            ).start()
            processes.append(process)
            url = f"http://127.0.0.1:{hammal_port}"
            wait_until(
                lambda: http_request("GET", url + "/healthz", timeout=2).status == 200,
                f"hammal for the {zone} upstream",
                30,
                process,
            )
            results = []
            for repository in ("byaddress/app", "byname/app"):
                for path in (
                    f"/v2/{repository}/blobs/{SECRET_DIGEST}",
                    f"/v2/{repository}/manifests/latest",
                ):
                    response = http_request(
                        "GET", url + path, [("Accept", MANIFEST_V2)], timeout=20
                    )
                    results.append(
                        {
                            "path": path,
                            "status": response.status,
                            "body": response.body.decode("latin-1"),
                        }
                    )
            report["results"][zone] = results
            report["cached"][zone] = sorted(
                os.path.relpath(os.path.join(root, name), cache_dir)
                for root, _, names in os.walk(cache_dir)
                for name in names
            )
            process.stop(timeout=10)
            report["warnings"][zone] = [
                line for line in process.log_text().splitlines() if "refused to follow" in line
            ]
    finally:
        for process in processes:
            process.stop(timeout=10)
        for server in [metadata, *upstreams.values()]:
            server.shutdown()
    report["metadata_seen"] = seen
    report["secret"] = SECRET.decode()
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
