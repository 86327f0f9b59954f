"""Every registered model (timm's tests/test_models.py: parametrized over the registry, so a new entry is
tested by registering it): forward, backward, output shape, its declared capabilities, save/load, and the
torchvision state_dict it declares it takes."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from guardx.errors import ConfigError
from guardx.models import MODELS, create_model
from guardx.models._io import load_model, save_model

NAMES = MODELS.names()
TORCHVISION = [e.name for e in MODELS if e.torchvision]
CLASSES, RES, MEAN, STD = 7, 16, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


def tiny(name, seed=0):
    torch.manual_seed(seed)
    return create_model(name, num_classes=CLASSES, width=4, resolution=RES, mean=MEAN, std=STD)


def images(n=3, res=RES, seed=1):
    return torch.rand(n, 3, res, res, generator=torch.Generator().manual_seed(seed))


def batchnorms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_registry_is_not_empty_and_every_entry_declares_its_capabilities():
    assert {"resnet18", "resnet18_small", "convnet"} <= set(NAMES)
    for entry in MODELS:
        assert entry.torchvision is None or isinstance(entry.torchvision, str), entry.name
        assert isinstance(entry.batchnorm, bool), entry.name


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_shape_and_normaliser(name, mode):
    model = tiny(name).train(mode == "train")
    x = images()
    out = model(x)
    assert out.shape == (3, CLASSES) and out.dtype == torch.float32 and torch.isfinite(out).all()
    # the wrapper normalises with the given mean/std before the inner network (attacks see [0, 1] images)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    model.eval()
    torch.testing.assert_close(model(x), model.net((x - mean) / std), rtol=0, atol=0)
    assert model(x[:1]).shape == (1, CLASSES)  # batch of one (BatchNorm in eval mode)


@pytest.mark.parametrize("name", NAMES)
def test_backward_reaches_every_parameter_and_the_input(name):
    model = tiny(name).train()
    x = images(4).requires_grad_(True)
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 6])).backward()
    for key, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), key
        assert p.grad.abs().sum() > 0, f"{key} gets no gradient"
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0  # what attacks and GUARD differentiate


@pytest.mark.parametrize("name", NAMES)
def test_batchnorm_capability_says_whether_train_mode_differs(name):
    """``batchnorm=True``: the model has BatchNorm, a train-mode forward updates its running statistics and
    eval mode does not; ``batchnorm=False``: train and eval mode compute the same function, no buffers move
    (what the objectives' shared clean pass and the 2-rank == 1-process tests rely on)."""
    model, x = tiny(name), images(4)
    assert bool(batchnorms(model)) == MODELS.get(name).batchnorm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.eval()
        eval_out = model(x)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        model.train()
        train_out = model(x)
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    if MODELS.get(name).batchnorm:
        assert {k.rsplit(".", 1)[0] for k in moved if k.endswith("running_mean")} == \
            {k for k, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        assert not torch.allclose(train_out, eval_out)
    else:
        assert moved == []
        torch.testing.assert_close(train_out, eval_out, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_saved_model_rebuilds_from_its_metadata(name, tmp_path):
    model = tiny(name).eval()
    with torch.no_grad():  # move the running statistics away from their initial values
        model.train()(images(8, seed=5))
    model.eval()
    meta = {"name": name, "width": 4, "num_classes": CLASSES, "classes": [str(i) for i in range(CLASSES)],
            "resolution": RES, "mean": MEAN, "std": STD}
    save_model(tmp_path / "m.pt", model, meta)
    loaded, loaded_meta = load_model(tmp_path / "m.pt")
    assert loaded_meta == meta and not loaded.training
    x = images()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    state = torch.random.get_rng_state()
    load_model(tmp_path / "m.pt")
    assert torch.equal(torch.random.get_rng_state(), state)  # loading a file draws nothing from the caller's RNG


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_state_dict_loads_and_computes_the_same(name):
    """The README's claim: a torchvision checkpoint of the declared architecture loads unchanged (strict) into
    the inner network, and gives the same outputs. Random weights, no download."""
    torchvision = pytest.importorskip("torchvision")
    arch = MODELS.get(name).torchvision
    torch.manual_seed(0)
    reference = getattr(torchvision.models, arch)(weights=None, num_classes=10).eval()
    with torch.no_grad():  # non-trivial running statistics, so a BatchNorm mix-up shows
        for m in batchnorms(reference):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    model = create_model(name, num_classes=10, width=64).eval()  # identity normaliser
    model.net.load_state_dict(reference.state_dict(), strict=True)
    x = images(2, res=32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


def test_create_model_keeps_factory_defaults_for_none_and_refuses_unknown():
    model = create_model("convnet", num_classes=3, width=None, depth=None, resolution=None)
    assert model.net.features[0].out_channels == 128 and len(model.net.features) == 3 * 4  # width 128, depth 3
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 3)
    assert not model.has_norm  # mean/std None: identity normaliser
    with pytest.raises(ConfigError, match="did you mean 'convnet'"):
        create_model("convnt", num_classes=3)
    with pytest.raises(ConfigError, match="takes no parameter 'dropout'"):
        create_model("convnet", num_classes=3, dropout=0.1)
