"""Tests for L{hammal.web.state}: one typed record per request."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

from hammal.web.state import RequestState, client_gone, state_of


class StateTests(SynchronousTestCase):
    def test_one_record_per_request(self) -> None:
        """The same request gives the same record; another request its own."""
        request = Request(DummyChannel())
        state = state_of(request)
        self.assertIsInstance(state, RequestState)
        state.route = "blob"
        state.trace.attempts = 2
        self.assertIs(state_of(request), state)
        self.assertEqual(state_of(request).route, "blob")
        self.assertEqual(state_of(Request(DummyChannel())), RequestState())

    def test_client_gone(self) -> None:
        """A request is gone once its connection is lost."""
        request = Request(DummyChannel())
        self.assertFalse(client_gone(request))
        request.connectionLost(Exception("gone"))  # type: ignore[arg-type]
        self.assertTrue(client_gone(request))
