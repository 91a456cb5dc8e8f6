"""Plot a head profile: one layer x KV-head heatmap per score, and the class map (matplotlib, Agg)."""

from __future__ import annotations

import os
from pathlib import Path

from kvlab.errors import KvlabError
from kvlab.heads.scores import CLASSES
from kvlab.heads.store import SCORE_NAMES, HeadProfile
from kvlab.results import atomic_path

CLASS_COLORS = {"retrieval": "#d62728", "induction": "#ff7f0e", "local": "#c7d4e0"}
_TITLES = {"retrieval": "retrieval score (needle copy: argmax on the copied token)",
           "induction": "induction score (attention to the token after the earlier copy)",
           "locality": "locality score (attention mass on sinks + recent window)"}


def plot_profile(profile: HeadProfile, path: str | os.PathLike, dpi: int = 150) -> Path:
    """Write a PNG (or any format matplotlib knows from the suffix) atomically; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    path = Path(path)
    if path.is_dir():
        raise KvlabError(f"{path} is a folder; give a file name for the plot")
    layers, heads = profile.num_layers, profile.num_kv_heads
    annotate = layers * heads <= 160
    panel_h = 0.9 + 0.32 * heads
    fig, axes = plt.subplots(4, 1, figsize=(max(8.0, 0.34 * layers + 2.5), 4 * panel_h + 1.2),
                             constrained_layout=True)
    for ax, name in zip(axes, SCORE_NAMES):
        grid = profile.score(name).T.numpy()                               # (heads, layers)
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        fig.colorbar(im, ax=ax, pad=0.01, fraction=0.03)
        ax.set_title(_TITLES[name], fontsize=10, loc="left")
        if annotate:
            for h in range(heads):
                for layer in range(layers):
                    v = grid[h, layer]
                    ax.text(layer, h, f"{v:.2f}".lstrip("0") if v < 1 else "1", ha="center", va="center",
                            fontsize=6, color="white" if v < 0.6 else "black")
    codes = [[CLASSES.index(c) for c in row] for row in profile.classes]
    cmap = ListedColormap([CLASS_COLORS[c] for c in CLASSES])
    ax = axes[-1]
    im = ax.imshow(list(map(list, zip(*codes))), aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(CLASSES) - 0.5,
                   interpolation="nearest")
    bar = fig.colorbar(im, ax=ax, pad=0.01, fraction=0.03, ticks=range(len(CLASSES)))
    bar.ax.set_yticklabels(CLASSES, fontsize=8)
    counts = profile.counts()
    ax.set_title("class: " + ", ".join(f"{c} {counts[c]}" for c in CLASSES), fontsize=10, loc="left")
    if annotate:
        for layer, row in enumerate(profile.classes):
            for h, c in enumerate(row):
                ax.text(layer, h, c[0].upper(), ha="center", va="center", fontsize=7)
    step = 1 if layers <= 40 else 2
    for ax in axes:
        ax.set_xticks(range(0, layers, step))
        ax.set_yticks(range(heads))
        ax.set_ylabel("KV head", fontsize=9)
        ax.tick_params(labelsize=7)
    axes[-1].set_xlabel("layer", fontsize=9)
    fig.suptitle(f"Head profile of {profile.model}\n{layers} layers x {heads} KV heads, "
                 f"{profile.num_attention_heads} query heads (a KV head takes the max over its query heads, "
                 f"the min for locality)", fontsize=10)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=(path.suffix or ".png")[1:])
    finally:
        plt.close(fig)
    return path
