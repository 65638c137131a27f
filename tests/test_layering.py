"""The package's layering, read from the source with ``ast`` (function-level and TYPE_CHECKING
imports included): ``bmil.data`` and ``bmil.evaluation`` never import each other nor the
registry above them (``bmil.datasets``); ``bmil.records`` is a leaf that imports no bmil
module and not torch; ``engine/`` is the training loop and no command; ``cluster/`` is a
library on features (no engine, model, inference or command); every ``bmil`` command is one
module of ``commands/`` with a ``run(args)``, and ``cli.py`` only parses and dispatches."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
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

def offending_imports(folder: Path, forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    """``file: module`` for every import under ``folder`` of a module within one of ``forbidden``
    and within none of ``allowed``."""
    return [f"{path.relative_to(PACKAGE)}: {module}"
            for path in sorted(folder.rglob("*.py"))
            for module in sorted(imported_modules(path))
            if any(reaches({module}, package) for package in forbidden)
            and not any(reaches({module}, package) for package in allowed)]


def test_engine_is_the_training_loop_and_no_command():
    assert offending_imports(PACKAGE / "engine", ("bmil.commands", "bmil.cli")) == []
    commands = {path.stem for path in (PACKAGE / "commands").glob("*.py")} - {"__init__"}
    assert not commands & {path.stem for path in (PACKAGE / "engine").glob("*.py")}


@pytest.mark.parametrize("folder", ["cluster", "evaluation"])
def test_cluster_and_evaluation_import_no_model_engine_or_command(folder):
    forbidden = ("bmil.engine", "bmil.model", "bmil.commands", "bmil.cli", "bmil.inference")
    assert offending_imports(PACKAGE / folder, forbidden) == []


def test_cluster_reads_of_the_data_package_only_the_record_vocabulary():
    assert offending_imports(PACKAGE / "cluster", ("bmil.data",), allowed=("bmil.records",)) == []


def test_inference_imports_no_command():
    assert not {m for m in imported_modules(PACKAGE / "inference.py")
                if reaches({m}, "bmil.commands") or reaches({m}, "bmil.cli")}


def test_every_command_is_a_commands_module_with_run_and_cli_defines_none():
    from bmil.cli import MODULES, build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert set(subparsers.choices) == set(MODULES)
    for module in MODULES.values():
        tree = ast.parse((PACKAGE / "commands" / f"{module}.py").read_text())
        assert "run" in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}, module
    cli = ast.parse((PACKAGE / "cli.py").read_text())
    functions = {node.name for node in ast.walk(cli) if isinstance(node, ast.FunctionDef)}
    assert not [name for name in functions if name.startswith("cmd_")]
    # cli reaches a command's code only through bmil.commands.<module>.run
    assert {m for m in imported_modules(PACKAGE / "cli.py") if m.startswith("bmil")} <= {
        "bmil.commands", "bmil.commands.PRESETS", "bmil.errors", "bmil.errors.BmilError"}


def test_commands_spell_no_dataset_name():
    """Datasets are looked up in the registry: the commands name none, as engine/ and cli.py."""
    from bmil.datasets import DATASETS

    for path in sorted((PACKAGE / "commands").glob("*.py")):
        constants = {n.value for n in ast.walk(ast.parse(path.read_text()))
                     if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not constants & set(DATASETS), path


def test_help_imports_neither_torch_nor_numpy():
    """``bmil --help`` parses only: no command module (and so no torch) is imported."""
    code = ("import sys\nfrom bmil import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'numpy', 'bmil.engine', 'bmil.inference') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
