"""``bmil analyze``: the paper's diagnostic figures for a checkpoint (on the training set's
features) or for a run folder (pseudo-label quality per epoch); the figures themselves:
:mod:`bmil.analysis`."""

from __future__ import annotations

import argparse

from bmil.commands import preset_path
from bmil.errors import ConfigError


def run(args: argparse.Namespace) -> int:
    """Write the figures and print their paths, one a line."""
    from dataclasses import replace

    from bmil.analysis import analyze_features, analyze_run

    if args.run:
        written = analyze_run(args.run, args.out)
    else:
        from bmil.config import apply_overrides, load_config
        from bmil.inference import load_model, resolve_device, train_set_features
        from bmil.records import record_arrays

        if not args.out:
            raise ConfigError("bmil analyze --checkpoint needs --out DIR for the figures")
        device = resolve_device(args.device)
        model, trained = load_model(args.checkpoint, device)
        if args.config:
            cfg = load_config(preset_path(args.config), args.overrides)
        else:
            cfg = apply_overrides(trained, args.overrides) if args.overrides else trained
        # the network's input size is the checkpoint's, whatever the configuration says
        cfg = replace(cfg, data=replace(cfg.data, height=trained.data.height, width=trained.data.width))
        feats, records = train_set_features(model, cfg, device, progress=not args.quiet)
        pids, _, modality = record_arrays(records)
        written = analyze_features(feats, modality, pids, args.out, cfg.cluster, seed=cfg.train.seed)
    for name in sorted(written):
        print(written[name])
    return 0
