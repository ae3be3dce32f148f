"""Statements in the README that the code decides, checked against the code so they cannot drift."""
import os
import re

from lib_unetmods.techniques import TECHNIQUES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_readmes_hook_order_is_the_registrys():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    stated = re.search(r"Hooks run in one fixed order, the registry's \([^)]*\): ([^.]*)\.", readme)
    assert stated, "the README no longer states the hook order"
    names = [n.strip() for n in stated.group(1).replace("\n", " ").split(",")]
    assert names == [short_title(t.SPEC.title) for t in TECHNIQUES]


def short_title(title: str) -> str:
    """"Token Merging (ToMe)" -> "ToMe"; a title without an abbreviation stays as it is."""
    abbreviation = re.search(r"\((\w+)\)$", title)
    return abbreviation.group(1) if abbreviation else title
