"""Tests for L{hammal.ranges.parse_range}, absurd input included."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from hammal.errors import RangeInvalid
from hammal.ranges import parse_range

SIZE = 1000


class ParseRangeTests(SynchronousTestCase):
    def test_ordinary(self) -> None:
        self.assertEqual(parse_range(b"bytes=0-99", SIZE), (0, 100))
        self.assertEqual(parse_range(b"bytes=900-", SIZE), (900, SIZE))
        self.assertEqual(parse_range(b"bytes=-100", SIZE), (900, SIZE))
        self.assertEqual(parse_range(b"bytes=990-5000", SIZE), (990, SIZE))
        self.assertIsNone(parse_range(None, SIZE))
        self.assertIsNone(parse_range(b"bytes=0-1,5-6", SIZE))

    def test_unsatisfiable(self) -> None:
        failure = self.assertRaises(RangeInvalid, parse_range, b"bytes=1000-", SIZE)
        self.assertEqual(failure.status, 416)
        self.assertEqual(failure.headers, {"Content-Range": "bytes */1000"})

    def test_thousands_of_digits(self) -> None:
        """
        Positions too long for Python to convert (4300+ digits) answer 416
        or are clamped to the body, never an internal error.
        """
        huge = "9" * 5000
        self.assertRaises(RangeInvalid, parse_range, f"bytes={huge}-".encode(), SIZE)
        self.assertRaises(RangeInvalid, parse_range, f"bytes={huge}-{huge}".encode(), SIZE)
        self.assertEqual(parse_range(f"bytes=10-{huge}".encode(), SIZE), (10, SIZE))
        self.assertEqual(parse_range(f"bytes=-{huge}".encode(), SIZE), (0, SIZE))

    def test_leading_zeros(self) -> None:
        """Zeros before a small number do not make it absurd."""
        zeros = "0" * 5000
        self.assertEqual(parse_range(f"bytes={zeros}5-{zeros}9".encode(), SIZE), (5, 10))
        self.assertRaises(RangeInvalid, parse_range, f"bytes=-{zeros}".encode(), SIZE)

    def test_nineteen_digits(self) -> None:
        """Just past the 64-bit range: the end of the body."""
        self.assertEqual(parse_range(b"bytes=0-9999999999999999999", SIZE), (0, SIZE))
