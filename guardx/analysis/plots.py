"""Matplotlib on the Agg backend (no display needed), figures saved atomically."""
from __future__ import annotations

from pathlib import Path

from guardx.utils.io import atomic_path


def new_figure(rows: int, cols: int, *, width: float, height: float, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=(width * cols, height * rows), **kwargs)


def save_figure(fig, path: str | Path, dpi: int = 150) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
