"""The README documents every option hammal has."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from hammal.config import FLAGS, LISTS, PARAMETERS

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.rst")


class ReadmeTests(SynchronousTestCase):
    def test_every_option_documented(self) -> None:
        with open(README, encoding="utf-8") as readme:
            text = readme.read()
        names = [spec.name for spec in PARAMETERS + LISTS] + [name for name, _ in FLAGS]
        missing = [name for name in names if f"``--{name}``" not in text]
        self.assertEqual(missing, [])

    def test_set_up_commands(self) -> None:
        with open(README, encoding="utf-8") as readme:
            text = readme.read()
        self.assertIn("make run", text)
        self.assertIn("make test", text)
