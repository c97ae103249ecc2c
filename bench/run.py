#!/usr/bin/env python
"""One-command benchmark of ckpttool against torch on a ~4 GB training checkpoint.

    /work/venv/bin/python bench/run.py [--quick] [--keep] [--out bench/results.md]
    /work/venv/bin/python bench/run.py --only convert [--out FILE]
    /work/venv/bin/python bench/run.py --only sanitize [--width 32] [--out FILE]

* builds (or reuses, cached under bench/out/) a ~4.04 GB and a ~40 MB checkpoint of the
  same structure (1174 records; see bench/make_ckpt.py); --quick uses ~400 MB / ~4 MB;
* for `ckpttool convert --to adam` a ~1.30 GB SGD-momentum checkpoint of the same model
  (588 records; make_ckpt.py --optim sgd; --quick: ~130 MB), measured against torch.load +
  the same conversion by hand + torch.save; `--only convert` runs just that part, `--only
  main` everything else;
* `--only diff`: `ckpttool diff` and `diff --values` of the big file and its "next epoch"
  (every tensor x 1.001, built once with torch and cached beside it), against two
  torch.load(mmap=True) and a comparing walk (`--quick --only diff --runs 1` is the small run);
* for `ckpttool sanitize -o` the big file plus an argparse Namespace, numpy scalars, a numpy
  array and numpy's RNG state (`--only sanitize`; `--width 32` for a 4 MB smoke run), in
  pairs with cp + sync;
* runs every operation as a fresh subprocess: one warm-up run (also warms the page
  cache), then 3 timed runs; reports the median wall time and the median peak RSS of
  the child (os.wait4 rusage ru_maxrss, exact for the child process);
* prints a markdown table and writes it (with a machine header) to --out.

Edit outputs are always deleted; the built inputs are deleted at the end unless --keep.
The convert rows go to a second, small table under the main one.
A ckpttool command that does not exist yet is reported as "not available".
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
OUTDIR = HERE / "out"
PY = sys.executable
RUNS = 3

# widths -> (label, approx size); see make_ckpt.spec (params ~= 321*w^2)
FULL = {"big": (1024, "4 GB"), "small": (102, "40 MB")}
QUICK = {"big": (322, "400 MB"), "small": (32, "4 MB")}
# the SGD-momentum checkpoint for `convert --to adam`: model + momentum_buffer,
# 2 x params x 4 bytes (width 712: 163.0M params, 1.304 GB; width 225: 0.131 GB)
SGD_FULL = (712, "1.3 GB")
SGD_QUICK = (225, "130 MB")
PARTS = ("main", "convert", "check", "diff", "sanitize")
PAIRS: dict[str, tuple[list[float], list[float], list[int], list[float]]] = {}

# Peak RSS: ru_maxrss from wait4() of the measured process.  A child forked
# (vfork/posix_spawn) straight from this Python harness inherits the harness's
# own RSS high-water mark across exec (cp showed 26 MiB instead of 2 MiB), so
# when GNU time is present it is the (2 MiB) launcher: it wait4()s the child
# and prints that child's ru_maxrss (%M, KiB).  Its start-up adds ~1 ms of wall.
TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None

MB = 1_000_000
MIB = 1024 * 1024

# Children run with bytecode caching, as after any normal install: a session environment may
# set PYTHONDONTWRITEBYTECODE=1 (this VM does), which makes every start compile every module
# (~50 ms for ckpttool). The warm-up run writes the .pyc files.
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


# ----------------------------------------------------------------------------- build

def builder_hash() -> str:
    return hashlib.sha256((HERE / "make_ckpt.py").read_bytes()).hexdigest()[:16]


def ckpt_path(width: int, optim: str = "adam") -> pathlib.Path:
    return OUTDIR / (f"ckpt-w{width}.pt" if optim == "adam" else f"ckpt-{optim}-w{width}.pt")


def ensure_ckpt(width: int, log, optim: str = "adam") -> pathlib.Path:
    """Reuse bench/out/ckpt[-sgd]-w{width}.pt if its sidecar says it is valid, else (re)build it."""
    path = ckpt_path(width, optim)
    side = path.with_suffix(".json")
    bh = builder_hash()
    if path.exists() and side.exists():
        try:
            meta = json.loads(side.read_text())
            st = path.stat()
            if (meta.get("builder") == bh and meta.get("width") == width
                    and meta.get("optim", "adam") == optim
                    and meta.get("size") == st.st_size and meta.get("mtime_ns") == st.st_mtime_ns):
                log(f"reusing {path.name} ({st.st_size / 1e9:.2f} GB)")
                return path
        except (ValueError, OSError):
            pass
    cmd = [PY, str(HERE / "make_ckpt.py"), "--width", str(width), "--optim", optim]
    if path.exists() and not side.exists():
        # present but never validated (e.g. built by hand): validate instead of rebuilding
        log(f"validating existing {path.name} ...")
        r = subprocess.run(cmd + ["--validate", str(path)], capture_output=True, text=True)
        if r.returncode != 0:
            log(f"  invalid ({r.stderr.strip().splitlines()[-1:]}), rebuilding")
            path.unlink()
    if not path.exists():
        # input + one edit output + slack (adam: 3 tensors per param in and out; sgd: 2 in,
        # 3 out after convert --to adam)
        per_param = 12 * 2 if optim == "adam" else 8 + 12
        need = per_param * 321 * width * width + 1_000_000_000
        free = shutil.disk_usage(OUTDIR).free
        if free < need:
            raise SystemExit(f"not enough disk space in {OUTDIR}: {free / 1e9:.1f} GB free, need ~{need / 1e9:.1f} GB")
        log(f"building {path.name} (width {width}) ...")
        t0 = time.perf_counter()
        r = subprocess.run(cmd + ["--out", str(path)], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"building {path} failed:\n{r.stderr}")
        log(f"  built in {time.perf_counter() - t0:.1f} s")
    else:
        r = subprocess.run(cmd + ["--validate", str(path)], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"validating {path} failed:\n{r.stderr}")
    info = json.loads(r.stdout.strip().splitlines()[-1])
    st = path.stat()
    side.write_text(json.dumps({"builder": bh, "width": width, "optim": optim,
                                "size": st.st_size, "mtime_ns": st.st_mtime_ns, **info}))
    return path


def warm_page_cache(path: pathlib.Path) -> None:
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 * MIB)
        while f.readinto(buf):
            pass


# ----------------------------------------------------------------------------- measure

class Result:
    def __init__(self, walls=(), rss_kib=(), error=None):
        self.walls = list(walls)
        self.rss_kib = list(rss_kib)
        self.error = error

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.walls)

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)

    @property
    def rss_bytes(self) -> float:
        return statistics.median(self.rss_kib) * 1024


def run_once(argv, before=None):
    """Run argv as a fresh child; return (wall s, peak RSS KiB, exit code, stdout tail, stderr)."""
    if before:
        before()
    so = OUTDIR / "_stdout.txt"
    se = OUTDIR / "_stderr.txt"
    rf = OUTDIR / "_rss.txt"
    rf.unlink(missing_ok=True)
    full = [TIME, "-f", "%M", "-o", str(rf), *argv] if TIME else list(argv)
    with open(so, "wb") as fo, open(se, "wb") as fe:
        t0 = time.perf_counter()
        p = subprocess.Popen(full, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, cwd=REPO,
                             env=CHILD_ENV)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        rc = os.waitstatus_to_exitcode(status)
    rss = ru.ru_maxrss
    if TIME:
        try:
            rss = int(rf.read_text().split()[-1])
        except (OSError, ValueError, IndexError):
            pass
    out = so.read_bytes()[-2000:].decode(errors="replace")
    err = se.read_bytes()[-4000:].decode(errors="replace")
    return wall, rss, rc, out, err


def measure(argv, before=None, check=None, runs=None, ok_rc=(0,)) -> Result:
    """One warm-up run (checked), then `runs` timed runs; an exit code outside ``ok_rc`` is a
    failure (``diff`` exits 1 for "different")."""
    _, _, rc, out, err = run_once(argv, before)
    if rc not in ok_rc:
        if rc == 2 and "No such command" in err:
            return Result(error="not available")
        last = (err.strip().splitlines() or ["?"])[-1]
        if "No module named 'ckpttool" in err:
            return Result(error="not available")
        return Result(error=f"failed (exit {rc}: {last[:120]})")
    if check:
        problem = check()
        if problem:
            return Result(error=f"bad output: {problem}")
    walls, rss = [], []
    for _ in range(runs or RUNS):
        w, m, rc, _, err = run_once(argv, before)
        if rc not in ok_rc:
            last = (err.strip().splitlines() or ["?"])[-1]
            return Result(error=f"failed (exit {rc}: {last[:120]})")
        walls.append(w)
        rss.append(m)
    return Result(walls, rss)


def pairs_with_cp_sync(argv, src, out, remove, log):
    """``argv`` (which writes ``out`` from ``src``) and ``cp src out && sync out`` as pairs
    run in turn (the disk's speed drifts over minutes; a pair sees the same disk), at least 5:
    (ratios, walls, peak RSS KiB, cp walls)."""
    cp_argv = ["sh", "-c", 'cp "$1" "$2" && sync "$2"', "sh", str(src), str(out)]
    ratios, walls, rss, cp_walls = [], [], [], []
    for _ in range(max(RUNS, 5)):
        wc, _, rc1, _, _ = run_once(cp_argv, remove)
        w, m, rc2, _, err = run_once(argv, remove)
        if rc1 or rc2:
            log(f"  failed: {err[-200:]}")
            break
        ratios.append(w / wc)
        walls.append(w)
        rss.append(m)
        cp_walls.append(wc)
    return ratios, walls, rss, cp_walls


def ckpttool_cmd() -> list[str]:
    exe = pathlib.Path(PY).parent / "ckpttool"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("ckpttool")
    return [found] if found else [PY, "-m", "ckpttool"]


VERIFY = r"""
import sys, json, torch
path, kind = sys.argv[1], sys.argv[2]
locs = set()
def ml(storage, loc):
    locs.add(loc)
    return storage
ck = torch.load(path, mmap=True, weights_only=True, map_location=ml)
groups = ck["optimizer"]["param_groups"]
n = sum(len(g["params"]) for g in groups)
assert n == len(ck["optimizer"]["state"]) == 293, n
if kind == "lr":
    assert all(abs(g["lr"] - 1e-4) < 1e-12 for g in groups), [g["lr"] for g in groups]
if kind == "move":
    assert "cuda:1" in locs, locs
if kind == "merge":
    assert len(groups) == 1, len(groups)
if kind == "amsgrad":
    assert all(g["amsgrad"] is True for g in groups)
    for st in ck["optimizer"]["state"].values():
        m = st["max_exp_avg_sq"]
        assert m.shape == st["exp_avg"].shape and m.dtype == st["exp_avg"].dtype
        assert not m.any()
print("ok")
"""


def verifier(out: pathlib.Path, kind: str):
    def check():
        r = subprocess.run([PY, "-c", VERIFY, str(out), kind], capture_output=True, text=True)
        if r.returncode != 0:
            return (r.stderr.strip().splitlines() or ["?"])[-1][:150]
        return None
    return check


WALK = r"""
import sys, torch
sd = torch.load(sys.argv[1], mmap=True, weights_only=True)
n = 0
shapes = set()
for pid, st in sd["optimizer"]["state"].items():
    for k, v in st.items():
        if isinstance(v, torch.Tensor):
            n += v.numel()
            shapes.add((k, tuple(v.shape), str(v.dtype)))
for g in sd["optimizer"]["param_groups"]:
    _ = (g["lr"], len(g["params"]))
print(n, len(shapes))
"""

AMSGRAD_SAVE = r"""
import sys, torch
ck = torch.load(sys.argv[1], weights_only=True)
for g in ck["optimizer"]["param_groups"]:
    g["amsgrad"] = True
for st in ck["optimizer"]["state"].values():
    st["max_exp_avg_sq"] = torch.zeros_like(st["exp_avg"])
torch.save(ck, sys.argv[2])
"""

# `convert --to adam` by hand: the formulas of ckpttool/edits/convert.py (read_moments for SGD,
# target_values for Adam) with torch ops. SGD keeps no step, so t is ckpttool's default step
# ceil(1 / (1 - beta2)) = 1000; m = momentum_buffer * (1 - momentum) / (1 - dampening) is the
# running mean of the gradient; SGD keeps no second moment, so v is, in every element, the
# tensor's mean of m**2 (in float64, at least float32's tiny), as ckpttool's _mean_square.
# exp_avg = m * (1 - b1**t), exp_avg_sq = v * (1 - b2**t).
CONVERT_SAVE = r"""
import math, sys, torch
ck = torch.load(sys.argv[1], weights_only=True)
opt = ck["optimizer"]
adam = torch.optim.Adam([torch.zeros(1)]).defaults  # this torch's Adam defaults
b1, b2 = adam["betas"]
t = math.ceil(1 / (1 - b2))  # 1000
groups = []
for g in opt["param_groups"]:
    c = (1 - g["momentum"]) / (1 - g["dampening"])
    for pid in g["params"]:
        m = opt["state"][pid]["momentum_buffer"] * c
        v = max(float(m.double().square().mean()), torch.finfo(torch.float32).tiny)
        opt["state"][pid] = {"step": torch.tensor(float(t)),
                             "exp_avg": m * (1 - b1 ** t),
                             "exp_avg_sq": torch.full_like(m, v) * (1 - b2 ** t)}
    ng = dict(adam)
    ng["lr"] = g["lr"]
    if "initial_lr" in g:  # StepLR's
        ng["initial_lr"] = g["initial_lr"]
    ng["params"] = g["params"]
    groups.append(ng)
opt["param_groups"] = groups
torch.save(ck, sys.argv[2])
"""

# Checks a convert output (ckpttool's or the torch script's) against its SGD source, both
# memory-mapped: every param has exactly step / exp_avg / exp_avg_sq, the groups are Adam's
# (betas, no momentum), the values follow the formulas above (CONVERT_SAVE) on a few params
# (first, last, largest, first 1-D), and
# torch.optim.Adam + StepLR load it (over meta parameters).
CONVERT_VERIFY = r"""
import math, sys, torch
out, src = sys.argv[1], sys.argv[2]
ck = torch.load(out, mmap=True, weights_only=True)
sd = torch.load(src, mmap=True, weights_only=True)
opt, sopt = ck["optimizer"], sd["optimizer"]
groups, sgroups = opt["param_groups"], sopt["param_groups"]
assert [g["params"] for g in groups] == [g["params"] for g in sgroups], "params of the groups"
ids = [p for g in groups for p in g["params"]]
assert len(ids) == len(opt["state"]) == len(sopt["state"]) == 293, (len(ids), len(opt["state"]))
for g, sg in zip(groups, sgroups):
    assert "betas" in g, sorted(g)
    assert not {"momentum", "dampening", "nesterov"} & set(g), sorted(g)
    assert g["lr"] == sg["lr"], (g["lr"], sg["lr"])
b1, b2 = groups[0]["betas"]
t = 1000
for pid in ids:
    st = opt["state"][pid]
    assert set(st) == {"step", "exp_avg", "exp_avg_sq"}, (pid, sorted(st))
    assert st["step"].dim() == 0 and st["step"].dtype == torch.float32 and float(st["step"]) == t, st["step"]
    buf = sopt["state"][pid]["momentum_buffer"]
    for k in ("exp_avg", "exp_avg_sq"):
        assert st[k].shape == buf.shape and st[k].dtype == buf.dtype, (pid, k, st[k].shape, st[k].dtype)
group_of = {p: g for g in sgroups for p in g["params"]}
numel = {p: sopt["state"][p]["momentum_buffer"].numel() for p in ids}
one_d = [p for p in ids if sopt["state"][p]["momentum_buffer"].dim() == 1]
for pid in sorted({ids[0], ids[-1], max(ids, key=numel.get), *one_d[:1]}):
    sg, st = group_of[pid], opt["state"][pid]
    m = sopt["state"][pid]["momentum_buffer"] * ((1 - sg["momentum"]) / (1 - sg["dampening"]))
    torch.testing.assert_close(st["exp_avg"], m * (1 - b1 ** t), rtol=1e-6, atol=0)
    v = max(float(m.double().square().mean()), torch.finfo(torch.float32).tiny)
    torch.testing.assert_close(st["exp_avg_sq"], torch.full_like(m, v) * (1 - b2 ** t),
                               rtol=1e-5, atol=0)
P = {p: torch.nn.Parameter(torch.empty(sopt["state"][p]["momentum_buffer"].shape, device="meta"))
     for p in ids}
adam = torch.optim.Adam([{"params": [P[p] for p in g["params"]]} for g in groups])
sched = torch.optim.lr_scheduler.StepLR(adam, step_size=1000, gamma=0.5)
adam.load_state_dict(opt)
sched.load_state_dict(ck["scheduler"])
assert len(adam.state) == 293
print("ok")
"""


def convert_verifier(out: pathlib.Path, src: pathlib.Path):
    def check():
        r = subprocess.run([PY, "-c", CONVERT_VERIFY, str(out), str(src)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            return (r.stderr.strip().splitlines() or ["?"])[-1][:150]
        return None
    return check


# the obvious alternative to `ckpttool check`: load it all with torch and into a real Adam
# over params of the saved shapes (what the load test does on meta params), then one step
TORCH_CHECK = r"""
import sys, torch
ck = torch.load(sys.argv[1], weights_only=True)
osd = ck["optimizer"]
params = {pid: torch.zeros_like(st["exp_avg"]) for pid, st in osd["state"].items()}
groups = [{"params": [params[i] for i in g["params"]]} for g in osd["param_groups"]]
opt = torch.optim.Adam(groups)
opt.load_state_dict(osd)
for p in params.values():
    p.grad = torch.zeros_like(p)
opt.step()
print("ok")
"""

# the next "epoch" of a checkpoint, for `diff`: every tensor of model and optimizer state
# changed (x * 1.001), step + 1, epoch + 1, lr halved; built once with torch (not timed)
NEXT_EPOCH = r"""
import sys, torch
ck = torch.load(sys.argv[1], mmap=True, weights_only=True)
ck["epoch"] += 1
ck["global_step"] += 1
ck["model"] = {k: (v * 1.001 if v.is_floating_point() else v) for k, v in ck["model"].items()}
for st in ck["optimizer"]["state"].values():
    for k in list(st):
        st[k] = st[k] + 1 if k == "step" else st[k] * 1.001
for g in ck["optimizer"]["param_groups"]:
    g["lr"] /= 2
torch.save(ck, sys.argv[2])
"""

# the obvious alternative to `ckpttool diff`: two torch.load(mmap=True) and a walk comparing
# every value (torch.equal for tensors); with "values", max |b - a|, |b - a| / |a| and norms of
# the tensors that differ, as `diff --values` reports them
TORCH_DIFF = r"""
import sys, torch
a = torch.load(sys.argv[1], mmap=True, weights_only=True)
b = torch.load(sys.argv[2], mmap=True, weights_only=True)
values = len(sys.argv) > 3
out = []
def walk(x, y, p):
    if isinstance(x, torch.Tensor):
        if x.shape != y.shape or x.dtype != y.dtype:
            out.append((p, "tensor"))
        elif not torch.equal(x, y):
            if values:
                d = (y.double() - x.double())
                out.append((p, float(d.abs().max()), float(d.norm() / x.double().norm()),
                            float(x.double().norm()), float(y.double().norm())))
            else:
                out.append((p, "bytes"))
    elif isinstance(x, dict):
        for k in x:
            if k in y:
                walk(x[k], y[k], f"{p}/{k}")
            else:
                out.append((f"{p}/{k}", "removed"))
        out.extend((f"{p}/{k}", "added") for k in y if k not in x)
    elif isinstance(x, (list, tuple)):
        for i, (u, v) in enumerate(zip(x, y)):
            walk(u, v, f"{p}/{i}")
    elif x != y:
        out.append((p, "value"))
walk(a, b, "")
print(len(out))
"""

EDIT_SAVE = r"""
import sys, torch
sd = torch.load(sys.argv[1], weights_only=True)
for g in sd["optimizer"]["param_groups"]:
    g["lr"] = 1e-4
torch.save(sd, sys.argv[2])
"""


# ----------------------------------------------------------------------------- report

# the checkpoint a timm / pytorch-examples style script writes: the big file's dict plus an
# argparse Namespace, numpy scalars, a numpy array and numpy's RNG state (built from the big
# file through torch.load(mmap=True), so its tensors are the big file's)
ADD_EXTRAS = r"""
import argparse, sys
import numpy as np, torch
ck = torch.load(sys.argv[1], mmap=True, weights_only=True)
ck["args"] = argparse.Namespace(model="gpt-bench", lr=3e-4, batch_size=32, epochs=90,
                                opt="adam", weight_decay=0.0, seed=0, amp=False)
ck["best_metric"] = np.float64(0.8125)
ck["metrics"] = {"loss": np.float32(2.5), "loss_history": np.linspace(5, 2.5, 1000)}
np.random.seed(0)
ck["rng"] = {"numpy": np.random.get_state(), "torch": torch.get_rng_state()}
torch.save(ck, sys.argv[2])
"""


def sanitize_verifier(out: pathlib.Path):
    """The sanitized file loads with weights_only=True and holds the plain values."""
    def check():
        code = ("import sys, torch; ck = torch.load(sys.argv[1], mmap=True, weights_only=True); "
                "assert ck['args']['lr'] == 3e-4 and ck['best_metric'] == 0.8125; "
                "assert ck['metrics']['loss_history'].shape == (1000,); "
                "assert ck['rng']['numpy'][1].dtype == torch.uint32")
        r = subprocess.run([PY, "-c", code, str(out)], capture_output=True, text=True)
        return None if r.returncode == 0 else f"verify failed: {r.stderr.strip()[-300:]}"
    return check


def fmt_s(r: Result) -> str:
    return f"{r.wall:.3f}" if r.ok else "-"


def fmt_mib(r: Result) -> str:
    return f"{r.rss_bytes / MIB:.0f}" if r.ok else "-"


def machine_header(files: dict, quick: bool, parts=PARTS) -> list[str]:
    import importlib.metadata as md

    try:
        torch_v = md.version("torch")
    except md.PackageNotFoundError:
        torch_v = "?"
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    try:
        head = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %s"],
                              capture_output=True, text=True).stdout.strip()
    except OSError:
        head = "?"
    lines = [
        f"# ckpttool benchmark{' (--quick)' if quick else ''}"
        f"{'' if tuple(parts) == PARTS else ' (--only ' + ', '.join(parts) + ')'}",
        "",
        f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu}, {mem} RAM, "
        f"{platform.system()} {platform.release()}",
        f"- python {platform.python_version()}, torch {torch_v}",
        f"- ckpttool at git {head}",
    ]
    for key, (path, label) in files.items():
        meta = json.loads(path.with_suffix(".json").read_text())
        what = ("x 2 (model, SGD momentum_buffer)" if meta.get("optim") == "sgd"
                else "x 3 (model, exp_avg, exp_avg_sq)")
        lines.append(f"- {key} file (\"{label}\"): {path.name}, {meta['size']:,} bytes "
                     f"({meta['size'] / 1e9:.3f} GB), {meta['n_params'] / 1e6:.1f}M params "
                     f"{what}, {meta['records']} records")
    lines += [
        f"- each row: fresh subprocess, 1 warm-up run + median of {RUNS}, warm page cache; "
        "wall includes interpreter start-up (bytecode cached, as after a normal install: "
        "PYTHONDONTWRITEBYTECODE unset for the children); peak RSS = the child's ru_maxrss "
        "from wait4 "
        + ("(collected by /usr/bin/time -f %M as a 2 MiB launcher)" if TIME else "(os.wait4; includes the harness's ~25 MiB inherited at fork)"),
        "",
    ]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description="ckpttool vs torch benchmark")
    ap.add_argument("--quick", action="store_true", help="use ~400 MB / ~4 MB (and ~130 MB SGD) checkpoints instead of ~4 GB / ~40 MB (and ~1.3 GB)")
    ap.add_argument("--keep", action="store_true", help="keep the built input checkpoints in bench/out/")
    ap.add_argument("--only", choices=PARTS,
                    help="run one part: main (show, edits, torch baselines on the 4 GB / 40 MB files), "
                         "convert (SGD momentum -> Adam on the 1.3 GB file), check (check and "
                         "check --deep on the 4 GB file) or diff (diff and diff --values of the "
                         "4 GB file and its next epoch); default: all")
    ap.add_argument("--out", default=None,
                    help="markdown output (default bench/results.md; with --only the table goes to "
                         "stdout only unless --out is given, so a partial run never replaces the "
                         "full results)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per operation (median reported; default 3)")
    ap.add_argument("--width", type=int, default=None,
                    help="sanitize part only: model width of its checkpoint (default: the big "
                         "file's, 1024 = 4 GB; 32 = 4 MB for a smoke run)")
    a = ap.parse_args()
    global RUNS
    RUNS = max(1, a.runs)
    parts = (a.only,) if a.only else PARTS
    out_path = a.out or (None if a.only else str(HERE / "results.md"))

    def log(msg):
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    OUTDIR.mkdir(parents=True, exist_ok=True)
    sizes = QUICK if a.quick else FULL
    sgd_width, sgd_label = SGD_QUICK if a.quick else SGD_FULL
    du = shutil.disk_usage(OUTDIR)
    log(f"disk: {du.free / 1e9:.1f} GB free in {OUTDIR}")
    t_start = time.perf_counter()
    load_start = os.getloadavg()

    ck = ckpttool_cmd()
    log(f"ckpttool command: {' '.join(ck)}")
    files: dict[str, tuple[pathlib.Path, str]] = {}
    R: dict[str, Result] = {}

    def m(key, argv, **kw):
        log(f"{key} ...")
        r = measure(argv, **kw)
        R[key] = r
        log(f"  {fmt_s(r)} s, {fmt_mib(r)} MiB" if r.ok else f"  {r.error}")
        return r

    def remover(path: pathlib.Path):
        def rm_out():
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            os.sync()  # start every write benchmark with no dirty pages from the previous run
        return rm_out

    bl, sl = sizes["big"][1], sizes["small"][1]
    if "main" in parts:
        big = ensure_ckpt(sizes["big"][0], log)
        small = ensure_ckpt(sizes["small"][0], log)
        files["big"] = (big, bl)
        files["small"] = (small, sl)
        out_big = OUTDIR / "edit-out.pt"
        rm_out = remover(out_big)

        if shutil.disk_usage(OUTDIR).free < big.stat().st_size + 1_000_000_000:
            raise SystemExit("not enough free disk for one edit output next to the big checkpoint")

        warm_page_cache(big)
        warm_page_cache(small)

        m("pass", [PY, "-c", "pass"])
        m("import torch", [PY, "-c", "import torch"])
        m("help", ck + ["--help"])
        for key, path in (("big", big), ("small", small)):
            m(f"show {key}", ck + ["show", str(path)])
            m(f"show json {key}", ck + ["show", "--json", str(path)])
            m(f"torch full {key}", [PY, "-c", "import sys, torch; torch.load(sys.argv[1], weights_only=True)", str(path)])
            m(f"torch mmap {key}", [PY, "-c", WALK, str(path)])
        m("cp", ["cp", str(big), str(out_big)], before=rm_out)
        # ckpttool's writer fsyncs (and re-reads) its output before renaming it into place; this
        # is the durable-copy equivalent of that (coreutils `sync FILE` = fsync of that file)
        m("cp sync", ["sh", "-c", 'cp "$1" "$2" && sync "$2"', "sh", str(big), str(out_big)], before=rm_out)
        m("set-lr", ck + ["set-lr", str(big), "1e-4", "-o", str(out_big)], before=rm_out,
          check=verifier(out_big, "lr"))
        m("move", ck + ["move", str(big), "cuda:1", "-o", str(out_big)], before=rm_out,
          check=verifier(out_big, "move"))
        m("merge-groups", ck + ["merge-groups", str(big), "-o", str(out_big)], before=rm_out,
          check=verifier(out_big, "merge"))
        m("amsgrad", ck + ["set", str(big), "amsgrad=True", "-o", str(out_big)], before=rm_out,
          check=verifier(out_big, "amsgrad"))
        m("torch edit", [PY, "-c", EDIT_SAVE, str(big), str(out_big)], before=rm_out,
          check=verifier(out_big, "lr"))
        m("torch amsgrad", [PY, "-c", AMSGRAD_SAVE, str(big), str(out_big)], before=rm_out,
          check=verifier(out_big, "amsgrad"))
        rm_out()

    if "convert" in parts:
        # `convert --to adam` of an SGD-momentum checkpoint: reads model + momentum_buffer
        # (2 x params), writes model + exp_avg + exp_avg_sq (3 x params, 1.5x the input)
        sgd = ensure_ckpt(sgd_width, log, "sgd")
        files["sgd"] = (sgd, sgd_label)
        out_conv = OUTDIR / "convert-out.pt"
        rm_conv = remover(out_conv)
        if shutil.disk_usage(OUTDIR).free < 1.5 * sgd.stat().st_size + 1_000_000_000:
            raise SystemExit("not enough free disk for a convert output next to the SGD checkpoint")
        warm_page_cache(sgd)
        m("sgd cp sync", ["sh", "-c", 'cp "$1" "$2" && sync "$2"', "sh", str(sgd), str(out_conv)],
          before=rm_conv)
        m("convert", ck + ["convert", str(sgd), "--to", "adam", "-o", str(out_conv)],
          before=rm_conv, check=convert_verifier(out_conv, sgd))
        m("torch convert", [PY, "-c", CONVERT_SAVE, str(sgd), str(out_conv)], before=rm_conv,
          check=convert_verifier(out_conv, sgd))
        # set-lr -o against cp + sync of the same file, as pairs run in turn (the disk's
        # speed drifts over minutes; a pair sees the same disk): the median of the ratios
        log("set-lr vs cp+sync pairs (1.3 GB) ...")
        lr_argv = ck + ["set-lr", str(sgd), "1e-4", "-o", str(out_conv)]
        run_once(lr_argv, rm_conv)  # warm-up
        PAIRS["sgd set-lr"] = pairs_with_cp_sync(lr_argv, sgd, out_conv, rm_conv, log)
        rm_conv()

    if "check" in parts:
        big = ensure_ckpt(sizes["big"][0], log)
        files["big"] = (big, bl)
        warm_page_cache(big)
        m("check", ck + ["check", str(big)])
        m("check deep", ck + ["check", "--deep", str(big)])
        m("torch check", [PY, "-c", TORCH_CHECK, str(big)])

    if "diff" in parts:
        # two checkpoints a training run would write one epoch apart: every tensor differs
        big = ensure_ckpt(sizes["big"][0], log)
        files["big"] = (big, bl)
        nxt = OUTDIR / f"{big.stem}-next.pt"
        side = nxt.with_suffix(".json")
        st = big.stat()
        stamp = {"source": big.name, "source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns}
        known = json.loads(side.read_text()) if nxt.exists() and side.exists() else {}
        if any(known.get(k) != v for k, v in stamp.items()) or \
                known.get("size") != (nxt.stat().st_size if nxt.exists() else None):
            if shutil.disk_usage(OUTDIR).free < st.st_size + 1_000_000_000:
                raise SystemExit("not enough free disk for the second checkpoint of the diff")
            log(f"building {nxt.name} (the next epoch of {big.name}) ...")
            r = subprocess.run([PY, "-c", NEXT_EPOCH, str(big), str(nxt)], capture_output=True,
                               text=True)
            if r.returncode != 0:
                raise SystemExit(f"building {nxt} failed:\n{r.stderr}")
            meta = json.loads(big.with_suffix(".json").read_text())  # same structure
            side.write_text(json.dumps({**meta, **stamp, "size": nxt.stat().st_size}))
        files["next"] = (nxt, bl)
        warm_page_cache(big)
        warm_page_cache(nxt)
        # exit 1: "different", as it must be
        m("diff", ck + ["diff", str(big), str(nxt)], ok_rc=(1,))
        m("torch diff", [PY, "-c", TORCH_DIFF, str(big), str(nxt)])
        m("diff values", ck + ["diff", "--values", str(big), str(nxt)], ok_rc=(1,))
        m("torch diff values", [PY, "-c", TORCH_DIFF, str(big), str(nxt), "values"])
    if "sanitize" in parts:
        # the big checkpoint plus what timm / pytorch-examples style scripts add: an argparse
        # Namespace, numpy scalars, a numpy array and numpy's RNG state
        width = a.width or sizes["big"][0]
        base = ensure_ckpt(width, log)
        extras = OUTDIR / f"ckpt-w{width}-extras.pt"
        if not extras.exists():
            log(f"building {extras.name} ...")
            r = subprocess.run([PY, "-c", ADD_EXTRAS, str(base), str(extras) + ".tmp"],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"building {extras} failed:\n{r.stderr}")
            os.replace(str(extras) + ".tmp", extras)
        meta = json.loads(base.with_suffix(".json").read_text())
        meta["size"] = extras.stat().st_size  # the big file's tensors, plus the extras
        import zipfile
        with zipfile.ZipFile(extras) as z:
            meta["records"] = sum(1 for n in z.namelist() if "/data/" in n)
        extras.with_suffix(".json").write_text(json.dumps(meta))
        files.setdefault("big" if width == sizes["big"][0] else "sanitize base",
                         (base, f"{base.stat().st_size / 1e9:.2f} GB"))
        files["sanitize"] = (extras, f"{extras.stat().st_size / 1e9:.2f} GB")
        out_san = OUTDIR / "sanitize-out.pt"
        rm_san = remover(out_san)
        if shutil.disk_usage(OUTDIR).free < extras.stat().st_size + 1_000_000_000:
            raise SystemExit("not enough free disk for a sanitize output")
        warm_page_cache(extras)
        m("sanitize", ck + ["sanitize", str(extras), "-o", str(out_san)], before=rm_san,
          check=sanitize_verifier(out_san))
        log("sanitize vs cp+sync pairs ...")
        san_argv = ck + ["sanitize", str(extras), "-o", str(out_san)]
        PAIRS["sanitize"] = pairs_with_cp_sync(san_argv, extras, out_san, rm_san, log)
        rm_san()

    # ------------------------------------------------------------------ tables
    rows: list[tuple] = []

    def verdict(conds):
        if conds is None:
            return "-"
        return "pass" if all(conds) else "FAIL"

    def row(op, key, ref_key=None, ref_name="", target="", conds=None):
        r = R[key]
        if not r.ok:
            rows.append((op, r.error, "-", "-", target, "-"))
            return
        ratio = "-"
        if ref_key and R[ref_key].ok:
            ratio = f"{r.wall / R[ref_key].wall:.2f}x {ref_name}"
        rows.append((op, fmt_s(r), fmt_mib(r), ratio, target, verdict(conds(r) if conds else None)))

    def show_target(r):
        return [r.wall <= 0.25, r.rss_bytes <= 50 * MB]

    hdr = ("operation", "wall s", "peak RSS MiB", "ratio vs reference", "target", "pass/fail")

    def table(rs):
        return (["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
                + ["| " + " | ".join(str(c) for c in r) + " |" for r in rs])

    body: list[str] = []
    if "main" in parts:
        row("`python -c pass` (interpreter start)", "pass")
        row("`python -c 'import torch'`", "import torch", "pass", "python start")
        row("`ckpttool --help`", "help", "pass", "python start", "<= 0.2 s", lambda r: [r.wall <= 0.2])
        for key, label in (("big", bl), ("small", sl)):
            tgt = "<= 0.25 s, <= 50 MB" if key == "big" else ""
            cond = show_target if key == "big" else None
            row(f"`ckpttool show` {label}", f"show {key}", f"torch mmap {key}", "torch mmap+walk", tgt, cond)
            row(f"`ckpttool show --json` {label}", f"show json {key}", f"torch mmap {key}", "torch mmap+walk", tgt, cond)
            row(f"torch.load full, weights_only {label}", f"torch full {key}")
            row(f"torch.load mmap + walk optimizer state {label}", f"torch mmap {key}")
        for sk, name in (("show", "show"), ("show json", "show --json")):
            rb, rs = R[f"{sk} big"], R[f"{sk} small"]
            if rb.ok and rs.ok:
                ratio = rb.wall / rs.wall
                rows.append((f"`{name}` {bl} / {sl}", "-", "-", f"{ratio:.2f}x", "<= 1.5x",
                             "pass" if ratio <= 1.5 else "FAIL"))
            else:
                rows.append((f"`{name}` {bl} / {sl}", "not available", "-", "-", "<= 1.5x", "-"))
        row(f"`cp` {bl} (reference)", "cp")
        row(f"`cp` + `sync OUT` (fsync) {bl} (reference)", "cp sync", "cp", "cp")

        def edit_target(r):
            return [r.wall <= 1.3 * R["cp"].wall if R["cp"].ok else False, r.rss_bytes <= 100 * MB]

        for key, cmd in (("set-lr", "set-lr BIG 1e-4 -o OUT"), ("move", "move BIG cuda:1 -o OUT"),
                         ("merge-groups", "merge-groups BIG -o OUT")):
            row(f"`ckpttool {cmd}` {bl}", key, "cp", "cp", "<= 1.3x cp, <= 100 MB", edit_target)
            if R[key].ok and R["cp sync"].ok:
                op, w, mib, ratio, tgt, pf = rows[-1]
                rows[-1] = (op, w, mib, f"{ratio}; {R[key].wall / R['cp sync'].wall:.2f}x cp+sync", tgt, pf)
        row(f"torch.load + edit lr + torch.save {bl}", "torch edit", "cp", "cp")
        row(f"`ckpttool set BIG amsgrad=True -o OUT` {bl} (adds a zero tensor per param)", "amsgrad",
            "torch amsgrad", "torch", "<= 150 MB", lambda r: [r.rss_bytes <= 150 * MB])
        row(f"torch.load + amsgrad=True + zeros_like + torch.save {bl}", "torch amsgrad", "cp",
            "cp")
        body += table(rows) + [""]

    if "convert" in parts:
        rows = []
        rt = R["torch convert"]
        row(f"`cp` + `sync OUT` (fsync) {sgd_label} SGD file (reference)", "sgd cp sync")

        def convert_target(r):
            if not rt.ok:
                return [False]
            return [r.rss_bytes <= 150 * MB, 3 * r.wall <= rt.wall, 4 * r.rss_bytes <= rt.rss_bytes]

        tgt = "<= 150 MB, >= 3x faster than torch, <= 1/4 torch RSS"
        row(f"`ckpttool convert SGD --to adam -o OUT` {sgd_label} (SGD->Adam)", "convert",
            "torch convert", "torch", tgt, convert_target)
        r = R["convert"]
        if r.ok and rt.ok:
            op, w, mib, ratio, tg, pf = rows[-1]
            ratio = (f"{r.wall / rt.wall:.2f}x torch wall ({rt.wall / r.wall:.2f}x faster); "
                     f"{r.rss_bytes / rt.rss_bytes:.3f}x torch RSS")
            if pf == "FAIL":
                c = convert_target(r)
                pf = "FAIL (" + ", ".join(n for n, ok in zip(("150 MB", "3x", "1/4 RSS"), c)
                                          if not ok) + ")"
            rows[-1] = (op, w, mib, ratio, tg, pf)
        row(f"torch.load + SGD->Adam by hand + torch.save {sgd_label}", "torch convert",
            "sgd cp sync", "cp+sync")
        pr = PAIRS.get("sgd set-lr")
        if pr and pr[0]:
            ratios, lw, lm, cw = pr
            med = statistics.median(ratios)
            rss = statistics.median(lm) * 1024
            rows.append((f"`ckpttool set-lr SGD 1e-4 -o OUT` {sgd_label}, in pairs with cp + sync "
                         f"({len(ratios)} pairs)", f"{statistics.median(lw):.3f}",
                         f"{rss / MIB:.0f}",
                         f"{med:.2f}x cp+sync (median of pair ratios; cp+sync "
                         f"{statistics.median(cw):.3f} s)", "<= 1.25x cp+sync, < 100 MB",
                         "pass" if med <= 1.25 and rss < 100 * MB else "FAIL"))
        body += [f"## convert (SGD momentum -> Adam, {sgd_label})", ""] + table(rows) + [""]

    if "check" in parts:
        rows = []
        size = files["big"][0].stat().st_size
        row(f"`ckpttool check BIG` {bl} (load test included)", "check", "torch check", "torch",
            "<= 3 s, <= 300 MB", lambda r: [r.wall <= 3, r.rss_bytes <= 300 * MB])
        row(f"`ckpttool check --deep BIG` {bl} (every byte: CRCs, NaN/Inf, moments)", "check deep",
            "torch check", "torch", ">= 1 GB/s", lambda r: [size / r.wall >= 1e9])
        if R["check deep"].ok:
            op, w, mib, ratio, tg, pf = rows[-1]
            rows[-1] = (op, w, mib, f"{ratio}; {size / R['check deep'].wall / 1e9:.2f} GB/s", tg, pf)
        row(f"torch.load + Adam.load_state_dict + step {bl} (reference)", "torch check")
        body += [f"## check ({bl})", ""] + table(rows) + [""]

    if "diff" in parts:
        rows = []
        size = files["big"][0].stat().st_size
        row(f"`ckpttool diff A B` {bl} each, one epoch apart (CRCs only)", "diff", "torch diff",
            "torch", "<= 0.5 s, <= 100 MB", lambda r: [r.wall <= 0.5, r.rss_bytes <= 100 * MB])
        row(f"2x torch.load(mmap) + torch.equal walk {bl} (reference)", "torch diff")
        row(f"`ckpttool diff --values A B` {bl} each (reads both)", "diff values",
            "torch diff values", "torch", ">= 1 GB/s of checkpoint",
            lambda r: [size / r.wall >= 1e9])
        if R["diff values"].ok:
            op, w, mib, ratio, tg, pf = rows[-1]
            rows[-1] = (op, w, mib, f"{ratio}; {size / R['diff values'].wall / 1e9:.2f} GB/s of "
                        f"checkpoint, {2 * size / R['diff values'].wall / 1e9:.2f} GB/s read",
                        tg, pf)
        row(f"2x torch.load(mmap) + max/norms of every tensor {bl} (reference)",
            "torch diff values")
        body += [f"## diff ({bl} vs its next epoch)", ""] + table(rows) + [""]
    if "sanitize" in parts:
        rows = []
        label = f"{a.width or sizes['big'][0]}-wide"
        row(f"`ckpttool sanitize IN -o OUT` ({label} file + Namespace + numpy values)",
            "sanitize")
        pr = PAIRS.get("sanitize")
        if pr and pr[0]:
            ratios, sw, sm, cw = pr
            med = statistics.median(ratios)
            rss = statistics.median(sm) * 1024
            rows.append((f"`ckpttool sanitize IN -o OUT`, in pairs with cp + sync "
                         f"({len(ratios)} pairs)", f"{statistics.median(sw):.3f}",
                         f"{rss / MIB:.0f}",
                         f"{med:.2f}x cp+sync (median of pair ratios; cp+sync "
                         f"{statistics.median(cw):.3f} s)", "<= 1.25x cp+sync, < 100 MB",
                         "pass" if med <= 1.25 and rss < 100 * MB else "FAIL"))
        body += [f"## sanitize ({label})", ""] + table(rows) + [""]

    total = time.perf_counter() - t_start
    load = (f"load average (1/5/15 min) {'/'.join(f'{x:.2f}' for x in load_start)} at start, "
            f"{'/'.join(f'{x:.2f}' for x in os.getloadavg())} at end "
            f"(anything else running on the {os.cpu_count()} CPUs makes the numbers noisier)")
    text = "\n".join(machine_header(files, a.quick, parts) + body +
                     [f"Total benchmark time: {total:.0f} s; {load}. MB = 10^6 bytes, MiB = 2^20 bytes.", ""])
    print(text)
    if out_path:
        pathlib.Path(out_path).write_text(text)
        log(f"wrote {out_path}")
    else:
        log("--only: not written to a file (give --out FILE)")

    for p in (OUTDIR / "_stdout.txt", OUTDIR / "_stderr.txt", OUTDIR / "_rss.txt"):
        p.unlink(missing_ok=True)
    if not a.keep:
        remove_inputs([p for p, _ in files.values()], log)
    return 0


def remove_inputs(paths, log) -> None:
    """Delete built input checkpoints and their validation sidecars (unless --keep)."""
    for p in paths:
        p.unlink(missing_ok=True)
        p.with_suffix(".json").unlink(missing_ok=True)
    log("removed the built inputs (use --keep to cache them in bench/out/)")


if __name__ == "__main__":
    sys.exit(main())
