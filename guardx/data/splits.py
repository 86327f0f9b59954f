"""Which files a split holds and which class index each gets — the one place every backend asks.

* train: ``data.train_dir`` is an ImageFolder (``<synset>/<image>``); classes = sorted folder names.
* val, ImageFolder (``data.val_labels`` empty): ``data.val_dir/<synset>/<image>``; each folder is
  labelled with its index among the **train** classes, so train and val agree even when val lacks a
  class; a val folder that is not a train class is an error naming it.
* val, flat (``data.val_labels=FILE``): every image directly in ``data.val_dir``, labelled by FILE
  (formats in :mod:`guardx.data.labels`), again as indices into the train classes; an image without
  a label, a label without an image, and a synset unknown to train are errors naming them. Samples are
  in file-name order (ILSVRC2012_val_00000001.JPEG, ...).

The train classes come from (first found): the ``classes`` a caller passes (evaluate passes the
model's), ``data.train_dir``'s folders, or the sidecar of ``data.ffcv_train``. Without any of them a
flat val split cannot be labelled (an error says what to set) and an ImageFolder val split uses its own
folders, as before.

``resolve_split(..., strict=False)`` collects problems instead of raising: ``guardx data check``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from guardx.data.folder import IMG_EXTENSIONS, scan_image_folder
from guardx.errors import ConfigError, DataError


@dataclass
class Split:
    root: str
    samples: list[tuple[str, int]]       # (path, class index), in loader order
    classes: list[str]                   # index → synset (the train classes when known)
    layout: str                          # "imagefolder" | "flat"
    labels_file: str = ""
    problems: list[str] = field(default_factory=list)  # strict=False only


def split_root(cfg, split: str) -> str:
    path = cfg.train_dir if split == "train" else cfg.val_dir
    if not path:
        key = "train_dir" if split == "train" else "val_dir"
        raise ConfigError(f"data.{key} is empty: set it to an ImageFolder root (data.{key}=/path/to/{split})"
                          + (" or, with data.val_labels, a flat folder of images" if split != "train" else ""))
    return path


def folder_classes(root: str | Path) -> list[str]:
    """Sorted class sub-folder names of an ImageFolder (no file listing: cheap on ImageNet)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    return sorted(d.name for d in os.scandir(root) if d.is_dir())


def train_classes(cfg) -> list[str] | None:
    """The train split's class order, if the config names the train split (folder or .beton)."""
    if cfg.train_dir and Path(cfg.train_dir).is_dir():
        found = folder_classes(cfg.train_dir)
        if found:
            return found
    if getattr(cfg, "ffcv_train", "") and Path(f"{cfg.ffcv_train}.json").is_file():
        from guardx.data.ffcv import read_meta

        return list(read_meta(cfg.ffcv_train)["classes"])
    return None


def resolve_split(cfg, split: str, classes: list[str] | None = None, *, strict: bool = True) -> Split:
    root = split_root(cfg, split)
    if split == "train":
        samples, found = scan_image_folder(root)
        return Split(root, samples, found, "imagefolder")
    reference = list(classes) if classes else train_classes(cfg)
    if getattr(cfg, "val_labels", ""):
        return _flat(cfg, root, reference, strict)
    return _imagefolder_val(root, reference, strict)


def _imagefolder_val(root: str, reference: list[str] | None, strict: bool) -> Split:
    if reference is None:
        samples, found = scan_image_folder(root)
        return Split(root, samples, found, "imagefolder")
    found = folder_classes(root)
    if not found:
        if any(e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS) for e in os.scandir(root)):
            raise DataError(f"{root} holds images but no class folders: a flat validation folder needs "
                            "data.val_labels=FILE (see README: ImageNet layouts)")
        raise DataError(f"no class sub-folders in {root} (expected ImageFolder layout root/<class>/<image>)")
    unknown = [c for c in found if c not in set(reference)]
    problems = []
    if unknown:
        msg = (f"{root} has class folders the train split lacks: {_few(unknown)} (the train split has "
               f"{len(reference)} classes)")
        if strict:
            raise DataError(msg)
        problems.append(msg)
    index = {c: i for i, c in enumerate(reference)}
    samples, _ = scan_image_folder(root, [c for c in found if c in index])
    by_name = [c for c in found if c in index]
    samples = [(p, index[by_name[label]]) for p, label in samples]
    return Split(root, samples, list(reference), "imagefolder", problems=problems)


def _flat(cfg, root: str, reference: list[str] | None, strict: bool) -> Split:
    from guardx.data.labels import read_val_labels

    if reference is None:
        where = f" ({cfg.train_dir} is not a folder)" if cfg.train_dir else ""
        raise ConfigError("data.val_labels labels a flat folder by the train classes: set data.train_dir (or "
                          f"data.ffcv_train) so guardx knows the class order{where}")
    if not Path(root).is_dir():
        raise DataError(f"data folder not found: {root}")
    labels = read_val_labels(cfg.val_labels, reference, getattr(cfg, "val_label_map", ""))
    files = sorted(e.name for e in os.scandir(root) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
    if not files:
        subdirs = folder_classes(root)
        raise DataError(f"no images directly in {root}" + (
            f" (it has {len(subdirs)} sub-folders: an ImageFolder val split needs no data.val_labels)" if subdirs
            else ""))
    samples, unlabelled, used = [], [], set()
    for name in files:
        key = name if name in labels else Path(name).stem if Path(name).stem in labels else None
        if key is None:
            unlabelled.append(name)
            continue
        used.add(key)
        samples.append((os.path.join(root, name), labels[key]))
    missing = sorted(set(labels) - used)
    problems = []
    if unlabelled:
        problems.append(f"{len(unlabelled)} images in {root} have no label in {cfg.val_labels}: {_few(unlabelled)}")
    if missing:
        problems.append(f"{len(missing)} images listed in {cfg.val_labels} are missing from {root}: {_few(missing)}")
    if problems and strict:
        raise DataError(problems[0] + (f" (and: {problems[1]})" if len(problems) > 1 else ""))
    return Split(root, samples, list(reference), "flat", labels_file=str(cfg.val_labels), problems=problems)


def _few(items: list[str], k: int = 3) -> str:
    return ", ".join(items[:k]) + (f", ... ({len(items)} in all)" if len(items) > k else "")


def class_display_names(cfg, classes: list[str]) -> list[str]:
    """Display name per class: from ``data.class_names`` when set (synsets it lacks keep their id)."""
    path = getattr(cfg, "class_names", "")
    if not path:
        return list(classes)
    from guardx.data.labels import read_class_names

    names = read_class_names(path)
    return [names.get(c, c) for c in classes]
