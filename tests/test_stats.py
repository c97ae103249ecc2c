"""Tensor statistics (``show --stats``), checked against torch.load of the same files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpttool
from ckpttool.formats.nodes import TensorRef
from ckpttool.stats import optimizer_stats, tensor_stats
from conftest import FIXTURES

ROOT = Path(__file__).resolve().parents[1]

# (fixture, pointer of the optimizer in the torch.load result, its dtype of exp_avg)
CASES = [("optim_adam.pt", (), "float32"), ("bf16.pt", ("optimizer",), "bfloat16")]


def _expected(t: torch.Tensor) -> dict[str, Any]:
    x = t.double()
    finite = x[torch.isfinite(x)]
    return {"norm": float(torch.linalg.vector_norm(finite)), "min": float(finite.min()),
            "max": float(finite.max()), "mean": float(finite.mean()),
            "nan": int(torch.isnan(x).sum()), "inf": int(torch.isinf(x).sum())}


def _loaded_state(name: str, where: tuple[str, ...]) -> dict[str, torch.Tensor]:
    sd = torch.load(FIXTURES / name, weights_only=True)
    for k in where:
        sd = sd[k]
    state: dict[str, torch.Tensor] = sd["state"][0]
    return state


# Hides numpy as if it were not installed (torch then warns on import that it cannot
# initialize NumPy), then prints the statistics of parameter 0's state as JSON.
_NO_NUMPY = """
import json, sys

class NoNumpy:
    def find_spec(self, name, path=None, target=None):
        if name == "numpy" or name.startswith("numpy."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoNumpy())
import ckpttool, ckpttool.stats
entries = ckpttool.open(sys.argv[1]).optimizers[0].state[0].entries
print(json.dumps({k: ckpttool.stats.tensor_stats(v) for k, v in entries.items()}))
assert "numpy" not in sys.modules or sys.modules["numpy"] is None
"""


@pytest.mark.parametrize("name,where,dtype", CASES)
def test_stats_without_numpy_are_quiet_and_exact(name: str, where: tuple[str, ...],
                                                 dtype: str) -> None:
    proc = subprocess.run([sys.executable, "-c", _NO_NUMPY, str(FIXTURES / name)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    got = json.loads(proc.stdout)
    state = _loaded_state(name, where)
    assert str(state["exp_avg"].dtype) == f"torch.{dtype}"
    assert got == {k: _expected(v) for k, v in state.items()}


def test_optimizer_stats_covers_every_state_tensor_once() -> None:
    ckpt = ckpttool.open(FIXTURES / "optim_adam.pt")
    stats = optimizer_stats(ckpt.optimizers)
    refs = {id(v): v for s in ckpt.optimizers[0].state for v in s.entries.values()
            if isinstance(v, TensorRef)}
    assert set(stats) == set(refs) and len(refs) == 12  # 4 params x step, exp_avg, exp_avg_sq
    loaded = torch.load(FIXTURES / "optim_adam.pt", weights_only=True)["state"]
    for s in ckpt.optimizers[0].state:
        for k, v in s.entries.items():
            assert stats[id(v)] == _expected(loaded[s.param][k])
            assert stats[id(v)] == tensor_stats(v)


def test_stats_of_non_finite_values(tmp_path: Path) -> None:
    t = torch.tensor([[1.0, float("nan")], [float("inf"), -3.0]]).t()  # not contiguous
    sd = {"state": {0: {"exp_avg": t, "empty": torch.zeros(0)}},
          "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8,
                            "weight_decay": 0, "amsgrad": False, "params": [0]}]}
    path = tmp_path / "nonfinite.pt"
    torch.save(sd, path)
    entries = ckpttool.open(path).optimizers[0].state[0].entries
    norm = float(torch.tensor([1.0, -3.0], dtype=torch.float64).norm())
    assert tensor_stats(entries["exp_avg"]) == {"norm": norm, "min": -3.0, "max": 1.0,
                                                "mean": -1.0, "nan": 1, "inf": 1}
    assert tensor_stats(entries["empty"]) == {"norm": 0.0, "min": None, "max": None,
                                              "mean": None, "nan": 0, "inf": 0}
