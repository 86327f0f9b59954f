"""MTT (Cazenavette et al. 2022) and TESLA (Cui et al. 2023): distillation by matching expert trajectories.

    guardx buffers --config configs/tinyimagenet.yaml --config configs/mtt/tinyimagenet_ipc10.yaml
    guardx mtt     --config configs/tinyimagenet.yaml --config configs/mtt/tinyimagenet_ipc10.yaml
    guardx mtt     --config ... mtt.tesla=true            # TESLA: writes <run>/tesla

One iteration: draw an expert and a start epoch t < max_start_epoch; from the expert's parameters θ*_t take
N student SGD steps on synthetic batches, θ_{i+1} = θ_i − α ∇ℓ(θ_i; x_i, y_i), with the learnable step size
α; the loss is MTT's normalised distance ‖θ_N − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖². The images take an SGD step
(lr_img, momentum 0.5), α another (lr_lr, momentum 0.5). Images live in the experts' input space (normalised,
or ZCA-whitened), as in MTT; the written set is converted back to pixels.

How the gradient is computed (:class:`Matcher`):

* ``unrolled`` (MTT): the N steps are built as one autograd graph (double backward through every step);
  activation memory grows linearly in N.
* ``exact`` (TESLA, default): the forward keeps only θ_0..θ_N (N·P floats, as TESLA's code does) and each
  step's batch indices and augmentation seed; the backward walks the steps in reverse with the adjoint
  λ_N = 2(θ_N − θ*)/D, recomputing step i's gradient g_i with a graph and taking one vector–Jacobian
  product of g_i·λ_{i+1}:  ∂L/∂x_i = −α ∂(g_i·λ)/∂x_i,  ∂L/∂α += −g_i·λ,  λ_i = λ_{i+1} − α H_i λ_{i+1}.
  This is the unrolled gradient exactly (tested in fp64), with one step's activations alive at a time.
* ``first_order`` (TESLA's public code, ``distill.py``): the same loop with λ held at λ_N and no H_i term,
  i.e. the dependence of later steps on earlier ones dropped. Exact for N = 1, an approximation beyond:
  the TESLA paper calls its procedure exact, its code computes this.

Labels: ``hard`` (MTT); ``assign`` (TESLA's soft label assignment: every iteration the labels are the
sampled expert's logits at the target epoch on the current images, softmaxed, not learned — TESLA
``--teacher_label``); ``learn`` (logits initialised from one expert and learned with the images).

Resumable at iteration boundaries: everything random in iteration ``it`` is drawn from (run.seed, it).
Writes ``<run>/mtt`` or ``<run>/tesla``: ``images/<class>/<class>_<k:04d>.png`` (8-bit; see the manifest's
``quantisation``), ``synthetic.pt`` (the exact float pixels, labels, α), ``soft_labels.pt`` (soft modes),
``zca.pt`` (ZCA runs), ``metrics.json``, and ``manifest.json`` last.
"""
from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from guardx.config import Config, dump_config
from guardx.distill.trajectory import (FlatModel, build_augment, build_model, check_compatible, expert_path,
                                       input_space, load_expert, load_real)
from guardx.distributed import init_distributed
from guardx.errors import ConfigError, DataError
from guardx.paths import layout
from guardx.stage_guard import stage_guard
from guardx.utils.checkpoint import Checkpointer
from guardx.utils.io import read_json, save_torch, write_json, write_text
from guardx.utils.misc import check_finite, derive_seed, progress

GRADIENTS = ("unrolled", "exact", "first_order")

# How MTT and TESLA train a student on their sets (utils.evaluate_synset in both repositories): written into
# the manifest so the train stage can follow it.
STUDENT_RECIPE = {"optimizer": "sgd", "lr": "syn_lr", "momentum": 0.9, "weight_decay": 5e-4, "epochs": 1000,
                  "lr_decay": {"at_epoch": 501, "factor": 0.1}, "batch_size": 256, "augment": "dsa"}


# ---------------------------------------------------------------- one iteration's matching problem
def plan_batches(n: int, batch_syn: int, steps: int, seed: int) -> list[torch.Tensor]:
    """MTT's batch order: a random permutation cut into chunks of ``batch_syn``, taken from the end, and a
    new permutation when they run out. ``batch_syn = 0``: every step sees all images (shuffled)."""
    batch_syn = batch_syn or n
    gen = torch.Generator().manual_seed(seed)
    chunks: list[torch.Tensor] = []
    plan = []
    for _ in range(steps):
        if not chunks:
            chunks = list(torch.randperm(n, generator=gen).split(batch_syn))
        plan.append(chunks.pop())
    return plan


def step_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with hard labels (long) or with soft ones given as logits (float): CE(z, softmax(y))."""
    if labels.is_floating_point():
        return F.cross_entropy(logits, labels.softmax(1))
    return F.cross_entropy(logits, labels)


class Matcher:
    """The matching loss of one iteration and its gradient w.r.t. images, step size and (learned) labels.

    ``images`` (n, C, H, W) and ``labels`` ((n,) long, or (n, K) logits) are the whole synthetic set;
    ``plan[i]`` the indices step i trains on and ``seeds[i]`` its augmentation seed; ``start``/``target``
    flat expert parameters. Every method returns ``(loss, grad_images, grad_syn_lr, grad_labels)``;
    ``grad_labels`` is None unless ``labels.requires_grad``.
    """

    def __init__(self, flat_model: FlatModel, augment=None):
        self.f, self.augment = flat_model, augment

    def _augmented(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        return self.augment(x, seed) if self.augment is not None else x

    def _grad(self, theta, x, y, create_graph: bool) -> torch.Tensor:
        (g,) = torch.autograd.grad(step_loss(self.f(theta, x), y), theta, create_graph=create_graph)
        return g

    def __call__(self, mode: str, images, syn_lr, labels, start, target, plan, seeds):
        if mode == "unrolled":
            return self.unrolled(images, syn_lr, labels, start, target, plan, seeds)
        if mode in ("exact", "first_order"):
            return self.constant_memory(images, syn_lr, labels, start, target, plan, seeds,
                                        exact=mode == "exact")
        raise ValueError(f"gradient mode must be one of {GRADIENTS}, got {mode!r}")

    def unrolled(self, images, syn_lr, labels, start, target, plan, seeds):
        """MTT: the whole student trajectory as one graph, then one backward."""
        learn = labels.requires_grad
        theta = start.detach().requires_grad_(True)
        for idx, seed in zip(plan, seeds):
            g = self._grad(theta, self._augmented(images[idx], seed), labels[idx], create_graph=True)
            theta = theta - syn_lr * g
        loss = (theta - target).pow(2).sum() / (start - target).pow(2).sum()
        grads = torch.autograd.grad(loss, [images, syn_lr, *([labels] if learn else [])])
        return loss.detach(), grads[0], grads[1], grads[2] if learn else None

    def constant_memory(self, images, syn_lr, labels, start, target, plan, seeds, *, exact: bool = True):
        """TESLA: forward without a graph keeping θ_0..θ_N; backward recomputes one step at a time."""
        learn = labels.requires_grad
        alpha = syn_lr.detach()
        images_, labels_ = images.detach(), labels.detach()
        thetas = [start.detach()]
        for idx, seed in zip(plan, seeds):  # forward: each step's graph is freed once g_i is known
            theta = thetas[-1].clone().requires_grad_(True)
            g = self._grad(theta, self._augmented(images_[idx], seed), labels_[idx], create_graph=False)
            thetas.append(thetas[-1] - alpha * g)
        dist = (start - target).pow(2).sum()
        loss = (thetas[-1] - target).pow(2).sum() / dist
        lam = 2 * (thetas[-1] - target) / dist  # λ_N = ∂L/∂θ_N
        g_images = torch.zeros_like(images_)
        g_labels = torch.zeros_like(labels_) if learn else None
        g_lr = torch.zeros_like(alpha)
        for i in reversed(range(len(plan))):
            idx = plan[i]
            theta = thetas[i].clone().requires_grad_(True)
            x = images_[idx].requires_grad_(True)
            y = labels_[idx].requires_grad_(learn)
            g = self._grad(theta, self._augmented(x, seeds[i]), y, create_graph=True)
            g_lr -= g.detach() @ lam  # ∂L/∂α through θ_{i+1} = θ_i − α g_i
            wrt = [x, *([y] if learn else []), *([theta] if exact else [])]
            vjp = torch.autograd.grad(g @ lam, wrt)  # one vector–Jacobian product of g_i·λ_{i+1}
            g_images.index_add_(0, idx, -alpha * vjp[0])
            if learn:
                g_labels.index_add_(0, idx, -alpha * vjp[1])
            if exact:
                lam = lam - alpha * vjp[-1]  # λ_i = λ_{i+1} − α H_i λ_{i+1}
        return loss, g_images, g_lr, g_labels


# ---------------------------------------------------------------- the distiller
def stage_dir(cfg: Config) -> Path:
    return layout(cfg).stage("tesla" if cfg.mtt.tesla else "mtt")


def buffers_dir(cfg: Config) -> Path:
    return Path(cfg.mtt.buffers_dir) if cfg.mtt.buffers_dir else layout(cfg).stage("buffers")


def gradient_mode(cfg: Config) -> str:
    return cfg.mtt.tesla_grad if cfg.mtt.tesla else "unrolled"


class _Experts:
    """The buffers' expert files, memory-mapped on first use."""

    def __init__(self, folder: Path, manifest: dict, max_experts: int):
        names = manifest["experts"][:max_experts or None]
        self.paths = [folder / n for n in names]
        missing = [p for p in self.paths if not p.is_file()]
        if missing:
            raise DataError(f"expert file missing: {missing[0]} (rerun guardx buffers)")
        self.epochs = manifest["epochs"]
        self._open: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, i: int) -> dict:
        if i not in self._open:
            self._open[i] = load_expert(self.paths[i])
        return self._open[i]

    def params(self, i: int, epoch: int, device, dtype) -> torch.Tensor:
        return self.get(i)["params"][epoch].to(device=device, dtype=dtype)


def draw(seed: int, it: int, num_experts: int, max_start_epoch: int) -> tuple[int, int]:
    """Iteration ``it``'s expert and start epoch (a function of the seed and ``it`` only)."""
    gen = torch.Generator().manual_seed(derive_seed("mtt-draw", seed, it))
    expert = int(torch.randint(num_experts, (1,), generator=gen))
    start = int(torch.randint(max_start_epoch, (1,), generator=gen))
    return expert, start


def init_images(images_u8: torch.Tensor, labels: torch.Tensor, num_classes: int, ipc: int, *, how: str,
                seed: int, space, device) -> torch.Tensor:
    """Class-major synthetic images in the input space: random real images of each class (MTT's
    ``pix_init=real``) or standard-normal noise."""
    shape = (num_classes * ipc, *images_u8.shape[1:])
    gen = torch.Generator().manual_seed(derive_seed("mtt-init", seed))
    if how == "noise":
        return torch.randn(shape, generator=gen).to(device)
    picks = []
    for c in range(num_classes):
        pool = (labels == c).nonzero().flatten()
        if len(pool) < ipc:
            raise DataError(f"class {c} has {len(pool)} training images, fewer than mtt.ipc={ipc}")
        picks.append(pool[torch.randperm(len(pool), generator=gen)[:ipc]])
    chosen = images_u8[torch.cat(picks)].to(device).float().div_(255)
    return space.to_input(chosen)


def run(cfg: Config) -> Path:
    out = stage_dir(cfg)
    ctx = init_distributed(cfg)
    # this run owns mtt/ (or tesla/) and resumes only its own iterations
    with stage_guard(cfg, "mtt", ctx=ctx, folder=out) as guard:
        if not guard.finished(out / "manifest.json"):
            _distil(cfg, ctx, guard)
    return out


def _distil(cfg: Config, ctx, guard) -> None:
    mc, out = cfg.mtt, stage_dir(cfg)
    method = "tesla" if mc.tesla else "mtt"
    bdir = buffers_dir(cfg)
    if not (bdir / "manifest.json").is_file():
        raise DataError(f"no expert buffers at {bdir}: run guardx buffers first (or set mtt.buffers_dir)")
    bman = read_json(bdir / "manifest.json")
    if mc.max_start_epoch + mc.expert_epochs > bman["epochs"]:
        raise ConfigError(f"mtt.max_start_epoch ({mc.max_start_epoch}) + mtt.expert_epochs ({mc.expert_epochs}) "
                          f"exceeds the {bman['epochs']} epochs of the experts in {bdir}")
    # 1. distributed context (above): every rank runs the same (deterministic) distillation, rank 0 writes
    if ctx.world_size > 1 and ctx.is_main:
        warnings.warn(f"{method} runs one distillation; the {ctx.world_size} ranks repeat it and rank 0 writes "
                      "(launch it as one process)", stacklevel=2)
    device, seed = ctx.device, cfg.run.seed
    # 2. the experts' input space and architecture, from the buffers
    zca_file = bdir / bman["input_space"]["zca"] if bman["input_space"]["zca"] else None
    if (zca_file is not None) != cfg.buffers.zca:
        raise ConfigError(f"the experts in {bdir} were trained {'with' if zca_file else 'without'} ZCA but "
                          f"buffers.zca={str(cfg.buffers.zca).lower()}: match it, or point mtt.buffers_dir elsewhere")
    space = input_space(cfg.data, zca_file).to(device)
    if zca_file is None and [list(cfg.data.mean), list(cfg.data.std)] != [bman["input_space"]["mean"],
                                                                         bman["input_space"]["std"]]:
        raise ConfigError(f"data.mean/std differ from those the experts in {bdir} were trained with")
    flat = FlatModel(build_model(bman["model"]).to(device).train())
    for p in flat.model.parameters():
        p.requires_grad_(False)  # the parameters come from the flat vectors, never from the module
    experts = _Experts(bdir, bman, mc.max_experts)
    check_compatible(flat, experts.get(0), experts.paths[0])
    if mc.label_mode == "learn" and mc.label_expert >= len(experts):
        raise ConfigError(f"mtt.label_expert={mc.label_expert} but the buffers hold {len(experts)} experts")
    num_classes, classes = bman["num_classes"], bman["classes"]
    augment = build_augment(mc.dsa_strategy)
    matcher = Matcher(flat, augment)
    mode, label_mode = gradient_mode(cfg), mc.label_mode
    # 3. the synthetic set, its step size and labels, their optimisers
    real_x, real_y, _ = load_real(cfg.data, "train", resolution=bman["resolution"])
    images = init_images(real_x, real_y, num_classes, mc.ipc, how=mc.init, seed=seed, space=space,
                         device=device).requires_grad_(True)
    del real_x, real_y
    hard = torch.arange(num_classes, device=device).repeat_interleave(mc.ipc)
    syn_lr = torch.tensor(mc.lr_teacher, device=device).requires_grad_(True)
    labels = hard
    if label_mode == "learn":
        epoch = min(mc.max_start_epoch + mc.expert_epochs, experts.epochs)
        with torch.no_grad():
            labels = flat(experts.params(mc.label_expert, epoch, device, images.dtype), images)
        labels = labels.clone().requires_grad_(True)
    opt_img = torch.optim.SGD([images], lr=mc.lr_img, momentum=0.5)
    opt_lr = torch.optim.SGD([syn_lr], lr=mc.lr_lr, momentum=0.5)
    opt_label = torch.optim.SGD([labels], lr=mc.lr_label, momentum=0.5) if label_mode == "learn" else None
    # 4. resume
    ckpt = Checkpointer(out / "ckpt", keep=mc.keep_checkpoints, ctx=ctx, guard=guard)
    state, start_it, history = ckpt.load(), 0, []
    if state is not None:
        with torch.no_grad():
            images.copy_(state["images"].to(device))
            syn_lr.copy_(state["syn_lr"].to(device))
            if opt_label is not None:
                labels.copy_(state["labels"].to(device))
        opt_img.load_state_dict(state["opt_img"])
        opt_lr.load_state_dict(state["opt_lr"])
        if opt_label is not None:
            opt_label.load_state_dict(state["opt_label"])
        start_it, history = state["iteration"], list(state["history"])
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_text(dump_config(cfg), out / "config.yaml")

    def snapshot(it: int) -> None:
        ckpt.save({"iteration": it, "images": images.detach().cpu(), "syn_lr": syn_lr.detach().cpu(),
                   "labels": labels.detach().cpu() if opt_label is not None else None,
                   "opt_img": opt_img.state_dict(), "opt_lr": opt_lr.state_dict(),
                   "opt_label": opt_label.state_dict() if opt_label is not None else None,
                   "history": history}, it)

    def soft_targets(expert: int, start: int) -> torch.Tensor:
        """TESLA's assignment: the expert at the target epoch labels the current images."""
        with torch.no_grad():
            return flat(experts.params(expert, start + mc.expert_epochs, device, images.dtype), images)

    # 5. the loop
    t0 = time.perf_counter()
    bar = progress(range(start_it, mc.iterations), enabled=cfg.run.progress and ctx.is_main, desc=method,
                   unit="it", initial=start_it, total=mc.iterations)
    for it in bar:
        e, t = draw(seed, it, len(experts), mc.max_start_epoch)
        start = experts.params(e, t, device, images.dtype)
        target = experts.params(e, t + mc.expert_epochs, device, images.dtype)
        step_labels = soft_targets(e, t) if label_mode == "assign" else labels
        plan = [idx.to(device) for idx in plan_batches(len(images), mc.batch_syn, mc.syn_steps,
                                                       derive_seed("mtt-batches", seed, it))]
        seeds = [derive_seed("mtt-augment", seed, it, i) for i in range(mc.syn_steps)]
        loss, g_img, g_lr, g_lab = matcher(mode, images, syn_lr, step_labels, start, target, plan, seeds)
        value = float(loss)  # host sync: one per iteration, for the finite check and the log
        check_finite(value, stage=method, step=it, last_good=None if ckpt.last_saved is None else str(ckpt.last_saved))
        images.grad, syn_lr.grad = g_img, g_lr
        opt_img.step()
        opt_lr.step()
        if opt_label is not None:
            labels.grad = g_lab
            opt_label.step()
        history.append({"iteration": it + 1, "loss": value, "expert": e, "start_epoch": t,
                        "syn_lr": float(syn_lr.detach())})
        bar.set_postfix(loss=f"{value:.4f}", syn_lr=f"{history[-1]['syn_lr']:.4g}")
        if (it + 1) % mc.ckpt_every == 0 or it + 1 == mc.iterations:
            snapshot(it + 1)
    bar.close()
    # 6. the distilled set: final labels, pixels, files; the manifest last
    if label_mode == "assign":
        final_logits = soft_targets(*draw(seed, mc.iterations - 1, len(experts), mc.max_start_epoch))
    else:
        final_logits = labels.detach() if label_mode == "learn" else None
    if ctx.is_main:
        write_set(out, method=method, images=images.detach(), hard=hard, logits=final_logits,
                  syn_lr=float(syn_lr.detach()), classes=classes, space=space, zca_file=zca_file, cfg=cfg,
                  model=bman["model"], label_mode=label_mode, gradient=mode, buffers=bdir,
                  history=history, seconds=time.perf_counter() - t0, fingerprint=guard.stamp())
    ctx.barrier()


def write_set(out: Path, *, method: str, images, hard, logits, syn_lr: float, classes, space, zca_file,
              cfg: Config, model: dict, label_mode: str, gradient: str, buffers: Path, history: list,
              seconds: float, fingerprint: dict | None = None) -> None:
    """PNGs, exact tensors, soft labels, then the manifest (rank 0)."""
    from guardx.data.distilled import image_path, save_png

    pixels = space.to_pixels(images).float().cpu()
    stored = pixels.clamp(0, 1).mul(255).round().div(255)  # what the 8-bit PNGs hold
    with torch.no_grad():
        back = space.to_input(stored.to(images.device)).float().cpu()
    quantisation = {"clipped_fraction": float(((pixels < 0) | (pixels > 1)).float().mean()),
                    "max_abs_error_pixels": float((stored - pixels).abs().max()),
                    "rmse_input_space": float((back - images.float().cpu()).pow(2).mean().sqrt())}
    root = out / "images"
    per_class = [0] * len(classes)
    rel_paths = []
    for k in range(len(hard)):
        c = int(hard[k])
        path = image_path(root, classes[c], per_class[c])
        per_class[c] += 1
        save_png(pixels[k].clamp(0, 1), path)
        rel_paths.append(path.relative_to(out).as_posix())
    soft = logits is not None
    save_torch({"images": pixels, "labels": hard.cpu(), "logits": logits.float().cpu() if soft else None,
                "syn_lr": syn_lr, "classes": list(classes), "paths": rel_paths}, out / "synthetic.pt")
    if soft:
        save_torch({"paths": rel_paths, "logits": logits.float().cpu()}, out / "soft_labels.pt")
    if zca_file is not None:
        shutil.copyfile(zca_file, out / "zca.pt")
    mc = cfg.mtt
    write_json({"history": history, "seconds_this_run": seconds}, out / "metrics.json")
    zca = zca_file is not None
    write_json({
        "distiller": method, "labels": "soft" if soft else "hard", "label_mode": label_mode,
        "classes": list(classes), "num_classes": len(classes), "resolution": int(images.shape[-1]),
        "ipc": mc.ipc, "images": len(rel_paths), "image_dir": "images", "paths": rel_paths,
        # the student's normaliser: mean/std, or (zca) identity mean/std and the ZCA transform in zca.pt
        "mean": [0.0] * 3 if zca else list(cfg.data.mean), "std": [1.0] * 3 if zca else list(cfg.data.std),
        "zca": "zca.pt" if zca else None,
        "syn_lr": syn_lr, "soft_labels": "soft_labels.pt" if soft else None, "exact_tensors": "synthetic.pt",
        "quantisation": quantisation, "model": model,
        "student": {**STUDENT_RECIPE, "lr": syn_lr, "loss": "soft_ce" if soft else "ce",
                    "dsa_strategy": mc.dsa_strategy},
        "settings": {"iterations": mc.iterations, "syn_steps": mc.syn_steps, "expert_epochs": mc.expert_epochs,
                     "max_start_epoch": mc.max_start_epoch, "lr_img": mc.lr_img, "lr_lr": mc.lr_lr,
                     "lr_teacher": mc.lr_teacher, "batch_syn": mc.batch_syn, "init": mc.init,
                     "gradient": gradient, "seed": cfg.run.seed},
        "buffers": str(buffers), "final_loss": history[-1]["loss"] if history else None, "fingerprint": fingerprint,
    }, out / "manifest.json")


__all__ = ["Matcher", "plan_batches", "step_loss", "draw", "init_images", "run", "write_set", "stage_dir",
           "GRADIENTS", "STUDENT_RECIPE"]
