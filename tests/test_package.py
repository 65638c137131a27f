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
