"""The README's code layout lists exactly the modules in the tree, so a newcomer's map stays true."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _readme_modules() -> set[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Layout of the code", 1)[1].split("```", 2)[1]
    modules: set[str] = set()
    package = ""
    for line in section.splitlines():
        entry = re.match(r"^  (\s*)(\S+)", line)
        if not entry:
            continue
        indent, name = entry.groups()
        if name.endswith("/"):
            package = name
        elif name.endswith(".py"):
            modules.add((package if indent else "") + name)
    return modules


def _tree_modules() -> set[str]:
    """Every module under streammf/, without the package markers (docstring-only __init__.py files);
    cli/__init__.py holds the command group, so it counts."""
    package = ROOT / "streammf"
    found = {str(p.relative_to(package)) for p in package.rglob("*.py")}
    return {m for m in found if not m.endswith("__init__.py") or m == "cli/__init__.py"}


def test_the_readme_layout_lists_every_module_and_no_other() -> None:
    listed, present = _readme_modules(), _tree_modules()
    assert listed - present == set(), "the README lists modules that do not exist"
    assert present - listed == set(), "modules missing from the README's layout section"
