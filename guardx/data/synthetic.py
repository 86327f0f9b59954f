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
