"""One module per ``bmil`` command, each holding the command's implementation and its entry
point ``run(args) -> int`` (the exit status), which :mod:`bmil.cli` dispatches to.

=============  ==========================================
command        module
=============  ==========================================
train          :mod:`bmil.commands.train`
eval           :mod:`bmil.commands.evaluate`
demo           :mod:`bmil.commands.demo`
check-data     :mod:`bmil.commands.check_data`
cluster-scan   :mod:`bmil.commands.cluster_scan`
extract        :mod:`bmil.commands.extract`
search         :mod:`bmil.commands.search`
export         :mod:`bmil.commands.export`
analyze        :mod:`bmil.commands.analyze`
=============  ==========================================

This package's own module holds what several commands share: reading ``--config``. It
imports neither torch nor numpy, so ``bmil --help`` stays fast.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from bmil.errors import ConfigError

if TYPE_CHECKING:
    from bmil.config import Config

PRESETS = "sysu, regdb, llcm, folder, folder-small, demo, ablation/m1 … ablation/m6"


def preset_path(name: str) -> Path:
    """A YAML path, or the packaged preset called ``name``."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    preset = Path(str(resources.files("bmil") / "configs" / f"{name}.yaml"))
    if not preset.is_file():
        raise ConfigError(f"config '{name}' is neither a YAML file nor a preset ({PRESETS})")
    return preset


def config_from_args(args: argparse.Namespace) -> Config:
    """The configuration of ``--config`` (a YAML file or preset) with the command line's
    ``KEY=VALUE`` overrides applied."""
    from bmil.config import load_config

    return load_config(preset_path(args.config), args.overrides)
