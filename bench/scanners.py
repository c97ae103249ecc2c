#!/usr/bin/env python
"""Pickle scanners vs ckpttool on the security corpus (tests/security/corpus.py).

    /work/main/.venv/bin/python bench/scanners.py [--out bench/security.md]

* creates (or reuses) a venv at bench/out/scanners-venv and pip-installs picklescan, modelscan
  and fickling from PyPI into it (``--upgrade`` re-resolves them); records their versions;
* builds the corpus into bench/out/security-corpus (payload markers point into
  bench/out/security-markers, which must still be empty at the end: nothing here runs a
  payload);
* runs, one file at a time: ``picklescan --path FILE`` (and ``--strict``), ``modelscan -p FILE -r
  json``, fickling through its Python API (bench/fickling_scan.py, one process), ckpttool
  (``python -m ckpttool show --json FILE``), and, as a reference, ``torch.load(FILE,
  weights_only=True)`` in one subprocess;
* prints a markdown report and writes it to --out (default bench/security.md).

Must run with a Python that has torch (the corpus saves real torch objects): the project's
.venv. See bench/SECURITY-BENCH.md for what each column means.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
VENV = OUT / "scanners-venv"
CORPUS = OUT / "security-corpus"
MARKERS = OUT / "security-markers"
SCANNERS = ["picklescan", "modelscan", "fickling"]


def pip_args() -> list[str]:
    """What goes into the venv. fickling's polyglot module (file-type detection) needs its
    ``torch`` extra; its ``fickle`` module imports typing_extensions, which fickling 0.1.12
    does not declare for Python < 3.12. torch is pinned to the running one so that pip takes
    the same (CPU) build instead of resolving a CUDA one."""
    import torch
    return ["picklescan", "modelscan", "fickling[torch]", "typing_extensions",
            f"torch=={torch.__version__}"]

sys.path.insert(0, str(REPO / "tests" / "security"))
import corpus  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def vbin(name: str) -> str:
    return str(VENV / "bin" / name)


def ensure_venv(upgrade: bool) -> dict[str, str]:
    if not (VENV / "bin" / "python").exists():
        log(f"creating {VENV}")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    code = ("import importlib.metadata as m, json; v = {}\n"
            f"for n in {SCANNERS + ['torch']!r}:\n"
            "    try: v[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(v))")

    def versions() -> dict[str, str]:
        r = subprocess.run([vbin("python"), "-c", code], capture_output=True, text=True,
                           check=True)
        return json.loads(r.stdout)

    have = versions()
    ok = subprocess.run([vbin("python"), "-c", "import fickling.polyglot"],
                        capture_output=True).returncode == 0
    if upgrade or not set(SCANNERS) <= set(have) or not ok:
        log("pip install " + " ".join(pip_args()))
        subprocess.run([vbin("python"), "-m", "pip", "install", "-q",
                        "--disable-pip-version-check", *(["--upgrade"] if upgrade else []),
                        *pip_args()], check=True)
        have = versions()
    return have


# --------------------------------------------------------------------------------------------
# one tool at a time; every call is "unsafe", "clean", "error" or "skipped" (not scanned), or
# for ckpttool its level

def run(cmd: list[str], timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          cwd=tempfile.gettempdir())


def picklescan(path: Path, strict: bool) -> str:
    r = run([vbin("picklescan"), "--path", str(path), *(["--strict"] if strict else [])])
    m = re.search(r"Dangerous globals: (\d+)", r.stdout)
    dangerous = int(m.group(1)) if m else 0
    # exit codes: 0 clean, 1 dangerous globals found, 2 scan error (even when it also found
    # dangerous globals: then the count in the summary still says so)
    if r.returncode == 1 or dangerous:
        return "unsafe"
    return {0: "clean", 2: "error"}.get(r.returncode, f"rc{r.returncode}")


def modelscan(path: Path) -> str:
    with tempfile.TemporaryDirectory() as d:
        rep = Path(d) / "r.json"
        r = run([vbin("modelscan"), "-p", str(path), "-r", "json", "-o", str(rep)])
        data = json.loads(rep.read_text()) if rep.exists() else {}
    # exit codes: 0 clean, 1 issues, 2 scan errors (checked before issues), 3 nothing scanned
    issues = data.get("issues") or []
    if issues or r.returncode == 1:
        return "unsafe"
    return {0: "clean", 2: "error", 3: "skipped"}.get(r.returncode, f"rc{r.returncode}")


SEV = ["LIKELY_SAFE", "POSSIBLY_UNSAFE", "SUSPICIOUS", "LIKELY_UNSAFE",
       "LIKELY_OVERTLY_MALICIOUS", "OVERTLY_MALICIOUS"]
SEV_SHORT = {"LIKELY_SAFE": "safe", "POSSIBLY_UNSAFE": "possibly", "SUSPICIOUS": "susp",
             "LIKELY_UNSAFE": "likely-unsafe", "LIKELY_OVERTLY_MALICIOUS": "likely-OM",
             "OVERTLY_MALICIOUS": "OM"}


def fickling_all(paths: list[Path]) -> dict[str, dict]:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "f.json"
        subprocess.run([vbin("python"), str(HERE / "fickling_scan.py"), str(out),
                        *map(str, paths)], check=True, capture_output=True, timeout=900,
                       cwd=d)
        return json.loads(out.read_text())


def fickling_call(res: dict, key: str, threshold: str) -> str:
    sev = res.get(key)
    if res["dispatch"] == "crash":
        return "error"
    if sev is None:
        return "skipped"
    return "unsafe" if SEV.index(sev) >= SEV.index(threshold) else "clean"


def _strings(obj: object) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)] + [k for k in obj if
                                                                 isinstance(k, str)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def ckpttool_source(ref: str | None) -> Path:
    """The folder holding the ckpttool package to run: the work tree, or ``git archive REF``
    of it exported under bench/out/ (the work tree is left alone)."""
    if ref is None:
        return REPO
    commit = subprocess.run(["git", "rev-parse", "--short", ref], capture_output=True,
                            text=True, cwd=REPO, check=True).stdout.strip()
    dest = OUT / f"ckpttool-{commit}"
    if not (dest / "ckpttool" / "__init__.py").exists():
        dest.mkdir(parents=True, exist_ok=True)
        arc = subprocess.run(["git", "archive", commit, "ckpttool"], capture_output=True,
                             cwd=REPO, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=arc, check=True)
    return dest


def ckpttool(path: Path, src: Path) -> tuple[str, list[str], str]:
    """(call, named strings, source of the call). ``python -m`` puts the cwd first on
    sys.path, so running in ``src`` picks that folder's ckpttool package."""
    r = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-m", "ckpttool", "show",
                        "--json", str(path)], capture_output=True, text=True, timeout=120,
                       cwd=src)
    try:
        doc = json.loads(r.stdout)
    except ValueError:
        doc = None
    named: list[str] = []
    if isinstance(doc, dict):
        named = _strings(doc.get("safety")) + list(doc.get("unsafe_globals") or [])
        safety = doc.get("safety")
        if isinstance(safety, dict) and isinstance(safety.get("level"), str):
            return safety["level"], named, "safety.level"
    if r.returncode == 4:
        return "unsafe", named, "exit 4"
    if isinstance(doc, dict) and "unsafe" in doc:
        return ("unsafe" if doc["unsafe"] else "not-unsafe"), named, "unsafe flag"
    if r.returncode == 3:
        return "error", named, "exit 3"
    return "unknown", named, f"exit {r.returncode}"


def names_offending(named: list[str], offending: str) -> bool:
    return any(offending in re.findall(r"[\w.]+", s) for s in named)


TORCH_WO = r"""
import json, sys, warnings, torch
warnings.simplefilter("ignore")
res = {}
for p in sys.argv[2:]:
    try:
        torch.load(p, weights_only=True)
        res[p] = "loads"
    except Exception as e:
        res[p] = "refused"
json.dump(res, open(sys.argv[1], "w"))
"""


def torch_weights_only(paths: list[Path]) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "t.json"
        subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c", TORCH_WO, str(out),
                        *map(str, paths)], check=True, capture_output=True, timeout=600, cwd=d)
        return json.loads(out.read_text())


# --------------------------------------------------------------------------------------------

TOOLS = ["picklescan", "picklescan --strict", "modelscan",
         "fickling (>= LIKELY_OVERTLY_MALICIOUS)", "fickling (> LIKELY_SAFE)",
         "fickling MLAllowlist (> LIKELY_SAFE)", "ckpttool",
         "torch weights_only=True (reference)"]
SHORT = {"picklescan": "ps", "picklescan --strict": "ps-strict", "modelscan": "ms",
         "fickling (>= LIKELY_OVERTLY_MALICIOUS)": "fk", "fickling (> LIKELY_SAFE)": "fk-any",
         "fickling MLAllowlist (> LIKELY_SAFE)": "fk-ml", "ckpttool": "ckpttool",
         "torch weights_only=True (reference)": "torch-wo"}
# the reference row: "unsafe" = torch.load(weights_only=True) refuses the file, "loads" = it
# accepts it


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(HERE / "security.md"))
    ap.add_argument("--upgrade", action="store_true", help="pip install --upgrade the scanners")
    ap.add_argument("--ckpttool-ref", metavar="REF", default=None,
                    help="run ckpttool as committed at git REF (exported with git archive "
                         "under bench/out/) instead of the work tree")
    args = ap.parse_args()
    t_start = time.monotonic()

    versions = ensure_venv(args.upgrade)
    ck_src = ckpttool_source(args.ckpttool_ref)
    log(f"scanners: {versions}")
    if MARKERS.exists():
        for f in MARKERS.iterdir():
            f.unlink()
    MARKERS.mkdir(parents=True, exist_ok=True)
    cases = corpus.build(CORPUS, MARKERS)
    mal = [c for c in cases if c.malicious]
    ben = [c for c in cases if not c.malicious]
    log(f"corpus: {len(mal)} malicious + {len(ben)} benign files in {CORPUS}")

    calls: dict[str, dict[str, str]] = {t: {} for t in TOOLS}
    named: dict[str, str] = {}
    ck_source: set[str] = set()
    detail: dict[str, str] = {}

    log("fickling ...")
    fk = fickling_all([c.path for c in cases])
    log("torch weights_only=True ...")
    wo = torch_weights_only([c.path for c in cases])
    for i, c in enumerate(cases, 1):
        log(f"[{i}/{len(cases)}] {c.name}")
        calls["picklescan"][c.name] = picklescan(c.path, False)
        calls["picklescan --strict"][c.name] = picklescan(c.path, True)
        calls["modelscan"][c.name] = modelscan(c.path)
        f = fk[str(c.path)]
        calls["fickling (>= LIKELY_OVERTLY_MALICIOUS)"][c.name] = fickling_call(
            f, "severity", "LIKELY_OVERTLY_MALICIOUS")
        calls["fickling (> LIKELY_SAFE)"][c.name] = fickling_call(f, "severity",
                                                                  "POSSIBLY_UNSAFE")
        calls["fickling MLAllowlist (> LIKELY_SAFE)"][c.name] = fickling_call(
            f, "ml_severity", "POSSIBLY_UNSAFE")
        detail[c.name] = (SEV_SHORT.get(f["severity"], f["dispatch"])
                          if f.get("severity") else f["dispatch"])
        call, nm, src = ckpttool(c.path, ck_src)
        ck_source.add(src)
        calls["ckpttool"][c.name] = call
        if c.malicious:
            named[c.name] = ("yes" if names_offending(nm, c.offending or "") else
                             "also" if any(names_offending(nm, a) for a in c.also) else "no")
        calls["torch weights_only=True (reference)"][c.name] = (
            "unsafe" if wo[str(c.path)] == "refused" else "loads")
    ran = sorted(p.name for p in MARKERS.iterdir())
    elapsed = time.monotonic() - t_start

    # ---------------------------------------------------------------- report
    L: list[str] = []
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    git = subprocess.run(["git", "log", "-1", "--format=%h %s", args.ckpttool_ref or "HEAD"],
                         capture_output=True, text=True, cwd=REPO).stdout.strip()
    git = git if len(git) <= 70 else git[:67] + "..."
    dirty = "" if args.ckpttool_ref else subprocess.run(
        ["git", "status", "--porcelain", "ckpttool"], capture_output=True, text=True,
        cwd=REPO).stdout.strip()
    import torch
    L.append("# Pickle scanners vs ckpttool on the security corpus\n")
    L.append(f"- date: {today}; {elapsed:.0f} s; python {platform.python_version()}, "
             f"torch {torch.__version__}")
    L.append("- scanners (PyPI, bench/out/scanners-venv): "
             + ", ".join(f"{k} {versions.get(k, '?')}" for k in SCANNERS)
             + f" (with its torch extra: torch {versions.get('torch', '?')})")
    L.append(f"- ckpttool at git {git}" + (" (the work tree, with uncommitted changes in "
                                           "ckpttool/)" if dirty else "")
             + (f" (exported with --ckpttool-ref {args.ckpttool_ref})"
                if args.ckpttool_ref else "")
             + f"; its verdict came from: {', '.join(sorted(ck_source))}")
    L.append(f"- corpus: tests/security/corpus.py, {len(mal)} malicious + {len(ben)} benign "
             f"files (every malicious one runs its payload under torch.load(weights_only=False) "
             f"or pickle.load: tests/security/test_corpus.py)")
    L.append(f"- payload markers created during this run (must be none): "
             f"{', '.join(ran) if ran else 'none'}")
    L.append("")
    L.append("| tool | malicious called unsafe | malicious called clean | malicious error / "
             "skipped | benign called unsafe |")
    L.append("|---|---|---|---|---|")
    for t in TOOLS:
        cm = [calls[t][c.name] for c in mal]
        cb = [calls[t][c.name] for c in ben]
        clean = sum(x in ("clean", "not-unsafe", "needs-trust", "weights-only", "loads")
                    for x in cm)
        other = len(cm) - clean - cm.count("unsafe")
        L.append(f"| {t} | {cm.count('unsafe')} / {len(mal)} | {clean} / {len(mal)} | "
                 f"{other} / {len(mal)} | {cb.count('unsafe')} / {len(ben)} |")
    L.append("")
    n_named = sum(v == "yes" for v in named.values())
    n_also = sum(v == "also" for v in named.values())
    ok_lvl = sum(calls["ckpttool"][c.name] == c.expect_level for c in cases)
    ok_ben = sum(calls["ckpttool"][c.name] == c.expect_level for c in ben)
    line = (f"ckpttool names the expected offending global in {n_named} / {len(mal)} "
            f"malicious cases, and only another dangerous global of the case (`also`) in "
            f"{n_also}")
    if "safety.level" in ck_source:
        line += (f"; its level equals `expect_level` in {ok_lvl} / {len(cases)} cases "
                 f"(benign: {ok_ben} / {len(ben)})")
    else:
        line += ("; this ckpttool has no `safety.level` yet, so it cannot say needs-trust / "
                 "weights-only (`not-unsafe` = its JSON's `unsafe: false`, `error` = exit 3)")
    L.append(line + ".")
    L.append("")
    L.append("## Per case\n")
    L.append("Columns: " + ", ".join(f"`{SHORT[t]}` = {t}" for t in TOOLS) + ". `fk sev` is "
             "fickling's highest severity (or how it dispatched the file). `named`: yes = "
             "ckpttool names `offending`, also = only another dangerous global of the case "
             "(corpus `Case.also`), no = neither. Cells: unsafe / clean / error / skipped (not scanned: "
             "unsupported extension or format); ckpttool: its level.")
    L.append("")
    head = ["case", "file", "expected", "offending"] + [SHORT[t] for t in TOOLS] + [
        "fk sev", "named"]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "---|" * len(head))
    for c in cases:
        row = [c.name, f"`{c.path.relative_to(CORPUS)}`".replace("|", "\\|"),
               c.expect_level, f"`{c.offending}`" if c.offending else "-"]
        for t in TOOLS:
            v = calls[t][c.name]
            miss = c.malicious and v != "unsafe" or (not c.malicious and v == "unsafe")
            row.append(f"**{v}**" if miss else v)
        row.append(detail[c.name])
        row.append((named[c.name] if named[c.name] != "no" else "**no**")
                   if c.malicious else "-")
        L.append("| " + " | ".join(row) + " |")
    L.append("")
    L.append("Bold: a malicious file not called unsafe, a benign file called unsafe, or "
             "ckpttool not naming the offending global.")
    text = "\n".join(L) + "\n"
    print(text)
    Path(args.out).write_text(text)
    log(f"wrote {args.out}")
    if ran:
        log(f"WARNING: payload markers were created: {ran}")
        sys.exit(1)


if __name__ == "__main__":
    main()
