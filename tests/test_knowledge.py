"""Tests for ckpttool.knowledge (torch-free optimizer/scheduler knowledge)."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.optim.lr_scheduler as L
from torch.optim.swa_utils import SWALR

import ckpttool.knowledge as K
from ckpttool.knowledge import generate as G

REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------
# (a) committed JSON == what the installed torch produces
# --------------------------------------------------------------------------


def test_committed_json_matches_installed_torch() -> None:
    committed = resources.files("ckpttool.knowledge").joinpath("torch_optim.json").read_text(encoding="utf-8")
    regenerated = G.dumps(G.generate())
    assert regenerated == committed, "run `python -m ckpttool.knowledge.generate` to refresh torch_optim.json"


def test_check_mode_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert G.main(["--check"]) == 0


def test_check_mode_reports_stale(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stale = tmp_path / "torch_optim.json"
    stale.write_text(G.JSON_PATH.read_text(encoding="utf-8").replace('"max_exp_avg_sq"', '"bogus"'), encoding="utf-8")
    assert G.main(["--check", "--output", str(stale)]) == 1
    err = capsys.readouterr().err
    assert "is stale: 4 changed lines" in err
    assert '-          "bogus"\n+          "max_exp_avg_sq"' in err


def test_knowledge_covers_torch_optim() -> None:
    expected = sorted(
        n
        for n in torch.optim.__all__
        if inspect.isclass(getattr(torch.optim, n))
        and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)
        and n != "Optimizer"
    )
    assert K.optimizer_types() == expected
    assert K.torch_version() == torch.__version__
    expected_sched = sorted(
        n for n in L.__all__ if inspect.isclass(getattr(L, n)) and n != "LRScheduler"
    ) + ["SWALR"]
    assert K.scheduler_types() == sorted(expected_sched)


def test_optimizer_info_details() -> None:
    adam = K.optimizer_info("Adam")
    assert adam.group_keys == (
        "lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach",
        "capturable", "differentiable", "fused", "decoupled_weight_decay", "params",
    )
    assert adam.defaults["betas"] == [0.9, 0.999]
    assert adam.defaults["foreach"] is None
    assert adam.defaults["decoupled_weight_decay"] is False
    assert adam.state_keys == {1: ("exp_avg", "exp_avg_sq", "step"), 2: ("exp_avg", "exp_avg_sq", "step")}
    assert adam.conditional_state == {"amsgrad=true": ("max_exp_avg_sq",)}
    assert adam.possible_state_keys == {"exp_avg", "exp_avg_sq", "step", "max_exp_avg_sq"}
    assert adam.step_is_tensor and not adam.step_is_python_int
    assert adam.step == K.StateEntryInfo(kind="tensor", dtype="float32", ndim=0, sparse=False, type=None)
    assert adam.options_tried["capturable=true"] == "raised"

    assert K.optimizer_info("AdamW").defaults["decoupled_weight_decay"] is True
    assert K.optimizer_info("SGD").state_keys == {}
    assert K.optimizer_info("SGD").conditional_state == {"momentum=0.9": ("momentum_buffer",)}
    assert K.optimizer_info("RMSprop").conditional_state == {
        "centered=true": ("grad_avg",),
        "momentum=0.9": ("momentum_buffer",),
    }
    assert K.optimizer_info("Adafactor").state_keys == {1: ("step", "variance"), 2: ("col_var", "row_var", "step")}
    assert K.optimizer_info("Adafactor").defaults["eps"] == [None, 0.001]
    sparse = K.optimizer_info("SparseAdam")
    assert sparse.step_is_python_int and sparse.step_dtype is None
    assert sparse.param_setup == "sparse-embedding"
    assert K.optimizer_info("Muon").param_setup == "dense-2d"
    lbfgs = K.optimizer_info("LBFGS")
    assert lbfgs.supports_param_groups is False
    assert lbfgs.step is None
    assert lbfgs.state_entries[2]["old_dirs"] == K.StateEntryInfo(kind="python", type="list")
    assert lbfgs.state_entries[2]["func_evals"] == K.StateEntryInfo(kind="python", type="int")
    with pytest.raises(KeyError, match="unknown optimizer type 'Lamb'"):
        K.optimizer_info("Lamb")


# --------------------------------------------------------------------------
# (b) every optimizer built for real -> infer_optimizer gives its class name
# --------------------------------------------------------------------------


def _param(shape: tuple[int, ...], seed: int) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)))


def _build_and_step(name: str, options: dict[str, Any]) -> torch.optim.Optimizer:
    """Build optimizer ``name`` with two param groups (one for LBFGS, which
    refuses groups), step it twice with real gradients."""
    cls = getattr(torch.optim, name)
    if name == "SparseAdam":
        embs = [torch.nn.Embedding(5, 3, sparse=True), torch.nn.Embedding(4, 2, sparse=True)]
        params = [e.weight for e in embs]

        def loss_fn() -> torch.Tensor:
            idx = torch.tensor([0, 2])
            return sum((e(idx) ** 2).sum() for e in embs)  # type: ignore[return-value]

    else:
        second = (4, 2) if name == "Muon" else (3,)
        params = [_param((3, 4), 1), _param(second, 2)]

        def loss_fn() -> torch.Tensor:
            return sum(((p - 0.5) ** 2).sum() for p in params)  # type: ignore[return-value]

    if name == "LBFGS":
        opt = cls(params, **options)
    else:
        opt = cls([{"params": [params[0]]}, {"params": [params[1]], "lr": 0.0005}], **options)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    return opt


def _keys(sd: dict[str, Any]) -> tuple[set[str], set[str], dict[str, Any]]:
    group_keys = {k for g in sd["param_groups"] for k in g}
    state_keys = {k for st in sd["state"].values() for k in st}
    return group_keys, state_keys, sd["param_groups"][0]


OPTIMIZER_CASES: list[tuple[str, dict[str, Any], str]] = [(n, {}, n) for n in K.optimizer_types()] + [
    ("Adam", {"amsgrad": True}, "Adam"),
    ("AdamW", {"amsgrad": True}, "AdamW"),
    ("AdamW", {"weight_decay": 0.0}, "AdamW"),
    ("Adam", {"weight_decay": 0.01}, "Adam"),
    # Adam(decoupled_weight_decay=True) *is* AdamW (same algorithm and keys).
    ("Adam", {"decoupled_weight_decay": True}, "AdamW"),
    ("SGD", {"momentum": 0.9}, "SGD"),
    ("SGD", {"momentum": 0.9, "nesterov": True}, "SGD"),
    ("RMSprop", {"centered": True, "momentum": 0.9}, "RMSprop"),
    ("NAdam", {"decoupled_weight_decay": True}, "NAdam"),
    ("RAdam", {"decoupled_weight_decay": True}, "RAdam"),
]


@pytest.mark.parametrize(("name", "options", "expected"), OPTIMIZER_CASES, ids=lambda v: str(v))
def test_infer_optimizer_real(name: str, options: dict[str, Any], expected: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = _build_and_step(name, options)
    group_keys, state_keys, values = _keys(opt.state_dict())
    guess = K.infer_optimizer(group_keys, state_keys, values)
    assert guess.type == expected, guess.reason
    assert guess.candidates == (expected,)
    assert guess.exact is True
    assert guess.seen_group_keys == tuple(sorted(K.optimizer_info(expected).defaults))
    assert guess.seen_state_keys == tuple(sorted(state_keys))
    assert guess.reason == f"group keys match {expected} exactly and state keys fit" + (
        "; decoupled_weight_decay=True selects AdamW" if expected == "AdamW" else
        "; decoupled_weight_decay=False selects Adam" if expected == "Adam" else ""
    )


def test_infer_optimizer_real_named_params_and_scheduler_keys() -> None:
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.named_parameters(), lr=0.01)
    sched = L.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    for _ in range(2):
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
        sched.step()
    group_keys, state_keys, values = _keys(opt.state_dict())
    assert {"param_names", "initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum"} <= group_keys
    guess = K.infer_optimizer(group_keys, state_keys, values)
    assert guess.type == "AdamW"
    assert guess.exact is True
    assert "initial_lr" not in guess.seen_group_keys and "param_names" not in guess.seen_group_keys


def test_infer_adam_without_values_is_ambiguous() -> None:
    info = K.optimizer_info("Adam")
    guess = K.infer_optimizer(info.group_keys, ["step", "exp_avg", "exp_avg_sq"])
    assert guess.type == "Adam"
    assert guess.candidates == ("Adam", "AdamW")
    assert guess.is_ambiguous
    assert guess.reason == (
        "group and state keys fit Adam, AdamW; ambiguous, picked Adam (pass group values to distinguish)"
    )


def test_infer_sgd_empty_state() -> None:
    guess = K.infer_optimizer(K.optimizer_info("SGD").group_keys, [])
    assert (guess.type, guess.candidates, guess.exact) == ("SGD", ("SGD",), True)


def test_infer_group_match_but_foreign_state_is_unknown() -> None:
    guess = K.infer_optimizer(K.optimizer_info("Adamax").group_keys, ["step", "exp_avg", "my_extra"])
    assert guess.type == "unknown"
    assert guess.candidates == ("Adamax",)
    assert guess.reason == "group keys match Adamax but state keys ['my_extra'] are not written by it"


def test_infer_old_torch_adam_closest_match() -> None:
    # torch 1.13-style Adam group: no `fused`, no `decoupled_weight_decay`.
    keys = ["lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
            "differentiable", "params"]
    guess = K.infer_optimizer(keys, ["step", "exp_avg", "exp_avg_sq"], {"lr": 1e-3, "weight_decay": 0.0})
    assert guess.type == "Adam"
    assert guess.candidates == ("Adam", "AdamW")
    assert guess.exact is False
    assert guess.reason == (
        "closest match: group keys missing decoupled_weight_decay, fused; ambiguous between Adam, AdamW"
    )
    # state keys narrow it down when the group keys alone would not
    old_sgd = K.infer_optimizer(["lr", "momentum", "dampening", "weight_decay", "nesterov", "params"],
                                ["momentum_buffer"])
    assert (old_sgd.type, old_sgd.candidates, old_sgd.exact) == ("SGD", ("SGD",), False)
    assert old_sgd.reason == "closest match: group keys missing differentiable, foreach, fused, maximize"


# --------------------------------------------------------------------------
# (d) foreign optimizers -> unknown
# --------------------------------------------------------------------------


def test_infer_timm_lamb_is_unknown() -> None:
    group = {
        "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.01, "grad_averaging": True,
        "max_grad_norm": 1.0, "trust_clip": False, "always_adapt": False, "step": 3, "params": [0, 1],
    }
    state = ["exp_avg", "exp_avg_sq"]
    for values in (None, group):
        guess = K.infer_optimizer(group.keys(), state, values)
        assert guess.type == "unknown"
        assert guess.candidates == ()
        assert guess.exact is False
        assert guess.seen_group_keys == (
            "always_adapt", "betas", "eps", "grad_averaging", "lr", "max_grad_norm", "step", "trust_clip",
            "weight_decay",
        )
        assert guess.seen_state_keys == ("exp_avg", "exp_avg_sq")
        assert guess.reason == "keys match no torch.optim optimizer"


def test_infer_optimizer_degenerate_inputs() -> None:
    assert K.infer_optimizer([], []).type == "unknown"
    assert K.infer_optimizer(["params"], []).reason == "no param-group hyperparameter keys"
    assert K.infer_optimizer(["lr", "weight_decay", "params"], []).type == "unknown"


# --------------------------------------------------------------------------
# (c) every scheduler built for real -> infer_scheduler gives its class name
# --------------------------------------------------------------------------


class _WarmupFactor:
    """A callable *object* lr_lambda: its __dict__ ends up in state_dict()."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup

    def __call__(self, epoch: int) -> float:
        return min(1.0, (epoch + 1) / self.warmup)


def _sgd(n_groups: int = 2) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        [{"params": [_param((3,), i)], "lr": 0.1 * (i + 1)} for i in range(n_groups)], lr=0.1, momentum=0.9
    )


SCHEDULER_FACTORIES: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "LambdaLR": lambda o: L.LambdaLR(o, [_WarmupFactor(3), lambda e: 0.5]),
    "MultiplicativeLR": lambda o: L.MultiplicativeLR(o, lambda e: 0.95),
    "StepLR": lambda o: L.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o: L.MultiStepLR(o, milestones=[2, 5]),
    "ConstantLR": lambda o: L.ConstantLR(o, factor=0.5, total_iters=3),
    "LinearLR": lambda o: L.LinearLR(o, start_factor=0.1, total_iters=4),
    "ExponentialLR": lambda o: L.ExponentialLR(o, gamma=0.95),
    "SequentialLR": lambda o: L.SequentialLR(
        o, [L.LinearLR(o, start_factor=0.1, total_iters=2), L.ConstantLR(o), L.CosineAnnealingLR(o, T_max=5)], [2, 4]
    ),
    "CosineAnnealingLR": lambda o: L.CosineAnnealingLR(o, T_max=7, eta_min=1e-4),
    "ChainedScheduler": lambda o: L.ChainedScheduler([L.ConstantLR(o), L.StepLR(o, 2)]),
    "ReduceLROnPlateau": lambda o: L.ReduceLROnPlateau(o, mode="max", patience=1),
    "CyclicLR": lambda o: L.CyclicLR(o, base_lr=[0.01, 0.02], max_lr=0.2, step_size_up=3, mode="exp_range"),
    "CosineAnnealingWarmRestarts": lambda o: L.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2),
    "OneCycleLR": lambda o: L.OneCycleLR(o, max_lr=0.5, epochs=2, steps_per_epoch=5, three_phase=True),
    "PolynomialLR": lambda o: L.PolynomialLR(o, total_iters=6, power=2.0),
    "SWALR": lambda o: SWALR(o, swa_lr=0.05, anneal_epochs=3, anneal_strategy="linear"),
}

#: LambdaLR and MultiplicativeLR have the same state keys; LambdaLR wins.
SCHEDULER_EXPECTED = {n: n for n in SCHEDULER_FACTORIES} | {"MultiplicativeLR": "LambdaLR"}


def test_scheduler_factories_cover_all_types() -> None:
    assert sorted(SCHEDULER_FACTORIES) == K.scheduler_types()


def _stepped_scheduler(name: str) -> tuple[Any, torch.optim.Optimizer]:
    opt = _sgd(2)
    sched = SCHEDULER_FACTORIES[name](opt)
    for _ in range(3):
        opt.step()
        if name == "ReduceLROnPlateau":
            sched.step(0.5)
        else:
            sched.step()
    return sched, opt


@pytest.mark.parametrize("name", sorted(SCHEDULER_FACTORIES))
def test_infer_scheduler_real(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched, opt = _stepped_scheduler(name)
    sd = sched.state_dict()
    assert K.looks_like_scheduler(sd.keys()) is True
    assert K.infer_scheduler(sd.keys()) == SCHEDULER_EXPECTED[name]
    info = K.scheduler_info(name)
    assert tuple(sorted(sd)) == info.keys
    for key in K.per_group_scheduler_keys(name):
        assert isinstance(sd[key], list) and len(sd[key]) == 2, key
    for key in info.nested_scheduler_keys:
        for nested in sd[key]:
            assert K.infer_scheduler(nested.keys()) in K.scheduler_types()
    # the optimizer state written next to it is still recognised as SGD
    group_keys, state_keys, values = _keys(opt.state_dict())
    assert K.infer_optimizer(group_keys, state_keys, values).type == "SGD"


def test_lambda_multiplicative_collision() -> None:
    keys = K.scheduler_info("MultiplicativeLR").keys
    assert keys == K.scheduler_info("LambdaLR").keys
    assert K.scheduler_candidates(keys) == ("LambdaLR", "MultiplicativeLR")


def test_scheduler_callables_in_state_dict() -> None:
    sched, _ = _stepped_scheduler("LambdaLR")
    # plain functions/lambdas are saved as None, callable objects as their __dict__
    assert sched.state_dict()["lr_lambdas"] == [{"warmup": 3}, None]


def test_per_group_scheduler_keys() -> None:
    assert K.per_group_scheduler_keys("StepLR") == ("_last_lr", "base_lrs")
    assert K.per_group_scheduler_keys("CyclicLR") == (
        "_last_lr", "base_lrs", "base_momentums", "max_lrs", "max_momentums",
    )
    assert K.per_group_scheduler_keys("LambdaLR") == ("_last_lr", "base_lrs", "lr_lambdas")
    assert K.per_group_scheduler_keys("ReduceLROnPlateau") == ("_last_lr", "min_lrs")
    assert K.per_group_scheduler_keys("SequentialLR") == ("_last_lr",)
    assert K.per_group_scheduler_keys("unknown") == ()
    assert K.LR_LIKE_GROUP_KEYS == ("lr", "initial_lr", "max_lr", "min_lr", "swa_lr")
    # every LR-like key but lr is one a scheduler adds to the groups
    assert set(K.LR_LIKE_GROUP_KEYS) - {"lr"} <= K.scheduler_added_group_keys()
    assert K.scheduler_added_group_keys() == {
        "initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum", "swa_lr",
    }


def test_infer_scheduler_non_exact() -> None:
    # torch 2.1-style StepLR: has `verbose`, lacks `_is_initial`
    old_step = ["step_size", "gamma", "base_lrs", "last_epoch", "verbose", "_step_count",
                "_get_lr_called_within_step", "_last_lr"]
    assert K.infer_scheduler(old_step) == "StepLR"
    # torch 2.1-style ReduceLROnPlateau: `verbose`, no `default_min_lr`, no `_last_lr`
    old_plateau = ["factor", "min_lrs", "patience", "verbose", "cooldown", "cooldown_counter", "mode",
                   "threshold", "threshold_mode", "best", "num_bad_epochs", "mode_worse", "eps", "last_epoch"]
    assert K.infer_scheduler(old_plateau) == "ReduceLROnPlateau"
    # scheduler-like but matches nothing (e.g. a custom warmup scheduler)
    custom = ["warmup_steps", "base_lrs", "last_epoch", "_step_count", "_last_lr"]
    assert K.looks_like_scheduler(custom) is True
    assert K.infer_scheduler(custom) == "unknown"
    # base keys only: a scheduler, but no class-specific keys to tell which
    assert K.infer_scheduler(["base_lrs", "last_epoch", "_step_count", "_last_lr"]) == "unknown"
    # not schedulers at all
    assert K.infer_scheduler(["gamma"]) is None
    assert K.infer_scheduler(["state", "param_groups"]) is None
    assert K.infer_scheduler([]) is None
    assert K.looks_like_scheduler(["epoch", "global_step"]) is False


# --------------------------------------------------------------------------
# (e) importing ckpttool.knowledge does not import torch
# --------------------------------------------------------------------------


def test_knowledge_import_is_torch_free() -> None:
    code = (
        "import sys\n"
        "import ckpttool.knowledge as k\n"
        "assert k.optimizer_types()\n"
        "g = k.infer_optimizer(k.optimizer_info('AdamW').group_keys, ['step'], {'decoupled_weight_decay': True})\n"
        "assert g.type == 'AdamW', g\n"
        "assert k.infer_scheduler(k.scheduler_info('StepLR').keys) == 'StepLR'\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "print('TORCH' if bad else 'NO-TORCH', bad)\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, env=env, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "NO-TORCH []"
