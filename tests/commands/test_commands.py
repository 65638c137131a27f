"""``bmil demo`` through the command line: the demo preset with ``--out`` and the overrides
reaches the demo, whose summary is printed as its table (the demo itself:
test_train.py's demo test)."""

from __future__ import annotations

from helpers import run_cli


def test_demo_command_runs_the_preset_with_the_overrides_and_prints_the_table(tmp_path, capsys, monkeypatch):
    from bmil.commands import demo

    headline = {"rank1": 0.5, "mAP": 0.25}
    clustering = {"images": 40.0, "ari_plain": 0.1, "ari_modality_aware": 0.2, "cross_precision_plain": 0.3,
                  "cross_recall_plain": 0.4, "cross_precision_modality_aware": 0.6, "cross_recall_modality_aware": 0.7}
    summary = {"stage1": headline, "stage2": headline, "clustering": clustering, "clustering_all_images": clustering,
               "clustering_training_features": clustering, "selected_by": "mAP", "stage1_last": headline,
               "stage2_last": headline, "stage1.rank1": 0.5, "stage1.mAP": 0.25, "stage2.rank1": 0.75,
               "stage2.mAP": 0.125, "clustering.ari_plain": 0.1, "clustering.ari_modality_aware": 0.2}
    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda cfg, progress=True: seen.append((cfg, progress)) or summary)
    out = tmp_path / "demo"
    code, printed, err = run_cli(capsys, "demo", "--out", str(out), "train.stage1_epochs=1", "cluster.eps=0.6")
    assert code == 0, err
    cfg, progress = seen[0]
    assert (cfg.name, cfg.output, cfg.train.stage1_epochs, cfg.cluster.eps, progress) == ("demo", str(out), 1, 0.6,
                                                                                          False)
    lines = printed.splitlines()
    assert lines[:2] == ["| result | value |", "|---|---|"]
    assert "| stage 2 cross-modality Rank-1 / mAP (%) | 75.0 / 12.5 |" in lines
    assert "| visible–infrared pairs joined, modality-aware: precision / recall | 0.60 / 0.70 |" in lines
    assert lines[-1] == f"summary written to {out / 'summary.json'}"
