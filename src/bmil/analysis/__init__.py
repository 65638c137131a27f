"""The paper's diagnostic figures (PNG, matplotlib Agg) and the numbers behind them (JSON).

- :func:`neighbour_modality_share` — Figure 1a, intra- vs inter-modality top-k neighbours;
- :func:`identity_pair_distances` — Figure 3, same-identity distances, plain vs modality-aware Jaccard;
- :func:`read_curves` — Figure 4, pseudo-label ARI per epoch from a run's metrics.jsonl;
- :func:`tsne_points` — Figures 1b and 5, t-SNE of a few identities;
- :func:`analyze_features`, :func:`analyze_run` — all of them into a folder;
- :func:`draw_rank_list` — ``bmil search``'s figure, a query and its ranked matches.

Works on feature arrays; the engine (``bmil analyze``) supplies them from a checkpoint.
"""

from bmil.analysis.curves import CURVE_KEYS, read_curves
from bmil.analysis.distances import identity_pair_distances, pair_distances, same_label_pairs
from bmil.analysis.neighbours import neighbour_modality_share, share_summary
from bmil.analysis.rank_list import draw_rank_list
from bmil.analysis.report import analyze_features, analyze_run
from bmil.analysis.tsne import pick_identities, tsne_points

__all__ = [
    "CURVE_KEYS",
    "analyze_features",
    "analyze_run",
    "draw_rank_list",
    "identity_pair_distances",
    "neighbour_modality_share",
    "pair_distances",
    "pick_identities",
    "read_curves",
    "same_label_pairs",
    "share_summary",
    "tsne_points",
]
