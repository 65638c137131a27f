"""Matplotlib (Agg) drawings of the analysis results; each function writes one PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

MODALITY_MARKERS = {0: ("o", "visible"), 1: ("^", "infrared")}


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_neighbour_share(summary: dict, k: int, path: str | Path) -> Path:
    """Stacked bars: intra vs inter-modality share of the top-k neighbours per modality."""
    names = ["visible", "infrared", "all"]
    intra = np.array([summary[n]["intra"] for n in names])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(names, intra, label="intra-modality", color="tab:blue")
    ax.bar(names, 1 - intra, bottom=intra, label="inter-modality", color="tab:orange")
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"share of top-{k} neighbours")
    ax.set_xlabel("query modality")
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_distance_histograms(pairs: dict[str, dict[str, np.ndarray]], eps: float, path: str | Path) -> Path:
    """One panel per distance ({"plain": {"intra", "cross"}, ...}): histograms of the
    same-identity pair distances, intra- vs cross-modality, with the DBSCAN eps."""
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 3.5), squeeze=False)
    bins = np.linspace(0, 1, 41)
    for ax, (name, groups) in zip(axes[0], pairs.items(), strict=True):
        for group, colour in (("intra", "tab:blue"), ("cross", "tab:orange")):
            values = groups[group]
            if values.size:
                ax.hist(values, bins=bins, density=True, alpha=0.6, color=colour, label=f"{group}-modality")
        ax.axvline(eps, color="k", linestyle="--", linewidth=1, label=f"eps {eps:g}")
        ax.set_title(f"{name} Jaccard")
        ax.set_xlabel("Jaccard distance between two images of one identity")
        ax.set_ylabel("density (each histogram: area 1)")
        ax.legend()
    return _save(fig, path)


def plot_curves(curves: dict[str, dict[str, list]], path: str | Path) -> Path:
    """Each curve against its epochs (ARI and cross-modality precision, per epoch)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, curve in curves.items():
        ax.plot(curve["epoch"], curve["value"], marker="o", markersize=3, label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("pseudo-label quality")
    ax.set_ylim(-0.05, 1.05)
    ax.legend()
    return _save(fig, path)


def tsne_figure(points: np.ndarray, pids: np.ndarray, modality: np.ndarray):
    """The t-SNE scatter as a matplotlib figure: colour = identity, marker = modality
    (o visible, ^ infrared); the legend names both (``id <pid>`` per colour)."""
    fig, ax = plt.subplots(figsize=(6.5, 5))
    ids = np.unique(pids)
    cmap = plt.get_cmap("tab10" if ids.size <= 10 else "tab20")
    for colour_index, pid in enumerate(ids):
        colour = cmap(colour_index % cmap.N)
        for mod, (marker, _) in MODALITY_MARKERS.items():
            mask = (pids == pid) & (modality == mod)
            ax.scatter(points[mask, 0], points[mask, 1], s=18, marker=marker, color=colour)
        ax.scatter([], [], marker="s", color=colour, label=f"id {pid}")
    for marker, label in MODALITY_MARKERS.values():
        ax.scatter([], [], marker=marker, color="grey", label=label)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    ax.set_title("t-SNE of the features (distances between clouds are not to scale)", fontsize="small")
    ax.set_xticks([])
    ax.set_yticks([])
    return fig


def plot_tsne(points: np.ndarray, pids: np.ndarray, modality: np.ndarray, path: str | Path) -> Path:
    """:func:`tsne_figure` as a PNG."""
    return _save(tsne_figure(points, pids, modality), path)
