"""Byte-mutation fuzzing of the restricted unpickler, in process.

Seeds are real pickles: every ``data.pkl`` of the fixture archives, the five pickles of three
legacy fixtures (one of torch 2.x, two of the Python 2 era), and ``pickle.dumps`` of plain containers at every protocol (dumps never loads
anything). Each case applies a few mutations (bit flips, byte replacements, opcode bytes,
inserts, deletes, truncation, splices of a run of another seed) and feeds the result to
:func:`~ckpttool.formats.unpickler.unpickle`, which must return or raise a
:class:`~ckpttool.errors.CkptError`: any other exception, or any warning (they are made
errors), is an escape. Each case must also finish within a time bound.

The suite runs a fixed seed and count (a few seconds). For a long run::

    python tests/test_fuzz_unpickler.py --count 2000000 --seed 7

prints the rate and every escape (the input as a bytes literal), to be added to
``REGRESSIONS`` below once fixed.
"""

from __future__ import annotations

import argparse
import collections
import pickle
import random
import sys
import time
import warnings
import zipfile
from typing import Iterator

import pytest

from ckpttool.errors import CkptError
from ckpttool.formats.nodes import Reduce
from ckpttool.formats.pickler import dumps
from ckpttool.formats.unpickler import unpickle
from conftest import FIXTURES

SEED = 20250101
COUNT = 20_000  # about 3 s
TIME_BOUND = 1.0  # seconds for one input (the slowest seen is a few milliseconds)

# every opcode byte of protocols 0-5 (and a few bytes that are none)
OPCODES = b"().0123FGIJKLMNPQRSTUVXabcdeghijlopqrstu}]\x80\x81\x82\x83\x84\x85\x86\x87\x88" \
    b"\x89\x8a\x8b\x8c\x8d\x8e\x8f\x90\x91\x92\x93\x94\x95\x96\x97\x98\x00\xff"
# values whose lengths or counts are interesting once they land in an argument
INTERESTING = [b"\x00", b"\xff", b"\x7f", b"\x80", b"\xff\xff\xff\xff", b"\xff\xff\xff\x7f",
               b"\x00\x00\x00\x80", b"\xff" * 8, b"\n", b"'", b"\\", b"\\x", b"\\u", b"L\n",
               b"latin1", b"\xc4\x80", b"\xed\xa0\x80"]


def _zip_pickles() -> Iterator[bytes]:
    for path in sorted(FIXTURES.rglob("*")):
        if path.is_file() and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                for name in z.namelist():
                    if name.endswith("data.pkl"):
                        yield z.read(name)


def _legacy_pickles() -> Iterator[bytes]:
    # torch 2.x, and Python 2-era files (OrderedDict(items), SHORT_BINSTRING, LONG1, old
    # rebuild functions and storage types)
    for name in ("imagenet_style_legacy.pth", "wild/lpips_v0.1_alex.pth", "wild/py2_adam.pth"):
        data = (FIXTURES / name).read_bytes()
        pos = 0
        for _ in range(5):  # magic, protocol, sys_info, the object, the storage keys
            end = unpickle(data, pos).end
            yield data[pos:end]
            pos = end


def _handmade_pickles() -> Iterator[bytes]:
    od: collections.OrderedDict[str, int] = collections.OrderedDict(a=1, b=2)
    values = [
        {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-08, "params": [0, 1, 2],
         "name": "héllo ✓", "none": None, "flags": [True, False]},
        [1, -1, 255, 256, 65535, 65536, -2**31, 2**31, 2**63, -2**100, 10**40, 0.5, -1e300,
         float("inf"), complex(1, -2)],
        (b"", b"bytes\x00\xff", bytearray(b"ba"), "", "x" * 300, b"y" * 300),
        {"set": {1, 2, 3}, "frozen": frozenset({"a", "b"}), "od": od,
         "counter": collections.Counter({"x": 2}), ("tuple", "key"): [[], {}, ()]},
    ]
    shared: list[int] = [7]
    values.append([shared, shared, {"again": shared}])
    for protocol in range(0, 6):
        for v in values:
            yield pickle.dumps(v, protocol=protocol)
    # Python 2 strings (STRING, BINSTRING, SHORT_BINSTRING) and text INT / LONG / FLOAT
    yield b"(S'abc\\x41\\n\\q'\nS\"d\"\nT\x03\x00\x00\x00efgU\x02hiI01\nI-7\nL12L\nF0.25\nl."
    yield b"\x80\x02c__builtin__\ncomplex\nK\x01G?\xf0\x00\x00\x00\x00\x00\x00\x86R."


def seeds() -> list[bytes]:
    return [*_zip_pickles(), *_legacy_pickles(), *_handmade_pickles()]


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    """One to four random mutations of ``data`` (``pool`` supplies spliced runs)."""
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        i = rng.randrange(len(b) + 1)
        kind = rng.randrange(9)
        if kind == 0 and b:  # flip one bit
            i = min(i, len(b) - 1)
            b[i] ^= 1 << rng.randrange(8)
        elif kind == 1 and b:  # replace a byte with any byte
            b[min(i, len(b) - 1)] = rng.randrange(256)
        elif kind == 2 and b:  # replace a byte with an opcode
            b[min(i, len(b) - 1)] = rng.choice(OPCODES)
        elif kind == 3:  # insert opcodes or random bytes
            ins = bytes(rng.choice(OPCODES) for _ in range(rng.randint(1, 4))) \
                if rng.random() < 0.5 else rng.randbytes(rng.randint(1, 8))
            b[i:i] = ins
        elif kind == 4:  # insert or overwrite with an interesting value
            v = rng.choice(INTERESTING)
            if rng.random() < 0.5:
                b[i:i] = v
            else:
                b[i:i + len(v)] = v
        elif kind == 5 and b:  # delete a run
            del b[i:i + rng.randint(1, 16)]
        elif kind == 6:  # truncate
            del b[i:]
        elif kind == 7:  # splice in a run of another seed
            src = rng.choice(pool)
            j = rng.randrange(len(src))
            b[i:i] = src[j:j + rng.randint(1, 64)]
        else:  # duplicate a run of this input elsewhere
            j = rng.randrange(len(b) + 1)
            b[i:i] = b[j:j + rng.randint(1, 32)]
    return bytes(b)


def run_one(data: bytes) -> tuple[BaseException | None, float]:
    """Unpickle ``data``; return (the escaped exception or None, seconds taken)."""
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            unpickle(data)
    except CkptError:
        pass
    except Exception as e:  # noqa: BLE001 - any other exception is what we look for
        return e, time.perf_counter() - t0
    return None, time.perf_counter() - t0


def fuzz(seed: int, count: int) -> tuple[list[tuple[bytes, BaseException | str]], float]:
    """Run ``count`` mutated inputs; return the escapes (input, exception or "slow: ...")."""
    rng = random.Random(seed)
    pool = seeds()
    escapes: list[tuple[bytes, BaseException | str]] = []
    slowest = 0.0
    for _ in range(count):
        data = mutate(rng, rng.choice(pool), pool)
        err, dt = run_one(data)
        slowest = max(slowest, dt)
        if err is not None:
            escapes.append((data, err))
        elif dt > TIME_BOUND:
            escapes.append((data, f"slow: {dt:.2f} s"))
    return escapes, slowest


def test_seeds_parse() -> None:
    """The unmutated seeds are valid: the fuzzer starts from real pickles."""
    pool = seeds()
    assert len(pool) > 60
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for data in pool:
            unpickle(data)


def test_fuzz_unpickler_only_raises_ckpt_errors() -> None:
    escapes, slowest = fuzz(SEED, COUNT)
    assert not escapes, [(d, repr(e)) for d, e in escapes[:5]]
    assert slowest < TIME_BOUND


# --------------------------------------------------------------------------------------------
# inputs that once escaped; each must now finish with a result or a CkptError

# pickle.dumps(b"\xe9", protocol=2) with the string made "\u0100", which is not Latin-1
CODECS_NOT_LATIN1 = (b"\x80\x02c_codecs\nencode\nq\x00X\x02\x00\x00\x00\xc4\x80q\x01"
                     b"X\x06\x00\x00\x00latin1q\x02\x86q\x03Rq\x04.")

REGRESSIONS = [
    CODECS_NOT_LATIN1,
    # a surrogate (BINUNICODE is read with surrogatepass) is not Latin-1 either
    b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00\xed\xa0\x80X\x06\x00\x00\x00latin1\x86R.",
    # complex() of an int too large for a float: OverflowError
    b"\x80\x02c__builtin__\ncomplex\n\x8a\xff" + b"\x01" * 254 + b"\x7fK\x00\x86R.",
    # an unknown escape in a Python 2 STRING: DeprecationWarning from codecs.escape_decode
    b"S'\\q'\n.",
]


@pytest.mark.parametrize("data", REGRESSIONS)
def test_regressions(data: bytes) -> None:
    err, dt = run_one(data)
    assert err is None, repr(err)
    assert dt < TIME_BOUND


def test_codecs_encode_of_non_latin1_string_stays_a_call() -> None:
    # torch.load fails on this call (UnicodeEncodeError); the tree keeps it as recorded and
    # the pickler writes it back unchanged
    root = unpickle(CODECS_NOT_LATIN1).root
    assert isinstance(root, Reduce) and root.qualname == "_codecs.encode"
    assert root.args == ("\u0100", "latin1")
    assert dumps(root) == CODECS_NOT_LATIN1


def test_codecs_encode_of_latin1_string_is_evaluated() -> None:
    data = pickle.dumps(b"\xe9\x00", protocol=2)
    assert unpickle(data).root == b"\xe9\x00"


def test_unknown_string_escape_is_kept() -> None:
    assert unpickle(b"S'a\\qb'\n.").root == "a\\qb"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=COUNT)
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args()
    t0 = time.perf_counter()
    escapes, slowest = fuzz(args.seed, args.count)
    dt = time.perf_counter() - t0
    print(f"{args.count} mutations in {dt:.1f} s ({args.count / dt:,.0f}/s), "
          f"slowest input {slowest * 1000:.1f} ms, {len(escapes)} escapes")
    seen: set[str] = set()
    for data, err in escapes:
        key = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
        if key not in seen:
            seen.add(key)
            print(key, data if len(data) < 400 else data[:400] + b"...", sep="\n  ")
    sys.exit(1 if escapes else 0)


if __name__ == "__main__":
    main()
