#!/usr/bin/env python
"""Build (or validate) one benchmark checkpoint shaped like a real training checkpoint.

    python bench/make_ckpt.py --width 1024 --out bench/out/big.pt     # ~4.04 GB, 1174 records
    python bench/make_ckpt.py --validate bench/out/big.pt --width 1024
    python bench/make_ckpt.py --optim sgd --width 712 --out bench/out/sgd.pt   # ~1.30 GB, 588 records

Layout (what torch.save writes, nothing faked):

    {"epoch": 3, "global_step": 1200,
     "model": state_dict of a GPT-like stack (24 blocks, 293 parameters + 2 buffers),
     "optimizer": torch.optim.Adam state_dict (2 param groups with equal
                  hyperparameters; per parameter: step, exp_avg, exp_avg_sq),
     "scheduler": a real torch.optim.lr_scheduler.StepLR state_dict}

With --optim sgd the optimizer is a torch.optim.SGD(momentum=0.9) state_dict instead
(per parameter: momentum_buffer only, no step), so the file is model + one buffer:
2 x params x 4 bytes (width 712: 163.0M params, 1.30 GB, 588 records).

The state dicts are assembled directly from tensors (no 336M-parameter
optimizer step), so building the 4 GB file needs ~4 GB of RAM, not 3x that.
The param_groups and the scheduler state come from a real Adam (or SGD) + StepLR
stepped 1200 times over two tiny parameters, then get the real parameter
indices, so their keys are exactly what this torch version writes.

--validate loads the file with torch.load(mmap=True, weights_only=True), checks
the record count, and feeds the optimizer/scheduler state to
torch.optim.Adam.load_state_dict / StepLR.load_state_dict over parameters of
the right shapes (meta tensors; real CPU tensors plus one real Adam step when
the model is small); with --optim sgd the same through torch.optim.SGD.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import zipfile

LAYERS = 24
STEPS = 1200
EPOCH = 3
LR = 3e-4
MOMENTUM = 0.9
OPTIMS = ("adam", "sgd")


def spec(width: int, optim: str = "adam") -> dict:
    """Parameter/buffer names and shapes for a GPT-like model of the given width."""
    d = width
    vocab, ctx, hidden = 16 * d, d, 4 * d
    params: list[tuple[str, tuple[int, ...], int]] = []  # (name, shape, group)
    buffers: list[tuple[str, tuple[int, ...], str]] = []  # (name, shape, dtype)
    order: list[str] = []  # model state_dict order

    def p(name, shape, group):
        params.append((name, shape, group))
        order.append(name)

    def b(name, shape, dtype):
        buffers.append((name, shape, dtype))
        order.append(name)

    # group 0: matrices / embeddings, group 1: biases and norms (equal hyperparameters)
    p("tok_emb.weight", (vocab, d), 0)
    p("pos_emb.weight", (ctx, d), 0)
    b("pos_ids", (ctx,), "int64")
    for i in range(LAYERS):
        pre = f"blocks.{i}."
        p(pre + "ln1.weight", (d,), 1)
        p(pre + "ln1.bias", (d,), 1)
        p(pre + "attn.qkv.weight", (3 * d, d), 0)
        p(pre + "attn.qkv.bias", (3 * d,), 1)
        p(pre + "attn.proj.weight", (d, d), 0)
        p(pre + "attn.proj.bias", (d,), 1)
        p(pre + "ln2.weight", (d,), 1)
        p(pre + "ln2.bias", (d,), 1)
        p(pre + "mlp.fc1.weight", (hidden, d), 0)
        p(pre + "mlp.fc1.bias", (hidden,), 1)
        p(pre + "mlp.fc2.weight", (d, hidden), 0)
        p(pre + "mlp.fc2.bias", (d,), 1)
    p("ln_f.weight", (d,), 1)
    p("ln_f.bias", (d,), 1)
    p("head.weight", (vocab, d), 0)
    b("causal_mask", (ctx, ctx), "bool")

    n_params = 0
    for _, shape, _ in params:
        n = 1
        for s in shape:
            n *= s
        n_params += n
    return {
        "width": d,
        "params": params,
        "buffers": buffers,
        "order": order,
        "n_params": n_params,
        # model tensors + (step, exp_avg, exp_avg_sq) per parameter (Adam) or
        # momentum_buffer per parameter (SGD)
        "records": len(params) + len(buffers) + (3 if optim == "adam" else 1) * len(params),
    }


def make_optimizer(torch, optim: str, groups):
    if optim == "sgd":
        return torch.optim.SGD(groups, lr=LR, momentum=MOMENTUM)
    return torch.optim.Adam(groups, lr=LR)


def real_templates(torch, optim: str = "adam"):
    """param_groups template + StepLR state_dict from a real (tiny) Adam/SGD + StepLR run
    (and Adam's step tensor; None for SGD, which keeps no step)."""
    a = torch.nn.Parameter(torch.ones(2, 2))
    c = torch.nn.Parameter(torch.ones(2))
    opt = make_optimizer(torch, optim, [{"params": [a]}, {"params": [c]}])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1000, gamma=0.5)
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=False)
        a.grad = torch.full_like(a, 1e-3)
        c.grad = torch.full_like(c, 1e-3)
        opt.step()
        sched.step()
    osd = opt.state_dict()
    step_tensor = osd["state"][0].get("step")
    if optim == "sgd":
        assert set(osd["state"][0]) == {"momentum_buffer"}, list(osd["state"][0])
    return osd["param_groups"], sched.state_dict(), step_tensor


def group_params(sp: dict) -> list[list[int]]:
    """Optimizer param indices: group 0 params first, then group 1 (Adam numbering)."""
    g0 = [i for i, (_, _, g) in enumerate(sp["params"]) if g == 0]
    g1 = [i for i, (_, _, g) in enumerate(sp["params"]) if g == 1]
    return [g0, g1]


def build(width: int, out: str, optim: str = "adam") -> None:
    import torch

    sp = spec(width, optim)
    groups_tpl, sched_sd, step_tpl = real_templates(torch, optim)
    gen = torch.Generator().manual_seed(width)

    by_name = {}
    for name, shape, _ in sp["params"]:
        t = torch.empty(shape, dtype=torch.float32)
        if name.endswith(".weight") and len(shape) == 1:
            t.fill_(1.0)  # norm weights
        elif len(shape) == 1:
            t.zero_()  # biases
        else:
            t.normal_(0.0, 0.02, generator=gen)
        by_name[name] = t
    ctx = width
    bufs = {
        "pos_ids": torch.arange(ctx, dtype=torch.int64),
        "causal_mask": torch.ones(ctx, ctx, dtype=torch.bool).tril_(),
    }
    model = {}
    for name in sp["order"]:
        model[name] = by_name[name] if name in by_name else bufs[name]

    # Optimizer state in the optimizer's numbering (group 0 first, then group 1).
    groups = group_params(sp)
    state = {}
    idx = 0
    for g in groups:
        for pi in g:
            _, shape, _ = sp["params"][pi]
            if optim == "sgd":
                buf = torch.empty(shape, dtype=torch.float32).normal_(0.0, 1e-2, generator=gen)
                state[idx] = {"momentum_buffer": buf}
                idx += 1
                continue
            ea = torch.empty(shape, dtype=torch.float32).normal_(0.0, 1e-3, generator=gen)
            eas = torch.empty(shape, dtype=torch.float32).uniform_(0.0, 1e-6, generator=gen)
            state[idx] = {"step": step_tpl.clone(), "exp_avg": ea, "exp_avg_sq": eas}
            idx += 1
    param_groups = []
    start = 0
    for tpl, g in zip(groups_tpl, groups):
        pg = dict(tpl)
        pg["params"] = list(range(start, start + len(g)))
        start += len(g)
        param_groups.append(pg)

    ckpt = {
        "epoch": EPOCH,
        "global_step": STEPS,
        "model": model,
        "optimizer": {"state": state, "param_groups": param_groups},
        "scheduler": sched_sd,
    }
    tmp = out + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, out)


def validate(path: str, width: int, optim: str = "adam") -> dict:
    import torch

    sp = spec(width, optim)
    with zipfile.ZipFile(path) as z:
        records = sum(1 for n in z.namelist() if "/data/" in n and not n.endswith("/"))
    if records != sp["records"]:
        raise SystemExit(f"{path}: {records} records, expected {sp['records']}")
    ck = torch.load(path, mmap=True, weights_only=True)
    assert set(ck) == {"epoch", "global_step", "model", "optimizer", "scheduler"}, list(ck)
    assert list(ck["model"]) == sp["order"]
    for name, shape, _ in sp["params"]:
        assert tuple(ck["model"][name].shape) == shape, name

    small = sp["n_params"] <= 50_000_000
    device = "cpu" if small else "meta"
    named = {n: torch.nn.Parameter(torch.zeros(s, device=device)) for n, s, _ in sp["params"]}
    plist = [named[n] for n, _, _ in sp["params"]]
    groups = [{"params": [plist[i] for i in g]} for g in group_params(sp)]
    opt = make_optimizer(torch, optim, groups)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1000, gamma=0.5)
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    assert len(opt.state) == len(plist)
    if small:
        for prm in plist:
            prm.grad = torch.full_like(prm, 1e-3)
        opt.step()
        sched.step()
    if optim == "sgd":
        for st in opt.state.values():
            assert set(st) == {"momentum_buffer"}, list(st)
    return {"records": records, "n_params": sp["n_params"], "optim": optim,
            "real_optimizer_step": small}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, required=True)
    ap.add_argument("--optim", choices=OPTIMS, default="adam",
                    help="optimizer state: adam (step, exp_avg, exp_avg_sq; default) or sgd "
                         "(SGD momentum=0.9: momentum_buffer)")
    ap.add_argument("--out", help="build this file")
    ap.add_argument("--validate", help="validate this file and print a JSON summary")
    a = ap.parse_args()
    if a.out:
        build(a.width, a.out, a.optim)
    path = a.validate or a.out
    if path:
        info = validate(path, a.width, a.optim)
        info["size"] = os.path.getsize(path)
        print(json.dumps(info))
    if not (a.out or a.validate):
        sp = spec(a.width, a.optim)
        print(json.dumps({k: sp[k] for k in ("width", "n_params", "records")}))


if __name__ == "__main__":
    sys.exit(main())
