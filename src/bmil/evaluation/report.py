"""Human- and machine-readable reports of protocol results.

The table follows the columns of the paper's Table 1 (Setting | R1 | R5 | R10 | R20 | mAP |
mINP, in %) and is always preceded by a header stating how the numbers were obtained:
SYSU-MM01, RegDB and LLCM scores are only comparable under the same protocol, gallery mode
and number of trials.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from bmil.evaluation.protocols import ProtocolResult

PROTOCOL_RULES = {
    "sysu": "SYSU-MM01 authors' rule: camera-3 queries ignore camera-2 gallery images; "
    "Rank-k counts distinct identities; mAP/mINP over all remaining matches",
    "llcm": "LLCM authors' rule: gallery images of the query's identity and camera removed; "
    "Rank-k counts distinct identities; mAP/mINP over all remaining matches",
    "regdb": "plain CMC/mAP/mINP, no gallery image removed",
    "standard": "Market-1501 rule: gallery images of the query's identity and camera removed; plain CMC",
}
TABLE_COLUMNS = ("Setting", "R1", "R5", "R10", "R20", "mAP", "mINP")
_TABLE_KEYS = ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP")


def results_table(results: Sequence[ProtocolResult]) -> str:
    """Markdown: a header block (protocol, mode, trials, sizes, feature) then the table.

    Scores are percentages with one decimal, the mean over each result's trials. The
    Setting cell names the dataset too when the results span several datasets.
    """
    if not results:
        raise ValueError("results_table needs at least one ProtocolResult.")
    several_datasets = len({r.dataset for r in results}) > 1
    lines = ["Evaluation protocol:"]
    for r in results:
        lines.append(
            f"- {r.dataset} {r.setting}: protocol `{r.protocol}` "
            f"({PROTOCOL_RULES.get(r.protocol, 'custom rule')}); mode {r.mode}; "
            f"{_trials_phrase(r.num_trials)}; {r.num_query} queries, "
            f"{r.num_gallery} gallery images per trial; feature: {r.feature}; "
            f"distance: {r.distance}"
        )
    lines.append("")
    lines.append("| " + " | ".join(TABLE_COLUMNS) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(TABLE_COLUMNS) - 1)) + "|")
    for r in results:
        setting = f"{r.dataset} {r.setting}" if several_datasets else r.setting
        cells = [f"{100.0 * r.mean[key]:.1f}" for key in _TABLE_KEYS]
        lines.append("| " + " | ".join([setting, *cells]) + " |")
    return "\n".join(lines) + "\n"


def save_results(results: Sequence[ProtocolResult], path: str | Path) -> Path:
    """Write the results (all fields, per-trial and mean, fractions) as JSON; returns path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": "bmil-evaluation-results",
        "version": 1,
        "results": [{**r.to_dict(), "protocol_rule": PROTOCOL_RULES.get(r.protocol, "custom rule")} for r in results],
    }
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _trials_phrase(num_trials: int) -> str:
    return "1 trial" if num_trials == 1 else f"mean of {num_trials} trials"
