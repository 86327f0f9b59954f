"""DC (Zhao, Mopuri & Bilen, ICLR 2021) and GUARD(DC) (the GUARD paper's Algorithm 1): gradient matching.

    for it in range(iterations):                 # a fresh θ₀ ~ p(θ₀) each (DC's ``Iteration``, Algorithm 1's K)
        θ ← θ₀
        for ol in range(outer_loop):             # synthetic-set updates on this θ (DC's ``outer_loop``, T)
            for each class c:                    # the same DSA transform ω for both batches of class c
                G_c = ∇θ L^T_c(θ)                # real minibatch of class c; L^T = the objective
                D_c = Σ_layers Σ_rows (1 − cos)(∇θ CE(θ; S_c), G_c)
            S ← SGD(S, ∇_S Σ_c D_c)              # lr_img 0.1, momentum 0.5
            if ol < outer_loop − 1:
                train θ on S for inner_loop epochs   # CE, batch_train, SGD lr_net (DC's ``inner_loop``, ς_θ)

The objective is whatever :func:`guardx.objectives.build_objective` returns, called as on any other
training batch: ``plain`` (cross-entropy) is DC; ``guard`` is GUARD(DC): L^T_c is the regularised loss ℓ_R
of eq. 11 and the matched gradient is ∇θ ℓ_R, taken with ``torch.autograd.grad`` of the objective's loss
(GUARD's ``low_memory`` surrogate has value ℓ_R and exactly the gradient ∇θ ℓ_R; tested).

Settings follow DC's code (VICO-UoE/DatasetCondensation ``main.py``/``utils.py``): distance ``'ours'``
(``distance_wb``: conv weights reshaped to (out, in·k·k), linear weights as they are, 1-D tensors — biases and
the instance-norm affine parameters — contribute 0), loop counts per ipc (``get_loops``), SGD momentum 0.5
on the images, plain SGD on θ, real images of a class drawn without replacement, images optimised in the
normalised space the network sees, and DSA applied to the normalised tensors (as DC's loaders normalise).

Speed: instance norm couples no samples, so the synthetic side — many tiny per-class double-backward
steps — runs for all classes at once (``torch.func.vmap`` over classes of ∇θ CE(S_c), then one backward to
S; ``batched=False`` is the per-class loop, same maths). The real side stays one class per call: the
objective is the shared one (GUARD's regulariser is never re-implemented here), and each call is already
a batch of ``batch_real`` images (a vmapped plain-CE real side measured 3× slower on CPU). On CPU the
vectorised synthetic side only wins for small steps (ipc 1, narrow nets): vmap's convolution backward
computes ~2× the FLOPs of autograd's pruned one (``python -m guardx.bench.dc``).

Ranks: classes are dealt out round-robin; each rank computes its classes' image gradients, one all-reduce
sums them (disjoint rows), and every rank takes the same optimiser step and trains the same θ on the full
synthetic set. Every random stream is a :func:`~guardx.utils.misc.derive_seed` of (seed, iteration, ...)
and the class, never of the rank, so any world size gives the images one process gives (tested).
"""
from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from guardx.data.dsa import DSA
from guardx.errors import ConfigError, GuardxError
from guardx.models.wrapper import Normalized, split_normalizer, unwrap
from guardx.utils.misc import derive_seed, progress

# DC's get_loops (utils.py l. 275-293): ipc -> (outer_loop, inner_loop)
DC_LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
STATE_FORMAT = "guardx-dc-1"


def default_loops(ipc: int) -> tuple[int, int]:
    """DC's (outer_loop, inner_loop) for ``ipc``; other ipc values have none (set both explicitly)."""
    if ipc not in DC_LOOPS:
        raise ConfigError(f"DC defines loop counts for ipc {sorted(DC_LOOPS)} only, not {ipc}: "
                          "set dc.outer_loops and dc.inner_loops")
    return DC_LOOPS[ipc]


def match_distance(g_syn: Sequence[torch.Tensor], g_real: Sequence[torch.Tensor]) -> torch.Tensor:
    """DC's layer-wise gradient distance (``dis_metric='ours'``): Σ over tensors Σ over output rows of
    1 − cos(g_syn_row, g_real_row), with each tensor reshaped to (out, -1); 1-D tensors (biases, norm
    affine parameters) contribute 0, as DC's ``distance_wb`` returns 0 for them. The cosine's
    denominator carries DC's +1e-6."""
    total = g_syn[0].new_zeros(())
    for gs, gr in zip(g_syn, g_real, strict=True):
        if gs.dim() <= 1:
            continue
        gs, gr = gs.reshape(gs.shape[0], -1), gr.reshape(gr.shape[0], -1)
        cos = (gs * gr).sum(-1) / (gs.norm(dim=-1) * gr.norm(dim=-1) + 1e-6)
        total = total + (1 - cos).sum()
    return total


class _OneProcess:
    rank, world_size = 0, 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t


class GradientMatching:
    """The DC / GUARD(DC) loop over a synthetic set; resumable at iteration boundaries.

    ``real``: one tensor per class, images in [0, 1] (N_c, 3, H, W). ``model_fn()``: a fresh model (a
    :class:`~guardx.models.Normalized` wrapper or a bare network) with the factory's random init; it is
    called under a seeded CPU generator, so θ₀ of iteration ``it`` is a pure function of (seed, it).
    ``objective(model, x, y) -> (loss, stats)``: the real-data loss. ``dsa``: a :class:`DSA` or None.
    ``outer_loop``/``inner_loop`` 0 take DC's values for ``ipc``. ``ctx``: anything with ``rank``,
    ``world_size`` and ``all_reduce_sum`` (a :class:`~guardx.distributed.DistContext`); None = one process.
    """

    def __init__(self, real: Sequence[torch.Tensor], model_fn: Callable[[], nn.Module], objective: Callable, *,
                 ipc: int, outer_loop: int = 0, inner_loop: int = 0, lr_img: float = 0.1,
                 momentum_img: float = 0.5, lr_net: float = 0.01, batch_real: int = 256, batch_train: int = 256,
                 init: str = "real", dsa: DSA | None = None, seed: int = 0, batched: bool = True,
                 device: torch.device | str | None = None, ctx=None):
        if init not in ("real", "noise"):
            raise ConfigError(f"dc init must be 'real' or 'noise', got {init!r}")
        dc_outer, dc_inner = DC_LOOPS.get(ipc, (0, 0))
        self.outer_loop, self.inner_loop = outer_loop or dc_outer, inner_loop or dc_inner
        if self.outer_loop <= 0 or self.inner_loop <= 0:
            default_loops(ipc)  # raises with the fix
        self.model_fn, self.objective, self.dsa = model_fn, objective, dsa
        self.ipc, self.lr_img, self.momentum_img, self.lr_net = ipc, lr_img, momentum_img, lr_net
        self.batch_real, self.batch_train, self.init, self.seed, self.batched = batch_real, batch_train, init, seed, batched
        self.ctx = ctx if ctx is not None else _OneProcess()
        self.device = torch.device(device) if device is not None else real[0].device
        self.num_classes = len(real)
        self.my_classes = list(range(self.ctx.rank, self.num_classes, self.ctx.world_size))

        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG as it was
            probe = unwrap(model_fn())
        norm = probe if isinstance(probe, Normalized) else Normalized(nn.Identity())
        self._mean, self._std = norm.mean.to(self.device), norm.std.to(self.device)
        for c, x in enumerate(real):
            if len(x) < (ipc if init == "real" else 1):
                raise GuardxError(f"class {c} has {len(x)} real images; dc.init=real needs at least ipc={ipc}")
        self.real = [self._normalize(x.to(self.device, torch.float32)) for x in real]  # DC's tensors are normalised

        self.labels = torch.arange(self.num_classes, device=self.device).repeat_interleave(ipc)  # [0,0,..,1,1,..]
        self.images = self._initial_images().requires_grad_(True)  # normalised space, (C·ipc, 3, H, W)
        self.optimizer = torch.optim.SGD([self.images], lr=lr_img, momentum=momentum_img)
        self.iteration = 0  # completed iterations
        self.history: list[dict] = []

    # ------------------------------------------------------------------ set-up
    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self._mean) / self._std

    def _denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._std + self._mean

    def _initial_images(self) -> torch.Tensor:
        out = []
        for c, x in enumerate(self.real):
            gen = torch.Generator().manual_seed(derive_seed("dc-init", self.seed, c))
            if self.init == "real":  # DC: ipc random real images of the class
                out.append(x[torch.randperm(len(x), generator=gen)[:self.ipc].to(self.device)])
            else:  # DC: torch.randn in the normalised space
                out.append(torch.randn((self.ipc, *x.shape[1:]), generator=gen).to(self.device))
        return torch.cat(out).detach().clone()

    def _fresh_model(self, it: int) -> nn.Module:
        """θ₀ ~ p(θ₀): the factory's init under a generator seeded by (seed, it), on the CPU, then moved."""
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(derive_seed("dc-theta0", self.seed, it))
            model = self.model_fn()
        return model.to(self.device).train()

    def settings(self) -> dict:
        """Everything that determines the images besides the data and the model factory (checked on resume)."""
        return {"ipc": self.ipc, "outer_loop": self.outer_loop, "inner_loop": self.inner_loop, "lr_img": self.lr_img,
                "momentum_img": self.momentum_img, "lr_net": self.lr_net, "batch_real": self.batch_real,
                "batch_train": self.batch_train, "init": self.init, "seed": self.seed,
                "dsa": repr(self.dsa) if self.dsa is not None else "none", "objective": repr(self.objective),
                "num_classes": self.num_classes, "shape": list(self.images.shape)}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "iteration": self.iteration, "images": self.images.detach().cpu().clone(),
                "labels": self.labels.cpu(), "optimizer": self.optimizer.state_dict(), "settings": self.settings(),
                "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise GuardxError(f"not a DC checkpoint (format {state.get('format')!r}, expected {STATE_FORMAT!r})")
        mine, theirs = self.settings(), state["settings"]
        diff = [f"{k}: checkpoint {theirs.get(k)!r}, now {v!r}" for k, v in mine.items() if theirs.get(k) != v]
        if diff:
            raise GuardxError("the DC checkpoint was made with other settings (" + "; ".join(diff) + "); "
                              "use a new run directory or restore the settings")
        with torch.no_grad():
            self.images.copy_(state["images"].to(self.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration, self.history = int(state["iteration"]), list(state["history"])

    def pixels(self) -> torch.Tensor:
        """The synthetic images in [0, 1] (denormalised and clipped, as DC saves them), on the CPU."""
        return self.exact_pixels().clamp(0, 1)

    def exact_pixels(self) -> torch.Tensor:
        """The synthetic images denormalised but not clipped (what a student trained on them sees), on the CPU."""
        return self._denormalize(self.images.detach()).cpu()

    # ------------------------------------------------------------------ one iteration
    def run(self, iterations: int, *, on_iteration: Callable[["GradientMatching"], None] | None = None,
            show_progress: bool = False) -> None:
        """Iterate until ``iterations`` are done (continuing from :attr:`iteration`); ``on_iteration(self)``
        after each (checkpointing happens there)."""
        real_per_it = sum(min(self.batch_real, len(x)) for x in self.real) * self.outer_loop
        bar = progress(range(self.iteration, iterations), enabled=show_progress, desc="dc iterations", unit="it")
        t0, done = time.perf_counter(), 0
        for _ in bar:
            stats = self.step()
            done += 1
            bar.set_postfix(match=f"{stats['match']:.3f}",
                            real_img_per_s=f"{done * real_per_it / (time.perf_counter() - t0):.0f}")
            if on_iteration is not None:
                on_iteration(self)
        bar.close()

    def step(self) -> dict:
        """One outer iteration: a fresh θ₀, ``outer_loop`` synthetic updates with network training between."""
        it = self.iteration
        model = self._fresh_model(it)
        _, net = split_normalizer(model, "normalized")  # synthetic images live in the space ``net`` sees
        opt_net = torch.optim.SGD(net.parameters(), lr=self.lr_net)  # DC: plain SGD, new each iteration
        sums = torch.zeros(3, dtype=torch.float64)
        for ol in range(self.outer_loop):
            sums += self._update_images(model, net, it, ol)
            if ol < self.outer_loop - 1:  # DC skips the network update after the last synthetic update
                self._train_net(net, opt_net, it, ol)
        self.iteration = it + 1
        n = self.num_classes * self.outer_loop
        stats = {"iteration": self.iteration, "match": sums[0].item() / n, "real_ce": sums[1].item() / n,
                 "real_reg": sums[2].item() / n}
        self.history.append(stats)
        return stats

    def _update_images(self, model: nn.Module, net: nn.Module, it: int, ol: int) -> torch.Tensor:
        params = list(net.parameters())
        seeds = {c: derive_seed("dc-dsa", self.seed, it, ol, c) for c in self.my_classes}
        grads_real, ce, reg = {}, 0.0, 0.0
        for c in self.my_classes:  # one objective call per class (GUARD's passes are per batch)
            grads_real[c], st = self._real_grads(model, params, c, it, ol, seeds[c])
            ce, reg = ce + st.get("ce", 0.0), reg + st.get("reg", 0.0)
        grad_images = torch.zeros_like(self.images)
        if self.my_classes:
            fn = self._syn_grads_batched if self.batched else self._syn_grads_loop
            rows, g, dist = fn(net, params, grads_real, seeds)
            grad_images[rows] = g
        else:
            dist = torch.zeros((), device=self.device)
        # one all-reduce: every rank's image gradient rows (disjoint) and the loss sums
        flat = torch.cat([grad_images.flatten(), torch.stack([dist.detach().sum().to(grad_images.dtype),
                                                               torch.tensor(ce, device=self.device),
                                                               torch.tensor(reg, device=self.device)])])
        flat = self.ctx.all_reduce_sum(flat)
        self.images.grad = flat[:-3].view_as(self.images)
        self.optimizer.step()
        self.images.grad = None
        return flat[-3:].double().cpu()

    def _real_batch(self, c: int, it: int, ol: int) -> torch.Tensor:
        x = self.real[c]
        gen = torch.Generator().manual_seed(derive_seed("dc-real", self.seed, it, ol, c))
        return x[torch.randperm(len(x), generator=gen)[:self.batch_real].to(self.device)]

    def _real_grads(self, model, params, c: int, it: int, ol: int, seed: int):
        """G_c = ∇θ of the objective's loss on a real minibatch of class c (detached), and its stats."""
        x = self._real_batch(c, it, ol)
        if self.dsa is not None:
            x = self.dsa(x, seed)
        y = torch.full((len(x),), c, dtype=torch.long, device=self.device)
        # the objective sees images as every objective does: pixel space through the model's normaliser
        loss, stats = self.objective(model, self._denormalize(x), y)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)], stats

    def _rows(self, c: int) -> slice:
        return slice(c * self.ipc, (c + 1) * self.ipc)

    def _augment_syn(self, x: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """x (K, ipc, 3, H, W): class k gets the transform of its real batch (siamese)."""
        if self.dsa is None:
            return x
        return torch.stack([self.dsa(x[k], s) for k, s in enumerate(seeds)])

    def _syn_grads_loop(self, net, params, grads_real, seeds):
        """Per class: ∂/∂S_c of D(∇θ CE(S_c), G_c) by double backward (DC's loop)."""
        grads, dists = [], []
        for c in self.my_classes:
            x = self.images[self._rows(c)].detach().requires_grad_(True)
            xa = self._augment_syn(x.unsqueeze(0), [seeds[c]])[0]
            y = torch.full((self.ipc,), c, dtype=torch.long, device=self.device)
            gs = torch.autograd.grad(F.cross_entropy(net(xa), y), params, create_graph=True)
            d = match_distance(gs, grads_real[c])
            (g,) = torch.autograd.grad(d, x)
            grads.append(g)
            dists.append(d.detach())
        rows = torch.cat([torch.arange(self._rows(c).start, self._rows(c).stop) for c in self.my_classes])
        return rows.to(self.device), torch.cat(grads), torch.stack(dists)

    def _syn_grads_batched(self, net, params, grads_real, seeds):
        """All of this rank's classes in one call (same maths as the loop): ``vmap`` over classes of
        ∇θ CE(S_c) — still an autograd graph in S — then the distances, then one backward to S."""
        from torch.func import functional_call, grad, vmap

        names = [n for n, _ in net.named_parameters()]
        theta = {n: p.detach() for n, p in zip(names, params)}
        classes = self.my_classes
        rows = torch.cat([torch.arange(self._rows(c).start, self._rows(c).stop) for c in classes]).to(self.device)
        x = self.images.detach()[rows].view(len(classes), self.ipc, *self.images.shape[1:]).requires_grad_(True)
        xa = self._augment_syn(x, [seeds[c] for c in classes])
        y = torch.tensor(classes, device=self.device).view(-1, 1).expand(-1, self.ipc)

        def syn_loss(th, xs, ys):
            return F.cross_entropy(functional_call(net, th, (xs,)), ys)

        g_syn = vmap(grad(syn_loss), in_dims=(None, 0, 0))(theta, xa, y)  # {name: (K, *shape)}
        g_real = [torch.stack([grads_real[c][i] for c in classes]) for i in range(len(params))]
        dist = vmap(match_distance)([g_syn[n] for n in names], g_real)  # (K,)
        (g,) = torch.autograd.grad(dist.sum(), x)  # rows of different classes do not interact
        return rows, g.reshape(-1, *self.images.shape[1:]), dist.detach()

    def _train_net(self, net: nn.Module, opt: torch.optim.Optimizer, it: int, ol: int) -> None:
        """DC's ``epoch('train', ...)`` × inner_loop on the whole synthetic set: shuffled batches of
        batch_train, CE on hard labels, per-image DSA (DC's seed=-1) when DSA is on."""
        x_all, y_all = self.images.detach(), self.labels
        n = len(y_all)
        gen = torch.Generator().manual_seed(derive_seed("dc-net-order", self.seed, it, ol))
        for il in range(self.inner_loop):
            order = torch.randperm(n, generator=gen).to(self.device)
            for b, start in enumerate(range(0, n, self.batch_train)):
                idx = order[start:start + self.batch_train]
                x = x_all[idx]
                if self.dsa is not None:
                    x = self.dsa(x, derive_seed("dc-dsa-net", self.seed, it, ol, il, b), per_sample=True)
                loss = F.cross_entropy(net(x), y_all[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()


# ---------------------------------------------------------------------- the stage
def stage_dir(cfg) -> Path:
    from guardx.paths import layout

    return layout(cfg).stage("dc")


def load_real_by_class(data_cfg) -> tuple[list[torch.Tensor], list[str]]:
    """The training split at ``data.resolution`` without augmentation, as one float tensor per class.
    Image folders: shorter side resized to the resolution, then centre-cropped — no eval margin
    (``data.val_crop_ratio`` is not applied), so 32 px CIFAR images pass unchanged as in DC."""
    import dataclasses

    from guardx.data import build_dataset
    from guardx.data.folder import collate_skip

    ds = build_dataset(dataclasses.replace(data_cfg, val_crop_ratio=1.0), "train", augment=False)
    workers = 0 if data_cfg.dataset == "digits" else data_cfg.workers
    loader = torch.utils.data.DataLoader(ds, batch_size=256, num_workers=workers, collate_fn=collate_skip)
    xs, ys, skipped = [], [], 0
    for x, y, bad in loader:
        xs.append(x)
        ys.append(y)
        skipped += len(bad)
    if skipped:
        warnings.warn(f"dc: skipped {skipped} unreadable training images", stacklevel=2)
    x, y = torch.cat(xs), torch.cat(ys)
    per_class = [x[y == c] for c in range(len(ds.classes))]
    empty = [ds.classes[c] for c, t in enumerate(per_class) if len(t) == 0]
    if empty:
        raise GuardxError(f"dc: classes without training images: {empty[:5]}")
    return per_class, list(ds.classes)


def write_distilled_set(out: Path, images: torch.Tensor, labels: torch.Tensor, classes: list[str],
                        manifest: dict) -> Path:
    """``out/images/<class>/<class>_<k:04d>.png``, the exact float pixels (``synthetic.pt``: DC's images leave
    [0, 1], which 8-bit PNGs cannot hold) then ``out/manifest.json``, so the set is complete or absent: the
    PNGs go to a temporary folder renamed into place, and the manifest is written last."""
    from guardx.data.distilled import image_path, save_png
    from guardx.utils.io import save_torch, write_json

    final, tmp = out / "images", out / ".images.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    counts: dict[int, int] = {}
    rel_paths = []
    for img, y in zip(images, labels.tolist()):
        k = counts.get(y, 0)
        counts[y] = k + 1
        save_png(img.clamp(0, 1), image_path(tmp, classes[y], k))
        rel_paths.append(image_path(final, classes[y], k).relative_to(out).as_posix())
    save_torch({"images": images.float().cpu(), "labels": labels.cpu(), "paths": rel_paths}, out / "synthetic.pt")
    shutil.rmtree(final, ignore_errors=True)  # a folder left by a run killed between rename and manifest
    tmp.rename(final)
    write_json({**manifest, "exact_tensors": "synthetic.pt"}, out / "manifest.json")
    return final


def student_recipe(dsa: bool, dsa_strategy: str) -> dict:
    """How DC trains a student on its sets (utils.py ``evaluate_synset``): a fresh ConvNet, hard labels,
    SGD lr 0.01 / momentum 0.9 / weight decay 5e-4, batch 256, lr x0.1 at half the epochs; 300 epochs
    without augmentation, 1000 with DSA (DC uses 1000 whenever DSA is on)."""
    return {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 256,
            "epochs": 1000 if dsa else 300, "lr_decay": {"at_epoch": "half", "factor": 0.1},
            "augment": "dsa" if dsa else "none", "dsa_strategy": dsa_strategy, "loss": "ce"}


def run(cfg) -> Path:
    """``guardx dc``: distil ``cfg.data``'s training split with DC (``objective.name=plain``) or GUARD(DC)
    (``objective.name=guard``); resumes from ``<out>/dc/ckpt``; returns the images folder."""
    from guardx.distributed import init_distributed
    from guardx.stage_guard import stage_guard

    out = stage_dir(cfg)
    ctx = init_distributed(cfg)
    with stage_guard(cfg, "dc", ctx=ctx) as guard:  # this run owns dc/ and resumes only its own iterations
        if not guard.finished(out / "manifest.json"):
            _distil(cfg, ctx, guard)
    return out / "images"


def _distil(cfg, ctx, guard) -> None:
    from guardx.models import create_model
    from guardx.objectives import build_objective
    from guardx.utils.checkpoint import Checkpointer

    dc, out = cfg.dc, stage_dir(cfg)
    real, classes = load_real_by_class(cfg.data)
    res = cfg.data.resolution

    def model_fn() -> nn.Module:
        return create_model(dc.model, num_classes=len(classes), width=dc.width, depth=dc.depth or None,
                            resolution=res, mean=cfg.data.mean, std=cfg.data.std)

    objective = build_objective(cfg.objective.name, **cfg.objective.params())
    gm = GradientMatching(real, model_fn, objective, ipc=dc.ipc, outer_loop=dc.outer_loops,
                          inner_loop=dc.inner_loops, lr_img=dc.lr_img, momentum_img=dc.momentum_img,
                          lr_net=dc.lr_net, batch_real=dc.batch_real, batch_train=dc.batch_train, init=dc.init,
                          dsa=DSA(dc.dsa_strategy) if dc.dsa else None, seed=cfg.run.seed, batched=dc.batched,
                          device=ctx.device, ctx=ctx)
    ckpt = Checkpointer(out / "ckpt", keep=2, ctx=ctx, guard=guard)
    state = ckpt.load()
    if state is not None:
        gm.load_state_dict(state)

    def checkpoint(g: GradientMatching) -> None:
        if g.iteration % max(dc.ckpt_every, 1) == 0 or g.iteration == dc.iterations:
            ckpt.save(g.state_dict(), g.iteration)

    with ctx.on_peer_loss(lambda: f"dc iteration {gm.iteration}"):
        gm.run(dc.iterations, on_iteration=checkpoint, show_progress=cfg.run.progress and ctx.is_main)
    if ctx.is_main:
        manifest = {"distiller": "dc", "labels": "hard", "objective": repr(objective), "classes": classes,
                    "num_classes": len(classes), "resolution": res, "ipc": dc.ipc,
                    "mean": list(cfg.data.mean), "std": list(cfg.data.std), "images": len(gm.labels),
                    "model": {"name": dc.model, "width": dc.width, "depth": dc.depth or None},
                    "student": student_recipe(dc.dsa, dc.dsa_strategy),
                    "iterations": gm.iteration, "settings": gm.settings(), "world_size": ctx.world_size,
                    "final_match": gm.history[-1]["match"] if gm.history else None, "fingerprint": guard.stamp()}
        write_distilled_set(out, gm.exact_pixels(), gm.labels.cpu(), classes, manifest)
    ctx.barrier()


__all__ = ["DC_LOOPS", "default_loops", "match_distance", "GradientMatching", "load_real_by_class",
           "write_distilled_set", "run", "stage_dir"]
