"""Regenerate ``tests/security/fsdp2_dtensor.pt``: a real FSDP2 (``fully_shard``) checkpoint.

    /work/main/.venv/bin/python tests/security/make_dtensor.py

A tiny MLP is wrapped with ``torch.distributed.fsdp.fully_shard`` on a one-rank *fake* process
group (in-process, no network, no gloo), stepped once with AdamW, and
``{"model": model.state_dict(), "optimizer": optim.state_dict(), "step": 1}`` is saved: every
parameter and every ``exp_avg`` / ``exp_avg_sq`` is a ``DTensor`` (DeviceMesh, Shard, DTensorSpec,
TensorMeta, mesh layout classes). It runs in its own process because it initialises a process
group; the corpus copies the checked-in file because building it takes ~3 s (the bytes differ a
little between runs, so it is not rebuilt for every test run).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "fsdp2_dtensor.pt"


def main() -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
                                    torch.nn.Linear(4, 2))
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.randn(2, 3)).sum().backward()
        opt.step()
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 1}, buf)
    finally:
        dist.destroy_process_group()
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    out.write_bytes(buf.getvalue())
    print(f"wrote {out} ({len(buf.getvalue())} bytes)")


if __name__ == "__main__":
    main()
