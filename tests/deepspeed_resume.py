#!/usr/bin/env python
"""Resume a DeepSpeed run folder of fixtures/deepspeed_ranks/ with DeepSpeed itself, on two
ranks, and print the lr the optimizer uses. Run by hand (deepspeed is not in the test venv):

    /work/fxvenv/bin/python tests/deepspeed_resume.py CASE RUN_FOLDER [STEPS]

CASE names the configuration the folder was written with (zero1, zero2, ... as in
fixtures/make_deepspeed_ranks.py, whose config is reused). Each rank builds the engine,
``engine.load_checkpoint(RUN_FOLDER)``, then takes STEPS (default 2) training steps; rank 0
prints one JSON line per rank: the groups' lr, weight_decay and betas after the load and the
lr each step used (read from the optimizer's param groups right before ``engine.step()``).
The ds_config saved in the checkpoint is not read: DeepSpeed uses the config given here.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "fixtures"))

import make_deepspeed_ranks as gen


def run_rank(name: str, folder: str, steps: int) -> None:
    import deepspeed
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(0)
    deepspeed.init_distributed(dist_backend="gloo")
    case = gen.CASES[name]
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    engine, _, _, _ = deepspeed.initialize(model=model, config=gen.config(case),
                                           **gen.client_objects(case, model))
    path, _ = engine.load_checkpoint(folder)
    assert path is not None, f"nothing loaded from {folder}"
    out = {"rank": torch.distributed.get_rank(),
           "loaded_lr": [g["lr"] for g in engine.optimizer.param_groups],
           "loaded_weight_decay": [g["weight_decay"] for g in engine.optimizer.param_groups],
           "loaded_betas": [list(g["betas"]) for g in engine.optimizer.param_groups],
           "step_lr": []}
    g = torch.Generator().manual_seed(1234)
    x, y = torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g)
    for _ in range(steps):
        engine.backward(F.mse_loss(engine(x), y))
        out["step_lr"].append([g["lr"] for g in engine.optimizer.param_groups])
        engine.step()
    outs: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(outs, out)
    if out["rank"] == 0:
        for o in outs:
            print(json.dumps(o))
    torch.distributed.destroy_process_group()


def main() -> None:
    if sys.argv[1] == "--rank":
        run_rank(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    name, folder = sys.argv[1], sys.argv[2]
    steps = sys.argv[3] if len(sys.argv) > 3 else "2"
    port = gen.free_port()
    procs = []
    for rank in range(gen.WORLD):
        env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(gen.WORLD),
                   LOCAL_WORLD_SIZE=str(gen.WORLD), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, __file__, "--rank", name, folder, steps],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate() for p in procs]
    if any(p.returncode for p in procs):
        for o, e in outs:
            sys.stderr.write(o + e)
        raise SystemExit("a rank failed")
    sys.stdout.write(outs[0][0])


if __name__ == "__main__":
    main()
