"""The package's layering, read from the source with ``ast`` (lazy imports inside functions
count too): ``engine/`` is the training loop and no command, ``cluster/`` is a library on
features (no engine, model, inference or command), every ``bmil`` command is one module of
``commands/`` with a ``run(args)``, and ``cli.py`` only parses and dispatches."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bmil

PACKAGE = Path(bmil.__file__).parent


def imported_modules(source: str) -> set[str]:
    """Every module ``source`` imports, at any depth: ``import a.b`` gives a.b, ``from a import b``
    gives a and a.b (b may be a sub-module); relative imports are not used in bmil."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def is_within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def offending_imports(folder: Path, forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    """``file: module`` for every import under ``folder`` of a module within one of ``forbidden``
    and within none of ``allowed``."""
    return [f"{path.relative_to(PACKAGE)}: {module}"
            for path in sorted(folder.rglob("*.py"))
            for module in sorted(imported_modules(path.read_text()))
            if any(is_within(module, package) for package in forbidden)
            and not any(is_within(module, package) for package in allowed)]


def test_the_import_reader_sees_every_form_of_import():
    source = ("import bmil.engine.trainer\nfrom bmil import commands\n"
              "def f():\n    from bmil.model.backbone import build_model as b\n")
    found = imported_modules(source)
    assert {"bmil.engine.trainer", "bmil.commands", "bmil.model.backbone"} <= found
    assert is_within("bmil.commands.demo", "bmil.commands") and not is_within("bmil.commandsx", "bmil.commands")


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
    assert not {m for m in imported_modules((PACKAGE / "inference.py").read_text())
                if is_within(m, "bmil.commands") or is_within(m, "bmil.cli")}


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
    assert {m for m in imported_modules((PACKAGE / "cli.py").read_text()) if m.startswith("bmil")} <= {
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
