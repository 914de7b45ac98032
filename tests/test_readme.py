"""The docs stay true: docs/flags.md is the CLI's table, and CI runs README's test command."""
from __future__ import annotations

import re
from pathlib import Path

from megatron_lite.training.arguments import flags_markdown

ROOT = Path(__file__).resolve().parents[1]


def _between(text: str, marker: str) -> str:
    return re.search(rf"<!-- {marker} -->\n(.*?)<!-- /{marker} -->", text, re.S).group(1)


def test_flags_table_matches_cli() -> None:
    assert _between((ROOT / "docs" / "flags.md").read_text(), "flags").strip() == flags_markdown()


def test_ci_runs_the_readme_test_command() -> None:
    block = _between((ROOT / "README.md").read_text(), "test-command")
    assert "python -m pytest" in block
    assert "test-command" in (ROOT / ".ci" / "run").read_text()
