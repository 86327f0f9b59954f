"""NVIDIA DALI backend: ImageFolder JPEGs decoded by DALI (nvJPEG on the GPU, or libjpeg-turbo threads).

Pipeline (one per epoch, see below)
    ``fn.readers.file(files, labels, shard_id=rank, num_shards=world_size, pad_last_batch=True)``
    train: ``fn.decoders.image_random_crop`` (random-resized-crop fused into the decoder: only the
    crop window is decoded) → ``fn.resize`` to R×R → ``fn.crop_mirror_normalize`` with a coin-flip mirror;
    eval: ``fn.decoders.image`` → ``fn.resize`` of the exact source window torchvision's
    Resize(R/val_crop_ratio) + CenterCrop(R) reads (computed per image from its header, see
    :func:`_eval_window`) → ``crop_mirror_normalize``. ``crop_mirror_normalize`` also maps
    uint8 → float in [0, 1] as its last step, on the GPU in ``mixed`` mode (mean 0, std 255: the model
    wrapper normalises). Decoding is ``mixed`` (GPU) when the loader's device is CUDA, else ``cpu``
    with ``device_id=None``; ``data.dali_decode`` forces either.

Order and epochs
    The file list of an epoch comes from the same :class:`ShardedSampler` as the folder backend: the
    global order (seeded by (seed, epoch), wrap-padded for train) is laid out so that DALI's contiguous
    shard ``rank`` of ``world_size`` is exactly this rank's shard, every shard padded to one length.
    The reader runs unshuffled with ``pad_last_batch=True`` and the iterator uses
    ``LastBatchPolicy.PARTIAL``: epochs are exact (no sample leaks into the next epoch), the last partial
    batch is kept, and the wrapper trims the shard padding. Because the list changes every epoch the
    pipeline is rebuilt per epoch (tens of ms); ``set_epoch(epoch, start)`` resumes exactly at ``start``.

Unreadable files
    DALI's decoders stop the pipeline on a file they cannot decode; the loader turns that into a
    one-line :class:`DataError` that names the file (taken from DALI's message, or found by probing the
    files of the batches in flight) and points to ``guardx data check``, which lists every such file.
    DALI cannot skip them mid-epoch as the folder backend does.
"""
from __future__ import annotations

import re

import torch

from guardx.data.folder import probe_image, scan_image_folder
from guardx.data.sharded import ShardedLoaderBase
from guardx.data.transforms import RATIO
from guardx.errors import ConfigError, DataError, MissingDependencyError
from guardx.utils.misc import derive_seed

READER = "reader"
_FAILED_FILE = re.compile(r"Failed to decode sample #\d+ : (.+)")


def import_dali():
    try:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except ImportError:
        raise MissingDependencyError("nvidia-dali-cuda130", "dali", "data.backend=dali") from None
    return fn, pipeline_def, types, DALIGenericIterator, LastBatchPolicy


def decode_mode(setting: str, device: torch.device | None) -> str:
    on_gpu = device is not None and device.type == "cuda"
    if setting == "auto":
        return "mixed" if on_gpu else "cpu"
    if setting == "mixed" and not on_gpu:
        raise ConfigError("data.dali_decode=mixed decodes on the GPU but the loader's device is not CUDA; "
                          "use data.dali_decode=cpu (or auto)")
    return setting


class DALILoader(ShardedLoaderBase):
    def __init__(self, root: str, cfg, *, train: bool, augment: bool, rank: int, world_size: int, batch_size: int,
                 seed: int, device: torch.device | None, max_samples: int = 0, shard_block: int = 0,
                 samples: list[tuple[str, int]] | None = None, classes: list[str] | None = None):
        """``samples`` + ``classes``: a resolved split (``guardx.data.splits``, e.g. a flat val folder);
        otherwise ``root`` is scanned as an ImageFolder."""
        import_dali()
        if samples is None:
            samples, classes = scan_image_folder(root)
        if not train and max_samples:
            samples = samples[:max_samples]
        super().__init__(len(samples), classes, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                         train=train, shard_block=shard_block)
        self.root, self.cfg, self.augment = root, cfg, augment
        self.check_command = f"guardx data check {root}"  # what lists every unreadable file of this split
        self.paths = [p for p, _ in samples]
        self.labels = [label for _, label in samples]
        self.decode = decode_mode(cfg.dali_decode, device)
        self.device_id = None
        if self.decode == "mixed":
            self.device_id = device.index if device.index is not None else torch.cuda.current_device()

    def epoch_file_list(self) -> tuple[list[str], list[int], int]:
        """``(files, labels, shard_length)`` for the reader: shard r = files[r*m:(r+1)*m] is rank r's
        ShardedSampler shard, padded with its last sample to the common length m."""
        shards = [self.shard_indices(r).tolist() for r in range(self.world_size)]
        m = max(len(s) for s in shards)
        order = [i for s in shards for i in s + [s[-1] if s else 0] * (m - len(s))]
        return [self.paths[i] for i in order], [self.labels[i] for i in order], m

    def _pipeline(self, files: list[str], labels: list[int]):
        fn, pipeline_def, types, _, _ = import_dali()
        cfg, size = self.cfg, self.cfg.resolution
        gpu = self.decode == "mixed"
        # large-enough nvJPEG buffers up front avoid reallocations during the first epochs (NVIDIA's RN50 recipe)
        decoder_args = dict(device="mixed", device_memory_padding=211_025_920,
                            host_memory_padding=140_544_512) if gpu else dict(device="cpu")

        @pipeline_def(batch_size=self.batch_size, num_threads=max(1, cfg.workers), device_id=self.device_id,
                      seed=derive_seed("dali", self.seed, self.epoch, self.sampler.start, self.rank) % (2**31 - 1),
                      prefetch_queue_depth=cfg.dali_prefetch)
        def pipe():
            jpegs, labels_ = fn.readers.file(files=files, labels=labels, shard_id=self.rank,
                                             num_shards=self.world_size, random_shuffle=False, pad_last_batch=True,
                                             stick_to_shard=True, name=READER)
            if self.augment:
                images = fn.decoders.image_random_crop(jpegs, output_type=types.RGB, random_area=list(cfg.rrc_scale),
                                                       random_aspect_ratio=list(RATIO), num_attempts=10,
                                                       **decoder_args)
                images = fn.resize(images, resize_x=size, resize_y=size)
                mirror = fn.random.coin_flip(probability=0.5) if cfg.flip else 0
                images = fn.crop_mirror_normalize(images, crop=(size, size), crop_pos_x=0.5, crop_pos_y=0.5,
                                                  mirror=mirror, mean=[0.0] * 3, std=[255.0] * 3,
                                                  dtype=types.FLOAT, output_layout="CHW")
            else:
                roi_start, roi_end = _eval_window(jpegs, size, int(round(size / cfg.val_crop_ratio)))
                images = fn.decoders.image(jpegs, output_type=types.RGB, **decoder_args)
                # the source window torchvision's Resize + CenterCrop reads, resampled once to size x size
                images = fn.resize(images, size=[size, size], roi_start=roi_start, roi_end=roi_end,
                                   roi_relative=False)
                images = fn.crop_mirror_normalize(images, mean=[0.0] * 3, std=[255.0] * 3, dtype=types.FLOAT,
                                                  output_layout="CHW")
            return images, labels_

        return pipe()

    def __iter__(self):
        mine = len(self.sampler)
        if mine == 0:
            return
        _, _, _, DALIGenericIterator, LastBatchPolicy = import_dali()
        files, labels, _ = self.epoch_file_list()
        done = 0
        try:
            batches = DALIGenericIterator([self._pipeline(files, labels)], ["x", "y"], reader_name=READER,
                                          last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False)
            while done < mine:
                out = next(batches)[0]
                x, y = out["x"], out["y"].view(-1).long()
                take = min(len(y), mine - done)  # the shard padding sits at the end
                done += take
                yield x[:take], y[:take]
        except StopIteration:
            raise DataError(f"DALI ended the epoch after {done} of {mine} samples (rank {self.rank})") from None
        except RuntimeError as e:
            raise self._decode_error(e, done) from None

    def _decode_error(self, err: RuntimeError, done: int) -> DataError:
        """Name the file DALI could not decode: from its message, else by probing the batches in flight."""
        text = str(err)
        found = _FAILED_FILE.search(text)
        path, reason = (found.group(1).strip(), None) if found else (None, None)
        if path is None:
            in_flight = self.shard_indices()[done:done + (self.cfg.dali_prefetch + 2) * self.batch_size]
            for i in in_flight.tolist():
                result = probe_image(self.paths[i])
                if isinstance(result, str):
                    path, reason = self.paths[i], result
                    break
        if path is None:
            return DataError(f"DALI failed near sample {done} of rank {self.rank}'s shard in epoch {self.epoch}: "
                             f"{_dali_reason(text)}")
        if reason is None:
            probed = probe_image(path)
            reason = probed if isinstance(probed, str) else "readable by PIL, not by DALI"
        return DataError(f"DALI cannot decode {path} ({reason}); unlike the folder backend DALI cannot skip it: "
                         f"remove or replace it (`{self.check_command}` lists every unreadable file)")


def _eval_window(jpegs, crop: int, resize: int):
    """Per-image source window (``roi_start``, ``roi_end`` as [y, x]) of torchvision's eval transform,
    Resize(resize) + CenterCrop(crop), from the encoded image's header (no decode).

    torchvision resizes the short side to ``resize`` and the long side to ``floor(resize * long / short)``,
    then crops at ``round((out - crop) / 2)`` (Python's round: halves to even). Resampling that window of
    the source straight to ``crop`` x ``crop`` puts every output pixel at the same source position as
    torchvision's two steps, with the same antialiasing width, so the tensors agree to the decoder's
    rounding (tests/test_loaders.py) instead of differing by a half-pixel shift."""
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath

    shape = fn.peek_image_shape(jpegs)  # (H, W, C), int64
    h, w = shape[0], shape[1]
    short = dmath.min(h, w)
    out_h, out_w = (resize * h) // short, (resize * w) // short

    def offset(extra):  # round(extra / 2), halves to even
        half = extra // 2
        return half + (extra % 2) * (half % 2)

    top, left = offset(out_h - crop), offset(out_w - crop)

    def f(x):
        return fn.cast(x, dtype=types.FLOAT)

    sy, sx = f(h) / f(out_h), f(w) / f(out_w)  # source pixels per resized pixel
    start = fn.stack(f(top) * sy, f(left) * sx)
    end = fn.stack(f(top + crop) * sy, f(left + crop) * sx)
    return start, end


def _dali_reason(text: str) -> str:
    """The informative line of a DALI pipeline error (the one after ``encountered:``), else its first line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for i, line in enumerate(lines[:-1]):
        if line == "encountered:":
            return lines[i + 1]
    return lines[0] if lines else "unknown error"


def build_dali_loader(cfg, split: str, rank: int = 0, world_size: int = 1, *, batch_size: int, seed: int = 0,
                      augment: bool | None = None, device: torch.device | None = None, max_samples: int = 0,
                      shard_block: bool = False, classes: list[str] | None = None) -> DALILoader:
    from guardx.data.splits import resolve_split

    train = split == "train"
    found = resolve_split(cfg, split, classes)
    loader = DALILoader(found.root, cfg, train=train, augment=train if augment is None else augment,
                        rank=rank, world_size=world_size, batch_size=batch_size, seed=seed, device=device,
                        max_samples=max_samples, shard_block=batch_size if shard_block and not train else 0,
                        samples=found.samples, classes=found.classes)
    if found.layout == "flat":
        loader.check_command = "guardx data check --config ... (with data.val_dir and data.val_labels)"
    return loader
