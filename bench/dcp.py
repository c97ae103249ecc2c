#!/usr/bin/env python
"""DCP benchmark: ckpttool against torch's own tools on a ~2 GB two-rank DCP folder.

    python bench/dcp.py [--quick] [--runs N] [--out bench/results-dcp.md] [--keep]

* builds (or reuses, cached under bench/out/dcp-<size>/ with a JSON sidecar) a DCP folder
  written by real torch.distributed: two processes (gloo on localhost), an MLP of 10
  Linear(4096, 4096) layers sharded with FSDP2 ``fully_shard`` on a CPU mesh, AdamW stepped
  once, ``dcp.save({"model": ..., "optim": ...})`` from ``get_state_dict``: params + exp_avg +
  exp_avg_sq, ~2.0 GB in two data files (--quick: Linear(1024, 1024), ~130 MB);
* measures, each as a fresh subprocess (one warm-up run, then the median of --runs):
  ``ckpttool show DIR`` against torch's own metadata read
  (``FileSystemReader(DIR).read_metadata()`` + listing each entry's size: what a user runs to
  see what a folder holds); ``ckpttool to-file DIR OUT`` against
  ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save(DIR, OUT)``; wall time and
  peak RSS (/usr/bin/time -f %M of the child), ratios in the same run;
* checks once that both files hold the same tensors (torch.equal, by name and id);
* prints a markdown table (with a machine header) and writes it to --out.

Process launching, timing and formatting come from bench/run.py, imported as a module.
Outputs are deleted after each run; the folder is deleted at the end unless --keep.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
OUTDIR = HERE / "out"


sys.path.insert(0, str(HERE))  # bench/run.py: launching, timing, peak RSS, formatting
import run  # noqa: E402
PY = run.PY
MB, MIB = run.MB, run.MIB
SCRATCH = OUTDIR / "dcp-scratch"
run.OUTDIR = SCRATCH

BUILD = r'''
import os, socket, sys, torch, torch.distributed as dist, torch.multiprocessing as mp

def worker(rank, world, port, out, width, layers):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(2, width)).sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=out)
    dist.destroy_process_group()

if __name__ == "__main__":
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    mp.spawn(worker, args=(2, port, sys.argv[1], int(sys.argv[2]), int(sys.argv[3])), nprocs=2)
'''

TORCH_SHOW = r'''
import sys
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
meta = FileSystemReader(sys.argv[1]).read_metadata()
n = 0
for fqn, md in meta.state_dict_metadata.items():
    if isinstance(md, TensorStorageMetadata):
        print(fqn, tuple(md.size), md.properties.dtype, len(md.chunks))
        n += 1
print(n, "tensors")
'''

TORCH_TO_FILE = r'''
import sys
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
dcp_to_torch_save(sys.argv[1], sys.argv[2])
'''

COMPARE = r'''
import sys, torch
a = torch.load(sys.argv[1], mmap=True, weights_only=True)
b = torch.load(sys.argv[2], mmap=True, weights_only=True)
assert list(a["model"]) == list(b["model"])
for k in a["model"]:
    assert torch.equal(a["model"][k], b["model"][k]), k
names = [n for g in b["optim"]["param_groups"] for n in g["param_names"]]
assert names == [n for g in a["optim"]["param_groups"] for n in g["params"]]
for i, n in enumerate(names):
    for k, v in a["optim"]["state"][n].items():
        assert torch.equal(v, b["optim"]["state"][i][k]), (n, k)
print("same", len(a["model"]), "model tensors,", len(names), "params of state")
'''


def build(folder: pathlib.Path, width: int, layers: int, log) -> None:
    side = folder.with_suffix(".json")
    want = {"width": width, "layers": layers, "builder": BUILD}
    if folder.is_dir() and side.exists() and json.loads(side.read_text()) == want:
        log(f"reusing {folder}")
        return
    shutil.rmtree(folder, ignore_errors=True)
    log(f"building {folder} (2 ranks, {layers} x Linear({width}, {width}), AdamW)")
    script = SCRATCH / "build_dcp.py"  # mp.spawn's children import the main module: a file
    script.write_text(BUILD)
    subprocess.run([PY, str(script), str(folder), str(width), str(layers)], check=True)
    side.write_text(json.dumps(want))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--quick", action="store_true", help="~130 MB instead of ~2 GB")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results-dcp.md"))
    ap.add_argument("--keep", action="store_true", help="keep the built folder")
    a = ap.parse_args()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    run.RUNS = a.runs  # for the machine header
    width, layers = (1024, 10) if a.quick else (4096, 10)
    folder = OUTDIR / f"dcp-w{width}"
    build(folder, width, layers, log)
    size = sum(p.stat().st_size for p in folder.iterdir())
    for p in folder.iterdir():
        run.warm_page_cache(p)
    ours_out = SCRATCH / "ours.pt"
    torch_out = SCRATCH / "torch.pt"

    def clean() -> None:
        ours_out.unlink(missing_ok=True)
        torch_out.unlink(missing_ok=True)
    tool = run.ckpttool_cmd()
    rows = []
    log("show")
    ours_show = run.measure([*tool, "show", str(folder)], runs=a.runs)
    torch_show = run.measure([PY, "-c", TORCH_SHOW, str(folder)], runs=a.runs)
    rows.append(("show DIR", "torch FileSystemReader.read_metadata() + list", ours_show,
                 torch_show))
    log("to-file")
    ours_tf = run.measure([*tool, "to-file", str(folder), str(ours_out)], before=clean,
                          runs=a.runs)
    torch_tf = run.measure([PY, "-c", TORCH_TO_FILE, str(folder), str(torch_out)],
                           before=clean, runs=a.runs)
    rows.append(("to-file DIR OUT", "format_utils.dcp_to_torch_save", ours_tf, torch_tf))
    clean()
    subprocess.run([*tool, "to-file", str(folder), str(ours_out)], check=True,
                   capture_output=True)
    subprocess.run([PY, "-c", TORCH_TO_FILE, str(folder), str(torch_out)], check=True)
    same = subprocess.run([PY, "-c", COMPARE, str(torch_out), str(ours_out)], check=True,
                          capture_output=True, text=True).stdout.strip()
    clean()

    lines = run.machine_header({}, a.quick, ("dcp",))
    lines[0] = "# ckpttool DCP benchmark" + (" (--quick)" if a.quick else "")
    lines += [f"DCP folder: {folder.name}, 2 ranks, {size / MB:.0f} MB "
              f"({size / MIB:.0f} MiB) in 2 data files; medians of {a.runs} runs after a "
              "warm-up run, page cache warm.", "",
              "| operation | ckpttool | peak RSS | reference | ref time | ref peak RSS | "
              "time ratio | RSS ratio |", "|---|---|---|---|---|---|---|---|"]
    for op, ref, ours, theirs in rows:
        if not (ours.ok and theirs.ok):
            lines.append(f"| {op} | {ours.error or ''} | | {ref} | {theirs.error or ''} | | | |")
            continue
        lines.append(f"| `{op}` | {ours.wall:.2f} s | {ours.rss_bytes / MIB:.0f} MiB | {ref} | "
                     f"{theirs.wall:.2f} s | {theirs.rss_bytes / MIB:.0f} MiB | "
                     f"{ours.wall / theirs.wall:.2f}x | "
                     f"{ours.rss_bytes / theirs.rss_bytes:.2f}x |")
    lines += ["", f"Check: the two files of to-file hold the same tensors ({same})."]
    text = "\n".join(lines) + "\n"
    print(text)
    pathlib.Path(a.out).write_text(text)
    if not a.keep:
        shutil.rmtree(folder, ignore_errors=True)
        folder.with_suffix(".json").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
