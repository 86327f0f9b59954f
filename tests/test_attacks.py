"""Attacks: closed-form worst cases, threat-model bounds, equality with torchattacks, reproducibility."""
import dataclasses
import inspect

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from guardx.attacks import ATTACKS, attack_info, list_attacks, parse_attack, run_attack
from guardx.attacks.cw import cw_l2
from guardx.config import EvaluateConfig, load_config
from guardx.errors import ConfigError
from guardx.models import create_model

torchattacks = pytest.importorskip("torchattacks")

EPS = 8 / 255
# small budgets: the properties tested do not depend on the budget
BUDGET = {"pgd": dict(steps=5), "mim": dict(steps=5), "fgsm": {}, "cw": dict(steps=10, c=1.0),
          "square": dict(queries=20), "autoattack": dict(steps=3, targets=2, square_queries=20)}


def conv_model(seed=0, classes=10):
    torch.manual_seed(seed)
    return create_model("convnet", num_classes=classes, width=8, depth=2, resolution=16,
                        mean=[0.5] * 3, std=[0.25] * 3).eval()


def bn_model(seed=0):
    torch.manual_seed(seed)
    return create_model("resnet18_small", num_classes=10, width=4, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3]).eval()


def images(n=6, res=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, res, res, generator=g)


def linear_binary(seed=0, dim=48):
    torch.manual_seed(seed)
    lin = nn.Linear(dim, 2)
    return nn.Sequential(nn.Flatten(), lin).eval(), lin


# --------------------------------------------------------------------------- closed form on a linear model

@pytest.mark.parametrize("name,params", [("fgsm", {}), ("pgd", dict(steps=10, random_start=False)),
                                         ("pgd", dict(steps=10, random_start=True)), ("mim", dict(steps=10))])
def test_linear_model_worst_case(name, params):
    """For logits Wx + b with two classes, the worst L∞ point is x + ε·sign(w_other − w_y), which lowers the
    margin by exactly ε‖w_y − w_other‖₁; sign-gradient attacks must land on it (x stays away from 0 and 1)."""
    model, lin = linear_binary()
    g = torch.Generator().manual_seed(3)
    x = 0.25 + 0.5 * torch.rand(8, 3, 4, 4, generator=g)
    y = torch.tensor([0, 1] * 4)
    adv = run_attack(name, model, x, y, EPS, seed=5, **params)
    dw = (lin.weight[1] - lin.weight[0]).detach()  # w_1 − w_0
    direction = torch.where(y[:, None] == 0, dw.sign(), -dw.sign()).view_as(x)
    torch.testing.assert_close(adv, x + EPS * direction, atol=1e-6, rtol=0)

    def margin(z):
        return (model(z).gather(1, y[:, None]) - model(z).gather(1, 1 - y[:, None])).squeeze(1)

    with torch.no_grad():
        torch.testing.assert_close(margin(x) - margin(adv), EPS * dw.abs().sum().expand(8), atol=1e-5, rtol=1e-5)


def test_cw_reaches_the_minimal_l2_distance_on_a_linear_model():
    """Any misclassified point is at least margin/‖w_y − w_o‖₂ away; with a large c, CW gets close to that."""
    model, lin = linear_binary(seed=1)
    x = 0.4 + 0.2 * torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        lin.bias.copy_(torch.zeros(2))
        y = model(x).argmax(1)
        logits = model(x)
    margin = (logits.gather(1, y[:, None]) - logits.gather(1, 1 - y[:, None])).squeeze(1)
    d_min = margin / (lin.weight[1] - lin.weight[0]).norm()
    adv = cw_l2(model, x, y, c=10.0, steps=100, lr=0.02)
    fooled = model(adv).argmax(1) != y
    assert fooled.all()
    dist = (adv - x).flatten(1).norm(dim=1)
    assert (dist >= d_min.detach() - 1e-5).all()
    assert (dist <= 1.5 * d_min.detach()).all(), (dist, d_min)


def test_cw_handles_negative_logits_where_torchattacks_does_not():
    """torchattacks' CW margin is max(0, ·) of the logits: with all logits negative it sees no margin and
    never moves (Harry24k/adversarial-attacks-pytorch#184). Ours masks the true class instead."""
    model, lin = linear_binary(seed=2)
    x = 0.4 + 0.2 * torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        lin.bias.copy_(torch.tensor([-20.0, -20.0]))  # every logit negative
        y = model(x).argmax(1)
        assert (model(x) < 0).all()
    ours = cw_l2(model, x, y, c=100.0, steps=100, lr=0.05)
    theirs = torchattacks.CW(model, c=100.0, steps=100, lr=0.05)(x, y)
    assert (model(ours).argmax(1) != y).all()
    assert (model(theirs).argmax(1) == y).all()


def test_cw_result_of_a_sample_does_not_depend_on_its_batch():
    model = conv_model().double()
    x = images(5).double()
    y = model(x).argmax(1)
    together = cw_l2(model, x, y, c=1.0, steps=15, lr=0.02)
    alone = torch.cat([cw_l2(model, x[i:i + 1], y[i:i + 1], c=1.0, steps=15, lr=0.02) for i in range(len(x))])
    torch.testing.assert_close(together, alone, atol=1e-9, rtol=0)


# --------------------------------------------------------------------------- threat model

def margin(model, x, y):
    """Logit of the true class minus the largest other logit (negative: misclassified)."""
    with torch.no_grad():
        logits = model(x)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return logits.gather(1, y[:, None]).squeeze(1) - other


@pytest.mark.parametrize("name", list_attacks())
def test_every_attack_stays_in_the_threat_model_and_works(name):
    """In [0, 1] and (for bounded attacks) within ε in L∞; no sample's margin grows (an attack never helps the
    model), and the attack breaks at least one of the six samples at ε = 8/255 (it does something)."""
    model = conv_model()
    x = images(6)
    y = model(x).argmax(1)
    adv = run_attack(name, model, x, y, EPS, seed=0, **BUDGET[name])
    assert adv.shape == x.shape and adv.dtype == x.dtype and torch.isfinite(adv).all()
    assert adv.min() >= 0 and adv.max() <= 1
    if attack_info(name).bounded:  # CW-L2 is not (the paper exempts it from ε)
        assert (adv - x).abs().max() <= EPS + 1e-6
    before, after = margin(model, x, y), margin(model, adv, y)
    assert (after <= before + 1e-6).all(), (before, after)
    assert (after < 0).any(), after


@pytest.mark.parametrize("name", ["pgd", "square", "autoattack"])
def test_seeded_attacks_are_reproducible_and_leave_the_global_rng_alone(name):
    model = conv_model()
    x = images(6)
    y = model(x).argmax(1)
    state = torch.random.get_rng_state()
    a = run_attack(name, model, x, y, EPS, seed=11, **BUDGET[name])
    assert torch.equal(torch.random.get_rng_state(), state)
    b = run_attack(name, model, x, y, EPS, seed=11, **BUDGET[name])
    assert torch.equal(a, b)
    if name == "pgd":
        assert not torch.equal(a, run_attack(name, model, x, y, EPS, seed=12, **BUDGET[name]))


# --------------------------------------------------------------------------- equality with torchattacks

def test_pgd_equals_torchattacks_without_random_start():
    model = bn_model()
    x = images(4, res=8)
    y = torch.arange(4)
    ours = run_attack("pgd10", model, x, y, EPS, alpha=2 / 255, random_start=False)
    theirs = torchattacks.PGD(model, eps=EPS, alpha=2 / 255, steps=10, random_start=False)(x, y)
    assert torch.equal(ours, theirs)


def test_fgsm_and_mim_equal_torchattacks():
    model = bn_model(seed=1)
    x = images(4, res=8, seed=2)
    y = torch.arange(4)
    assert torch.equal(run_attack("fgsm", model, x, y, EPS), torchattacks.FGSM(model, eps=EPS)(x, y))
    ours = run_attack("mim", model, x, y, EPS, steps=10, decay=1.0, alpha=2 / 255)
    theirs = torchattacks.MIFGSM(model, eps=EPS, alpha=2 / 255, steps=10, decay=1.0)(x, y)
    assert torch.equal(ours, theirs)


def test_mim_follows_its_momentum_through_a_zero_gradient():
    """A saturated softmax gives an exactly zero gradient; MIM must keep stepping along its momentum
    (torchattacks 3.5.1 computes 0/0 there, a NaN momentum that freezes the sample for good)."""
    from guardx.attacks.pgd import _step

    model, lin = linear_binary(seed=3)
    with torch.no_grad():
        lin.bias.copy_(torch.tensor([500.0, 0.0]))  # p(class 0) == 1 in float32: zero gradient
    x = 0.4 + 0.2 * torch.rand(3, 3, 4, 4)
    y = torch.zeros(3, dtype=torch.long)
    momentum = torch.ones_like(x)
    adv, momentum = _step(model, x, x, y, EPS, EPS / 4, momentum, 1.0)
    assert torch.isfinite(momentum).all()
    torch.testing.assert_close(adv, x + EPS / 4)


@pytest.mark.parametrize("name", ["pgd", "mim"])
def test_early_stop_keeps_the_first_adversarial_iterate(name):
    """Each sample ends at the iterate k_i where it was first misclassified (the last one if never): exactly
    what the same attack without early stop returns after k_i steps."""
    model = conv_model()
    x = images(8)
    y = model(x).argmax(1)
    eps = 1 / 255  # samples fall at different steps, some never
    iterates = [x] + [run_attack(name, model, x, y, eps, steps=k, random_start=False) if name == "pgd" else
                      run_attack(name, model, x, y, eps, steps=k) for k in range(1, 11)]
    with torch.no_grad():
        fooled = torch.stack([model(a).argmax(1) != y for a in iterates])  # (step, sample)
    first = [int(f.nonzero()[0]) if f.any() else 10 for f in fooled.T]
    assert len(set(first)) >= 3, first  # the batch mixes early, late and never-fooled samples
    params = dict(random_start=False) if name == "pgd" else {}
    stopped = run_attack(name, model, x, y, eps, steps=10, early_stop=True, **params)
    assert torch.equal(stopped, torch.stack([iterates[k][i] for i, k in enumerate(first)]))


# --------------------------------------------------------------------------- AutoAttack wiring

def test_autoattack_runs_at_the_reference_strength(monkeypatch):
    """standard = APGD-CE, APGD-T, FAB-T, Square with 100 iterations, 9 targets, 5000 queries (fra31/auto-attack);
    fast = the APGD pair only."""
    seen = {}

    class Recorder:
        def __init__(self, attacks):
            seen["attacks"] = attacks

        def __call__(self, x, y):
            return x

    monkeypatch.setattr(torchattacks, "MultiAttack", Recorder)
    model = conv_model(classes=20)
    x, y = images(2), torch.tensor([0, 1])
    run_attack("autoattack", model, x, y, EPS)
    ce, t, fab, square = seen["attacks"]
    assert type(ce).__name__ == "APGD" and ce.loss == "ce" and ce.steps == 100 and ce.n_restarts == 1
    assert type(t).__name__ == "APGDT" and t.steps == 100 and t.n_target_classes == 9
    assert type(fab).__name__ == "FAB" and fab.multi_targeted and fab.steps == 100 and fab.n_target_classes == 9
    assert type(square).__name__ == "Square" and square.n_queries == 5000 and square.p_init == 0.8
    assert all(a.eps == EPS and a.norm == "Linf" for a in seen["attacks"])
    run_attack("autoattack", model, x, y, EPS, version="fast")
    assert [type(a).__name__ for a in seen["attacks"]] == ["APGD", "APGDT"]


def test_autoattack_standard_is_at_least_as_strong_as_fast():
    model = conv_model()
    x = images(6)
    y = model(x).argmax(1)
    robust = {}
    for version in ("fast", "standard"):
        adv = run_attack("autoattack", model, x, y, 2 / 255, version=version, steps=3, targets=2, square_queries=20,
                         seed=0)
        robust[version] = (model(adv).argmax(1) == y)
    assert (robust["standard"] <= robust["fast"]).all()  # same APGD seeds, then more attacks


# --------------------------------------------------------------------------- names

def test_attack_names_and_budgets():
    assert parse_attack("pgd100") == ("pgd", {"steps": 100})
    assert parse_attack("square500") == ("square", {"queries": 500})
    assert parse_attack("cw") == ("cw", {})
    with pytest.raises(ConfigError, match="did you mean 'square'"):
        parse_attack("sqare")
    with pytest.raises(ConfigError, match="no numeric budget"):
        parse_attack("fgsm5")


# The reference AutoAttack, version="standard", L∞ (fra31/auto-attack, autoattack/autoattack.py at commit a392200:
# the constructor and set_version('standard')): what each of its four attacks is configured with.
REFERENCE_AUTOATTACK_STANDARD = [
    ("APGD", {"steps": 100, "n_restarts": 1, "loss": "ce", "eot_iter": 1, "thr_decr": 0.75}),
    ("APGDT", {"steps": 100, "n_restarts": 1, "eot_iter": 1, "thr_decr": 0.75, "n_target_classes": 9}),
    ("FAB", {"steps": 100, "n_restarts": 1, "multi_targeted": True, "n_target_classes": 9, "alpha_max": 0.1,
             "eta": 1.05, "beta": 0.9}),
    ("Square", {"n_queries": 5000, "n_restarts": 1, "p_init": 0.8, "loss": "margin", "rescale_schedule": False}),
]


def test_autoattack_is_configured_as_the_reference_standard_version():
    pytest.importorskip("torchattacks")
    from guardx.attacks.library import autoattack_components

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 10))
    attacks = autoattack_components(model, 1 / 255, n_classes=10, seed=3)
    assert [type(a).__name__ for a in attacks] == [name for name, _ in REFERENCE_AUTOATTACK_STANDARD]
    for attack, (name, settings) in zip(attacks, REFERENCE_AUTOATTACK_STANDARD):
        assert attack.norm == "Linf" and attack.eps == 1 / 255 and attack.seed == 3, name
        assert {k: getattr(attack, k) for k in settings} == settings, name
    fast = autoattack_components(model, 1 / 255, n_classes=10, version="fast")
    assert [type(a).__name__ for a in fast] == ["APGD", "APGDT"]


def test_square_rescaled_schedule_is_a_documented_choice(tmp_path):
    pytest.importorskip("torchattacks")
    from guardx.config import load_config

    cfg = load_config(None, ["evaluate.attacks=[square]"])
    assert cfg.evaluate.attack_params("square")["resc_schedule"] is False  # AutoAttack's setting by default
    cfg = load_config(None, ["evaluate.attacks=[square]", "evaluate.square_resc_schedule=true"])
    assert cfg.evaluate.attack_params("square")["resc_schedule"] is True
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 10))
    x, y = torch.rand(4, 3, 4, 4), torch.randint(0, 10, (4,))
    seen = {}
    import torchattacks

    real = torchattacks.Square.__init__

    def spy(self, *a, **k):
        seen.update(k)
        real(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torchattacks.Square, "__init__", spy)
        run_attack("square", model, x, y, 1 / 255, queries=2, resc_schedule=True, seed=0)
    assert seen["resc_schedule"] is True


# --------------------------------------------------------------------------- registry and config keys

def _changed(value):
    """A valid value other than a parameter's default (None: no generic choice for this type)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.5
    return None


@pytest.mark.parametrize("name", list_attacks())
def test_every_attack_declares_capabilities_and_its_parameters_are_config_keys(name):
    """``bounded``, ``budget``, ``source`` declared; every documented parameter is a generated
    ``evaluate.*`` key whose default is the attack function's, and a value set there reaches the attack."""
    entry = ATTACKS.get(name)
    signature = inspect.signature(entry.factory).parameters
    assert isinstance(entry.bounded, bool) and entry.source in ("guardx", "torchattacks")
    assert list(signature)[:4] == ["model", "x", "y", "eps"] and "seed" in signature
    fields = {f.name: f for f in dataclasses.fields(EvaluateConfig)}
    defaults = load_config(None, []).evaluate
    for p in entry.params.values():
        assert p.key in fields, f"{name}.{p.name}: no evaluate.{p.key}"
        assert getattr(defaults, p.key) == signature[p.name].default, p.key
        assert type(getattr(defaults, p.key)) is type(signature[p.name].default), p.key
        assert p.help in fields[p.key].metadata["help"], p.key
        value = _changed(p.default)
        if value is not None:
            assert load_config(None, [f"evaluate.{p.key}={value}"]).evaluate.attack_params(name)[p.name] == value
    assert defaults.attack_params(name) == {p.name: signature[p.name].default for p in entry.params.values()}
    if entry.budget is None:
        with pytest.raises(ConfigError, match="no numeric budget"):
            parse_attack(f"{name}7")
    else:  # the suffix sets the budget parameter, over the config key
        assert entry.budget in entry.params and type(signature[entry.budget].default) is int
        assert defaults.attack_params(f"{name}7")[entry.budget] == 7
