"""convert: every (source, target) pair over the optimizer fixtures loads into the real target
class and trains; the moment formulas hold exactly; SGD momentum <-> Adam keeps a converged
least-squares run converged and points the first step the way the old optimizer was going."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ckpttool
from ckpttool.edits import convert
from ckpttool.edits.convert import targets
from ckpttool.errors import EditError
from ckpttool.save import save
from conftest import FIXTURES, run

MLP = [(3, 4), (3,), (2, 3), (2,)]
SHAPES = {"optim_muon.pt": [(3, 4), (2, 3)], "optim_sparse_adam.pt": [(6, 3), (5, 2)]}
SOURCES = sorted(p.name for p in FIXTURES.glob("optim_*.pt") if p.name != "optim_lbfgs.pt")
TARGETS = targets()



def build(sd: dict[str, Any], target: str, shapes: list[tuple[int, ...]]) -> tuple[
        list[torch.Tensor], torch.optim.Optimizer]:
    """The target optimizer built over params of the right shapes, in the saved groups."""
    torch.manual_seed(0)
    params = [torch.randn(s, requires_grad=True) for s in shapes]
    groups = []
    i = 0
    for g in sd["param_groups"]:
        groups.append({"params": params[i:i + len(g["params"])]})
        i += len(g["params"])
    cls = getattr(torch.optim, target)
    opt = cls(groups) if target != "SGD" else cls(groups, lr=0.1)
    opt.load_state_dict(sd)
    return params, opt


def train(params: list[torch.Tensor], opt: torch.optim.Optimizer, target: str,
          steps: int = 5) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            grad = torch.randn(p.shape, generator=g)
            p.grad = grad.to_sparse() if target == "SparseAdam" else grad
        opt.step()


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("source", SOURCES)
def test_every_pair_loads_and_trains(source: str, target: str, tmp_path: Path) -> None:
    shapes = SHAPES.get(source, MLP)
    ckpt = ckpttool.open(FIXTURES / source)
    if target == "Muon" and source == "optim_sgd.pt":  # plain SGD keeps no state: no shapes
        with pytest.raises(EditError, match="Muon takes 2-D parameters only, and the shapes "
                                            "of 4 of the 4 params cannot be told"):
            convert(ckpt, target)
        return
    if target == "Muon" and any(len(s) != 2 for s in shapes):
        named = " (0.bias)" if "named" in source else ""
        with pytest.raises(EditError, match=re.escape(f"Muon takes 2-D parameters only; params "
                                                      f"1{named}")):
            convert(ckpt, target)
        return
    for moments in ("carry", "zero"):
        out = tmp_path / f"{moments}.pt"
        save(convert(ckpt, target.lower(), moments=moments), str(out))
        sd = torch.load(out)
        params, opt = build(sd, target, shapes)
        assert type(opt).__name__ == target
        train(params, opt, target)
        for p in params:
            assert torch.isfinite(p).all()
        for st in opt.state.values():
            for k, x in st.items():
                if torch.is_tensor(x):
                    assert torch.isfinite(x.to_dense() if x.is_sparse else x).all(), k


def test_sgd_momentum_to_adam_formulas(tmp_path: Path) -> None:
    src = torch.load(FIXTURES / "optim_sgd_momentum.pt")
    out = tmp_path / "adam.pt"
    r = run("convert", FIXTURES / "optim_sgd_momentum.pt", "--to", "ADAM", "-o", out)
    assert r.stdout == ("convert: optimizer (root) SGD -> Adam (2 groups, moments carry); "
                        f"wrote {out}\n")
    sd = torch.load(out)
    t = 1000  # no step in SGD state: ceil(1 / (1 - beta2))
    for pid, st in sd["state"].items():
        assert list(st) == ["step", "exp_avg", "exp_avg_sq"]
        assert st["step"].item() == t and st["step"].dtype == torch.float32
        m = src["state"][pid]["momentum_buffer"] * (1 - 0.9) / (1 - 0)
        torch.testing.assert_close(st["exp_avg"], m * (1 - 0.9 ** t), rtol=1e-6, atol=0)
        torch.testing.assert_close(st["exp_avg_sq"],
                                   (m * m).mean().expand(m.shape) * (1 - 0.999 ** t),
                                   rtol=1e-5, atol=0)
    g0 = sd["param_groups"][0]
    assert g0 == {"lr": src["param_groups"][0]["lr"], "betas": (0.9, 0.999), "eps": 1e-08,
                  "weight_decay": 0, "amsgrad": False, "maximize": False, "foreach": None,
                  "capturable": False, "differentiable": False, "fused": None,
                  "decoupled_weight_decay": False, "params": [0, 1]}


def test_adam_to_sgd_and_back_keeps_moments(tmp_path: Path) -> None:
    src = torch.load(FIXTURES / "optim_adam.pt")
    ckpt = ckpttool.open(FIXTURES / "optim_adam.pt")
    save(convert(ckpt, "sgd", sets={"momentum": 0.9}), str(tmp_path / "sgd.pt"))
    sgd = torch.load(tmp_path / "sgd.pt")
    t = src["state"][0]["step"].item()
    for pid, st in sgd["state"].items():
        m = src["state"][pid]["exp_avg"] / (1 - 0.9 ** t)
        torch.testing.assert_close(st["momentum_buffer"], m / (1 - 0.9), rtol=1e-6, atol=0)
    save(convert(ckpttool.open(tmp_path / "sgd.pt"), "adam"), str(tmp_path / "back.pt"))
    back = torch.load(tmp_path / "back.pt")
    for pid, st in back["state"].items():
        m = src["state"][pid]["exp_avg"] / (1 - 0.9 ** t)
        torch.testing.assert_close(st["exp_avg"] / (1 - 0.9 ** 1000), m, rtol=1e-5, atol=0)


def test_second_moments_between_conventions(tmp_path: Path) -> None:
    """Adam's exp_avg_sq, Adagrad's sum, RMSprop's square_avg and Adafactor's factored
    row_var / col_var describe the same v."""
    src = torch.load(FIXTURES / "optim_adam.pt")
    t = int(src["state"][0]["step"].item())
    v = {p: s["exp_avg_sq"] / (1 - 0.999 ** t) for p, s in src["state"].items()}
    ckpt = ckpttool.open(FIXTURES / "optim_adam.pt")
    for target, check in {
        "Adagrad": lambda st, p: torch.testing.assert_close(st["sum"], v[p] * t, rtol=1e-5,
                                                            atol=0),
        "RMSprop": lambda st, p: torch.testing.assert_close(st["square_avg"], v[p], rtol=1e-5,
                                                            atol=0),
        "Adafactor": lambda st, p: torch.testing.assert_close(
            st["row_var"] if v[p].dim() == 2 else st["variance"],
            v[p].mean(dim=-1, keepdim=True) if v[p].dim() == 2 else v[p], rtol=1e-5, atol=0),
    }.items():
        out = tmp_path / f"{target}.pt"
        save(convert(ckpt, target), str(out))
        sd = torch.load(out)
        for p, st in sd["state"].items():
            assert st["step"].item() == t
            check(st, p)
        if target == "Adafactor":
            torch.testing.assert_close(sd["state"][0]["col_var"],
                                       v[0].mean(dim=0, keepdim=True), rtol=1e-5, atol=0)


def test_convert_errors() -> None:
    ckpt = ckpttool.open(FIXTURES / "optim_adam.pt")
    with pytest.raises(EditError) as e:
        convert(ckpt, "lion")
    assert str(e.value) == ("cannot convert to 'lion'; pick one of " + ", ".join(TARGETS))
    with pytest.raises(EditError, match="SGD has no hyperparameter 'betas'"):
        convert(ckpt, "sgd", sets={"betas": (0.9, 0.99)})
    with pytest.raises(EditError, match="reads torch.optim states only"):
        convert(ckpttool.open(FIXTURES / "optim_lbfgs.pt"), "adam")
    # layer-wise decay: one --set lr for all groups would be a guess at the user's intent
    r = run("convert", FIXTURES / "timm_layer_decay.pth", "--to", "sgd", "--set", "lr=1e-3",
            code=1)
    assert r.stderr == (
        f"Error: {FIXTURES / 'timm_layer_decay.pth'}: the groups of optimizer /optimizer have "
        "different lrs (0.00033513, 0.000446771, 0.000595626, 0.000794099); --set lr would give "
        "every group the same one; convert without --set lr, then run ckpttool set-lr with "
        "--keep-ratios or --same\n")


def test_zero_moments_leave_state_to_torch(tmp_path: Path) -> None:
    plan = convert(ckpttool.open(FIXTURES / "optim_adam.pt"), "rmsprop", moments="zero")
    assert plan.result.optimizers[0].raw["state"] == {}
    assert plan.result.optimizers[0].type == "RMSprop"


def test_set_lr_scales_the_scheduler(tmp_path: Path) -> None:
    src = FIXTURES / "imagenet_style.pth"
    out = tmp_path / "o.pth"
    r = run("convert", src, "--to", "adamw", "--set", "lr=1e-3", "-o", out)
    assert r.stdout == (
        "convert: optimizer /optimizer SGD -> AdamW (1 group, moments carry); set-lr: lr 0.001 "
        "in optimizer /optimizer (group 0 x0.1); scheduler /scheduler (StepLR) scaled to "
        f"match; 4 values changed; wrote {out}\n")
    ck = torch.load(out)
    assert ck["scheduler"]["base_lrs"] == [pytest.approx(0.01)]
    g = ck["optimizer"]["param_groups"][0]
    assert (g["lr"], g["initial_lr"], g["weight_decay"]) == (1e-3, pytest.approx(0.01), 1e-4)


def test_name_keyed_and_folder_sources(tmp_path: Path) -> None:
    """Name-keyed state (FSDP1) and a Trainer folder convert like any other."""
    save(convert(ckpttool.open(FIXTURES / "fsdp1_full_cuda.pt"), "sgd",
                 sets={"momentum": 0.9}), str(tmp_path / "f.pt"))
    sd = torch.load(tmp_path / "f.pt", map_location="cpu")["optimizer"]
    assert sorted(sd["state"]) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert all(list(s) == ["momentum_buffer"] for s in sd["state"].values())
    folder = tmp_path / "hf"
    shutil.copytree(FIXTURES / "hf_trainer" / "checkpoint-4", folder)
    r = run("convert", folder, "--to", "sgd", "--set", "momentum=0.9")
    assert r.stdout == f"convert: optimizer /optimizer.pt AdamW -> SGD (2 groups, moments carry); wrote {folder}\n"
    opt = ckpttool.open(folder).optimizer()
    assert opt.type == "SGD" and len(opt.state) == 16
    acc = tmp_path / "acc"
    shutil.copytree(FIXTURES / "accelerate_state", acc)
    r = run("convert", acc, "--to", "rmsprop")
    assert r.stdout == ("convert: optimizer /optimizer.bin AdamW -> RMSprop (1 group, moments "
                        f"carry); wrote {acc}\n")
    sd = torch.load(acc / "optimizer.bin")
    assert all(list(s) == ["step", "square_avg"] for s in sd["state"].values())
    assert torch.load(acc / "scheduler.bin")["base_lrs"] == \
        torch.load(FIXTURES / "accelerate_state" / "scheduler.bin")["base_lrs"]


# ---------------------------------------------------------------- least squares, steady state

def problem() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 8, generator=g, dtype=torch.float64)
    b = a @ torch.randn(8, 1, generator=g, dtype=torch.float64) \
        + 0.1 * torch.randn(64, 1, generator=g, dtype=torch.float64)
    return a, b


def loss_of(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a @ w - b) ** 2).mean()


def minibatch_steps(w: nn.Parameter, opt: torch.optim.Optimizer, steps: int, seed: int
                    ) -> list[torch.Tensor]:
    """``steps`` minibatch steps on the least-squares problem; the update each step made."""
    a, b = problem()
    g = torch.Generator().manual_seed(seed)
    updates = []
    for _ in range(steps):
        idx = torch.randint(0, 64, (16,), generator=g)
        before = w.detach().clone()
        opt.zero_grad()
        loss_of(w, a[idx], b[idx]).backward()
        opt.step()
        updates.append((w.detach() - before).flatten())
    return updates


def resume_converted(path: Path, target: str, moments: str, sets: dict[str, Any],
                     direction: torch.Tensor, tmp_path: Path) -> None:
    """Convert, resume the real ``target`` on the converted file for 50 steps: the loss stays
    within 1.05x of its value at the conversion, and with carried moments the first update
    points along ``direction`` (the old optimizer's momentum)."""
    a, b = problem()
    out = tmp_path / f"{target}-{moments}.pt"
    save(convert(ckpttool.open(path), target, moments=moments, sets=sets), str(out))
    ck = torch.load(out)
    w = nn.Parameter(ck["w"].clone())
    opt = getattr(torch.optim, target)([w], lr=1.0)
    opt.load_state_dict(ck["optimizer"])
    assert opt.param_groups[0]["lr"] == sets["lr"]
    at_conversion = loss_of(w, a, b).item()
    losses = []
    for i, update in enumerate(minibatch_steps(w, opt, 50, seed=2)):
        if i == 0 and moments == "carry":
            cos = torch.nn.functional.cosine_similarity(update, direction.flatten(), dim=0)
            assert cos.item() > 0.5, cos
        losses.append(loss_of(w, a, b).item())
    assert max(losses) <= 1.05 * at_conversion, (moments, max(losses), at_conversion)


def test_sgd_momentum_to_adam_least_squares(tmp_path: Path) -> None:
    w = nn.Parameter(torch.zeros(8, 1, dtype=torch.float64))
    sgd = torch.optim.SGD([w], lr=0.02, momentum=0.9)
    minibatch_steps(w, sgd, 300, seed=1)  # to steady state, with minibatch noise
    path = tmp_path / "sgd.pt"
    torch.save({"w": w.detach().clone(), "optimizer": sgd.state_dict()}, path)
    buf = sgd.state[w]["momentum_buffer"]
    # the README's rule of thumb: Adam lr ~ SGD lr x rms(momentum_buffer), the size of the
    # steps SGD was taking (Adam's steps are about lr per coordinate)
    adam_lr = 0.02 * buf.pow(2).mean().sqrt().item()
    for moments in ("carry", "zero"):
        resume_converted(path, "Adam", moments, {"lr": adam_lr}, -buf, tmp_path)


def test_adam_to_sgd_momentum_least_squares(tmp_path: Path) -> None:
    w = nn.Parameter(torch.zeros(8, 1, dtype=torch.float64))
    adam = torch.optim.Adam([w], lr=0.01)
    minibatch_steps(w, adam, 600, seed=1)
    path = tmp_path / "adam.pt"
    torch.save({"w": w.detach().clone(), "optimizer": adam.state_dict()}, path)
    t = adam.state[w]["step"].item()
    m = adam.state[w]["exp_avg"] / (1 - 0.9 ** t)
    v = adam.state[w]["exp_avg_sq"] / (1 - 0.999 ** t)
    # the README's rule of thumb the other way: SGD lr ~ Adam lr x (1 - momentum) / mean(sqrt(v))
    # (SGD's step is lr x buf, and buf ~ m / (1 - momentum))
    sgd_lr = 0.01 * (1 - 0.9) / v.sqrt().mean().item()
    for moments in ("carry", "zero"):
        resume_converted(path, "SGD", moments, {"lr": sgd_lr, "momentum": 0.9}, -m, tmp_path)
