from pathlib import Path

import pytest
import yaml

from guardx.config import Config, dump_config, from_dict, load_config, reference_markdown
from guardx.errors import ConfigError


REPO = Path(__file__).resolve().parents[1]
# GUARD paper, section 5.1: squeeze 50 epochs at lr 0.025, h = 3 and lambda = 100, recover 2000 iterations,
# 300 epochs of soft labels, a ResNet-18 student trained 300 epochs
PAPER = {"squeeze.epochs": 50, "squeeze.lr": 0.025, "recover.iterations": 2000, "relabel.epochs": 300,
         "train.epochs": 300, "model.width": 64}


@pytest.mark.parametrize("path", ["configs/imagenette.yaml", "configs/tinyimagenet.yaml", "configs/imagenet1k.yaml"])
def test_paper_configs_resolve_to_the_papers_settings(path):
    """What each method of a shipped paper config runs (defaults, then the file, then the method's own
    objective and its distiller's adjustments) is section 5.1's recipe, with DESIGN's GUARD defaults."""
    from guardx.objectives import build_objective
    from guardx.pipeline import method_config

    cfg = load_config(REPO / path)
    methods = {m.name: method_config(cfg, m) for m in cfg.pipeline.methods}
    assert "guard" in methods and "sre2l" in methods
    for name, mcfg in methods.items():
        for key, value in PAPER.items():
            section, field = key.split(".")
            assert getattr(getattr(mcfg, section), field) == value, (name, key)
        # ResNet-18: the ImageNet stem, or at 64 px (Tiny-ImageNet) the small-image stem as SRe2L's code uses
        assert mcfg.model.name == ("resnet18_small" if mcfg.data.resolution <= 64 else "resnet18"), name
    guard = build_objective("guard", **methods["guard"].objective.params())
    assert guard.h == 3.0 and (guard.beta == 1e-4 if guard.mode == "lossdiff" else guard.lam == 100.0)
    assert build_objective(methods["sre2l"].objective.name).__class__.__name__ == "Plain"


def test_registry_keys_default_to_the_factories_and_reach_them():
    """The objective/evaluate keys generated from the registries: a default config builds exactly what the
    factory builds with no arguments, and a set key reaches the object."""
    import inspect

    from guardx.objectives import OBJECTIVES, build_objective

    for entry in OBJECTIVES:
        cfg = load_config(None, [f"objective.name={entry.name}"])
        assert vars(build_objective(entry.name, **cfg.objective.params())) == vars(build_objective(entry.name))
        signature = inspect.signature(entry.factory).parameters
        assert cfg.objective.params() == {p: signature[p].default for p in entry.params}
    assert build_objective("guard", **load_config(None, ["objective.name=guard", "objective.h=0.5"])
                           .objective.params()).h == 0.5


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("squeeze:\n  epochs: 3\nobjective:\n  name: guard\n")
    cfg = load_config(f, ["squeeze.epochs=5", "objective.eps=4/255", "evaluate.eps=[1/255, 8/255]"])
    assert cfg.squeeze.epochs == 5 and cfg.objective.name == "guard"
    assert cfg.objective.eps == pytest.approx(4 / 255)
    assert cfg.evaluate.eps == pytest.approx([1 / 255, 8 / 255])


@pytest.mark.parametrize("override, message", [
    ("squeeze.epoch=3", "unknown config key 'squeeze.epoch' (did you mean 'squeeze.epochs'?)"),
    ("squeez.epochs=3", "unknown config key 'squeez' (did you mean 'squeeze'?)"),
    ("squeeze.epochs=three", "squeeze.epochs must be int"),
    ("objective.name=gaurd", "objective.name: unknown objective 'gaurd' (did you mean 'guard'?)"),
    ("squeeze.batch_size=0", "squeeze.batch_size=0 is outside [1, inf)"),
    ("model.name=resnet81", "did you mean 'resnet18'"),
    ("run.progress=maybe", "run.progress must be true or false"),
])
def test_bad_config_is_one_line_error(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_method_objective_key():
    with pytest.raises(ConfigError, match="pipeline.methods.g.objective.lamda"):
        load_config(None, ["pipeline.methods=[{name: g, objective: {name: guard, lamda: 3}}]"])


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("squeeze: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def test_shipped_configs_load_and_round_trip():
    """Each shipped file loads, and the resolved config a stage writes (config.yaml) reads back equal."""
    paths = sorted(REPO.joinpath("configs").glob("*.yaml"))
    assert paths
    for path in paths:
        cfg = load_config(path)
        assert from_dict(yaml.safe_load(dump_config(cfg))) == cfg, path.name
        assert cfg != Config(), path.name  # the file changed something
        from guardx.pipeline import method_config

        for m in cfg.pipeline.methods:  # every method's overrides and distiller resolve
            method_config(cfg, m)


def test_reference_lists_every_key():
    import dataclasses

    ref = reference_markdown()
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(getattr(Config(), section.name)):
            assert f"`{f.name}`" in ref


def test_readme_config_reference_is_current():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "update_readme.py"
    proc = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- values (issue 10)

@pytest.mark.parametrize("override, message", [
    # ranges of numbers (one mechanism: F(..., range=...) and registry ranges), integer-ness, lists
    ("evaluate.eps=[2]", "evaluate.eps[0]=2 is outside [0, 1] in pixel units (did you mean 2/255?)"),
    ("evaluate.eps=[1/255, 8]", "evaluate.eps[1]=8 is outside [0, 1] in pixel units (did you mean 8/255?)"),
    ("evaluate.eps=[]", "evaluate.eps is empty"),
    ("objective.eps=4", "objective.eps=4 is outside [0, 1] in pixel units (did you mean 4/255?)"),
    ("evaluate.pgd_alpha=2", "evaluate.pgd_alpha=2 is outside [0, 1] in pixel units (did you mean 2/255?)"),
    ("squeeze.max_steps=-5", "squeeze.max_steps=-5 is outside [0, inf)"),
    ("squeeze.lr=-0.1", "squeeze.lr=-0.1 is outside (0, inf)"),
    ("squeeze.lr=0", "squeeze.lr=0 is outside (0, inf)"),
    ("squeeze.lr=.nan", "squeeze.lr=nan is outside (0, inf)"),
    ("squeeze.momentum=5", "squeeze.momentum=5 is outside [0, 1]"),
    ("train.lr=-1", "train.lr=-1 is outside (0, inf)"),
    ("recover.betas=[0.5, 1.0]", "recover.betas[1]=1 is outside [0, 1)"),
    ("recover.betas=[0.5]", "recover.betas must have 2 values"),
    ("relabel.batch_size=0", "relabel.batch_size=0 is outside [1, inf)"),
    ("squeeze.epochs=2.5", "squeeze.epochs must be int, got 2.5"),
    ("recover.classes=[a]", "recover.classes[0] must be int, got 'a'"),
    ("recover.classes=[-1]", "recover.classes[0]=-1 is outside [0, inf)"),
    ("recover.classes=[1, 1]", "recover.classes has duplicates"),
    ("data.mean=[0.5, 0.5]", "data.mean must have 3 values"),
    ("data.std=[0.5, 0, 0.5]", "data.std[1]=0 is outside (0, inf)"),
    ("data.rrc_scale=[0.9, 0.1]", "data.rrc_scale must be [min, max] with min <= max"),
    ("data.val_crop_ratio=1.5", "data.val_crop_ratio=1.5 is outside (0, 1]"),
    ("distributed.grad_accum=0", "distributed.grad_accum=0 is outside [1, inf)"),
    ("evaluate.square_p_init=2", "evaluate.square_p_init=2 is outside [0, 1]"),
    # choices and names, each with a did-you-mean
    ("squeeze.schedule=cosin",
     "squeeze.schedule='cosin' is not one of ['cosine', 'constant'] (did you mean 'cosine'?)"),
    ("run.on_config_change=restrat", "(did you mean 'restart'?)"),
    ("distributed.zero_stage=4", "distributed.zero_stage=4 is not one of [0, 1, 2, 3]"),
    ("objective.name=Guard", "objective.name: unknown objective 'Guard' (did you mean 'guard'?)"),
    ("model.name=resnet81", "model.name: unknown model 'resnet81' (did you mean 'resnet18'?)"),
    ("train.model=convnett", "train.model: unknown model 'convnett' (did you mean 'convnet'?)"),
    ("evaluate.attacks=[pgdd]", "unknown attack 'pgdd' (did you mean 'pgd'?)"),
    ("evaluate.attacks=[autoatack]", "unknown attack 'autoatack' (did you mean 'autoattack'?)"),
    ("run.distiller=sre2", "run.distiller: unknown distiller 'sre2' (did you mean 'sre2l'?)"),
    ("pipeline.methods=[{name: g, objective: {name: gaurd}}]", "unknown objective 'gaurd' (did you mean 'guard'?)"),
    ("pipeline.stages=[squeze]", "pipeline.stages='squeze' is not one of"),
])
def test_values_outside_their_range_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_every_numeric_key_declares_its_allowed_values():
    """A new int/float key (or list of numbers) without a range or choices fails here, not at a user."""
    import dataclasses
    import typing

    from guardx.config import Config

    missing = []
    for section in dataclasses.fields(Config):
        values = getattr(Config(), section.name)
        for f in dataclasses.fields(values):
            want = typing.get_type_hints(type(values))[f.name]
            numeric = want in (int, float) or typing.get_args(want) in ((int,), (float,))
            if numeric and f.metadata.get("range") is None and not f.metadata.get("choices"):
                missing.append(f"{section.name}.{f.name}")
    assert not missing, f"declare range= or choices= for {missing}"


def test_the_reference_shows_ranges():
    ref = reference_markdown()
    assert "| `lr` | `0.025` | `(0, inf)` | SGD learning rate |" in ref
    assert "| `eps` | `[0.00392156862745098]` | `each in [0, 1] in pixel units` |" in ref
    assert "`3 values, each in [0, 1]`" in ref
