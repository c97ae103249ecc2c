"""A real two-rank DCP checkpoint: two processes (gloo on localhost), an MLP sharded with FSDP2
``fully_shard`` on a CPU mesh, AdamW stepped twice, saved by ``dcp.save`` from
``get_state_dict`` (optimizer state keyed by parameter name, every tensor a DTensor sharded on
dim 0 across both ranks), plus ``extra.col``: a 4x6 DTensor sharded on dim 1.

    python tests/make_dcp2.py OUTDIR              (~8 s)
    python tests/make_dcp2.py --load DIR OUT.pt   resume from DIR on two ranks (dcp.load into
        the get_state_dict layout, set_state_dict), record the lr of each group, then save the
        full state (model and optimizer, gathered on rank 0) to OUT.pt
"""
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

def _model(world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    return model


def loader(rank, world, port, src, out):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                             set_state_dict)
        model = _model(world)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.ones(3, 4)).sum().backward()  # make the state to load into
        opt.step()
        msd, osd = get_state_dict(model, opt)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=src)
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        full = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True,
                                                                   cpu_offload=True))
        if rank == 0:
            torch.save({"model": full[0], "optim": full[1],
                        "lrs": [g["lr"] for g in opt.param_groups]}, out)
    finally:
        dist.destroy_process_group()


def worker(rank, world, port, out):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(2):
            opt.zero_grad()
            model(torch.ones(3, 4)).sum().backward()
            opt.step()
        msd, osd = get_state_dict(model, opt)
        # and a tensor sharded on dim 1 (column chunks, not rows)
        from torch.distributed.tensor import Shard, distribute_tensor
        col = distribute_tensor(torch.arange(24.0).reshape(4, 6), mesh, [Shard(1)])
        dcp.save({"model": msd, "optim": osd, "extra": {"col": col}}, checkpoint_id=out)
    finally:
        dist.destroy_process_group()

def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


if __name__ == "__main__":
    for attempt in range(3):  # another process may take the free port before the ranks bind it
        try:
            if sys.argv[1] == "--load":
                mp.spawn(loader, args=(2, _free_port(), sys.argv[2], sys.argv[3]), nprocs=2,
                         join=True)
            else:
                mp.spawn(worker, args=(2, _free_port(), sys.argv[1]), nprocs=2, join=True)
            break
        except mp.ProcessRaisedException:
            if attempt == 2:
                raise
    print("ok")
