"""Synthetic ImageFolder trees of JPEGs: for the loader tests and the loader benchmark.

Images are smooth random colour fields with a few shapes, optional texture and per-pixel noise: the
texture and noise set the JPEG size, hence the decode cost, so a tree can be made to decode like
ImageNet (a pure-noise JPEG would be ~3x larger than an average photograph). A tree is a pure
function of its arguments; ``corrupt`` adds files no decoder can read.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def synthetic_image(rng: np.random.Generator, width: int, height: int, *, noise: int = 6,
                    detail: int = 0) -> Image.Image:
    """Smooth colour field + 3 ellipses + ``detail`` (mid-frequency texture, 8-px scale) + ``noise``
    (per-pixel), amplitudes in grey levels. ``noise=32, detail=40`` gives ~95 KB per 500x375 JPEG at
    quality 90, about an average ImageNet file (entropy decoding cost grows with the file size)."""
    coarse = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(4, width // 2 + 5)), y0 + int(rng.integers(4, height // 2 + 5))
        draw.ellipse([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-noise, noise + 1, size=(height, width, 3), dtype=np.int16)
    if detail:
        small = rng.integers(128 - detail, 129 + detail, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        arr += np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR), dtype=np.int16) - 128
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def solid_color(k: int) -> tuple[int, int, int]:
    """The colour of image ``k`` of a ``solid`` tree: 216 colours at least 40 levels apart in one channel."""
    if not 0 <= k < 216:
        raise ValueError("a solid tree holds at most 216 images")
    return 20 + 40 * (k % 6), 20 + 40 * (k // 6 % 6), 20 + 40 * (k // 36)


def identify_solid(x) -> list[int]:
    """Indices (in ImageFolder order) of a batch of ``solid`` images, float (B, 3, H, W) in [0, 1]."""
    rgb = ((x.float().mean(dim=(2, 3)) * 255 - 20) / 40).round().long().clamp(0, 5)
    return (rgb[:, 0] + 6 * rgb[:, 1] + 36 * rgb[:, 2]).tolist()


def write_jpeg_tree(root: str | Path, *, classes: int = 3, per_class: int = 8, size: tuple[int, int] = (64, 48),
                    size_jitter: float = 0.25, quality: int = 90, seed: int = 0, solid: bool = False,
                    noise: int = 6, detail: int = 0, corrupt: dict[str, str] | None = None) -> list[str]:
    """Write ``root/class_k/img_i.jpg`` (``size`` = (width, height), each side jittered by ±``size_jitter``).

    Images are :func:`synthetic_image` (``noise``, ``detail``); with ``solid``, image k (in ImageFolder
    order) is filled with :func:`solid_color` (k) instead, so it can be recognised after any crop, flip or
    resize (:func:`identify_solid`). ``corrupt`` maps a relative
    path to ``"truncated"`` (a valid JPEG cut to a third) or ``"garbage"`` (not an image at all); those
    files are written over the generated ones or added. Returns the class names. Existing files are
    kept, so a large tree is generated once and reused.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    names = [f"class_{k:03d}" for k in range(classes)]
    for c, name in enumerate(names):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w = max(8, int(size[0] * (1 + size_jitter * rng.uniform(-1, 1))))
            h = max(8, int(size[1] * (1 + size_jitter * rng.uniform(-1, 1))))
            path = root / name / f"img_{i:05d}.jpg"
            image_seed = rng.integers(2**32)  # drawn even when the file exists: the tree stays a function of seed
            if not path.exists():
                tmp = path.with_suffix(".tmp")
                image = (Image.new("RGB", (w, h), solid_color(c * per_class + i))
                         if solid else synthetic_image(np.random.default_rng(image_seed), w, h,
                                                       noise=noise, detail=detail))
                image.save(tmp, format="JPEG", quality=quality)
                tmp.replace(path)
    for rel, kind in (corrupt or {}).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "truncated":
            buf = path.read_bytes() if path.exists() else _jpeg_bytes(rng, size, quality)
            path.write_bytes(buf[: len(buf) // 3])
        elif kind == "garbage":
            path.write_bytes(b"this is not an image " * 20)
        else:
            raise ValueError(f"corrupt kind must be truncated or garbage, got {kind!r}")
    return names


def _jpeg_bytes(rng: np.random.Generator, size: tuple[int, int], quality: int) -> bytes:
    import io

    buf = io.BytesIO()
    synthetic_image(rng, *size).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ------------------------------------------------------------------------------- ImageNet-shaped trees

# the first ten ImageNet-1K synsets in sorted order, with their LOC_synset_mapping.txt names
IMAGENET_SYNSETS = [
    ("n01440764", "tench, Tinca tinca"), ("n01443537", "goldfish, Carassius auratus"),
    ("n01484850", "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias"),
    ("n01491361", "tiger shark, Galeocerdo cuvieri"), ("n01494475", "hammerhead, hammerhead shark"),
    ("n01496331", "electric ray, crampfish, numbfish, torpedo"), ("n01498041", "stingray"),
    ("n01514668", "cock"), ("n01514859", "hen"), ("n01518878", "ostrich, Struthio camelus"),
]
# (width, height) of ImageNet photographs: mostly 500 px on the long side, 4:3 / 3:4 / 3:2 / square, a few others
IMAGENET_SIZES = [(500, 375)] * 6 + [(375, 500)] * 2 + [(500, 333), (333, 500), (500, 500), (500, 400),
                                                         (640, 480), (300, 225), (500, 281)]


def write_imagenet_tree(root: str | Path, *, classes: int = 10, train_per_class: int = 24, val_per_class: int = 5,
                        quality: int = 90, seed: int = 0, scale: float = 1.0) -> dict:
    """An ImageNet-1K-shaped tree, as the user has it on disk (a pure function of the arguments):

    * ``train/<synset>/<synset>_<k>.JPEG`` (ImageFolder), ImageNet-like sizes and aspect ratios (``scale``
      shrinks them for fast tests);
    * ``val/ILSVRC2012_val_<00000001>.JPEG``: one flat folder, classes interleaved in a seeded order;
    * the quirks of the real files: one CMYK JPEG, one grayscale JPEG and one PNG named ``.JPEG`` in each split;
    * label files in every accepted format: ``val_labels.txt`` (FILENAME SYNSET), ``val_index.txt`` (FILENAME
      INDEX, 0-based into the sorted synsets), ``LOC_val_solution.csv`` (Kaggle), the devkit's
      ``ILSVRC2012_validation_ground_truth.txt`` (1-based IDs) with ``map_clsloc.txt`` (ID order is not the
      sorted order, as in the devkit), and ``LOC_synset_mapping.txt`` (display names).

    Returns the paths (``train``, ``val``, each label file) plus ``synsets``, ``val_synsets`` (per val file,
    in file order) and ``quirks`` (relative path → ``cmyk`` | ``gray`` | ``png``)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    synsets = [s for s, _ in IMAGENET_SYNSETS[:classes]] + [f"n{90000000 + k:08d}" for k in range(classes - 10)]
    names = {s: n for s, n in IMAGENET_SYNSETS} | {s: f"synthetic class {s}" for s in synsets[10:]}
    kinds = ("cmyk", "gray", "png")
    quirks: dict[str, str] = {}

    def write(path: Path, kind: str | None) -> None:
        w, h = IMAGENET_SIZES[int(rng.integers(len(IMAGENET_SIZES)))]
        w, h = max(16, int(w * scale)), max(16, int(h * scale))
        image_seed = rng.integers(2**32)
        if path.exists():
            return
        img = synthetic_image(np.random.default_rng(image_seed), w, h, noise=8, detail=24)
        tmp = path.with_name(f".{path.name}.tmp")
        if kind == "png":
            img.save(tmp, format="PNG")
        else:
            img = img.convert("CMYK") if kind == "cmyk" else img.convert("L") if kind == "gray" else img
            img.save(tmp, format="JPEG", quality=quality)
        tmp.replace(path)

    for c, synset in enumerate(synsets):
        (root / "train" / synset).mkdir(parents=True, exist_ok=True)
        for k in range(train_per_class):
            kind = kinds[c] if c < len(kinds) and k == 0 else None
            rel = f"train/{synset}/{synset}_{k}.JPEG"
            if kind:
                quirks[rel] = kind
            write(root / rel, kind)
    (root / "val").mkdir(parents=True, exist_ok=True)
    order = [c for c in range(classes) for _ in range(val_per_class)]
    order = [order[i] for i in rng.permutation(len(order))]
    val_files = [f"ILSVRC2012_val_{i + 1:08d}.JPEG" for i in range(len(order))]
    for i, (name, c) in enumerate(zip(val_files, order)):
        kind = kinds[i] if i < len(kinds) else None
        if kind:
            quirks[f"val/{name}"] = kind
        write(root / "val" / name, kind)
    # the devkit numbers classes in its own (WordNet) order: here the sorted synsets, rotated by 3
    devkit_id = {s: (k + 3) % classes + 1 for k, s in enumerate(synsets)}
    files = {
        "val_labels": ("val_labels.txt", [f"{f} {synsets[c]}" for f, c in zip(val_files, order)]),
        "val_index": ("val_index.txt", [f"{f} {c}" for f, c in zip(val_files, order)]),
        "kaggle": ("LOC_val_solution.csv", ["ImageId,PredictionString"] + [
            f"{Path(f).stem},{synsets[c]} 10 20 200 180 {synsets[c]} 5 5 90 80" for f, c in zip(val_files, order)]),
        "devkit_truth": ("ILSVRC2012_validation_ground_truth.txt", [str(devkit_id[synsets[c]]) for c in order]),
        "devkit_map": ("map_clsloc.txt", [f"{s} {devkit_id[s]} {names[s].split(',')[0].replace(' ', '_')}"
                                          for s in sorted(synsets, key=devkit_id.get)]),
        "class_names": ("LOC_synset_mapping.txt", [f"{s} {names[s]}" for s in synsets]),
    }
    out = {"root": root, "train": root / "train", "val": root / "val", "synsets": synsets,
           "val_synsets": [synsets[c] for c in order], "quirks": quirks}
    for key, (name, lines) in files.items():
        (root / name).write_text("\n".join(lines) + "\n")
        out[key] = root / name
    return out
