"""The PNGs of persona geometry: cosine heatmaps and the leakage scatter.

Drawn with matplotlib's object API on an Agg canvas (no pyplot state, no display) and written
atomically through a buffer, like `persona_cli.eval.heatmap`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from persona_cli.artifacts import write_bytes_atomic

MATRIX_TITLES = {
    "raw": "raw cosine",
    "centred": "centred on the personas' mean",
    "reference": "minus the reference persona",
}


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_bytes_atomic(path, buf.getvalue())
    return path


def plot_cosines(
    matrices: dict[str, np.ndarray], personas: list[str], title: str, path: Path
) -> Path:
    """One panel per matrix kind (persona x persona cosine, colour -1..1, values written in
    each cell when there are few personas)."""
    n = len(personas)
    side = min(3 + 0.38 * n, 14)
    fig = _figure(side * len(matrices) + 1, side)
    axes = fig.subplots(1, len(matrices), squeeze=False)[0]
    image = None
    for ax, (kind, m) in zip(axes, matrices.items(), strict=True):
        image = ax.imshow(m, vmin=-1.0, vmax=1.0, cmap="RdBu_r")
        ax.set_xticks(range(n), labels=personas, fontsize=7, rotation=90)
        ax.set_yticks(range(n), labels=personas, fontsize=7)
        ax.set_title(MATRIX_TITLES.get(kind, kind), fontsize=10)
        if n <= 12:
            for i in range(n):
                for j in range(n):
                    if np.isfinite(m[i, j]):
                        ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6)
    fig.suptitle(title, fontsize=11)
    fig.colorbar(image, ax=list(axes), label="cosine", fraction=0.02)
    return _save(fig, path)


def plot_scatter(
    x: list[float], y: list[float], labels: list[str], *, title: str, xlabel: str, path: Path
) -> Path:
    """Marker rate against cosine to the source, one labelled point per bystander."""
    fig = _figure(7, 5)
    ax = fig.add_subplot()
    ax.scatter(x, y, s=24)
    for xi, yi, label in zip(x, y, labels, strict=True):
        ax.annotate(label, (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("marker rate")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_bars(
    panels: dict[str, dict[str, tuple[float, float, float]]], *, title: str, ylabel: str, path: Path
) -> Path:
    """One panel per label (a layer); per persona a bar (estimate) with its 95% interval."""
    fig = _figure(min(2.5 + 3.2 * len(panels), 24), 4)
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, (label, bars) in zip(axes, panels.items(), strict=True):
        names = list(bars)
        est = np.array([bars[n][0] for n in names])
        err = np.abs(np.array([[bars[n][1] for n in names], [bars[n][2] for n in names]]) - est)
        ax.bar(range(len(names)), est, yerr=err, capsize=2)
        ax.set_xticks(range(len(names)), labels=names, fontsize=7, rotation=90)
        ax.set_title(label, fontsize=10)
    axes[0].set_ylabel(ylabel)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)
