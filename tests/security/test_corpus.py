"""The security corpus is real: every malicious file runs its payload under its declared loader,
and no benign one does.

ONE throwaway subprocess (``run_loaders.py``) imports torch once and loads every case in turn:
``torch.load(weights_only=True)`` of the benign cases first, then every case with its loader
(``torch.load(weights_only=False)`` or ``pickle.load``). The payloads only create marker files
in ``tmp_path``. See corpus.py for the cases.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus  # noqa: E402

HERE = Path(__file__).resolve().parent


def _digest(cases: list[corpus.Case], dest: Path) -> dict[str, str]:
    out = {}
    for f in sorted(p for p in dest.rglob("*") if p.is_file()):
        out[str(f.relative_to(dest))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def test_corpus_shape_and_determinism(tmp_path: Path) -> None:
    t0 = time.monotonic()
    cases = corpus.build(tmp_path / "a", tmp_path / "m")
    assert time.monotonic() - t0 < 5
    names = [c.name for c in cases]
    assert len(names) == len(set(names))
    assert sum(c.malicious for c in cases) >= 60
    assert sum(not c.malicious for c in cases) >= 15
    for c in cases:
        assert c.path.is_file(), c.name
        assert c.expect_level in corpus.LEVELS and c.loader in corpus.LOADERS
        assert (c.expect_level == "unsafe") == c.malicious, c.name
        assert (c.offending is not None) == c.malicious, c.name
        assert c.note, c.name
    assert {c.path.name for c in cases if c.name.startswith("bare_")} >= {
        "x.pkl", "x.pt", "x.bin", "pytorch_model.bin"}
    # the same inputs give the same bytes
    again = corpus.build(tmp_path / "b", tmp_path / "m")
    assert [c.name for c in again] == names
    assert _digest(cases, tmp_path / "a") == _digest(again, tmp_path / "b")


def test_payloads_run_under_real_loaders_and_benign_files_do_not(tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    cases = corpus.build(tmp_path / "corpus", markers)
    spec = [{"name": c.name, "path": str(c.path), "loader": c.loader,
             "malicious": c.malicious, "requires": c.requires} for c in cases]
    (tmp_path / "cases.json").write_text(json.dumps(spec))
    out = tmp_path / "out.json"
    work = tmp_path / "cwd"
    work.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    r = subprocess.run([sys.executable, str(HERE / "run_loaders.py"), str(tmp_path / "cases.json"),
                        str(markers), str(out)], capture_output=True, text=True, timeout=300,
                       cwd=work, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert list(work.iterdir()) == []  # the payloads wrote nowhere but their markers
    res = json.loads(out.read_text())
    malicious = [c for c in cases if c.malicious]
    benign = [c for c in cases if not c.malicious]

    # benign files: loading them with weights_only=False runs nothing
    assert res["after_benign"] == []
    expected_load = {}
    for c in benign:
        if c.requires and not res["importable"][c.requires]:
            # e.g. mmengine is not a test dependency: torch.load stops at its classes
            expected_load[c.name] = f"ModuleNotFoundError: No module named '{c.requires}'"
        else:
            expected_load[c.name] = "ok"
    assert {c.name: res["load"][c.name] for c in benign} == expected_load

    # expect_level "weights-only" exactly where torch.load(weights_only=True) accepts the file
    accepted = {n for n, o in res["weights_only"].items() if o == "ok"}
    assert accepted == {c.name for c in benign if c.expect_level == "weights-only"}

    # every malicious file created its marker under its loader, and nothing else was written
    created = set(res["markers"])
    want = set()
    for c in malicious:
        hits = [p.name for p in corpus.marker_paths(markers, c.name) if p.name in created]
        assert len(hits) == 1, (c.name, res["load"][c.name])
        want.update(hits)
    assert created == want
    assert sorted(p.name for p in markers.iterdir()) == sorted(want)
