"""The bmil package as a whole: no absolute path is hard-coded in its source."""

from __future__ import annotations

import re

from helpers import REPO


def test_no_absolute_path_is_hard_coded_in_the_package():
    """Data and weights come from the configuration (data.root, model.pretrained); the only
    absolute paths allowed in code are the kernel's interfaces: /proc and the shared-memory
    file system /dev/shm (whose free space bounds the loader workers)."""
    import ast

    found = []
    for path in (REPO / "src" / "bmil").rglob("*.py"):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                text = node.value
                if re.fullmatch(r"(/(?!proc/|dev/shm$)[\w.-]+|~|[A-Za-z]:)([/\\][\w.-]*)+", text):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {text!r}")
    assert not found, found


def test_version_and_python_dash_m():
    """``bmil --version`` and ``python -m bmil`` (the package's __main__) both reach the CLI."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    version = subprocess.run([sys.executable, "-m", "bmil", "--version"], capture_output=True, text=True, env=env)
    assert version.returncode == 0 and version.stdout.startswith("bmil ")
    usage = subprocess.run([sys.executable, "-m", "bmil", "extract", "--help"], capture_output=True, text=True,
                           env=env)
    assert usage.returncode == 0 and "--ids-from-folders" in usage.stdout


def test_quiet_is_accepted_before_and_after_the_command():
    from bmil.cli import build_parser

    parser = build_parser()
    for argv in (["-q", "export", "--checkpoint", "c.pt", "--format", "onnx"],
                 ["export", "--checkpoint", "c.pt", "--format", "onnx", "-q"]):
        args = parser.parse_args(argv)
        assert args.quiet and not args.verbose, argv
    assert not parser.parse_args(["export", "--checkpoint", "c.pt", "--format", "onnx"]).quiet


def test_train_summary_is_a_table_like_evals():
    from bmil.commands.train import train_table

    scores = {"rank1": 0.5, "rank5": 0.75, "rank10": 0.875, "rank20": 1.0, "mAP": 0.4321, "mINP": 0.25}
    summary = {"stage1": {"epoch": 4, "metrics": {"infrared→visible": scores}, "selected_by": "x",
                          "last": {"epoch": 5, "metrics": {"infrared→visible": {**scores, "rank1": 0.25}}}}}
    lines = train_table(summary).splitlines()
    assert lines[2] == "| 1 | best | 4 | infrared→visible | 50.0 | 75.0 | 87.5 | 100.0 | 43.2 | 25.0 |"
    assert lines[3] == "| 1 | last | 5 | infrared→visible | 25.0 | 75.0 | 87.5 | 100.0 | 43.2 | 25.0 |"


def test_imagenet_weights_say_what_is_fetched_and_where(tmp_path, monkeypatch, caplog):
    """Not in the cache: the log names the URL and the cache file before torchvision is asked;
    offline, one sentence says where to put the file. Nothing is fetched for a path or none."""
    import logging

    import pytest
    import torch

    from bmil.errors import CheckpointError
    from bmil.model import build_model
    from bmil.model.pretrained import imagenet_cache_path, load_imagenet_weights

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    asked = []

    def offline(url, **kwargs):
        asked.append(url)
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    model = build_model(depth=18, non_local=False, pretrained="none")
    assert asked == []  # none: nothing fetched
    with caplog.at_level(logging.INFO, logger="bmil"), pytest.raises(CheckpointError) as err:
        load_imagenet_weights(model, "imagenet")
    cache = imagenet_cache_path(18)
    assert asked == ["https://download.pytorch.org/models/resnet18-f37072fd.pth"]
    assert any(asked[0] in r.getMessage() and str(cache) in r.getMessage() for r in caplog.records)
    assert str(err.value) == (
        f"ImageNet weights for ResNet-18 are not in the torch hub cache and could not be downloaded (OSError): "
        f"put resnet18-f37072fd.pth in {cache.parent}/ or set model.pretrained=/path/to/resnet18-f37072fd.pth."
    )


def test_every_page_the_repository_names_is_in_the_repository():
    """Code, configs, tests and docs name only Markdown pages a clone of bmil has (the method
    is in docs/method.md, the architecture in the README's developer map)."""
    names = {path.name for path in REPO.rglob("*.md") if ".venv" not in path.parts}
    checked = [*(REPO / "src").rglob("*.py"), *(REPO / "src" / "bmil" / "configs").rglob("*.yaml"),
               *(REPO / "tests").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py"), REPO / "README.md",
               *(REPO / "docs").glob("*.md")]
    missing = [f"{path.relative_to(REPO)}: {name}" for path in checked
               for name in sorted(set(re.findall(r"\b[\w-]+\.md\b", path.read_text()))) if name not in names]
    assert not missing, missing
