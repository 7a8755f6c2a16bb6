"""docs/architecture.md's map lists every module and package of mimscale, data_prep and
benchmarks, one line each, and nothing that is not there: adding, moving or removing a module
without changing the map fails here."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "architecture.md"
ROOTS = ("mimscale", "data_prep", "benchmarks")


def map_entries(text: str) -> dict[str, str]:
    """path -> its one-line description, from the code block under '## Map' (two spaces of
    indentation per folder level; a folder ends with '/')."""
    block = text.split("## Map", 1)[1].split("```", 2)[1]
    entries, stack = {}, []
    for line in block.splitlines():
        if not line.strip():
            continue
        m = re.match(r"^( *)(\S+)\s*(.*)$", line)
        depth, name, what = len(m.group(1)) // 2, m.group(2), m.group(3).strip()
        del stack[depth:]
        path = "/".join([*stack, name.rstrip("/")])
        assert path not in entries, f"{path} is listed twice"
        entries[path] = what
        if name.endswith("/"):
            stack.append(name.rstrip("/"))
    return entries


def tree() -> set[str]:
    """Every module (but __init__.py) and every package under the roots."""
    out = set()
    for root in ROOTS:
        for p in (REPO / root).rglob("*.py"):
            rel = p.relative_to(REPO)
            if "__pycache__" in rel.parts:
                continue
            if p.name == "__init__.py":
                out.add(str(rel.parent))
            else:
                out.add(str(rel))
    return out


def test_the_map_lists_every_module_and_package_once():
    listed = map_entries(DOC.read_text())
    modules = tree()
    missing = sorted(modules - set(listed))
    assert not missing, f"in the tree but not in docs/architecture.md's map: {missing}"
    extra = sorted(p for p in set(listed) - modules if not (REPO / p).is_dir())
    assert not extra, f"in docs/architecture.md's map but not in the tree: {extra}"
    undescribed = sorted(p for p, what in listed.items() if not what)
    assert not undescribed, f"listed without a line saying what it owns: {undescribed}"


def test_the_map_parser_nests_folders(tmp_path):
    text = "## Map\n```\na/\n  b.py   one\n  c/     two\n    d.py three\ne.py     four\n```\n"
    assert map_entries(text) == {"a": "", "a/b.py": "one", "a/c": "two", "a/c/d.py": "three", "e.py": "four"}
