"""Tests for L{hammal.cache.preallocate}: blocks for a cache file of known size."""

from __future__ import annotations

import ctypes
import errno
import os

from twisted.trial.unittest import SynchronousTestCase

from hammal.cache import preallocate as module
from hammal.cache.preallocate import preallocate


class PreallocateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self.addCleanup(os.close, self.fd)

    def test_blocks_without_size(self) -> None:
        """The blocks are the file's, its size stays what was written (0)."""
        if not preallocate(self.fd, 4 * 1024 * 1024):
            raise self.skipTest("this filesystem cannot preallocate")
        status = os.fstat(self.fd)
        self.assertEqual(status.st_size, 0)
        self.assertGreaterEqual(status.st_blocks * 512, 4 * 1024 * 1024)

    def _failing(self, code: int) -> None:
        def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
            ctypes.set_errno(code)
            return -1

        self.patch(module, "_fallocate", fallocate)

    def test_no_room_raises(self) -> None:
        """A disk without the room is the caller's error (ENOSPC)."""
        self._failing(errno.ENOSPC)
        with self.assertRaises(OSError) as raised:
            preallocate(self.fd, 1024)
        self.assertEqual(raised.exception.errno, errno.ENOSPC)

    def test_unsupported_is_not_an_error(self) -> None:
        """A filesystem without fallocate: nothing allocated, writing goes on as before."""
        self._failing(errno.EOPNOTSUPP)
        self.assertFalse(preallocate(self.fd, 1024))

    def test_without_the_call(self) -> None:
        """Without fallocate in the C library, nothing is done."""
        self.patch(module, "_fallocate", None)
        self.assertFalse(preallocate(self.fd, 1024))
        self.assertFalse(preallocate(self.fd, 0))
