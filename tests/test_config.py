import pytest

from guardx.config import Config, load_config, reference_markdown
from guardx.errors import ConfigError


def test_defaults_are_the_papers():
    cfg = Config()
    assert (cfg.squeeze.epochs, cfg.squeeze.lr, cfg.squeeze.momentum, cfg.squeeze.weight_decay) == (50, 0.025, 0.9, 1e-4)
    assert (cfg.squeeze.batch_size, cfg.squeeze.schedule) == (32, "cosine")
    assert (cfg.objective.h, cfg.objective.lam, cfg.objective.beta) == (3.0, 100.0, 1e-4)
    r = cfg.recover
    assert (r.iterations, r.batch_size, r.lr, r.betas, r.r_bn, r.first_bn_multiplier, r.jitter) == \
        (2000, 100, 0.25, [0.5, 0.9], 0.01, 10.0, 32)
    assert (cfg.relabel.epochs, cfg.train.epochs, cfg.train.lr, cfg.train.weight_decay) == (300, 300, 1e-3, 0.01)


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


def test_shipped_configs_load():
    from pathlib import Path

    for path in sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml")):
        load_config(path)


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
