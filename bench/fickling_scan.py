"""Run fickling over files; used by bench/scanners.py INSIDE the scanners venv.

    bench/out/scanners-venv/bin/python bench/fickling_scan.py OUT.json FILE...

For each file it does what fickling's own file-level scanner does (the dispatch in
``fickling.cli._scan_huggingface``, with the content checks first so that a bare pickle named
.pt is scanned as a pickle rather than failing as a zip): a zip (``find_file_properties``: torch
zip or standard zip) goes through ``fickling.loader.scan_zip_archive`` (members named .pkl,
.pickle or .bin, CRC checks off); a valid pickle through ``fickling.loader.scan_file``; then by
name: .pt/.pth as a zip, .bin/.pkl/.pickle as a pickle; tar, 7z and NumPy-pickle files are
"not yet supported" and skipped; anything else is skipped. All with ``graceful=True`` (a parse
error is reported as SUSPICIOUS). The result is the highest ``Severity`` over all pickles
(stacked pickles included) and the errors.

It also reports ``ml_severity``: the same pickles checked with only fickling's ``MLAllowlist``
analysis (the allowlist that ``fickling.hook.activate_safe_ml_environment`` enforces).
"""

from __future__ import annotations

import json
import sys
import zipfile
from io import BytesIO
from pathlib import PurePosixPath

from fickling.analysis import Analyzer, Severity, check_safety
from fickling.fickle import StackedPickle
from fickling.loader import RelaxedZipFile, scan_file, scan_zip_archive
from fickling.ml import MLAllowlist
from fickling.polyglot import find_file_properties

RAW = {".bin", ".pkl", ".pickle"}
ZIPEXT = {".pt", ".pth"}
ML = Analyzer([MLAllowlist()])


def _ml(data: bytes) -> Severity:
    sev = Severity.LIKELY_SAFE
    try:
        for pickled in StackedPickle.load(BytesIO(data), fail_on_decode_error=False):
            sev = max(sev, check_safety(pickled, analyzer=ML).severity)
    except Exception:  # noqa: BLE001 -- a parse failure counts like fickling's graceful mode
        sev = max(sev, Severity.SUSPICIOUS)
    return sev


def scan(path: str) -> dict:
    ext = PurePosixPath(path).suffix.lower()
    props = find_file_properties(path)
    is_zip = props["is_torch_zip"] or props["is_standard_zip"]
    is_pickle = props["is_valid_pickle"]
    if not is_zip and not is_pickle:
        is_zip, is_pickle = ext in ZIPEXT, ext in RAW
    if is_zip:
        results = scan_zip_archive(path, graceful=True)
        ml = Severity.LIKELY_SAFE
        try:
            with RelaxedZipFile(path) as z:
                for info in z.infolist():
                    if PurePosixPath(info.filename).suffix.lower() in RAW:
                        try:
                            ml = max(ml, _ml(z.read(info)))
                        except (zipfile.BadZipFile, OSError):
                            ml = max(ml, Severity.SUSPICIOUS)
        except (zipfile.BadZipFile, OSError):
            ml = max(ml, Severity.SUSPICIOUS)
        sev = max([r.severity for r in results.values()], default=Severity.LIKELY_SAFE)
        errors = [e for r in results.values() for e in r.errors]
        return {"dispatch": "zip", "members": sorted(results), "severity": sev.name,
                "errors": errors, "ml_severity": ml.name}
    if is_pickle:
        r = scan_file(path, graceful=True)
        with open(path, "rb") as f:
            ml = _ml(f.read())
        return {"dispatch": "pickle", "severity": r.severity.name, "errors": r.errors,
                "ml_severity": ml.name}
    kind = "tar/7z/numpy (unsupported)" if (
        props.get("is_7z") or props["is_tar"] or props["is_numpy_pickle"]) else "unknown"
    return {"dispatch": "skipped", "kind": kind, "severity": None, "errors": [],
            "ml_severity": None}


def main() -> None:
    out, files = sys.argv[1], sys.argv[2:]
    res = {}
    for f in files:
        try:
            res[f] = scan(f)
        except Exception as e:  # noqa: BLE001 -- report, go on with the next file
            res[f] = {"dispatch": "crash", "severity": None,
                      "errors": [f"{type(e).__name__}: {e}"], "ml_severity": None}
    with open(out, "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
