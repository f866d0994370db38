"""L{hammal.selfsigned} and ``--tls`` without certificate files."""

from __future__ import annotations

import ipaddress
import os
import stat
from typing import Any

from cryptography import x509
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from hammal.selfsigned import ensure_self_signed, listening_names, listening_port, tls_directory
from hammal.tap import Options, makeService


class EnsureTests(SynchronousTestCase):
    def test_made_once_then_kept(self) -> None:
        directory = os.path.join(self.mktemp(), "tls")
        made = ensure_self_signed(directory, ["mirror.example", "localhost"], ["127.0.0.1", "::1"])
        self.assertTrue(made.created)
        self.assertEqual(stat.S_IMODE(os.stat(made.key_path).st_mode), 0o600)
        with open(made.cert_path, "rb") as f:
            certificate = x509.load_pem_x509_certificate(f.read())
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(names.get_values_for_type(x509.DNSName), ["mirror.example", "localhost"])
        self.assertEqual(
            names.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )
        self.assertEqual(len(made.fingerprint), 32 * 3 - 1)
        again = ensure_self_signed(directory, ["other.example"], [])
        self.assertFalse(again.created)
        self.assertEqual(again.fingerprint, made.fingerprint)

    def test_trust_command(self) -> None:
        made = ensure_self_signed(self.mktemp(), ["localhost"], [])
        self.assertEqual(
            made.trust_command("mirror:5000"),
            f"sudo install -D -m 644 {made.cert_path} /etc/docker/certs.d/mirror:5000/ca.crt",
        )

    def test_directory_next_to_the_cache(self) -> None:
        self.assertEqual(tls_directory("/srv/hammal/var/cache"), "/srv/hammal/var/tls")
        self.assertEqual(tls_directory(None), os.path.abspath("var/tls"))

    def test_listening(self) -> None:
        self.assertEqual(listening_port("tcp:443:interface=10.1.2.3"), "443")
        self.assertIsNone(listening_port("unix:/run/h.sock"))
        _, addresses = listening_names("tcp:443:interface=10.1.2.3")
        self.assertIn("10.1.2.3", addresses)
        names, addresses = listening_names(r"tcp6:443:interface=\:\:1")
        self.assertIn("localhost", names)
        self.assertIn("::1", addresses)


class TlsOptionTests(SynchronousTestCase):
    def test_tls_alone_is_accepted(self) -> None:
        options = Options(environ={})
        options.parseOptions(["--tls"])
        assert options.settings is not None
        self.assertTrue(options.settings.tls)

    def test_one_file_without_the_other(self) -> None:
        options = Options(environ={})
        self.assertRaises(UsageError, options.parseOptions, ["--tls", "--tls-cert", "c.pem"])

    def test_make_service_makes_and_logs_the_certificate(self) -> None:
        root = self.mktemp()
        options = Options(environ={})
        options.parseOptions(
            [
                "--tls",
                "--port",
                "tcp:8443:interface=127.0.0.1",
                "--cache-dir",
                os.path.join(root, "var", "cache"),
            ]
        )
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        makeService(options, MemoryReactorClock())
        cert = os.path.join(os.path.abspath(root), "var", "tls", "hammal.crt")
        self.assertTrue(os.path.exists(cert))
        logged = [e for e in events if "self-signed" in e.get("log_format", "")]
        self.assertEqual(len(logged), 1)
        self.assertEqual(logged[0]["path"], cert)
        self.assertEqual(logged[0]["state"], "new")
        self.assertIn(f"{cert} /etc/docker/certs.d/", logged[0]["command"])
        self.assertIn(":8443/ca.crt", logged[0]["command"])
        self.assertRegex(logged[0]["fingerprint"], r"\A([0-9A-F]{2}:){31}[0-9A-F]{2}\Z")
