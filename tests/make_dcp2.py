"""A real two-rank DCP checkpoint: two processes (gloo on localhost), an MLP sharded with FSDP2
``fully_shard`` on a CPU mesh, AdamW stepped twice, saved by ``dcp.save`` from
``get_state_dict`` (optimizer state keyed by parameter name, every tensor a DTensor sharded on
dim 0 across both ranks).

    python tests/make_dcp2.py OUTDIR      (~8 s)
"""
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=out)
    finally:
        dist.destroy_process_group()

if __name__ == "__main__":
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    mp.spawn(worker, args=(2, port, sys.argv[1]), nprocs=2, join=True)
    print("ok")
