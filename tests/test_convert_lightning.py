"""A Lightning GAN's generator optimizer converts (SGD momentum -> Adam) and the run resumes
under the real Trainer (fixtures/lightning_gan, made from tests/lightning_gan.py)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import lightning as L  # the `test` extra pins lightning==2.6.6
import pytest
import torch
from click.testing import CliRunner

from ckpttool.cli import cli
from conftest import FIXTURES
from lightning_gan import STEPS_PER_BATCH, TinyGAN, dataloader

FIXTURE = FIXTURES / "lightning_gan" / "epoch=0-step=6.ckpt"
ADAM_LR = 2e-3  # ~ SGD lr 0.025 x rms(momentum_buffer) 0.094: the README's step-size rule
NEW_BATCHES = 2
CONVERTED_STEP = 1000  # SGD keeps no step: ceil(1 / (1 - 0.999)), Adam's longest horizon


class AdamGAN(TinyGAN):
    G_OPT = "adam"


def same(a: Any, b: Any) -> bool:
    """Equal trees, tensors compared by dtype, shape and value."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return bool(a == b)


@pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning")
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated")
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`:UserWarning")
def test_gan_generator_sgd_to_adam_resumes_under_trainer(tmp_path: Path) -> None:
    ckpt = tmp_path / FIXTURE.name
    shutil.copy(FIXTURE, ckpt)
    r = CliRunner().invoke(cli, ["convert", str(ckpt), "--to", "adam",
                                 "--optimizer", "/optimizer_states/0", "--set", f"lr={ADAM_LR}"])
    assert r.exit_code == 0, r.output
    assert r.stdout == (
        "convert: optimizer /optimizer_states/0 SGD -> Adam (1 group, moments carry); "
        "set-lr: lr 0.002 in optimizer /optimizer_states/0 (group 0 x0.08); "
        "scheduler /lr_schedulers/0 (StepLR) scaled to match; 4 values changed; "
        f"wrote {ckpt}\n")

    # the file: only the generator's optimizer and scheduler changed
    before = torch.load(FIXTURE, weights_only=True)
    after = torch.load(ckpt, weights_only=True)
    assert list(after) == list(before)
    for key in before:
        if key not in ("optimizer_states", "lr_schedulers"):
            assert same(after[key], before[key]), key
    assert same(after["optimizer_states"][1], before["optimizer_states"][1])  # discriminator
    assert same(after["lr_schedulers"][1], before["lr_schedulers"][1])
    g_before, g_after = before["optimizer_states"][0], after["optimizer_states"][0]
    assert g_before["param_groups"][0]["lr"] == 0.025  # StepLR halved 0.05 once
    assert after["lr_schedulers"][0]["base_lrs"] == [pytest.approx(2 * ADAM_LR)]
    assert after["lr_schedulers"][0]["_last_lr"] == [ADAM_LR]
    assert after["lr_schedulers"][0]["last_epoch"] == 3
    group = g_after["param_groups"][0]
    assert (group["lr"], group["betas"], group["params"]) == (ADAM_LR, (0.9, 0.999), [0, 1, 2, 3])
    for pid, st in g_after["state"].items():
        buf = g_before["state"][pid]["momentum_buffer"]
        assert list(st) == ["step", "exp_avg", "exp_avg_sq"]
        assert st["step"].item() == CONVERTED_STEP
        # m = buf (1 - 0.9) and exp_avg = m (1 - 0.9^1000)
        torch.testing.assert_close(st["exp_avg"], buf * 0.1, rtol=1e-6, atol=0)
        assert (st["exp_avg_sq"] > 0).all()

    # resume under the Trainer with the generator optimizer built as Adam
    L.seed_everything(0, verbose=False)
    module = AdamGAN()
    trainer = L.Trainer(max_steps=before["global_step"] + NEW_BATCHES * STEPS_PER_BATCH,
                        accelerator="cpu", devices=1, enable_progress_bar=False, logger=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=str(tmp_path / "run"))
    trainer.fit(module, dataloader(), ckpt_path=str(ckpt))

    assert trainer.global_step == before["global_step"] + NEW_BATCHES * STEPS_PER_BATCH
    opt_g, opt_d = trainer.optimizers
    assert type(opt_g) is torch.optim.Adam
    assert [p for g in opt_g.param_groups for p in g["params"]] == \
        list(module.generator.parameters())
    for p in module.generator.parameters():
        st = opt_g.state[p]
        assert set(st) == {"step", "exp_avg", "exp_avg_sq"}
        assert st["step"].item() == CONVERTED_STEP + NEW_BATCHES
        assert st["exp_avg"].shape == p.shape and torch.isfinite(st["exp_avg"]).all()
        assert torch.isfinite(st["exp_avg_sq"]).all() and (st["exp_avg_sq"] > 0).all()
    for p in module.discriminator.parameters():
        assert opt_d.state[p]["step"].item() == 3 + NEW_BATCHES
    # the schedule continues from the converted lr: batch 4 uses it, StepLR(2, 0.5) then halves
    assert module.g_lrs == [pytest.approx(ADAM_LR), pytest.approx(ADAM_LR * 0.5)]
    sched_g = trainer.lr_scheduler_configs[0].scheduler
    assert sched_g.last_epoch == 3 + NEW_BATCHES
    assert sched_g.get_last_lr() == [pytest.approx(ADAM_LR * 0.5)]
    assert len(module.losses) == NEW_BATCHES
    assert all(math.isfinite(x) for pair in module.losses for x in pair)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    # the generator moved from the checkpoint's weights
    moved = [not torch.equal(p, before["state_dict"][f"generator.{n}"])
             for n, p in module.generator.named_parameters()]
    assert all(moved)
