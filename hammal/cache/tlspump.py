"""
Upstream blob bodies over TLS, decrypted on a pump thread.

Most blobs come from HTTPS upstreams and CDNs. Left to the event loop,
their bodies are decrypted there (pyOpenSSL's C{recv} per record, a new
C{bytes} each) before the HTTP client parses them. A L{TLSBodyPump} goes on
from where the event loop stopped, with the same pyOpenSSL connection
(L{hammal.cache.tlsbody} says why that is all the state there is): it
reads the ciphertext the socket has into one buffer, feeds it to the
connection's memory BIO, reads the records it decrypts into a second
buffer, and writes them at their offset in the cache file; with the held
tail, the plain pump's hashing thread hashes them behind it. OpenSSL's
calls release the GIL (cffi), so the event loop only sends to clients.

Whatever TLS wants to send meanwhile (an alert) the pump writes to the
socket itself: the event loop writes nothing on a connection whose body is
pumped. A peer that starts a new handshake (TLS 1.2 renegotiation) ends the
pump, like a close, a reset or a record that fails to decrypt: as
L{TransferBroken}, after which the fill resumes with C{Range} on a new
connection. Timeouts (silence and the minimum rate, over body bytes),
stopping, and the cache's own failures are the plain pump's.
"""

from __future__ import annotations

import os
import select
from typing import Any

from OpenSSL import SSL

from hammal.cache.pump import PUMP_READ, BodyPump, write_at
from hammal.errors import UpstreamTimeout
from hammal.stream import TransferBroken

__all__ = ["TLS_READ", "TLSBodyPump"]

#: Ciphertext read from the socket at once: as much as the plaintext
#: buffer, so each write (and each progress report to the event loop) is
#: about a MiB (256 KiB reads cost the event loop twice as much per GiB).
TLS_READ = PUMP_READ
#: Plaintext asked of OpenSSL at once: more than a record (16 KiB) holds,
#: small enough for pyOpenSSL's temporary buffer to stay off C{mmap}.
RECORD_READ = 64 * 1024
#: What TLS wants to send, taken from the memory BIO at once.
SEND_READ = 64 * 1024


class TLSBodyPump(BodyPump):
    """
    A L{BodyPump} for a body over TLS: C{tls} is the pyOpenSSL connection
    the event loop decrypted the stream with so far, which the pump thread
    alone uses until L{run} returned.
    """

    kind = "tls"

    def __init__(self, *args: Any, tls: SSL.Connection, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tls = tls
        self._renegotiations = tls.total_renegotiations()
        self._ended: TransferBroken | None = None

    def run(self) -> int:
        """Decrypt and write the body; returns the end offset, or raises why it stopped."""
        self._started()
        hashing = self._hash_behind()
        poller = self._poller(select.POLLIN)
        plain = memoryview(bytearray(min(PUMP_READ, self._end - self._start)))
        raw = memoryview(bytearray(TLS_READ))
        position = self._start
        try:
            while position < self._end:
                # What the connection holds first: a record decrypted
                # before the hand-over is the next bytes of the body.
                count = self._decrypt(plain[: self._end - position], position)
                if not count:
                    self._wait_readable(poller, position)
                    self._receive(raw, position)
                    continue
                write_at(self._file_fd, plain[:count], position)
                if hashing is not None:
                    hashing.hash(count)
                position += count
                self._moved_to(position)
        finally:
            if hashing is not None:
                # Whatever ended the pump, the hasher has taken exactly the
                # bytes written: a resume goes on from there.
                hashing.finish()
        return position

    def _decrypt(self, view: memoryview, position: int) -> int:
        """
        Read what the connection can decrypt into C{view} (without reading
        the socket); how much. Raises why the stream ended once nothing
        decrypted before the end is left.
        """
        if self._ended is not None:
            raise self._ended
        filled = 0
        try:
            while filled < len(view):
                filled += self._tls.recv_into(view[filled:], RECORD_READ)
        except SSL.WantReadError:
            pass
        except SSL.ZeroReturnError:
            self._ended = TransferBroken(
                f"{self._upstream} closed TLS after {position + filled} of {self._end} bytes"
            )
        except SSL.Error as failure:
            self._ended = TransferBroken(
                f"{self._upstream} broke TLS after {position + filled} bytes: {_tls_error(failure)}"
            )
        if self._ended is None and self._tls.total_renegotiations() != self._renegotiations:
            self._ended = TransferBroken(
                f"{self._upstream} started a new TLS handshake after {position + filled} bytes"
            )
        else:
            self._send_pending(position + filled)
        if not filled and self._ended is not None:
            raise self._ended
        return filled

    def _receive(self, raw: memoryview, position: int) -> None:
        """Feed the connection the ciphertext the socket has."""
        try:
            count = os.readv(self._socket_fd, [raw])
        except BlockingIOError:
            return
        except OSError as failure:
            raise self._broken(position, failure) from failure
        if count == 0:
            raise self._ended_early(position)
        self._heard_at = self._clock()  # a part of a record is upstream's bytes too
        self._tls.bio_write(raw[:count])

    def _send_pending(self, position: int) -> None:
        """Write to the socket what TLS wants to send (an alert, a key update)."""
        while True:
            try:
                data = self._tls.bio_read(SEND_READ)
            except SSL.WantReadError:
                return  # nothing (the usual case)
            except SSL.Error:
                return
            self._send(memoryview(data), position)

    def _send(self, data: memoryview, position: int) -> None:
        poller: select.poll | None = None
        while data:
            if self._stopping is not None:
                raise self._stopping
            try:
                data = data[os.write(self._socket_fd, data) :]
                continue
            except BlockingIOError:
                pass
            except OSError as failure:
                raise self._broken(position, failure) from failure
            if poller is None:
                poller = self._poller(select.POLLOUT)
            if not poller.poll(self._idle_ms):
                raise UpstreamTimeout(
                    f"{self._upstream} took nothing for {self._idle_timeout:g} seconds"
                    f" after {position} bytes"
                )


def _tls_error(failure: SSL.Error) -> str:
    """OpenSSL's reason, short (its error queue is a list of tuples)."""
    if isinstance(failure, SSL.SysCallError):
        return str(failure.args[1]) if len(failure.args) > 1 else "unexpected end"
    details = failure.args[0] if failure.args else None
    if isinstance(details, list) and details and isinstance(details[-1], tuple):
        return str(details[-1][-1])
    return str(failure) or type(failure).__name__
