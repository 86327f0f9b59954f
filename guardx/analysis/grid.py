"""Fig. 1 / Fig. 3: distilled images per class, for one run or several side by side.

    guardx analyze grid --images GUARD=runs/demo/guard --images SRe2L=runs/demo/sre2l --out grid.png

``--images`` takes a run directory (its ``recover/images``) or an ImageFolder tree of distilled images.
Columns are classes (the ones all runs have, sorted, or ``--classes``); each run contributes
``--per-class`` rows (its first images per class, sorted by file name), labelled on the left.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from guardx.analysis.plots import new_figure, save_figure
from guardx.data.folder import scan_image_folder
from guardx.errors import DataError


def images_root(path: Path) -> Path:
    """A run directory's distilled images (any distiller's: the stage folder whose manifest describes a
    distilled set), or ``path`` itself when it is the image tree."""
    path = Path(path)
    stages = sorted(d for d in path.iterdir() if (d / "images").is_dir() and (d / "manifest.json").is_file()) \
        if path.is_dir() else []
    for candidate in (path / "recover" / "images", *(d / "images" for d in stages), path):
        if candidate.is_dir() and any(p.is_dir() for p in candidate.iterdir()):
            return candidate
    raise DataError(f"no distilled images under {path} (expected <run>/recover/images/<class>/*.png "
                    "or an ImageFolder tree)")


def select(roots: list[Path], classes: list[str] | None, max_classes: int) -> list[str]:
    common = None
    for root in roots:
        _, found = scan_image_folder(root)
        common = set(found) if common is None else common & set(found)
    if classes:
        missing = [c for c in classes if c not in common]
        if missing:
            raise DataError(f"classes {missing} are not in every image folder")
        return classes
    if not common:
        raise DataError("the image folders have no class in common")
    return sorted(common)[:max_classes]


def image_grid(entries: list[tuple[str, Path]], out: Path, *, classes: list[str] | None = None,
               max_classes: int = 10, per_class: int = 1) -> dict:
    from PIL import Image

    roots = [images_root(p) for _, p in entries]
    names = select(roots, classes, max_classes)
    rows = [(label, root, i) for label, root in zip((lab for lab, _ in entries), roots) for i in range(per_class)]
    fig, axes = new_figure(len(rows), len(names), width=1.6, height=1.6, squeeze=False)
    shown = {}
    for r, (label, root, i) in enumerate(rows):
        samples, _ = scan_image_folder(root, names)
        by_class: dict[int, list[str]] = {}
        for f, c in samples:
            by_class.setdefault(c, []).append(f)
        for c, name in enumerate(names):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            files = by_class.get(c, [])
            if i < len(files):
                with Image.open(files[i]) as im:
                    ax.imshow(np.asarray(im.convert("RGB")))
                shown.setdefault(label, []).append(files[i])
            else:
                ax.axis("off")
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(label if per_class == 1 else f"{label} #{i + 1}", fontsize=9)
    save_figure(fig, out)
    return {"classes": names, "rows": [f"{label}#{i}" for label, _, i in rows], "images": shown}
