"""Writing a checkpoint tree back as a pickle, the way torch.save's pickler would have.

:func:`dumps` is the inverse of :func:`ckpttool.formats.unpickler.unpickle`: for a tree read
from a torch.save file and left unchanged, it reproduces ``data.pkl`` byte for byte.

How: the pure-Python :class:`pickle._Pickler` (which emits the same opcodes as the C pickler
torch.save uses) with dispatch entries for the tree's nodes. Nothing named in the tree is ever
imported:

* :class:`~.nodes.Global` -> ``GLOBAL module\\nname\\n`` plus a memo entry (the unpickler makes
  one node per GLOBAL opcode, so memo identity is the original's);
* :class:`~.nodes.Reduce` / :class:`~.nodes.TensorRef` -> ``func, args, REDUCE`` (or NEWOBJ /
  NEWOBJ_EX by ``kind``) plus a memo entry, then APPENDS for ``items``, SETITEMS for
  ``dictitems`` and ``state BUILD`` -- the order of ``pickle``'s ``save_reduce``;
* :class:`~.nodes.Storage` -> a persistent id: a FRESH tuple built from ``storage.pid``'s
  elements at each use, as torch's ``persistent_id`` builds a new tuple per tensor while its
  elements (the ``"storage"`` literal, the storage type, the key string, the location string)
  keep their identity, so the memo GETs come out as in the original.

Values the unpickler evaluated (``OrderedDict()`` with ``_metadata``, bytes from
``_codecs.encode``, ``set([...])``, ``bytes()``, ``bytearray``) are written by ``pickle``'s own
code, which produces exactly what the C pickler produced for them.

Known limits of byte-exactness (the result still loads to equal values):

* a ``set``/``frozenset`` of strings iterates in an order that depends on the string hash seed
  of the process, so its members may come out in another order than torch's process wrote them;
* a shared storage (several tensors on one storage) is one :class:`Storage` keeping the FIRST
  pid tuple; if torch's process built a *new* location string for each use (e.g. ``"cuda:0"``
  made by string concatenation) the later uses are written as a memo GET instead of a new
  string. CPU locations (the constant ``"cpu"``) are exact.
* two equal one-character (or empty) strings that torch's process held as distinct objects
  become one object when unpickled (CPython caches them), so the later one is written as a memo
  GET.
"""

from __future__ import annotations

import io
import pickle
from typing import Any, Callable

from .nodes import Global, Reduce, Storage, TensorRef

DEFAULT_PROTOCOL = 2

# Map a Storage to the persistent id tuple to write for it (called once per storage per dump;
# the result's elements are reused for every later use of that storage).
StoragePid = Callable[[Storage], tuple[Any, ...]]


class TreePickler(pickle._Pickler):  # type: ignore[misc,name-defined]
    """``pickle._Pickler`` that writes ckpttool tree nodes without importing anything."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def __init__(self, file: Any, protocol: int = DEFAULT_PROTOCOL,
                 storage_pid: StoragePid | None = None) -> None:
        super().__init__(file, protocol=protocol)
        self._storage_pid = storage_pid
        self._pids: dict[int, tuple[Storage, tuple[Any, ...]]] = {}
        # storages in first-use order, as torch's serialized_storages would be
        self.storage_order: list[Storage] = []

    # -- persistent ids ---------------------------------------------------------------------
    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is not Storage:
            return None
        entry = self._pids.get(id(obj))
        if entry is None:
            pid = self._storage_pid(obj) if self._storage_pid is not None else obj.pid
            if not isinstance(pid, tuple):
                raise pickle.PicklingError(f"storage pid must be a tuple, got {pid!r}")
            pid = _fresh_key(pid)
            entry = (obj, pid)  # keep obj alive so id() stays unique during the dump
            self._pids[id(obj)] = entry
            self.storage_order.append(obj)
        # a fresh tuple per use; its elements keep their identity (memo GETs as torch wrote)
        return tuple(list(entry[1]))

    # -- nodes ------------------------------------------------------------------------------
    def save_global_node(self, obj: Global) -> None:
        if self.proto >= 4:
            self.save(obj.module)
            self.save(obj.name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + obj.module.encode("utf-8") + b"\n"
                       + obj.name.encode("utf-8") + b"\n")
        self.memoize(obj)

    def save_reduce_node(self, obj: Reduce) -> None:
        save = self.save
        write = self.write
        if obj.kind == "newobj_ex":
            save(obj.func)
            save(obj.args)
            save(obj.kwargs if obj.kwargs is not None else {})
            write(pickle.NEWOBJ_EX)
        elif obj.kind == "newobj":
            save(obj.func)
            save(obj.args)
            write(pickle.NEWOBJ)
        else:
            save(obj.func)
            save(obj.args)
            write(pickle.REDUCE)
        if id(obj) in self.memo:  # recursive reference through the args
            write(pickle.POP + self.get(self.memo[id(obj)][0]))
        else:
            self.memoize(obj)
        if obj.items:
            self._batch_appends(iter(obj.items))
        if obj.dictitems:
            self._batch_setitems(iter(obj.dictitems))
        if obj.has_state:
            save(obj.state)
            write(pickle.BUILD)

    dispatch[Global] = save_global_node
    dispatch[Reduce] = save_reduce_node
    dispatch[TensorRef] = save_reduce_node


def _fresh_key(pid: tuple[Any, ...]) -> tuple[Any, ...]:
    """Give a one-character storage key a string object of its own.

    torch names storages ``str(len(id_map))``: a new string object per storage, shared by
    every use of that storage (memo GETs) but by nothing else. The unpickler, though, gets
    CPython's cached singleton for a one-character string, which is also the object of every
    other equal one-character string in the tree (say the ``"0"`` key of a model's
    ``_metadata``); writing that would turn the other string into a memo GET. ``str(int(k))``
    is a fresh object (CPython does not cache it), as torch's was.
    """
    if len(pid) > 2 and isinstance(pid[2], str) and len(pid[2]) == 1 and pid[2].isdigit():
        return (*pid[:2], str(int(pid[2])), *pid[3:])
    return pid


def dumps(root: Any, *, protocol: int = DEFAULT_PROTOCOL,
          storage_pid: StoragePid | None = None,
          storage_order: list[Storage] | None = None) -> bytes:
    """The pickle of ``root``, as torch.save's pickler writes it (protocol 2 by default).

    ``storage_pid(storage)`` may return the persistent id tuple to write for a storage (to
    rename its key, change its location, or turn a legacy 6-element pid into the zip form);
    by default ``storage.pid`` is written as is. If ``storage_order`` is a list, the storages
    are appended to it in first-use order (the order torch writes their ``data/<key>``
    records).
    """
    buf = io.BytesIO()
    p = TreePickler(buf, protocol=protocol, storage_pid=storage_pid)
    p.dump(root)
    if storage_order is not None:
        storage_order.extend(p.storage_order)
    return buf.getvalue()


def zip_pid_renumbering() -> StoragePid:
    """A ``storage_pid`` giving keys ``"0"``, ``"1"``, ... in first-use order, in zip form.

    The result is ``("storage", type, key, location, numel)``: a legacy pid loses its sixth
    element (view metadata; refused when not None). A key equal to the old one keeps the old
    string object, so an unchanged torch-zip tree still pickles byte for byte.
    """
    counter = [0]

    def pid_for(st: Storage) -> tuple[Any, ...]:
        pid = st.pid
        if len(pid) > 5 and pid[5] is not None:
            raise ValueError(f"storage {st.key} is a legacy storage view (view metadata "
                             f"{pid[5]!r}); converting it is not supported")
        new_key = str(counter[0])
        counter[0] += 1
        key = pid[2] if pid[2] == new_key else new_key
        return (pid[0], pid[1], key, pid[3], pid[4])

    return pid_for
