"""Safety verdicts: what ``torch.load`` of a pickle would *do*, judged without doing it.

Loading a pickle does three kinds of things, and each is judged here from the opcodes the
restricted interpreter (:mod:`.unpickler`) read; nothing is ever imported or called:

* it looks up globals (``GLOBAL``, ``STACK_GLOBAL``, ``INST``): importing their module;
* it calls callables (``REDUCE``, ``NEWOBJ``, ``INST``, ``OBJ``, ``copyreg._reconstructor``);
* it uses machinery that picks a callable at load time (``EXT`` codes, ``STACK_GLOBAL`` operands
  that are not literal strings, calling the result of another call).

Three levels, strictest wins over a file:

``weights-only``
    every global is on the allowlist of ``torch.load(weights_only=True)`` (taken from the
    installed torch when ``ckpttool/knowledge`` is generated, shipped as data).
``needs-trust``
    ``weights_only=False`` is needed, and nothing known to be dangerous happens: classes are
    constructed (argparse ``Namespace``, numpy arrays, ``pathlib`` paths, enums and
    dataclasses of training libraries, a pickled ``nn.Module``), known data constructors run,
    functions are merely referenced (``torch._C._nn.gelu`` as an activation), a public class
    attribute is fetched (mmengine's ``getattr(HistoryBuffer, "min")``).
``unsafe``
    by *shape*, whatever the names: a call of a callable computed at load time (the result of
    ``getattr``, ``attrgetter``, any call); ``STACK_GLOBAL`` operands computed at load time; the
    extension registry (``EXT1/2/4``); a function of the standard library, numpy or torch
    called at load time that is not one of their known data constructors (file writers,
    process spawners, nested loaders, dotted-name resolvers, code objects all fall here);
    bytes given to a function outside the known constructors (a nested pickle); a class of the
    standard library constructed that is not a known data class (``wave.Wave_write(path)``).
    By *name*: the modules and functions known to run code, write files or reach the network,
    wherever they are re-exported from (``pathlib.os``, ``x.system``, ``x.attrgetter``).

So a new gadget in the standard library, numpy or torch needs a new *shape* to get through,
not a new name: only the listed data constructors of those packages may be called.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from typing import Any

from .. import knowledge

WEIGHTS_ONLY, NEEDS_TRUST, UNSAFE = "weights-only", "needs-trust", "unsafe"
_RANK = {WEIGHTS_ONLY: 0, NEEDS_TRUST: 1, UNSAFE: 2}

ALLOWED: frozenset[str] = knowledge.weights_only_globals()

# Harmless builtins a pickle may name (containers and numbers); every other builtin is unsafe.
_SAFE_BUILTINS = frozenset({
    "set", "frozenset", "bytearray", "bytes", "complex", "slice", "range", "int", "float",
    "str", "list", "tuple", "dict", "bool", "object", "NoneType", "Ellipsis", "NotImplemented",
})

# Callables outside torch's list that build plain data when called at load time.
KNOWN_DATA: frozenset[str] = frozenset(
    [f"builtins.{n}" for n in _SAFE_BUILTINS]
    + [
        "collections.defaultdict", "collections.deque", "argparse.Namespace",
        "types.SimpleNamespace", "datetime.datetime", "datetime.date", "datetime.time",
        "datetime.timedelta", "datetime.timezone", "decimal.Decimal", "fractions.Fraction",
        "uuid.UUID", "uuid.SafeUUID", "pathlib.Path", "pathlib.PosixPath", "pathlib.WindowsPath",
        "pathlib.PurePath", "pathlib.PurePosixPath", "pathlib.PureWindowsPath", "re._compile",
        "array.array", "array._array_reconstructor", "time.struct_time", "enum.Enum",
        "ipaddress.IPv4Address", "ipaddress.IPv6Address", "ipaddress.IPv4Network",
        "ipaddress.IPv6Network", "functools.partial",
        "logging.getLogger",  # a pickled Logger (Logger.__reduce__): fetches or makes a logger
        "zoneinfo.ZoneInfo._unpickle",  # a datetime's ZoneInfo: reads the tz database
        "numpy.dtype", "numpy.ndarray",
    ]
    + [f"numpy.{t}" for t in (
        "bool_", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "float16", "float32", "float64", "longdouble", "complex64", "complex128", "str_",
        "bytes_", "intc", "uintc", "longlong", "ulonglong", "short", "ushort", "byte", "ubyte",
        "half", "single", "double", "csingle", "cdouble", "datetime64", "timedelta64",
        "object_", "void")]
    + [
        "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
        "numpy.core.numeric._frombuffer", "numpy._core.numeric._frombuffer",
        "numpy.ma.core._mareconstruct",
        "numpy.random._pickle.__generator_ctor", "numpy.random._pickle.__randomstate_ctor",
        "numpy.random._pickle.__bit_generator_ctor",
    ]
    # the dataclasses of a DCP folder's .metadata, precisely (the rest of
    # torch.distributed.checkpoint loads files and stays dangerous)
    + [f"torch.distributed.checkpoint.metadata.{n}" for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")]
    + ["torch.distributed.checkpoint.filesystem._StorageInfo"])
# copyreg's protocol-2 helpers construct their first argument: that class is what is judged
RECONSTRUCTORS = frozenset({"copyreg._reconstructor", "copyreg.__newobj__",
                            "copyreg.__newobj_ex__"})
GETATTR = frozenset({"builtins.getattr"})

# Modules whose every member can run code, touch files or the network, or load another pickle.
_DANGEROUS_MODULES = (
    "os", "posix", "nt", "subprocess", "sys", "runpy", "importlib", "ctypes", "cProfile",
    "profile", "pdb", "bdb", "pty", "shutil", "socket", "webbrowser", "pip", "setuptools",
    "distutils", "code", "codeop", "commands", "multiprocessing", "asyncio", "concurrent",
    "timeit", "trace", "pickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle",
    "joblib", "types", "inspect", "gc", "threading", "_thread", "signal", "atexit", "site",
    "zipimport", "pkgutil", "io", "_io", "tempfile", "glob", "urllib", "http", "ftplib",
    "smtplib", "telnetlib", "xmlrpc", "operator", "_operator", "codecs", "linecache",
    "tokenize", "ensurepip", "venv", "sysconfig", "imp", "builtins", "copyreg",
    "_posixsubprocess", "select", "selectors", "mmap", "resource", "fcntl", "platform", "ssl",
    "sqlite3", "logging.config", "logging.handlers", "_ctypes", "_imp", "_frozen_importlib",
    "_frozen_importlib_external", "_functools", "_multiprocessing", "_posixshmem", "_socket",
    "_sqlite3", "_lsprof", "_winapi", "msvcrt", "winreg", "_osx_support", "_aix_support",
    "_testcapi", "_testinternalcapi", "test.support", "unittest", "doctest", "pydoc", "pstats",
    "compileall", "py_compile", "rlcompleter", "readline", "antigravity", "this", "zipfile",
    "tarfile", "gzip", "bz2", "lzma", "dbm", "mailbox", "fileinput", "socketserver", "wsgiref",
    "imaplib", "poplib", "nntplib", "cgi", "cgitb", "idlelib", "tkinter", "turtle", "wave",
    "aifc", "sunau", "uu", "ipykernel", "IPython", "requests", "httpx", "urllib3",
    "aiohttp", "yaml", "jinja2", "sympy", "numexpr", "pandas.io", "cffi",
    "numpy.lib.npyio", "numpy.lib._npyio_impl", "numpy.lib.format", "numpy.lib._format_impl",
    "numpy.lib._datasource", "numpy.ctypeslib", "numpy.f2py", "numpy.testing",
    "numpy.distutils",
    "torch._inductor", "torch._dynamo", "torch.hub", "torch.jit", "torch.package",
    "torch.utils.cpp_extension", "torch.ops", "torch.library", "torch.serialization",
    "torch.storage", "torch.fx", "torch.multiprocessing", "torch._ops", "torch.classes",
    "torch.utils.model_zoo", "torch.utils.collect_env", "torch.utils.benchmark",
    "torch.utils.serialization", "torch.utils.tensorboard", "torch.testing", "torch.export",
    "torch._export", "torch.onnx", "torch.compiler", "torch._functorch",
    "torch._higher_order_ops", "torch._weights_only_unpickler", "torch._load_global_deps",
    "torch.distributed.rpc", "torch.distributed.elastic", "torch.distributed.launcher",
    "torch.distributed.run", "torch.distributed.checkpoint",
)
# Specific names that are dangerous although their module is not.
_DANGEROUS_NAMES = frozenset({
    "torch.load", "torch.save", "torch.compile", "torch.from_file", "numpy.load",
    "numpy.fromfile", "numpy.save", "numpy.memmap", "numpy.savez", "numpy.savez_compressed",
    "numpy.savetxt", "numpy.loadtxt", "numpy.genfromtxt", "numpy.vectorize", "numpy.frompyfunc",
    "numpy.DataSource", "pandas.read_pickle", "pandas.eval", "logging.FileHandler",
    "logging.basicConfig", "torch._utils._import_dotted_name",
})
# Attribute names that are dangerous wherever a module re-exports them (``pathlib.os``,
# ``pathlib.attrgetter``): the top-level dangerous modules and the functions that run code,
# resolve names, load pickles or write files.
_DANGEROUS_LEAVES = frozenset(
    {m for m in _DANGEROUS_MODULES if "." not in m and m not in ("test", "this", "types",
                                                                   "typing", "code")}
    | {"system", "popen", "popen2", "popen3", "spawnl", "spawnv", "spawnve", "spawnvp",
       "execl", "execv", "execve", "execvp", "fork", "forkpty", "eval", "exec", "execfile",
       "compile", "__import__", "import_module", "attrgetter", "methodcaller", "getattr",
       "setattr", "delattr", "open", "_open", "fdopen", "load", "loads", "_load_from_bytes",
       "load_config", "check_call", "check_output", "getoutput", "getstatusoutput", "Popen",
       "write_history_file", "_import_dotted_name", "_eval_type", "import_string",
       "resolve_name", "locate", "get_obj_from_str", "breakpoint", "unlink", "rmtree",
       "remove", "write_text", "write_bytes", "savez", "savez_compressed", "tofile"})
_FAMILIES = ("numpy", "torch")


def _stdlib_modules() -> frozenset[str]:
    return frozenset(sys.stdlib_module_names) | {"__builtin__", "copy_reg", "cPickle"}


_STDLIB = _stdlib_modules()


@functools.lru_cache(maxsize=4096)
def normalize(module: str, name: str) -> tuple[str, str]:
    """The global as ``torch.load`` resolves it: protocol 0-2 pickles are loaded with
    ``fix_imports``, so Python 2 names (``__builtin__.eval``, ``cPickle.loads``) map to
    Python 3 ones through pickle's own table (``_compat_pickle``, data only)."""
    import _compat_pickle as cp
    if (module, name) in cp.NAME_MAPPING:
        return cp.NAME_MAPPING[(module, name)]
    if module in cp.IMPORT_MAPPING:
        return cp.IMPORT_MAPPING[module], name
    return module, name


def _denied(mod: str, name: str) -> str | None:
    """Why ``mod.name`` is dangerous by name, or None."""
    qual = f"{mod}.{name}"
    if qual in _DANGEROUS_NAMES or any(qual.startswith(n + ".") for n in _DANGEROUS_NAMES):
        return "a known-dangerous callable"
    if mod == "builtins":
        return None if name in _SAFE_BUILTINS else "a builtin that runs or reaches code"
    for d in _DANGEROUS_MODULES:
        if mod == d or mod.startswith(d + "."):
            return f"module {d} runs code, touches files or the network, or loads pickles"
    leaf = name.rsplit(".", 1)[-1]
    if leaf in _DANGEROUS_LEAVES:
        return f"{leaf!r} is a known-dangerous module or function, re-exported by {mod}"
    if "." in name or name.startswith("__"):
        return "an attribute chain or dunder name, which reaches code"
    return None


def _class_like(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1].lstrip("_")  # private classes: torch's _FlatLayout
    return leaf[:1].isupper()


def _family(mod: str) -> str | None:
    top = mod.split(".", 1)[0]
    if top in _STDLIB:
        return "the standard library"
    return top if top in _FAMILIES else None


def _has_bytes(args: Any, depth: int = 0) -> bool:
    if isinstance(args, (bytes, bytearray)):
        return True
    if isinstance(args, (tuple, list)) and depth < 3:
        return any(_has_bytes(a, depth + 1) for a in args)
    return False


def judge_global(module: str, name: str, use: str = "value",
                 args: tuple[Any, ...] = ()) -> tuple[str, str]:
    """The level of one use of the global ``module.name`` in a pickle, and why.

    ``use`` is ``"value"`` (looked up and stored), ``"init"`` (called: ``REDUCE``, ``INST``,
    ``OBJ``, or a class rebuilt by ``copyreg._reconstructor`` with its own ``__init__``) or
    ``"new"`` (only ``cls.__new__`` runs: ``NEWOBJ``, ``copyreg.__newobj__``, or
    ``_reconstructor`` over ``object``); ``args`` are the call's arguments.
    """
    level, why, bytes_matter = _judge_name(module, name, use)
    if bytes_matter and _has_bytes(args):
        return UNSAFE, "a function given bytes at load time (a nested pickle or code)"
    return level, why


@functools.lru_cache(maxsize=4096)
def _judge_name(module: str, name: str, use: str) -> tuple[str, str, bool]:
    """judge_global without the arguments; the flag says whether bytes among the arguments
    would make the call unsafe."""
    mod, nm = normalize(module, name)
    qual = f"{mod}.{nm}"
    if f"{module}.{name}" in ALLOWED or qual in ALLOWED:
        return WEIGHTS_ONLY, "", False
    if qual in KNOWN_DATA or qual in RECONSTRUCTORS:
        return NEEDS_TRUST, "a known data constructor outside torch's weights_only list", False
    if nm.startswith("__pyx_unpickle_") and "." not in nm:
        # Cython's generated pickle helper of an extension class (numpy's SeedSequence):
        # it builds that class with __new__ and sets its state
        return NEEDS_TRUST, f"Cython's pickle helper for {mod}.{nm[15:]}", False
    if qual in GETATTR:
        return NEEDS_TRUST, "fetches a public attribute of a class", False  # judged by caller
    why = _denied(mod, nm)
    if why is not None:
        return UNSAFE, why, False
    if use == "value":
        return NEEDS_TRUST, "referenced, not called, outside torch's weights_only list", False
    cls = _class_like(nm)
    family = _family(mod)
    if family is not None:
        if not cls or (family == "the standard library" and use == "init"):
            kind = "class" if cls else "function"
            return UNSAFE, (f"a {kind} of {family} called at load time that is not one of its "
                            "known data constructors"), False
        return NEEDS_TRUST, f"constructs a {family} class outside torch's weights_only list", False
    if cls:
        return NEEDS_TRUST, "constructs an object of a class outside torch's weights_only list", \
            False
    return NEEDS_TRUST, "calls a function of a library outside torch's weights_only list", True


# ------------------------------------------------------------------------------ verdicts

@dataclass
class Call:
    """One thing loading would do that is not weights-only: a call, a reference or a
    load-time lookup, where it is in the pickle (``offset``) and, once known, in the tree."""

    global_: str
    args_summary: str
    level: str
    why: str
    offset: int = -1
    file: str = ""
    pointer: str | None = None
    count: int = 1
    node: Any = None  # the tree node the call produced (to find its pointer); not shown

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"global": self.global_, "args_summary": self.args_summary,
                             "level": self.level, "why": self.why}
        if self.pointer is not None:
            d["pointer"] = self.pointer
        if self.offset >= 0:
            d["offset"] = self.offset
        if self.file:
            d["file"] = self.file
        if self.count > 1:
            d["count"] = self.count
        return d


@dataclass
class Safety:
    """The verdict on what ``torch.load`` would run: ``level`` (weights-only, needs-trust or
    unsafe), ``reasons`` (one line each) and the ``calls`` behind them, most severe first."""

    level: str = WEIGHTS_ONLY
    reasons: list[str] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    # pickle opcodes torch's weights-only unpickler does not read (names): a rewrite in
    # protocol 2 removes them (``sanitize``)
    opcodes: list[str] = field(default_factory=list)
    # what could not be read, so is not judged (a DCP value stored compressed): the headline
    # says so, whatever the level
    unjudged: list[str] = field(default_factory=list)

    @property
    def unsafe(self) -> bool:
        return self.level == UNSAFE

    @property
    def unsafe_globals(self) -> list[str]:
        return sorted({c.global_ for c in self.calls if c.level == UNSAFE})

    @property
    def trust_globals(self) -> list[str]:
        return sorted({c.global_ for c in self.calls if c.level == NEEDS_TRUST})

    def add_reason(self, level: str, reason: str) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)
        if _RANK[level] > _RANK[self.level]:
            self.level = level

    def merge(self, other: Safety, file: str = "") -> None:
        for c in other.calls:
            if file and not c.file:
                c.file = file
            self.calls.append(c)
        for r in other.reasons:
            if r not in self.reasons:
                self.reasons.append(r)
        self.opcodes = sorted(set(self.opcodes) | set(other.opcodes))
        self.unjudged += [u for u in other.unjudged if u not in self.unjudged]
        if _RANK[other.level] > _RANK[self.level]:
            self.level = other.level
        self.calls.sort(key=lambda c: -_RANK[c.level])

    def headline(self) -> str:
        """One line: the level and what decides it (and what was not judged)."""
        line = self._headline()
        if self.unjudged and not line.startswith("UNSAFE"):
            line += (f"; {len(self.unjudged)} value{'s' if len(self.unjudged) != 1 else ''} not "
                     f"read and not judged: {', '.join(self.unjudged[:3])}"
                     + (" ..." if len(self.unjudged) > 3 else ""))
        return line

    def _headline(self) -> str:
        if self.level == WEIGHTS_ONLY:
            return "weights-only: torch.load(weights_only=True) loads it"
        if self.level == UNSAFE:
            bad = [c for c in self.calls if c.level == UNSAFE]
            named = ", ".join(dict.fromkeys(f"{c.global_}{_where(c)}" for c in bad[:4]))
            more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
            return f"UNSAFE: loading it would run {named}{more}: {bad[0].why}" if bad else \
                "UNSAFE: " + "; ".join(self.reasons)
        if self.trust_globals == ["torch.jit.load"]:  # a TorchScript archive, nothing else
            return "needs-trust: " + next(c.why for c in self.calls
                                          if c.global_ == "torch.jit.load")
        if not self.trust_globals:  # nothing imported: the pickle's form alone
            return "needs-trust: " + "; ".join(self.reasons)
        names = ", ".join(self.trust_globals[:6])
        more = f" and {len(self.trust_globals) - 6} more" if len(self.trust_globals) > 6 else ""
        return (f"needs-trust: torch.load needs weights_only=False for {names}{more}; "
                "nothing known to be dangerous")

    def to_json(self) -> dict[str, Any]:
        return {"level": self.level, "reasons": list(self.reasons),
                "calls": [c.to_json() for c in self.calls]}


def _where(c: Call) -> str:
    if c.pointer is not None:
        return f" at {c.pointer or '/'}" + (f" of {c.file}" if c.file else "")
    if c.offset >= 0:
        return f" (byte {c.offset} of {c.file or 'the pickle'})"
    return ""


def summarize(args: Any, limit: int = 80) -> str:
    """A short, safe description of call arguments."""
    from .nodes import Global, Reduce

    def one(a: Any, depth: int) -> str:
        if isinstance(a, str):
            return repr(a if len(a) <= 40 else a[:37] + "...")
        if isinstance(a, (bytes, bytearray)):
            return f"<{len(a)} bytes>"
        if isinstance(a, (int, float, bool)) or a is None:
            return repr(a)
        if isinstance(a, Global):
            return a.qualname
        if isinstance(a, Reduce):
            return f"{a.qualname}(...)"
        if isinstance(a, (tuple, list)) and depth < 2:
            inner = ", ".join(one(x, depth + 1) for x in a[:4])
            more = ", ..." if len(a) > 4 else ""
            return f"({inner}{more})" if isinstance(a, tuple) else f"[{inner}{more}]"
        if isinstance(a, dict):
            return f"<dict of {len(a)}>"
        return f"<{type(a).__name__}>"
    text = ", ".join(one(a, 1) for a in args) if isinstance(args, tuple) else one(args, 1)
    return text if len(text) <= limit else text[:limit - 3] + "..."
