"""The persona x question marker-rate heatmap (a PNG a person can open).

Drawn with matplotlib's object API on an Agg canvas, so it never touches pyplot's global state
or needs a display; written atomically like every artifact.

    python -c "from persona_cli.eval.heatmap import heatmap_from_summary as h; \
        h('RUN/summary.json', 'heatmap.png')"
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from persona_cli.artifacts import read_json, write_bytes_atomic


def plot_heatmap(summary: dict[str, Any], path: str | Path) -> Path:
    """Rows are personas (the source first, marked), columns questions; colour is the rate."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    personas, questions = summary["personas"], summary["questions"]
    source = summary["source"]["persona"] if summary["source"] else None
    if source is not None:
        personas = [source, *[p for p in personas if p != source]]
    grid = np.full((len(personas), len(questions)), np.nan)
    for i, p in enumerate(personas):
        for j, q in enumerate(questions):
            cell = summary["cells"][p].get(q)
            if cell and cell[1]:
                grid[i, j] = cell[0] / cell[1]
    width = min(4 + 0.32 * len(questions), 40)
    height = min(2 + 0.35 * len(personas), 30)
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    rates = summary["rates"]
    labels = [f"{'* ' if p == source else ''}{p} ({rates[p]['rate']:.0%})" for p in personas]
    ax.set_yticks(range(len(personas)), labels=labels, fontsize=8)
    ax.set_xticks(range(len(questions)), labels=questions, fontsize=7, rotation=90)
    ax.set_xlabel("question")
    title = f"marker {summary['marker']!r} rate per persona x question ({summary['backend']})"
    ax.set_title(title + ("; * = source" if source else ""), fontsize=10)
    fig.colorbar(image, ax=ax, label="rate", fraction=0.03)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_bytes_atomic(path, buf.getvalue())
    return Path(path)


def heatmap_from_summary(summary_path: str | Path, path: str | Path) -> Path:
    return plot_heatmap(read_json(summary_path), path)
