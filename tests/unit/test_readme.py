"""The README's configuration reference is generated from the code; it must not drift."""

from pathlib import Path

import pytest

from tuneloop.config import reference_markdown

pytestmark = pytest.mark.unit
README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_config_reference_is_current():
    text = README.read_text()
    start, end = "<!-- config-reference:start -->\n", "\n<!-- config-reference:end -->"
    block = text[text.index(start) + len(start):text.index(end)]
    assert block == reference_markdown(), "README config reference is stale: paste `tuneloop config-reference`"


def test_readme_quickstart_has_the_two_commands():
    quick = README.read_text().split("## Quickstart", 1)[1].split("##", 1)[0]
    assert "make demo" in quick and "make test" in quick
