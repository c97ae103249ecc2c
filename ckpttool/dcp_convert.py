"""``to-file`` and ``to-dcp``: a torch.distributed.checkpoint folder <-> one torch.save file.

Both stream: one tensor's bytes at a time, so peak memory grows with the largest tensor, not
with the checkpoint.

* :func:`to_file` gathers each tensor from its chunks (on any number of ranks' data files)
  into one ``data/<n>`` record of a new torch.save zip file; the non-tensor values are kept as
  they were read. Optimizer state keyed by parameter name (``get_state_dict``'s layout) is
  keyed by id, as ``Optimizer.state_dict()`` keys it: ids in param-group order, the names kept
  in each group's ``param_names`` (torch's own key for named optimizers), so the file loads
  with ``torch.load(weights_only=True)`` and ``Optimizer.load_state_dict``. Reading the
  folder runs nothing: every chunk's small torch.save archive is judged like any file first.
* :func:`to_dcp` writes what ``dcp.save`` writes for a one-rank save of the file's state
  dict: optimizer state keyed by id becomes keyed by parameter name (from ``param_names``,
  the names ckpttool found by aligning the model, or a list given with ``model_order``), the
  state dict is flattened with torch's own ``flatten_state_dict``, tensors and values are
  torch.save'd into ``__0_0.distcp`` and ``.metadata`` is pickled from torch's own metadata
  classes. It imports torch (reading does not).

Both write under a temporary name beside the output and rename it into place when verified.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .checkpoint import Checkpoint, _read_zip, open_checkpoint, read_tensor_bytes
from .errors import CkptError, EditError, UnsafeCheckpointError, WriteError
from .formats.nodes import DTYPE_ITEMSIZE, TensorRef
from .formats.safetensors import SafeTensor
from .formats.safety import Safety
from .newtensors import CHUNK_BYTES, contiguous_stride, is_contiguous, standalone_tensor
from .tree import join, pointer_of, rebuild, resolve
from .writer import TMP_SUFFIX, WriteResult, fsync_dir, write_new

@dataclass
class ConvertResult:
    """What :func:`to_file` / :func:`to_dcp` wrote."""

    output: str
    tensors: int  # tensors written
    values: int  # non-tensor values written (to-dcp: bytes entries)
    optimizers: list[str] = field(default_factory=list)  # pointers re-keyed (name <-> id)
    size: int = 0  # bytes written
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------- to-file

class Gathered:
    """A tensor's bytes (row-major, contiguous) gathered from its DCP chunks."""

    def __init__(self, folder: str, fqn: str, shape: tuple[int, ...], dtype: str,
                 pieces: list[tuple[tuple[int, ...], tuple[int, ...], str, int]]) -> None:
        self.folder = folder
        self.fqn = fqn
        self.shape = shape
        self.dtype = dtype
        self.itemsize = DTYPE_ITEMSIZE[dtype]
        self.pieces = pieces  # (offsets, sizes, data file, absolute offset of its bytes)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    def describe(self) -> str:
        return f"{self.fqn} gathered from {len(self.pieces)} chunks"

    def _rows_only(self) -> bool:
        """Chunks split the tensor along dim 0 only (FSDP's and most sharding): the tensor is
        their bytes in order of offset."""
        return all(s[1:] == self.shape[1:] and all(o == 0 for o in off[1:])
                   for off, s, _, _ in self.pieces)

    def chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes | memoryview]:
        if not self.shape or self._rows_only():
            for _, sizes, file, start in sorted(self.pieces, key=lambda p: p[0][:1]):
                n = math.prod(sizes) * self.itemsize
                with open(os.path.join(self.folder, file), "rb") as fh:
                    fh.seek(start)
                    while n:
                        block = fh.read(min(n, chunk_bytes))
                        if not block:
                            raise CkptError(f"{file}: the bytes of {self.fqn} end early "
                                            "(truncated)", path=self.folder)
                        n -= len(block)
                        yield block
            return
        from .newtensors import lazy_numpy
        np = lazy_numpy()
        buf = bytearray(self.nbytes)  # another layout: placed in one buffer of this tensor
        whole = np.frombuffer(buf, dtype=np.uint8).reshape(
            *self.shape[:-1], self.shape[-1] * self.itemsize)
        for offsets, sizes, file, start in self.pieces:
            n = math.prod(sizes) * self.itemsize
            with open(os.path.join(self.folder, file), "rb") as fh:
                fh.seek(start)
                raw = fh.read(n)
            if len(raw) != n:
                raise CkptError(f"{file}: the bytes of {self.fqn} end early (truncated)",
                                path=self.folder)
            part = np.frombuffer(raw, dtype=np.uint8).reshape(
                *sizes[:-1], sizes[-1] * self.itemsize)
            index = tuple(slice(o, o + s) for o, s in zip(offsets[:-1], sizes[:-1])) + (
                slice(offsets[-1] * self.itemsize, (offsets[-1] + sizes[-1]) * self.itemsize),)
            whole[index] = part
        view = memoryview(buf)
        for i in range(0, len(buf), chunk_bytes):
            yield view[i:i + chunk_bytes]


def _chunk_pieces(folder: str, fqn: str, t: SafeTensor, safety: Safety,
                  transforms: dict[tuple[str, int], Any]
                  ) -> list[tuple[tuple[int, ...], tuple[int, ...], str, int]]:
    """Where each chunk's bytes lie: (offsets, sizes, data file, first byte)."""
    return [p[:4] for p in chunk_records(folder, fqn, t, safety, transforms)]


def chunk_records(folder: str, fqn: str, t: SafeTensor, safety: Safety,
                  transforms: dict[tuple[str, int], Any]
                  ) -> list[tuple[tuple[int, ...], tuple[int, ...], str, int, Any]]:
    """Each chunk of a DCP tensor: (offsets, sizes, data file, first byte of its elements, the
    zip record holding them). Each chunk is a small torch.save archive, read (and judged)
    like any file, its tensor's storage bytes located."""
    pieces = []
    for offsets, sizes, file, off, length in t.chunks or ():
        if off < 0 or file == "?":
            raise CkptError(f"{fqn}: .metadata names no data for the chunk at {list(offsets)}",
                            path=folder)
        if transforms.get((file, off)):
            raise CkptError(f"{fqn or 'a tensor'}: its chunk in {file} is stored with "
                            f"transforms {transforms[(file, off)]!r} (compressed or encrypted), "
                            "which ckpttool does not decode", path=folder)
        fp = os.path.join(folder, file)
        fd = os.open(fp, os.O_RDONLY)
        try:
            part = _read_zip(fp, file, fd, off + length)
        finally:
            os.close(fd)
        safety.merge(part.safety, file)
        if part.safety.unsafe:
            raise UnsafeCheckpointError("refusing to convert: the chunk of " + fqn + " in "
                                        + file + ": " + part.safety.headline()
                                        + ". Nothing was written.", path=folder)
        ref = part.root
        if not isinstance(ref, TensorRef) or ref.storage is None or ref.storage.record is None:
            raise CkptError(f"{fqn}: the chunk at bytes {off}.. of {file} is not a tensor",
                            path=folder)
        if tuple(ref.shape) != tuple(sizes) or not is_contiguous(ref) or ref.dtype != t.dtype:
            raise CkptError(f"{fqn}: the chunk at bytes {off}.. of {file} holds a "
                            f"{ref.dtype} tensor of shape {list(ref.shape)}, not the "
                            f"{t.dtype} chunk of shape {list(sizes)} .metadata declares",
                            path=folder)
        start = ref.storage.record.data_offset + ref.offset * ref.itemsize
        if start < off or start + math.prod(sizes) * ref.itemsize > off + length:
            raise CkptError(f"{fqn}: a chunk's bytes lie outside its archive in {file}",
                            path=folder)
        pieces.append((tuple(offsets), tuple(sizes), file, start, ref.storage.record))
    if sum(math.prod(p[1]) for p in pieces) != t.numel:
        raise CkptError(f"{fqn}: its chunks hold {sum(math.prod(p[1]) for p in pieces)} "
                        f"elements, the tensor {t.numel}", path=folder)
    return pieces


def dcp_transforms(ckpt: Checkpoint) -> dict[tuple[str, int], Any]:
    """(data file, offset) -> the transforms (compression, ...) .metadata says an entry was
    written with, for every entry of a DCP folder (worked out once per checkpoint)."""
    f = ckpt.files[0]
    cached = f.extra.get("dcp_transforms")
    if cached is None:
        from .formats.nodes import fields
        cached = {}
        for info in fields(f.extra["dcp_meta"]).get("storage_data", {}).values():
            i = fields(info)
            cached[(str(i.get("relative_path")), int(i.get("offset") or 0))] = \
                i.get("transform_descriptors")
        f.extra["dcp_transforms"] = cached
    return cached  # type: ignore[no-any-return]


def gathered_bytes(ckpt: Checkpoint, fqn: str, t: SafeTensor) -> bytes:
    """All of a DCP tensor's bytes, row-major (its chunks judged and gathered)."""
    pieces = _chunk_pieces(ckpt.path, fqn, t, Safety(), dcp_transforms(ckpt))
    return b"".join(bytes(c) for c in Gathered(ckpt.path, fqn, t.shape, t.dtype,
                                                pieces).chunks())


def names_to_ids(opt_sd: dict[Any, Any]) -> dict[Any, Any]:
    """A name-keyed optimizer state dict keyed by id, as ``Optimizer.state_dict()`` keys it
    (ids in param-group order; each group's names kept in ``param_names``)."""
    ids: dict[Any, int] = {}
    groups = []
    for g in opt_sd["param_groups"]:
        new = {}
        names = list(g.get("params", []))
        for k, v in g.items():
            if k == "params":
                new["param_names"] = g.get("param_names", names)
                new["params"] = [ids.setdefault(n, len(ids)) for n in names]
            elif k != "param_names":
                new[k] = v
        groups.append(new)
    state = {}
    for name, s in opt_sd["state"].items():
        if name not in ids:
            raise CkptError(f"the optimizer state has {name!r}, which no param group lists")
        state[ids[name]] = s
    out = {}
    for k, v in opt_sd.items():
        out[k] = state if k == "state" else groups if k == "param_groups" else v
    return out


def to_file(source: str | os.PathLike[str], output: str | os.PathLike[str], *,
            force: bool = False, keep_names: bool = False,
            progress: Any = None) -> ConvertResult:
    """Write DCP folder ``source`` as one torch.save file ``output`` (see the module doc).

    ``keep_names``: leave name-keyed optimizer state keyed by name (as ``dcp_to_torch_save``
    does) instead of keying it by id.
    """
    ckpt = open_checkpoint(source)
    if ckpt.kind != "dcp":
        raise CkptError("not a torch.distributed.checkpoint folder (no .metadata)",
                        path=ckpt.path, hint="to-dcp writes a DCP folder from a file")
    if ckpt.unsafe:
        raise UnsafeCheckpointError("refusing to convert: " + ckpt.safety.headline()
                                    + ". Nothing was written.", path=ckpt.path)
    f = ckpt.files[0]
    from .formats.nodes import fields
    if ckpt.safety.unjudged:
        raise CkptError(f"{len(ckpt.safety.unjudged)} values are stored through stream "
                        "transforms ckpttool does not decode ("
                        + ", ".join(ckpt.safety.unjudged[:3]) + "); nothing was written",
                        path=ckpt.path, hint="load it with dcp.load and the extension registry "
                        "it was saved with, and torch.save it")
    transforms = dcp_transforms(ckpt)
    safety = Safety()
    count = [0]

    def materialize(node: Any, keys: tuple[str, ...]) -> Any:
        if isinstance(node, SafeTensor):
            fqn = ".".join(keys)
            pieces = _chunk_pieces(ckpt.path, fqn, node, safety, transforms)
            count[0] += 1
            return standalone_tensor(node.dtype, node.shape, contiguous_stride(node.shape),
                                     Gathered(ckpt.path, fqn, node.shape, node.dtype, pieces))
        if isinstance(node, dict):
            return {k: materialize(v, keys + (str(k),)) for k, v in node.items()}
        if isinstance(node, list):
            return [materialize(v, keys + (str(i),)) for i, v in enumerate(node)]
        return node
    root = materialize(ckpt.root, ())
    if safety.unsafe:
        raise UnsafeCheckpointError("refusing to convert: a chunk archive "
                                    + safety.headline() + ". Nothing was written.",
                                    path=ckpt.path)
    rekeyed = []
    if not keep_names:
        for opt in ckpt.optimizers:
            if opt.names_source == "param ids (name-keyed)" and not opt.flattened:
                sd = resolve(root, opt.pointer)
                root = rebuild(root, {id(sd): names_to_ids(sd)})
                rekeyed.append(opt.pointer or "/")
    w = write_new(root, os.fspath(output), force=force, progress=progress)
    n_values = sum(1 for md in fields(f.extra["dcp_meta"])["state_dict_metadata"].values()
                   if getattr(md, "qualname", "").endswith(".BytesStorageMetadata"))
    return ConvertResult(w.path, count[0], n_values, rekeyed, w.size)


# ----------------------------------------------------------------------------------- to-dcp

def ids_to_names(opt_sd: dict[Any, Any], names: list[str]) -> dict[Any, Any]:
    """An id-keyed optimizer state dict keyed by parameter name, in ``get_state_dict``'s
    layout (``params`` lists names; ``param_names`` dropped)."""
    order = [p for g in opt_sd["param_groups"] for p in g.get("params", [])]
    if len(names) != len(order):
        raise EditError(f"{len(names)} parameter names for {len(order)} params")
    by_id = dict(zip(order, names))
    groups = []
    for g in opt_sd["param_groups"]:
        groups.append({k: ([by_id[p] for p in v] if k == "params" else v)
                       for k, v in g.items() if k != "param_names"})
    state = {}
    for pid, s in opt_sd["state"].items():
        if pid not in by_id:
            raise EditError(f"the optimizer state has param {pid!r}, which no group lists")
        state[by_id[pid]] = s
    return {k: state if k == "state" else groups if k == "param_groups" else v
            for k, v in opt_sd.items()}


def _opt_names(ckpt: Checkpoint, model_order: list[str] | None) -> dict[str, list[str]]:
    out = {}
    for opt in ckpt.optimizers:
        if opt.names_source == "param ids (name-keyed)":
            continue
        if model_order is not None:
            names = list(model_order)
            if len(names) != len(opt.param_ids):
                raise EditError(f"--model-order lists {len(names)} names; optimizer "
                                f"{opt.pointer or '/'} has {len(opt.param_ids)} params",
                                path=ckpt.path)
        elif opt.names_source is not None and all(g.param_names for g in opt.groups):
            names = [str(n) for g in opt.groups for n in g.param_names or ()]
        else:
            raise EditError(
                f"the parameter names of optimizer {opt.pointer or '/'} are not known "
                f"({opt.names_note or 'no param_names and no model state to align with'}); "
                "a DCP checkpoint keys optimizer state by name", path=ckpt.path,
                hint="pass --model-order FILE: the names in the optimizer's param order, one "
                     "per line (e.g. from [n for n, _ in model.named_parameters()])")
        out[opt.pointer] = names
    return out


def to_dcp(source: str | os.PathLike[str], output: str | os.PathLike[str], *,
           force: bool = False, model_order: list[str] | None = None) -> ConvertResult:
    """Write checkpoint file ``source`` as a one-rank DCP folder ``output`` (see the module
    doc)."""
    from .checkpoint import open_for_edit
    ckpt = open_for_edit(source, "to-dcp")
    if ckpt.is_folder or ckpt.kind == "dcp":
        raise CkptError("to-dcp converts one torch.save file", path=ckpt.path,
                        hint="a DCP folder is already one; for a Trainer or accelerate folder "
                             "give its model or optimizer file")
    names = _opt_names(ckpt, model_order)
    import torch
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata,
                                                       ChunkStorageMetadata, Metadata,
                                                       MetadataIndex, StorageMeta,
                                                       TensorProperties,
                                                       TensorStorageMetadata)
    root = ckpt.root
    rekeyed = []
    for ptr, n in names.items():
        sd = resolve(root, ptr)
        root = rebuild(root, {id(sd): ids_to_names(sd, n)})
        rekeyed.append(ptr or "/")
    refs: dict[int, TensorRef] = {}

    def skeleton(node: Any, ptr: str) -> Any:
        """The tree with each tensor a meta tensor, for torch's own flatten_state_dict."""
        if isinstance(node, TensorRef):
            if not node.plain:
                raise EditError(f"{ptr}: a {node.qualname} tensor (DTensor, subclass or "
                                "Parameter with state) cannot be written to DCP by ckpttool",
                                path=ckpt.path, pointer=ptr)
            meta = torch.empty(node.shape, dtype=getattr(torch, node.dtype), device="meta")
            refs[id(meta)] = node
            return meta
        if isinstance(node, dict):
            return {k: skeleton(v, join(ptr, k)) for k, v in node.items()}
        if isinstance(node, list):
            return [skeleton(v, join(ptr, i)) for i, v in enumerate(node)]
        return node

    if not isinstance(root, dict):
        raise CkptError("the file does not hold a dict: DCP saves a state dict",
                        path=ckpt.path)
    flat, mapping = flatten_state_dict(skeleton(root, ""))
    out = os.path.abspath(os.fspath(output))
    if os.path.lexists(out) and not force:
        raise CkptError("already exists", path=os.fspath(output),
                        hint="use --force to replace it")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise CkptError(f"the folder {parent} does not exist", path=os.fspath(output))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=TMP_SUFFIX, dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    data_name = "__0_0.distcp"
    sdm: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    tensors = values = 0
    try:
        with open(os.path.join(tmp, data_name), "wb") as fh:
            for fqn, value in flat.items():
                start = fh.tell()
                if isinstance(value, torch.Tensor) and id(value) in refs:
                    ref = refs[id(value)]
                    t = _load_tensor(torch, ref)
                    torch.save(t, fh)
                    zeros = torch.Size([0] * len(ref.shape))
                    sdm[fqn] = TensorStorageMetadata(
                        TensorProperties(dtype=t.dtype), torch.Size(ref.shape),
                        [ChunkStorageMetadata(zeros, torch.Size(ref.shape))])
                    storage[MetadataIndex(fqn, zeros, 0)] = _StorageInfo(
                        data_name, start, fh.tell() - start)
                    tensors += 1
                    del t
                else:  # a value: the original node (never a torch object) pickled
                    from .dcp_save import _tensorish, value_archive
                    node = resolve(root, pointer_of(mapping[fqn]))
                    if _tensorish(node):
                        raise EditError(f"{pointer_of(mapping[fqn])}: a tuple or object holding "
                                        "tensors; DCP would pickle it whole and ckpttool does "
                                        "not write that", path=ckpt.path)
                    fh.write(value_archive(node))
                    sdm[fqn] = BytesStorageMetadata()
                    storage[MetadataIndex(fqn)] = _StorageInfo(data_name, start,
                                                               fh.tell() - start)
                    values += 1
            fh.flush()
            os.fsync(fh.fileno())
        import pickle
        import uuid
        meta = Metadata(sdm, planner_data=mapping, storage_data=storage,
                        storage_meta=StorageMeta(checkpoint_id=out, save_id=str(uuid.uuid4())),
                        version="1.0.0")
        with open(os.path.join(tmp, ".metadata"), "wb") as fh:
            pickle.dump(meta, fh)
            fh.flush()
            os.fsync(fh.fileno())
        back = open_checkpoint(tmp)  # what was written reads back, with the same structure
        if back.unsafe or len(back.optimizers) != len(ckpt.optimizers):
            raise WriteError("the new folder does not read back as written; nothing was "
                             "written", path=os.fspath(output))
        fsync_dir(tmp)
        old = None
        if os.path.lexists(out):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old.", suffix=TMP_SUFFIX,
                                   dir=parent)
            os.rename(out, os.path.join(old, "x"))
        os.rename(tmp, out)
        tmp = ""
        fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise WriteError(f"could not write the folder ({e.strerror or e}); nothing was "
                         "written", path=os.fspath(output)) from e
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    size = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out))
    return ConvertResult(out, tensors, values, rekeyed, size)


def _load_tensor(torch: Any, ref: TensorRef) -> Any:
    """One tensor of the source file, from its bytes (no unpickling): a CPU tensor of its
    shape and dtype, contiguous."""
    raw = bytearray(read_tensor_bytes(ref)) if ref.numel else bytearray()
    dtype = getattr(torch, ref.dtype)
    if not raw:
        return torch.empty(ref.shape, dtype=dtype)
    flat = torch.frombuffer(raw, dtype=dtype)
    return flat.as_strided(tuple(ref.shape), tuple(ref.stride)).contiguous()


__all__ = ["ConvertResult", "Gathered", "ids_to_names", "names_to_ids",
           "to_dcp", "to_file"]
