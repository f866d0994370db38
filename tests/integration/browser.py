"""A headless Chromium driven through ``chromedriver`` (W3C WebDriver over
plain HTTP on 127.0.0.1, spoken with ``urllib``: no extra dependency).

Debian's ``chromium`` and ``chromium-driver`` packages provide both
binaries (``make test`` installs them). The browser runs with a fresh
``--user-data-dir`` and without anything that would reach the internet
(no QUIC, no background networking, no component updates, no sync).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import urllib.error
import urllib.request
from typing import Any, Dict, List, Optional

from tests.integration.environment import (
    HarnessError,
    ManagedProcess,
    clean_env,
    make_tempdir,
    wait_until,
)

CHROMEDRIVER_BIN = shutil.which("chromedriver") or "/usr/bin/chromedriver"
#: The real binary: /usr/bin/chromium is a shell wrapper around it.
CHROMIUM_BIN = next(
    (
        p
        for p in ("/usr/lib/chromium/chromium", shutil.which("chromium") or "")
        if p and os.access(p, os.X_OK)
    ),
    "/usr/lib/chromium/chromium",
)

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
]

_PORT_LINE = re.compile(r"started successfully on port (\d+)")


def missing_browser() -> List[str]:
    """The browser binaries that are not installed."""
    return [b for b in (CHROMEDRIVER_BIN, CHROMIUM_BIN) if not os.access(b, os.X_OK)]


class Browser:
    """One chromedriver, one headless Chromium session; :meth:`close` ends both."""

    def __init__(self, width: int = 1280, height: int = 900, timeout: float = 30.0) -> None:
        self._workdir = make_tempdir("hammal-it-chromium-")
        self._timeout = timeout
        self.driver = ManagedProcess(
            "chromedriver",
            [CHROMEDRIVER_BIN, "--port=0", "--allowed-ips=127.0.0.1"],
            os.path.join(self._workdir, "chromedriver.log"),
            env=clean_env(),
        ).start()
        self.session: Optional[str] = None
        try:
            found: Dict[str, int] = {}

            def listening() -> bool:
                match = _PORT_LINE.search(self.driver.log_text())
                if match:
                    found["port"] = int(match.group(1))
                return bool(match)

            wait_until(listening, "chromedriver listening", 20, self.driver)
            self._base = f"http://127.0.0.1:{found['port']}"
            profile = os.path.join(self._workdir, "profile")
            os.mkdir(profile)
            capabilities = {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": CHROMIUM_BIN,
                    "args": CHROMIUM_ARGS
                    + [
                        f"--user-data-dir={profile}",
                        f"--window-size={width},{height}",
                    ],
                },
                "goog:loggingPrefs": {"browser": "ALL"},
                "timeouts": {"pageLoad": int(timeout * 1000), "script": 10000},
            }
            answer = self._call("POST", "/session", {"capabilities": {"alwaysMatch": capabilities}})
            self.session = str(answer["sessionId"])
        except BaseException:
            self.close()
            raise

    def _call(self, method: str, path: str, body: Optional[Dict[str, Any]] = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self._base + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout + 30) as response:
                payload = json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as failure:
            text = failure.read().decode("utf-8", "replace")[:2000]
            raise HarnessError(
                f"chromedriver {method} {path}: {failure.code} {text}\n{self.driver.log_tail(2000)}"
            ) from None
        return payload.get("value")

    def _session(self, method: str, path: str, body: Optional[Dict[str, Any]] = None) -> Any:
        assert self.session is not None
        return self._call(method, f"/session/{self.session}{path}", body)

    def open(self, url: str) -> None:
        """Load *url* and wait for it (the page load timeout bounds it)."""
        self._session("POST", "/url", {"url": url})

    def run(self, script: str, *args: Any) -> Any:
        """The value of a synchronous *script* (a function body) in the page."""
        return self._session("POST", "/execute/sync", {"script": script, "args": list(args)})

    def console(self) -> List[Dict[str, Any]]:
        """Console and network messages logged since the last call."""
        return list(self._session("POST", "/se/log", {"type": "browser"}) or [])

    def resize(self, width: int, height: int) -> None:
        self._session("POST", "/window/rect", {"width": width, "height": height})

    def screenshot(self, path: str) -> str:
        """Save a PNG of the viewport to *path*; return *path*."""
        png = base64.b64decode(self._session("GET", "/screenshot"))
        with open(path, "wb") as f:
            f.write(png)
        return path

    def close(self) -> None:
        """End the session (Chromium exits) and stop chromedriver."""
        try:
            if self.session is not None:
                self._call("DELETE", f"/session/{self.session}")
        except Exception:
            pass
        finally:
            self.session = None
            self.driver.stop(timeout=10)
            shutil.rmtree(self._workdir, ignore_errors=True)
