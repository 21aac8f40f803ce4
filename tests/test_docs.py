"""The docs tell the truth where a test can tell: the front door's size and commands, the
configuration reference against the settings themselves, and every relative link."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.settings import SETTINGS, table
from tests.support import ROOT

PAGES = [
    ROOT / "README.md",
    ROOT / "BENCHMARKS.md",
    ROOT / "CHANGES.md",
    ROOT / "bench" / "NOTES.md",
    *sorted((ROOT / "docs").glob("*.md")),
]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {
        re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", text, re.M)
    }


def test_readme_is_a_short_front_door_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme
    assert "make test" in readme
    assert len(readme.splitlines()) <= 200


def test_the_benchmarks_page_is_short_and_its_lab_notes_are_apart():
    page = (ROOT / "BENCHMARKS.md").read_text()
    assert len(page.splitlines()) <= 200
    assert "## Goals" in page
    assert "## Reproducing" in page
    assert "(bench/NOTES.md)" in page


def test_the_configuration_page_is_written_from_the_settings():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == table(), "run `make docs`"
    for setting in SETTINGS:
        assert f"| `{setting.env}` | {setting.default_text()} | {setting.meaning} |" in page


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(re.sub(r"```.*?```", "", page.read_text(), flags=re.S)):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not ours to check here
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
            broken.append(target)
    assert broken == []


def test_the_keywords_table_is_what_the_service_does():
    """docs/design.md's table of Twilio's keywords lists exactly the handler's families, and
    the README warns of them with a link to it."""
    from service.handler import OPT_OUT

    page = (ROOT / "docs" / "design.md").read_text().split("## Twilio's keywords", 1)[1].split("\n## ", 1)[0]
    rows = [
        line.split("|")[1:-1] for line in page.splitlines() if line.startswith("| ") and "---" not in line
    ]
    listed = {cells[0].strip(): set(cells[0].strip().split(", ")) for cells in rows[1:]}
    assert sorted(map(frozenset, listed.values()), key=sorted) == sorted(
        map(frozenset, OPT_OUT.values()), key=sorted
    )
    readme = (ROOT / "README.md").read_text()
    assert "docs/design.md#twilios-keywords" in readme
    assert all(word in readme for word in OPT_OUT["STOP"] | {"YES", "UNSTOP"})


def python_block(page: Path, first_line: str) -> str:
    """The ```python block of ``page`` that starts with ``first_line``."""
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    [block] = [b for b in blocks if b.startswith(first_line)]
    return block


def test_the_testing_page_tests_the_readmes_bot(monkeypatch):
    """docs/testing.md's tests, run against the README's mybot.py, pass as printed."""
    import sys
    import types

    mybot = types.ModuleType("mybot")
    exec(python_block(ROOT / "README.md", "# mybot.py"), mybot.__dict__)
    monkeypatch.setitem(sys.modules, "mybot", mybot)
    tests: dict = {}
    exec(python_block(ROOT / "docs" / "testing.md", "# test_mybot.py"), tests)
    ran = [name for name, test in tests.items() if name.startswith("test_") and test() is None]
    assert len(ran) == 3
    assert "docs/testing.md" in (ROOT / "README.md").read_text()
