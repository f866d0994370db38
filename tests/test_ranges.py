"""Tests for L{hammal.ranges.parse_range}, absurd input included."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from hammal.errors import RangeInvalid
from hammal.ranges import content_range, parse_range

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


class RangeFormsTests(SynchronousTestCase):
    """Each form of a single byte range, and what hammal ignores (a 200 instead)."""

    def test_no_header(self) -> None:
        """No header, or an empty one: the whole body."""
        self.assertIsNone(parse_range(None, SIZE))
        self.assertIsNone(parse_range(b"", SIZE))

    def test_closed_range(self) -> None:
        """C{first-last} is inclusive: C{0-0} is the first byte."""
        self.assertEqual(parse_range(b"bytes=0-0", SIZE), (0, 1))
        self.assertEqual(parse_range(b"bytes=10-19", SIZE), (10, 20))
        self.assertEqual(parse_range(b"bytes=999-999", SIZE), (999, SIZE))

    def test_last_past_the_end_is_the_end(self) -> None:
        self.assertEqual(parse_range(b"bytes=500-1000", SIZE), (500, SIZE))

    def test_open_range(self) -> None:
        """C{first-}: to the end, down to the last byte alone."""
        self.assertEqual(parse_range(b"bytes=0-", SIZE), (0, SIZE))
        self.assertEqual(parse_range(b"bytes=999-", SIZE), (999, SIZE))

    def test_suffix_range(self) -> None:
        """C{-n}: the last n bytes; more than the body is the whole body."""
        self.assertEqual(parse_range(b"bytes=-1", SIZE), (999, SIZE))
        self.assertEqual(parse_range(b"bytes=-1000", SIZE), (0, SIZE))
        self.assertEqual(parse_range(b"bytes=-1001", SIZE), (0, SIZE))

    def test_empty_suffix_unsatisfiable(self) -> None:
        """C{-0} asks for no bytes at all: 416, saying the size."""
        failure = self.assertRaises(RangeInvalid, parse_range, b"bytes=-0", SIZE)
        self.assertEqual(failure.headers, {"Content-Range": "bytes */1000"})

    def test_start_beyond_the_end_unsatisfiable(self) -> None:
        """A range starting at or past the end: 416, whatever its last position."""
        for header in (b"bytes=1000-", b"bytes=1000-1005", b"bytes=5000-6000"):
            failure = self.assertRaises(RangeInvalid, parse_range, header, SIZE)
            self.assertEqual(failure.status, 416)

    def test_last_before_first_ignored(self) -> None:
        """An invalid range (last before first) is ignored (RFC 9110 14.2): a 200."""
        self.assertIsNone(parse_range(b"bytes=20-10", SIZE))
        self.assertIsNone(parse_range(b"bytes=2000-10", SIZE))

    def test_several_ranges_ignored(self) -> None:
        """hammal serves one range; several get the whole body, not a 416 or multipart."""
        self.assertIsNone(parse_range(b"bytes=0-1,5-6", SIZE))
        self.assertIsNone(parse_range(b"bytes=0-1, -5", SIZE))
        self.assertIsNone(parse_range(b"bytes=0-1,", SIZE))

    def test_other_units_and_garbage_ignored(self) -> None:
        """Anything but one C{bytes} range is ignored, never an error."""
        for header in (
            b"items=0-5",
            b"bytes 0-5",
            b"bytes=",
            b"bytes=-",
            b"bytes=a-b",
            b"bytes=0x10-",
            b"bytes=-5-6",
            b"bytes=1.5-2",
            b"bytes=+1-2",
            b"bytes=\xb2-",  # a superscript two is no digit
            b"=0-5",
        ):
            self.assertIsNone(parse_range(header, SIZE), header)

    def test_whitespace_tolerated(self) -> None:
        """Spaces and tabs around the parts do not change the range."""
        self.assertEqual(parse_range(b" bytes = 10 - 19 ", SIZE), (10, 20))
        self.assertEqual(parse_range(b"bytes=\t-5\t", SIZE), (995, SIZE))
        self.assertEqual(parse_range(b"bytes=10-\r\n", SIZE), (10, SIZE))

    def test_unit_is_case_sensitive(self) -> None:
        """The unit is matched as sent (RFC 9110 says case-insensitive; clients send lowercase)."""
        self.assertIsNone(parse_range(b"BYTES=0-5", SIZE))

    def test_empty_body(self) -> None:
        """
        An empty blob has no byte to give: a suffix range is served as the
        whole (empty) body, any other range is unsatisfiable.
        """
        self.assertIsNone(parse_range(b"bytes=-5", 0))
        self.assertRaises(RangeInvalid, parse_range, b"bytes=0-", 0)
        self.assertRaises(RangeInvalid, parse_range, b"bytes=0-0", 0)


class ContentRangeTests(SynchronousTestCase):
    def test_inclusive_last_position(self) -> None:
        """C{[start, end)} is sent as C{first-last} with the size."""
        self.assertEqual(content_range(0, 1, 1000), b"bytes 0-0/1000")
        self.assertEqual(content_range(900, 1000, 1000), b"bytes 900-999/1000")

    def test_round_trip(self) -> None:
        """What parse_range selects, content_range describes as asked."""
        start, end = parse_range(b"bytes=-100", SIZE) or (0, 0)
        self.assertEqual(content_range(start, end, SIZE), b"bytes 900-999/1000")
