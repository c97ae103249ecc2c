"""Load every corpus case with a real loader, in this one process (the positive control).

    python run_loaders.py CASES.json MARKER_DIR OUT.json

CASES.json is a list of ``{"name", "path", "loader", "malicious"}``. This script RUNS the
malicious payloads: only ever run it in a throwaway subprocess on a corpus built by
``corpus.build`` (each payload only creates its own marker file in MARKER_DIR).

1. ``torch.load(path, weights_only=True)`` of every benign case, before anything else has
   imported extra modules (DTensor checkpoints, for one, load only after
   ``import torch.distributed.tensor``).
2. Every benign case with its loader (``torch.load(weights_only=False)`` or ``pickle.load``),
   then the list of files in MARKER_DIR (must be empty).
3. Every malicious case with its loader inside try/except; then waits up to 5 s for markers of
   asynchronous payloads (Popen, os.popen).
Writes ``{"weights_only": {name: outcome}, "load": {name: outcome}, "after_benign": [...],
"markers": [...], "importable": {module: bool}}`` to OUT.json; an outcome is "ok" or
"ExceptionType: first line of the message".
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import sys
import time
import warnings


def outcome(fn) -> str:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 -- payloads may raise anything, even SystemExit
        msg = str(e).strip().splitlines()
        return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]
    return "ok"


def main() -> None:
    cases_file, marker_dir, out_file = sys.argv[1:4]
    with open(cases_file) as f:
        cases = json.load(f)
    warnings.simplefilter("ignore")
    import torch

    def load(case: dict, weights_only: bool = False):
        if case["loader"] == "pickle":
            def run():
                with open(case["path"], "rb") as fh:
                    pickle.load(fh)
            return run
        return lambda: torch.load(case["path"], weights_only=weights_only)

    benign = [c for c in cases if not c["malicious"]]
    malicious = [c for c in cases if c["malicious"]]
    res: dict = {"weights_only": {}, "load": {}}
    for c in benign:
        res["weights_only"][c["name"]] = outcome(load(c, weights_only=True))
    for c in benign:
        res["load"][c["name"]] = outcome(load(c))
    res["after_benign"] = sorted(os.listdir(marker_dir))
    for c in malicious:
        res["load"][c["name"]] = outcome(load(c))
    want = {c["name"] for c in malicious}
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        have = {n.split(".marker")[0] for n in os.listdir(marker_dir)}
        if want <= have:
            break
        time.sleep(0.1)
    res["markers"] = sorted(os.listdir(marker_dir))
    mods = {c["requires"] for c in cases if c.get("requires")}
    res["importable"] = {m: importlib.util.find_spec(m) is not None for m in sorted(mods)}
    with open(out_file, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
