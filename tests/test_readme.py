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


def test_architecture_layout_names_every_module() -> None:
    """docs/architecture.md's file-by-file layout names every module of the library and the tools
    (the kernels, one per file, in docs/kernels.md's table), so the map cannot fall behind the tree."""
    architecture = (ROOT / "docs" / "architecture.md").read_text()
    layout = architecture[architecture.index("## Layout"):]
    kernels = (ROOT / "docs" / "kernels.md").read_text()
    modules = [*(ROOT / "megatron_lite").rglob("*.py"), *(ROOT / "tools").glob("*.py")]
    missing = [str(path.relative_to(ROOT)) for path in modules if path.name != "__init__.py"
               and path.name not in (kernels if path.parent.name == "kernels" else layout)]
    assert not missing, missing
