"""Hessian spectra against torch.autograd.functional.hessian, and the analyze commands' outputs."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from guardx.analysis.hessian import hessian_eigenvalues
from guardx.cli import main
from guardx.models import Normalized, create_model
from guardx.models._io import save_model

MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


def tanh_mlp():
    """Smooth, so its input Hessian is indefinite and full rank (a harder case than ReLU's PSD, rank ≤ C−1)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.Tanh(), nn.Linear(16, 5))
    return Normalized(net, MEAN, STD).double().eval()


def resnet():
    torch.manual_seed(1)
    return create_model("resnet18_small", num_classes=10, width=4, mean=MEAN, std=STD).double().eval()


def exact_spectrum(model, x, y, space):
    """Eigenvalues (descending) of each sample's full Hessian, one sample at a time."""
    out = []
    for xi, yi in zip(x, y):
        if space == "normalized":
            z, f = model.normalize(xi[None]), model.net
        else:
            z, f = xi[None], model
        h = torch.autograd.functional.hessian(lambda z: F.cross_entropy(f(z), yi[None]), z, vectorize=True)
        out.append(torch.linalg.eigvalsh(h.reshape(z.numel(), z.numel())).flip(0))
    return torch.stack(out)


@pytest.mark.parametrize("space", ["normalized", "pixel"])
def test_lanczos_matches_the_full_hessian(space):
    model = tanh_mlp()
    x = torch.rand(3, 3, 4, 4, dtype=torch.double, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 3, 4])
    exact = exact_spectrum(model, x, y, space)
    assert (exact[:, -1] < 0).any()  # indefinite: "largest" is not "largest in magnitude"
    torch.testing.assert_close(hessian_eigenvalues(model, x, y, k=6, iters=48, space=space), exact[:, :6],
                               atol=1e-10, rtol=1e-8)  # a full Krylov space is exact
    torch.testing.assert_close(hessian_eigenvalues(model, x, y, k=2, iters=20, space=space), exact[:, :2],
                               atol=1e-8, rtol=1e-6)  # the extremes converge in a few steps


def test_lanczos_on_a_batchnorm_resnet_with_a_rank_deficient_hessian():
    model = resnet()
    x = torch.rand(1, 3, 4, 4, dtype=torch.double, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([7])
    exact = exact_spectrum(model, x, y, "normalized")
    assert exact[:, 9:].abs().max() < 1e-12  # ReLU net, 10 classes: rank <= 9
    torch.testing.assert_close(hessian_eigenvalues(model, x, y, k=4, iters=25), exact[:, :4], atol=1e-10, rtol=1e-8)


def test_power_iteration_finds_the_largest_magnitude():
    model = tanh_mlp()
    x = torch.rand(3, 3, 4, 4, dtype=torch.double, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([1, 2, 3])
    exact = exact_spectrum(model, x, y, "normalized")
    by_magnitude = exact.gather(1, exact.abs().argmax(1, keepdim=True)).squeeze(1)
    torch.testing.assert_close(hessian_eigenvalues(model, x, y, k=1, iters=300, method="power")[:, 0], by_magnitude,
                               atol=1e-6, rtol=1e-4)


def _save(path, seed):
    torch.manual_seed(seed)
    model = create_model("convnet", num_classes=10, width=4, resolution=16, mean=[0.5] * 3, std=[0.5] * 3)
    save_model(path, model, {"name": "convnet", "width": 4, "num_classes": 10, "classes": [str(i) for i in range(10)],
                             "resolution": 16, "mean": [0.5] * 3, "std": [0.5] * 3})


def test_analyze_curvature_writes_json_and_png(tmp_path, capsys):
    _save(tmp_path / "a.pt", 0)
    _save(tmp_path / "b.pt", 1)
    rc = main(["analyze", "curvature", "--checkpoint", f"SRe2L={tmp_path / 'a.pt'},GUARD={tmp_path / 'b.pt'}",
               "--samples", "6", "--topk", "3", "--iters", "8", "--batch-size", "4", "--out", str(tmp_path / "an"),
               "data.dataset=digits", "data.resolution=16", "run.progress=false", "run.device=cpu"])
    assert rc == 0
    report = json.loads((tmp_path / "an" / "curvature.json").read_text())
    assert [m["label"] for m in report["models"]] == ["SRe2L", "GUARD"] and report["space"] == "normalized"
    for m in report["models"]:
        eig = np.array(m["eigenvalues"])
        assert eig.shape == (6, 3) and (np.diff(eig, axis=1) <= 1e-9).all()
    with Image.open(tmp_path / "an" / "curvature.png") as im:
        assert im.width > im.height > 100
    assert "SRe2L: λ1 median" in capsys.readouterr().out


def test_analyze_grid_shows_classes_side_by_side(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for root in (tmp_path / "runA" / "recover" / "images", tmp_path / "runB"):
        for c in ("cat", "dog", "eel"):
            (root / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / c / f"{c}_{i:04d}.png")
    out = tmp_path / "grid.png"
    assert main(["analyze", "grid", "--images", f"GUARD={tmp_path / 'runA'}", "--images", f"SRe2L={tmp_path / 'runB'}",
                 "--classes", "dog,eel", "--per-class", "2", "--out", str(out)]) == 0
    assert "4 rows x 2 classes" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.height > im.width  # 4 rows, 2 columns
    assert main(["analyze", "grid", "--images", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "no distilled images" in capsys.readouterr().err
