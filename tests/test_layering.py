"""Import layering, read from the source with ``ast`` (function-level and TYPE_CHECKING
imports included): ``bmil.data`` and ``bmil.evaluation`` never import each other nor the
registry above them (``bmil.datasets``), and ``bmil.records`` is a leaf that imports no bmil
module and not torch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import bmil

PACKAGE = Path(bmil.__file__).parent


def module_name(path: Path, root: Path = PACKAGE.parent) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = PACKAGE.parent) -> set[str]:
    """Every module an ``import`` / ``from ... import`` anywhere in ``path`` names; relative
    imports resolved against the module's package; ``from a import b`` yields a and a.b."""
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def reaches(names: set[str], package: str) -> list[str]:
    return sorted(n for n in names if n == package or n.startswith(package + "."))


def test_the_import_parser_sees_nested_and_relative_imports(tmp_path):
    pkg = tmp_path / "bmil" / "evaluation"
    pkg.mkdir(parents=True)
    source = pkg / "x.py"
    source.write_text("def f():\n    from bmil.data import sysu\n    from ..data.records import Record\n"
                      "if True:\n    import bmil.cluster\n")
    found = imported_modules(source, root=tmp_path)
    assert {"bmil.data", "bmil.data.sysu", "bmil.data.records", "bmil.data.records.Record", "bmil.cluster"} <= found


@pytest.mark.parametrize(("lower", "above"), [
    ("evaluation", "bmil.data"), ("data", "bmil.evaluation"),
    ("evaluation", "bmil.datasets"), ("data", "bmil.datasets"),
])
def test_data_and_evaluation_import_neither_each_other_nor_the_registry(lower, above):
    files = sorted((PACKAGE / lower).rglob("*.py"))
    assert files
    offending = {module_name(f): reaches(imported_modules(f), above) for f in files}
    assert {m: names for m, names in offending.items() if names} == {}


def test_records_is_a_leaf():
    names = imported_modules(PACKAGE / "records.py")
    assert reaches(names, "bmil") == [] and reaches(names, "torch") == []
