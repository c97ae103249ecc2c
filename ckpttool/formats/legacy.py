"""The legacy (non-zip) torch.save format: consecutive pickles, then raw storages.

Layout: magic number, protocol version, sys_info, the object, the sorted list of storage keys,
then per key an 8-byte element count and the storage bytes. Offsets follow from key order and
sizes, so nothing but the pickles is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import PickleError, UnreadableError
from .nodes import Storage
from .safety import Safety
from .unpickler import Unpickled, unpickle

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001


@dataclass
class LegacyRecord:
    name: str
    data_offset: int
    size: int
    path: str = ""


def read_legacy(path: str, data: bytes, file_size: int) -> tuple[Unpickled, dict[str, Any]]:
    """Parse a legacy file whose leading bytes are ``data`` (the pickles; storages follow)."""
    safety = Safety()  # torch.load unpickles all five: what each runs counts

    def part(pos: int) -> Unpickled:
        try:
            u = unpickle(data, pos)
        except PickleError as e:
            partial = Safety()
            partial.merge(safety)
            partial.merge(getattr(e, "safety", None) or Safety())
            e.safety = partial
            raise
        safety.merge(u.safety)
        return u

    magic = part(0)
    if magic.root != MAGIC_NUMBER:
        raise UnreadableError(f"a plain pickle, not a torch.save checkpoint", path=path)
    proto = part(magic.end)
    if proto.root != PROTOCOL_VERSION:
        raise UnreadableError(f"legacy torch file with unknown protocol {proto.root!r}", path=path)
    info = part(proto.end)
    main = part(info.end)
    keys = part(main.end)
    if not isinstance(keys.root, list) or not all(isinstance(k, str) for k in keys.root):
        raise UnreadableError(f"legacy torch file without its storage key list", path=path)
    off = keys.end
    records: dict[str, LegacyRecord] = {}
    for key in keys.root:
        st: Storage | None = main.storages.get(key)
        if st is None:
            raise UnreadableError(f"storage {key} is listed but never used", path=path)
        nbytes = st.nbytes
        if off + 8 + nbytes > file_size:
            raise UnreadableError(f"storage {key} runs past the end of the file "
                                  "(truncated)", path=path)
        records[key] = LegacyRecord(key, off + 8, nbytes, path)
        off += 8 + nbytes
    for key, st in main.storages.items():
        if key not in records:
            raise UnreadableError(f"storage {key} has no bytes in the file", path=path)
        st.record = records[key]
    # torch.load unpickles all five pickles: globals named outside the main object count too
    globals_ = dict(main.globals)
    for u in (magic, proto, info, keys):
        for q, g in u.globals.items():
            globals_.setdefault(q, g)
    meta = {"sys_info": info.root, "end": off, "globals": globals_, "safety": safety}
    latin1 = [u.latin1_at for u in (magic, proto, info, main, keys) if u.latin1_at is not None]
    if latin1:
        meta["latin1_at"] = latin1[0]
    return main, meta
