"""Whole CLI outputs compared with golden files in tests/golden/ (one file per command).

The golden files were reviewed by hand when they were written. After an intended change of
output, regenerate them with ``CKPTTOOL_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py``
and read the diff before committing it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckpttool.cli import cli
from conftest import FIXTURES

GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("CKPTTOOL_UPDATE_GOLDEN") == "1"

# name -> (argv with {F} for the fixtures folder and {T} for a scratch copy, exit code)
CASES: dict[str, tuple[list[str], int]] = {
    "show_imagenet_style": (["show", "{F}/imagenet_style.pth"], 0),
    "show_cuda0": (["show", "{F}/cuda0.pt"], 0),
    "show_lightning": (["show", "{F}/lightning/epoch=0-step=3.ckpt"], 0),
    "show_hf_trainer": (["show", "{F}/hf_trainer/checkpoint-4"], 0),
    "show_accelerate": (["show", "{F}/accelerate_state"], 0),
    "show_opaque": (["show", "{F}/opaque.pt"], 0),
    "show_torch_save_model_cuda": (["show", "{F}/torch_save_model_cuda.pt"], 0),
    "show_fsdp1": (["show", "{F}/fsdp1_full_cuda.pt"], 0),
    "show_mmengine": (["show", "{F}/mmengine/iter_4.pth"], 0),
    "show_deepspeed": (["show", "{F}/deepspeed/global_step3"], 0),
    "show_peft": (["show", "{F}/peft_trainer/checkpoint-4"], 0),
    "dry_run_move_pickled_module": (["move", "{F}/torch_save_model_cuda.pt", "cpu",
                                     "--dry-run"], 0),
    "merge_groups_one_group": (["merge-groups", "{F}/gan_sched.pt", "--optimizer", "/opt_G",
                                  "--dry-run"], 1),
    "set_lr_mmengine_unknown_schedulers": (["set-lr", "{F}/mmengine/iter_4.pth", "1e-4",
                                            "--keep-ratios"], 1),
    "set_lr_same_shared_eta_min": (["set-lr", "{F}/timm_layer_decay.pth", "1e-4", "--same",
                                    "--dry-run"], 1),
    "dry_run_set_lr": (["set-lr", "{F}/imagenet_style.pth", "1e-4", "--dry-run"], 0),
    "dry_run_set_amsgrad": (["set", "{F}/optim_adam.pt", "amsgrad=true", "--dry-run"], 0),
    "dry_run_move_cuda0": (["move", "{F}/cuda0.pt", "cpu", "--dry-run"], 0),
    "set_lr_groups_differ": (["set-lr", "{F}/optim_adam.pt", "1e-4"], 1),
    "dry_run_convert_sgd_to_adam": (["convert", "{F}/imagenet_style.pth", "--to", "adam",
                                     "--set", "lr=1e-3", "--dry-run"], 0),
    "convert_to_muon_1d": (["convert", "{F}/optim_adamw_named.pt", "--to", "muon"], 1),
    "set_lr_keep_ratios": (["set-lr", "{T}/optim_adam.pt", "1e-4", "--keep-ratios"], 0),
    "merge_groups_no_names": (["merge-groups", "{F}/hf_trainer/checkpoint-4", "--dry-run"], 1),
    # checkpoints from the wild (fixtures/make_wild.py)
    "show_wild_lpips_v01": (["show", "{F}/wild/lpips_v0.1_alex.pth"], 0),
    "show_wild_lpips_v00": (["show", "{F}/wild/lpips_v0.0_alex.pth"], 0),
    "show_wild_dists": (["show", "{F}/wild/dists_weights.pt"], 0),
    "show_wild_py2_adam": (["show", "{F}/wild/py2_adam.pth"], 0),
    "show_wild_scripted": (["show", "{F}/wild/scripted.pt"], 0),
    "show_wild_traced": (["show", "{F}/wild/traced.pt"], 0),
    "dry_run_move_wild_traced": (["move", "{F}/wild/traced.pt", "cuda", "--dry-run"], 0),
    "show_run_loop": (["show", "{F}/runs/loop"], 0),
    "show_run_lightning_topk": (["show", "{F}/runs/lightning_topk"], 0),
    "diff_consecutive_epochs": (["diff", "{F}/runs/loop/epoch_1.pt", "{F}/runs/loop/epoch_2.pt"],
                                1),
    "diff_legacy_zip": (["diff", "{F}/imagenet_style_legacy.pth", "{F}/imagenet_style.pth"], 0),
    "diff_no_such_optimizer": (["diff", "{F}/runs/loop/epoch_1.pt", "{F}/optim_adam.pt",
                                "--optimizer", "/optim"], 2),
    "set_lr_run_folder": (["set-lr", "{F}/runs/loop", "1e-4"], 1),
    "sanitize_numpy_metrics": (["sanitize", "{F}/sanitize/numpy_metrics.pt", "--dry-run"], 0),
    "sanitize_timm_saver": (["sanitize", "{F}/sanitize/timm/last.pth.tar", "-o", "plain.pth"],
                            0),
    "sanitize_lightning_dataclass": (["sanitize", "{F}/sanitize/lightning/epoch=0-step=3.ckpt",
                                      "--dry-run"], 0),
    "sanitize_hf_trainer": (["sanitize", "{F}/hf_trainer/checkpoint-4", "-o", "plain"], 0),
    "sanitize_accelerate": (["sanitize", "{F}/accelerate_state", "--dry-run"], 0),
    "sanitize_deepspeed": (["sanitize", "{F}/deepspeed", "-o", "plain"], 0),
    "sanitize_imagenet_nothing": (["sanitize", "{F}/imagenet_style.pth", "-o", "same.pth"], 0),
    "sanitize_mmengine_unknown": (["sanitize", "{F}/mmengine/iter_4.pth", "--dry-run"], 1),
    "sanitize_mmengine_drop": (["sanitize", "{F}/mmengine/iter_4.pth", "--keep-unknown", "drop",
                                "--dry-run"], 0),
    "sanitize_unsafe": (["sanitize", "{F}/unsafe_exec.pt", "-o", "clean.pt"], 4),
}


def render(name: str, tmp_path: Path) -> str:
    argv, code = CASES[name]
    scratch = tmp_path / "t"
    scratch.mkdir()
    for a in argv:
        if "{T}" in a:
            rel = a.replace("{T}/", "")
            shutil.copy(FIXTURES / rel, scratch / rel)
    args = [a.replace("{F}", "fixtures").replace("{T}", "t") for a in argv]
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        (tmp_path / "fixtures").symlink_to(FIXTURES)
        result = CliRunner().invoke(cli, args, catch_exceptions=False)
    finally:
        os.chdir(cwd)
    assert result.exit_code == code, (result.stdout, result.stderr)
    text = f"$ ckpttool {' '.join(args)}\n{result.stdout}"
    if result.stderr:
        text += f"[stderr]\n{result.stderr}"
    return text + f"[exit {result.exit_code}]\n"


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str, tmp_path: Path) -> None:
    got = render(name, tmp_path)
    path = GOLDEN / f"{name}.txt"
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(got)
    assert got == path.read_text()
