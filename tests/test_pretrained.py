"""model.init: pretrained teachers from torchvision, timm and guardx files (no downloads), and squeeze.epochs=0."""
import pytest
import torch
import torchvision

from guardx.errors import ConfigError
from guardx.models import create_model
from guardx.models._io import load_model, save_model
from guardx.models.pretrained import load_init

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def tv_file(tmp_path_factory):
    """A torchvision ResNet-18 state_dict made locally (random weights, real names and shapes)."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path_factory.mktemp("init") / "resnet18-local.pth"
    torch.save(net.state_dict(), path)
    return path, net


def _resnet18(num_classes=1000, width=64, name="resnet18"):
    return create_model(name, num_classes=num_classes, width=width, mean=MEAN, std=STD).eval()


def test_torchvision_state_dict_gives_torchvisions_function(tv_file):
    path, net = tv_file
    model = _resnet18()
    report = load_init(model, str(path), model_name="resnet18", width=64)
    assert report["format"] == "state_dict" and report["tensors"] == len(net.state_dict())
    x = torch.rand(2, 3, 64, 64)
    normalized = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), net(normalized), atol=1e-5)


@pytest.mark.parametrize("wrap", ["state_dict+module", "model", "compiled"])
def test_timm_style_checkpoints(tv_file, tmp_path, wrap):
    path, net = tv_file
    state = net.state_dict()
    blob = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 90, "arch": "resnet18"} \
        if wrap == "state_dict+module" else {"model": state, "optimizer": None} if wrap == "model" \
        else {f"_orig_mod.{k}": v.half() for k, v in state.items()}
    f = tmp_path / "timm.pth.tar"
    torch.save(blob, f)
    model = _resnet18()
    load_init(model, str(f))
    assert torch.allclose(model.net.conv1.weight, state["conv1.weight"].to(model.net.conv1.weight.dtype), atol=1e-3)
    assert torch.equal(model.net.fc.bias.half(), state["fc.bias"].half())


def test_guardx_teacher_file_and_class_check(tmp_path):
    teacher = _resnet18(num_classes=3, width=8, name="resnet18_small")
    meta = {"name": "resnet18_small", "width": 8, "num_classes": 3, "classes": ["a", "b", "c"], "resolution": 32,
            "mean": MEAN, "std": STD}
    f = tmp_path / "teacher.pt"
    save_model(f, teacher, meta)
    model = _resnet18(num_classes=3, width=8, name="resnet18_small")
    assert load_init(model, str(f), classes=["a", "b", "c"])["format"] == "guardx"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), teacher.state_dict().values()))
    with pytest.raises(ConfigError, match="other classes.*class 2 is c there, d here.*init_head=reset"):
        load_init(_resnet18(3, 8, "resnet18_small"), str(f), classes=["a", "b", "d"])
    load_init(_resnet18(3, 8, "resnet18_small"), str(f), classes=["a", "b", "d"], head="reset")


def test_classifier_mismatch_is_one_line_unless_reset(tv_file):
    path, net = tv_file
    with pytest.raises(ConfigError) as err:
        load_init(_resnet18(num_classes=10), str(path))
    assert "1000-class classifier (fc.weight) but the data has 10 classes" in str(err.value)
    assert "model.init_head=reset" in str(err.value) and "\n" not in str(err.value)
    model = _resnet18(num_classes=10)
    fresh_fc = model.net.fc.weight.clone()
    report = load_init(model, str(path), head="reset")
    assert report["reset"] == ["fc.bias", "fc.weight"] and torch.equal(model.net.fc.weight, fresh_fc)
    assert torch.equal(model.net.layer4[1].conv2.weight, net.layer4[1].conv2.weight)


@pytest.mark.parametrize("name, width, message", [
    ("resnet18", 32, "conv1.weight is (64, 3, 7, 7) in the file but (32, 3, 7, 7) in model.name=resnet18 (width 32) "
                     "(the file's width is 64: set model.width=64)"),
    ("resnet18_small", 64, "the file has the 7x7 stem of resnet18: set model.name=resnet18"),
    ("convnet", 64, "does not fit model.name=convnet"),
])
def test_architecture_mismatch_names_the_setting(tv_file, name, width, message):
    path, _ = tv_file
    with pytest.raises(ConfigError) as err:
        load_init(_resnet18(1000, width, name), str(path), model_name=name, width=width)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_files_say_what_to_fetch(tmp_path, monkeypatch, tv_file):
    with pytest.raises(ConfigError, match="model.init file not found: .*never downloads"):
        load_init(_resnet18(), str(tmp_path / "nope.pth"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ConfigError) as err:
        load_init(_resnet18(), "torchvision:resnet18")
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert f"needs {expected}, which is missing" in str(err.value)
    assert "fetch https://download.pytorch.org/models/resnet18-f37072fd.pth" in str(err.value)
    expected.parent.mkdir(parents=True)
    expected.write_bytes(tv_file[0].read_bytes())  # where torchvision itself would have cached it
    assert load_init(_resnet18(), "torchvision:resnet18")["path"] == str(expected)
    with pytest.raises(ConfigError, match="torchvision has no model 'resnet99'"):
        load_init(_resnet18(), "torchvision:resnet99")


def test_unreadable_and_foreign_files(tmp_path):
    code = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), code)  # a pickled module: refused by weights_only loading
    with pytest.raises(ConfigError, match="cannot read model.init") as err:
        load_init(_resnet18(), str(code))
    assert "\n" not in str(err.value)
    other = tmp_path / "other.pth"
    torch.save({"epoch": 3, "acc": 0.5}, other)
    with pytest.raises(ConfigError, match="holds no state_dict"):
        load_init(_resnet18(), str(other))


def _init_file(tmp_path, num_classes=10, width=4):
    torch.manual_seed(1)
    net = create_model("resnet18_small", num_classes=num_classes, width=width).net
    f = tmp_path / "init.pth"
    torch.save(net.state_dict(), f)
    return f, net.state_dict()


def test_squeeze_epochs_0_takes_the_init_as_teacher(tiny_cfg, tmp_path):
    from guardx import squeeze

    f, state = _init_file(tmp_path)
    teacher, meta = load_model(squeeze.run(tiny_cfg(f"model.init={f}", "squeeze.epochs=0")))
    assert all(torch.equal(teacher.net.state_dict()[k], v) for k, v in state.items())
    assert meta["init"]["path"] == str(f) and meta["init"]["epochs"] == 0


def test_squeeze_epochs_0_with_bn_recalibration(tiny_cfg, tmp_path):
    from guardx import squeeze

    f, state = _init_file(tmp_path)
    cfg = tiny_cfg(f"model.init={f}", "squeeze.epochs=0", "squeeze.bn_recalibrate_batches=2")
    teacher, _ = load_model(squeeze.run(cfg))
    got = teacher.net.state_dict()
    assert torch.equal(got["conv1.weight"], state["conv1.weight"])  # weights untouched
    assert not torch.equal(got["bn1.running_mean"], state["bn1.running_mean"])  # statistics re-estimated


def test_guard_fine_tunes_from_the_init(tiny_cfg, tmp_path):
    from guardx import squeeze

    f, state = _init_file(tmp_path)
    cfg = tiny_cfg(f"model.init={f}", "squeeze.max_steps=1", "objective.name=guard", "objective.mode=lossdiff")
    teacher, meta = load_model(squeeze.run(cfg))
    assert meta["objective"]["name"] == "guard" and meta["init"]["epochs"] == 1
    delta = (teacher.net.state_dict()["conv1.weight"] - state["conv1.weight"]).abs().max()
    assert 0 < delta < 0.5  # one small SGD step away from the init


def test_epochs_0_needs_an_init_and_a_plain_objective(tiny_cfg, tmp_path):
    from guardx import squeeze

    with pytest.raises(ConfigError, match="squeeze.epochs=0 trains nothing: it needs model.init"):
        tiny_cfg("squeeze.epochs=0")
    f, _ = _init_file(tmp_path)
    with pytest.raises(ConfigError, match="objective.name=guard would never act"):
        squeeze.run(tiny_cfg(f"model.init={f}", "squeeze.epochs=0", "objective.name=guard"))
    with pytest.raises(ConfigError, match="model.init_head='swap' is not one of"):
        tiny_cfg("model.init_head=swap")
