"""
Tests for L{hammal.upstream.challenge}: ``WWW-Authenticate`` parsing and
the choice of the challenge hammal answers.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from hammal.upstream.challenge import Challenge, parse_challenges, select_challenge

DOCKER_HUB = (
    'Bearer realm="https://auth.docker.io/token",'
    'service="registry.docker.io",scope="repository:library/alpine:pull"'
)


class ParseChallengesTests(SynchronousTestCase):
    """L{parse_challenges} reads RFC 7235 challenges."""

    def test_docker_hub(self) -> None:
        [challenge] = parse_challenges(DOCKER_HUB)
        self.assertEqual(challenge.scheme, "bearer")
        self.assertEqual(challenge.realm, "https://auth.docker.io/token")
        self.assertEqual(challenge.service, "registry.docker.io")
        self.assertEqual(challenge.scope, "repository:library/alpine:pull")

    def test_basic(self) -> None:
        self.assertEqual(
            parse_challenges('Basic realm="Registry Realm"'),
            [Challenge("basic", {"realm": "Registry Realm"})],
        )

    def test_case_insensitive_names(self) -> None:
        """Scheme and parameter names are lower-cased; values are not."""
        [challenge] = parse_challenges('BEARER Realm="https://A.test/Token",SERVICE=Reg')
        self.assertEqual(challenge.scheme, "bearer")
        self.assertEqual(challenge.params, {"realm": "https://A.test/Token", "service": "Reg"})

    def test_whitespace(self) -> None:
        [challenge] = parse_challenges('  Bearer   realm = "r" ,  service="s"  ')
        self.assertEqual(challenge.params, {"realm": "r", "service": "s"})

    def test_unquoted_token_values(self) -> None:
        [challenge] = parse_challenges("Bearer realm=r1,service=registry.test")
        self.assertEqual(challenge.params, {"realm": "r1", "service": "registry.test"})

    def test_escaped_quotes(self) -> None:
        """Backslash escapes in quoted strings are undone."""
        [challenge] = parse_challenges(r'Bearer realm="a \"quoted\" realm",service="back\\slash"')
        self.assertEqual(challenge.realm, 'a "quoted" realm')
        self.assertEqual(challenge.service, "back\\slash")

    def test_comma_inside_quotes(self) -> None:
        [challenge] = parse_challenges(
            'Bearer realm="r",scope="repository:a:pull,push",service="s"'
        )
        self.assertEqual(challenge.scope, "repository:a:pull,push")
        self.assertEqual(challenge.service, "s")

    def test_empty_quoted_value(self) -> None:
        [challenge] = parse_challenges('Bearer realm="",service="s"')
        self.assertEqual(challenge.realm, "")

    def test_several_challenges(self) -> None:
        """One header value may carry several challenges."""
        challenges = parse_challenges(
            'Basic realm="basic realm", Bearer realm="https://t.test/token",service="s"'
        )
        self.assertEqual(
            challenges,
            [
                Challenge("basic", {"realm": "basic realm"}),
                Challenge("bearer", {"realm": "https://t.test/token", "service": "s"}),
            ],
        )

    def test_several_challenges_escaped(self) -> None:
        challenges = parse_challenges(r'Bearer realm="a\"b",service="s", Basic realm="z"')
        self.assertEqual([c.scheme for c in challenges], ["bearer", "basic"])
        self.assertEqual(challenges[0].realm, 'a"b')
        self.assertEqual(challenges[1].realm, "z")

    def test_scheme_without_parameters_then_another(self) -> None:
        """
        RFC 7235 allows a parameterless challenge followed by a comma and
        another challenge; the second one must not be lost.
        """
        challenges = parse_challenges('Negotiate, Bearer realm="https://t.test/token"')
        self.assertEqual(
            challenges,
            [Challenge("negotiate", {}), Challenge("bearer", {"realm": "https://t.test/token"})],
        )

    def test_scheme_only(self) -> None:
        self.assertEqual(parse_challenges("Bearer"), [Challenge("bearer", {})])

    def test_empty(self) -> None:
        self.assertEqual(parse_challenges(""), [])
        self.assertEqual(parse_challenges("   "), [])

    def test_garbage(self) -> None:
        """Garbage gives no usable challenge and never raises."""
        for header in ('"', "=", ",,,", '"Bearer realm=x"', "\x00\xff", "=== ,,, ==="):
            self.assertEqual([c for c in parse_challenges(header) if c.realm], [], repr(header))

    def test_unterminated_quote(self) -> None:
        """A parameter that does not parse is dropped, the scheme kept."""
        self.assertEqual(
            parse_challenges('Bearer realm="https://t.test/token'), [Challenge("bearer", {})]
        )

    def test_trailing_garbage_keeps_good_prefix(self) -> None:
        [challenge, *_] = parse_challenges('Bearer realm="r",service="s" @@@ junk')
        self.assertEqual(challenge.realm, "r")

    def test_long_input_terminates(self) -> None:
        """Pathological input is parsed (or given up on) without hanging."""
        parse_challenges("Bearer " + "a=b," * 5000)
        parse_challenges('Bearer realm="' + "\\" * 10001)
        parse_challenges("x " * 10000)


class SelectChallengeTests(SynchronousTestCase):
    """L{select_challenge} prefers Bearer with a realm, then Basic."""

    def test_bearer_over_basic(self) -> None:
        challenge = select_challenge(['Basic realm="b"', DOCKER_HUB])
        assert challenge is not None
        self.assertEqual(challenge.scheme, "bearer")
        self.assertEqual(challenge.realm, "https://auth.docker.io/token")

    def test_bearer_over_basic_same_header(self) -> None:
        challenge = select_challenge(['Basic realm="b", Bearer realm="t"'])
        assert challenge is not None
        self.assertEqual((challenge.scheme, challenge.realm), ("bearer", "t"))

    def test_bearer_without_realm_skipped(self) -> None:
        challenge = select_challenge(['Bearer service="s"', 'Basic realm="b"'])
        assert challenge is not None
        self.assertEqual((challenge.scheme, challenge.realm), ("basic", "b"))

    def test_first_usable_bearer(self) -> None:
        challenge = select_challenge(
            ['Bearer service="s"', 'Bearer realm="one"', 'Bearer realm="two"']
        )
        assert challenge is not None
        self.assertEqual(challenge.realm, "one")

    def test_basic_only(self) -> None:
        challenge = select_challenge(["Basic"])
        self.assertEqual(challenge, Challenge("basic", {}))

    def test_none(self) -> None:
        self.assertIsNone(select_challenge([]))
        self.assertIsNone(select_challenge(["", "garbage=", 'Digest realm="d"']))
        self.assertIsNone(select_challenge(['Bearer service="no realm"']))
