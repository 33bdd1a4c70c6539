"""The layout the README's "How it flows" draws: the building blocks (decode, embed, index, search)
never import the receivers, the answers or the adapters, and nothing below the adapters imports
the HTTP layer."""

from __future__ import annotations

import ast
from pathlib import Path

import orthanc_cbir

PACKAGE = Path(orthanc_cbir.__file__).parent
BUILDING_BLOCKS = ("dicom", "model", "index", "search")
ABOVE_THEM = ("ingest", "answers", "api", "cli", "standalone", "demo")
ADAPTERS = ("api", "cli.py", "standalone.py", "demo.py")


def imported(path: Path) -> set[str]:
    """The first package name under orthanc_cbir of every relative import of ``path`` that leaves its folder."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            depth = len(path.relative_to(PACKAGE).parts) - 1  # 0 for a module at the package's top
            if node.level > depth:  # climbs to orthanc_cbir itself
                names.add((node.module or "").split(".")[0] or "*")
    return names


def test_the_building_blocks_import_no_receiver_answer_or_adapter():
    offending = {str(path.relative_to(PACKAGE)): sorted(imported(path) & set(ABOVE_THEM))
                 for block in BUILDING_BLOCKS for path in (PACKAGE / block).rglob("*.py")}  # fmt: skip
    assert {name: found for name, found in offending.items() if found} == {}


def test_only_the_adapters_import_the_http_layer():
    names = {str(path.relative_to(PACKAGE)): imported(path) for path in PACKAGE.rglob("*.py")}
    assert sorted(name for name, found in names.items() if "api" in found and not name.startswith(ADAPTERS)) == []


def test_the_rule_sees_an_import_that_climbs_to_the_package():
    assert imported(PACKAGE / "answers" / "similar_series.py") >= {"ingest", "search", "index"}
