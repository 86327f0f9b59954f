"""ImageNet label files: the validation labels, the devkit's ID → synset map, and class display names.

What each integer means (nothing is guessed):

* ``FILENAME INDEX`` lines (e.g. Caffe's ``val.txt``): INDEX is the **0-based index into the sorted
  train synsets** — the class index guardx (and torchvision's ImageNet) uses. An index outside
  ``[0, C)`` is an error that says so (a file of 1..C is most likely 1-based devkit IDs).
* With ``data.val_label_map`` set, integers are **ILSVRC2012_IDs** (the devkit's 1-based class IDs, whose
  order is *not* the sorted synsets) and are mapped to synsets through that file: the devkit's
  ``data/meta.mat`` (read with scipy) or a text file of ``ID SYNSET`` / ``SYNSET ID [NAME]`` lines
  (e.g. ``map_clsloc.txt``).

Accepted validation label files (the format is detected per file; every line must follow it):

* ``FILENAME SYNSET`` or ``FILENAME INDEX`` (whitespace or comma separated; FILENAME may carry a folder
  and may omit the extension);
* the devkit's ``ILSVRC2012_validation_ground_truth.txt``: one ILSVRC2012_ID per line, line i labelling
  ``ILSVRC2012_val_{i:08d}.JPEG`` — needs ``data.val_label_map``;
* one SYNSET per line in the same file order (TensorFlow's ``imagenet_2012_validation_synset_labels.txt``);
* Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``; the first synset of the string).

Class names: ``LOC_synset_mapping.txt`` / ``words.txt`` style ``n01440764 tench, Tinca tinca`` lines.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

from guardx.errors import DataError

SYNSET = re.compile(r"^n\d{8}$")
DEVKIT_NAME = "ILSVRC2012_val_{:08d}.JPEG"


def _lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a text file ({what})") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _is_int(token: str) -> bool:
    return token.lstrip("+-").isdigit()


def _tokens(line: str) -> list[str]:
    return [t for t in re.split(r"[\s,]+", line) if t]


# ------------------------------------------------------------------------------------ class names


def read_class_names(path: str | Path) -> dict[str, str]:
    """``{synset: display name}`` from ``SYNSET NAME`` lines (tab or space; a numeric second column, as in
    ``map_clsloc.txt``, is skipped and underscores become spaces there)."""
    path = Path(path)
    names = {}
    for n, line in enumerate(_lines(path, "data.class_names file"), 1):
        parts = line.split(None, 1)
        if len(parts) < 2:
            raise DataError(f"{path}:{n}: expected 'SYNSET NAME', got {line[:80]!r}")
        synset, rest = parts
        head = rest.split(None, 1)
        if len(head) == 2 and _is_int(head[0]):  # map_clsloc.txt: SYNSET ID NAME
            rest = head[1].replace("_", " ")
        names[synset] = rest.strip()
    return names


# -------------------------------------------------------------------------------- ID → synset map


def read_label_map(path: str | Path) -> dict[int, str]:
    """``{ILSVRC2012_ID: synset}`` from the devkit's ``meta.mat`` or a text file (see the module docstring)."""
    path = Path(path)
    if path.suffix.lower() == ".mat":
        return _read_meta_mat(path)
    out: dict[int, str] = {}
    for n, line in enumerate(_lines(path, "data.val_label_map file"), 1):
        t = line.split()
        if len(t) >= 2 and _is_int(t[0]) and SYNSET.match(t[1]):
            key, synset = int(t[0]), t[1]
        elif len(t) >= 2 and SYNSET.match(t[0]) and _is_int(t[1]):
            key, synset = int(t[1]), t[0]
        else:
            raise DataError(f"{path}:{n}: expected 'ILSVRC2012_ID SYNSET' or 'SYNSET ILSVRC2012_ID [NAME]', "
                            f"got {line[:80]!r}")
        if out.get(key, synset) != synset:
            raise DataError(f"{path}:{n}: ID {key} is mapped twice ({out[key]} and {synset})")
        out[key] = synset
    return out


def _read_meta_mat(path: Path) -> dict[int, str]:
    if not path.is_file():
        raise DataError(f"data.val_label_map file not found: {path}")
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError(f"reading {path} needs scipy (pip install scipy), or give data.val_label_map as a text "
                        f"file of 'ILSVRC2012_ID SYNSET' lines") from None
    try:
        synsets = loadmat(str(path), squeeze_me=True)["synsets"]
        ids, wnids, children = synsets["ILSVRC2012_ID"], synsets["WNID"], synsets["num_children"]
    except Exception as e:  # noqa: BLE001  (a foreign .mat: KeyError, ValueError, ...)
        raise DataError(f"{path} is not the ImageNet devkit's meta.mat ({type(e).__name__}: {e})") from None
    # the 1000 leaf synsets are the classes (the other 860 entries are WordNet ancestors)
    return {int(i): str(w) for i, w, c in zip(ids, wnids, children) if int(c) == 0}


# ------------------------------------------------------------------------------ validation labels


def read_val_labels(path: str | Path, classes: list[str], label_map: str | Path = "") -> dict[str, int]:
    """``{file name: class index}`` (index into ``classes``, the sorted train synsets) from any format
    above. Keys are base names as written (with or without the extension)."""
    path = Path(path)
    lines = _lines(path, "data.val_labels file")
    if not lines:
        raise DataError(f"{path} is empty (data.val_labels)")
    index = {c: i for i, c in enumerate(classes)}
    id_map = read_label_map(label_map) if label_map else None
    raw = _parse(path, lines, id_map is not None)  # [(name, synset or int, line number)]
    out: dict[str, int] = {}
    ints = [v for _, v, _ in raw if isinstance(v, int)]
    if ints and id_map is None:
        lo, hi = min(ints), max(ints)
        if lo < 0 or hi >= len(classes):
            hint = (f"; the values run {lo}..{hi}: if they are the devkit's 1-based ILSVRC2012_IDs, set "
                    "data.val_label_map=<devkit>/data/meta.mat" if lo >= 1 and hi == len(classes) else "")
            raise DataError(f"{path}: class index {hi if hi >= len(classes) else lo} is outside 0..{len(classes) - 1} "
                            f"(INDEX = 0-based position in the {len(classes)} sorted train synsets){hint}")
    for name, value, n in raw:
        if isinstance(value, int):
            if id_map is None:
                label = value
            else:
                if value not in id_map:
                    raise DataError(f"{path}:{n}: ILSVRC2012_ID {value} is not in data.val_label_map {label_map}")
                value = id_map[value]
        if isinstance(value, str):
            if value not in index:
                raise DataError(f"{path}:{n}: {name} is labelled {value}, which is not a class of the train split "
                                f"({len(classes)} classes)")
            label = index[value]
        key = name.replace("\\", "/").rsplit("/", 1)[-1]
        if out.get(key, label) != label:
            raise DataError(f"{path}:{n}: {key} is labelled twice, differently")
        out[key] = label
    return out


def _parse(path: Path, lines: list[str], have_map: bool) -> list[tuple[str, str | int, int]]:
    first = _tokens(lines[0])
    if [t.lower() for t in first[:2]] == ["imageid", "predictionstring"]:  # Kaggle LOC_val_solution.csv
        rows = list(csv.reader(lines[1:]))
        bad = next((n for n, r in enumerate(rows, 2) if len(r) < 2 or not r[1].split()), None)
        if bad is not None:
            raise DataError(f"{path}:{bad}: expected 'ImageId,PredictionString'")
        return [(r[0].strip(), r[1].split()[0], n) for n, r in enumerate(rows, 2)]
    if len(first) == 1:  # one label per line, line i = ILSVRC2012_val_{i:08d}.JPEG (devkit or TF order)
        out = []
        for n, line in enumerate(lines, 1):
            t = _tokens(line)
            if len(t) != 1:
                raise DataError(f"{path}:{n}: expected one label per line like line 1, got {line[:80]!r}")
            out.append((DEVKIT_NAME.format(n), int(t[0]) if _is_int(t[0]) else t[0], n))
        if isinstance(out[0][1], int) and not have_map:
            raise DataError(f"{path} looks like the devkit's ground truth (one ILSVRC2012_ID per line: 1-based, "
                            "not in sorted-synset order): set data.val_label_map=<devkit>/data/meta.mat (needs scipy) "
                            "or a text file of 'ILSVRC2012_ID SYNSET' lines")
        return out
    out = []
    kind = None
    for n, line in enumerate(lines, 1):
        t = _tokens(line)
        if len(t) == 6 and all(_is_int(v) for v in t[2:]):  # Tiny-ImageNet's val_annotations.txt: + a bounding box
            t = t[:2]
        if len(t) != 2:
            raise DataError(f"{path}:{n}: expected 'FILENAME SYNSET' or 'FILENAME INDEX', got {line[:80]!r}")
        this = "int" if _is_int(t[1]) else "synset"
        if kind is not None and this != kind:
            raise DataError(f"{path}:{n}: mixes synsets and integer labels; use one kind per file")
        kind = this
        out.append((t[0], int(t[1]) if this == "int" else t[1], n))
    return out
