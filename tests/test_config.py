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
    ("squeeze.batch_size=0", "squeeze.batch_size must be > 0"),
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
