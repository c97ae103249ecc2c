"""The torch.save zip archive: reading its records without reading tensor bytes.

The archive is parsed the way torch's reader sees it: the central directory gives the records,
each local header is checked against it, and a record's payload offset is computed from the
local header, so tensor bytes can later be read (or copied) straight from the file.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass, field

from ..errors import UnreadableError

MAX_PICKLE_BYTES = 1 << 30
MAX_DEFLATE_RATIO = 1000  # deflate rarely beats ~10x on pickles; zeros reach ~1000x

_EOCD = struct.Struct("<4s4H2LH")
_EOCD64_LOC = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_CDIR = struct.Struct("<4s6H3L5H2L")
_LOCAL = struct.Struct("<4s5H3L2H")


@dataclass(slots=True)
class Record:
    """One archive member: ``name`` without the archive folder, where its bytes lie."""

    name: str
    full_name: str
    header_offset: int
    data_offset: int
    size: int  # stored (compressed) size
    usize: int
    crc: int
    method: int
    path: str = ""


@dataclass
class Archive:
    path: str
    prefix: str  # the archive folder name torch puts in front of every record
    records: dict[str, Record]  # by name without prefix, in archive order
    file_size: int
    offset_delta: int  # bytes of garbage before the archive (0 for a clean file)
    # what torch.load tolerates but a clean torch.save never writes (duplicate members, local
    # names that differ from the central directory's, backslashes): said, never hidden
    tricks: list[str] = field(default_factory=list)


def _pread(fd: int, n: int, off: int) -> bytes:
    b = os.pread(fd, n, off)
    if len(b) != n:
        raise EOFError
    return b


def read_archive(path: str, fd: int, file_size: int) -> Archive:
    """Parse the central directory of the torch zip file open as ``fd``."""
    tail_len = min(file_size, 65536 + _EOCD.size)
    tail = _pread(fd, tail_len, file_size - tail_len)
    pos = tail.rfind(b"PK\x05\x06")
    if pos < 0:
        raise UnreadableError(f"a zip archive without its end record "
                              "(truncated or still being written?)", path=path)
    eocd_pos = file_size - tail_len + pos
    (_, _, _, _, n_entries, cd_size, cd_offset, _) = _EOCD.unpack_from(tail, pos)
    if pos >= _EOCD64_LOC.size and tail[pos - _EOCD64_LOC.size:pos - _EOCD64_LOC.size + 4] \
            == b"PK\x06\x07":
        _, _, eocd64_off, _ = _EOCD64_LOC.unpack_from(tail, pos - _EOCD64_LOC.size)
        # the locator's offset counts from the archive's start; with bytes before the
        # archive (a zip inside a DCP data file) the record sits right before the locator
        before = eocd_pos - _EOCD64_LOC.size - _EOCD64.size
        if before >= 0 and before != eocd64_off and _pread(fd, 4, before) == b"PK\x06\x06":
            eocd64_off = before
        rec = _pread(fd, _EOCD64.size, eocd64_off) if eocd64_off + _EOCD64.size <= file_size \
            else b""
        if rec[:4] == b"PK\x06\x06":
            (_, _, _, _, _, _, _, n_entries, cd_size, cd_offset) = _EOCD64.unpack(rec)
            cd_end = eocd64_off
        else:
            cd_end = eocd_pos - _EOCD64_LOC.size
    else:
        cd_end = eocd_pos
    delta = cd_end - cd_size - cd_offset  # garbage prepended to the archive
    if delta < 0 or cd_size > file_size:
        raise UnreadableError(f"the zip central directory lies outside the file "
                              "(truncated or corrupt)", path=path)
    cd = _pread(fd, cd_size, cd_offset + delta)
    records: dict[str, Record] = {}
    tricks: list[str] = []
    p = 0
    prefix = ""
    for _ in range(n_entries):
        if cd[p:p + 4] != b"PK\x01\x02":
            raise UnreadableError(f"corrupt zip central directory", path=path)
        (_, _, _, flags, method, _, _, crc, csize, usize, nlen, xlen, clen, _, _, _,
         hoff) = _CDIR.unpack_from(cd, p)
        name = cd[p + _CDIR.size:p + _CDIR.size + nlen].decode("utf-8", "replace")
        extra = cd[p + _CDIR.size + nlen:p + _CDIR.size + nlen + xlen]
        p += _CDIR.size + nlen + xlen + clen
        if 0xFFFFFFFF in (csize, usize, hoff):
            usize, csize, hoff = _zip64_extra(extra, usize, csize, hoff)
        if "/" not in name or name.startswith("/") or \
                any(part == ".." for part in name.split("/")):
            raise UnreadableError(f"zip member {name!r} is not a torch record name", path=path)
        if "\\" in name and not any("backslash" in t for t in tricks):
            tricks.append(f"zip member {name!r} has a backslash in its name (torch.save never "
                          "writes one; torch.load reads it as part of the name)")
        if not prefix:
            prefix = name.split("/", 1)[0]
        if not name.startswith(prefix + "/"):
            raise UnreadableError(f"zip members lie in two archive folders "
                                  f"({prefix!r} and {name!r}); not a torch.save file", path=path)
        short = name[len(prefix) + 1:]
        if short in records:
            tricks.append(f"zip member {name!r} appears twice: torch.load reads the first, "
                          "ckpttool too")
            continue
        if flags & 0x1:
            raise UnreadableError(f"zip member {name!r} is encrypted", path=path)
        hoff += delta
        local = _pread(fd, _LOCAL.size, hoff) if hoff + _LOCAL.size <= file_size else b""
        if local[:4] != b"PK\x03\x04":
            raise UnreadableError(f"zip member {name!r} has no local header "
                                  "(truncated or corrupt)", path=path)
        (_, _, _, _, _, _, _, _, _, lnlen, lxlen) = _LOCAL.unpack(local)
        lname = _pread(fd, lnlen, hoff + _LOCAL.size).decode("utf-8", "replace")
        if lname != name:
            tricks.append(f"zip member {name!r} is named {lname!r} in its local header: "
                          "torch.load goes by the central directory's name, ckpttool too (other "
                          "zip tools may read another member)")
        data_offset = hoff + _LOCAL.size + lnlen + lxlen
        if data_offset + csize > file_size:
            raise UnreadableError(f"zip member {name!r} runs past the end of the "
                                  "file (truncated)", path=path)
        records[short] = Record(short, name, hoff, data_offset, csize, usize, crc, method, path)
    if "data.pkl" not in records:
        raise UnreadableError(f"a zip archive without data.pkl: not a torch.save "
                              f"checkpoint (members: {', '.join(list(records)[:5])})", path=path)
    return Archive(path, prefix, records, file_size, delta, tricks)


def _zip64_extra(extra: bytes, usize: int, csize: int, hoff: int) -> tuple[int, int, int]:
    i = 0
    while i + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, i)
        if tag == 1:
            vals = list(struct.unpack_from(f"<{size // 8}Q", extra, i + 4))
            if usize == 0xFFFFFFFF and vals:
                usize = vals.pop(0)
            if csize == 0xFFFFFFFF and vals:
                csize = vals.pop(0)
            if hoff == 0xFFFFFFFF and vals:
                hoff = vals.pop(0)
            break
        i += 4 + size
    return usize, csize, hoff


def read_record(path: str, fd: int, rec: Record, limit: int = MAX_PICKLE_BYTES,
                check_crc: bool = True) -> bytes:
    """The uncompressed bytes of a record (used for data.pkl and small records); with
    ``check_crc`` a record whose bytes fail their CRC is refused."""
    if rec.usize > limit:
        raise UnreadableError(f"record {rec.name} would be {rec.usize} bytes, over the "
                              f"{limit}-byte limit", path=path)
    if rec.method == 0:
        out = os.pread(fd, rec.size, rec.data_offset)
    elif rec.method == 8:
        if rec.usize > (16 << 20) and rec.usize > MAX_DEFLATE_RATIO * max(rec.size, 1):
            raise UnreadableError(f"record {rec.name} would inflate {rec.size} bytes "
                                  f"to {rec.usize} (zip bomb?)", path=path)
        raw = os.pread(fd, rec.size, rec.data_offset)
        d = zlib.decompressobj(-15)
        try:
            out = d.decompress(raw, rec.usize + 1)  # never more than declared (plus one)
        except zlib.error:
            raise UnreadableError(f"record {rec.name} is not valid deflate data "
                                  "(corrupt)", path=path) from None
        if len(out) > rec.usize:
            raise UnreadableError(f"record {rec.name} inflates past its declared "
                                  f"{rec.usize} bytes (corrupt, or a zip bomb)", path=path)
    else:
        raise UnreadableError(f"record {rec.name} uses zip compression method "
                              f"{rec.method}, which torch does not write", path=path)
    if len(out) != rec.usize:
        raise UnreadableError(f"record {rec.name} holds {len(out)} bytes, not the "
                              f"{rec.usize} its zip entry declares (truncated or corrupt)",
                              path=path)
    # torch may write CRC 0 (serialization config compute_crc32=False): only check real ones
    if check_crc and rec.crc and zlib.crc32(out) != rec.crc:
        raise UnreadableError(f"record {rec.name} fails its CRC check (corrupt: a "
                              "flipped bit or a bad copy)", path=path)
    return out
