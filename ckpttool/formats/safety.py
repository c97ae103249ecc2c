"""Classifies the globals a pickle names: allowed, opaque (kept as data) or dangerous.

Nothing here imports what it classifies. ``ALLOWED`` mirrors the globals that
``torch.load(weights_only=True)`` accepts (a test compares it with the installed torch).
"""

from __future__ import annotations

_TORCH_STORAGES = (
    "BFloat16", "Bool", "Byte", "Char", "ComplexDouble", "ComplexFloat", "Double", "Float",
    "Half", "Int", "Long", "Short",
)
_TENSOR_TYPES = ("BFloat16", "Bool", "Byte", "Char", "Double", "Float", "Half", "Int",
                 "Long", "Short")
_DTYPES = (
    "bfloat16", "bits16", "bits1x8", "bits2x4", "bits4x2", "bits8", "bool", "complex128",
    "complex32", "complex64", "float16", "float32", "float4_e2m1fn_x2", "float64",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    "int1", "int16", "int2", "int3", "int32", "int4", "int5", "int6", "int64", "int7", "int8",
    "qint32", "qint8", "quint2x4", "quint4x2", "quint8", "uint1", "uint16", "uint2", "uint3",
    "uint32", "uint4", "uint5", "uint6", "uint64", "uint7", "uint8",
    "per_channel_affine", "per_channel_affine_float_qparams", "per_channel_symmetric",
    "per_tensor_affine", "per_tensor_symmetric",
)

ALLOWED: frozenset[str] = frozenset(
    [
        "_codecs.encode", "builtins.bytearray", "builtins.complex", "builtins.set",
        "collections.Counter", "collections.OrderedDict",
        "torch.Size", "torch.Tensor", "torch.device", "torch.nn.parameter.Parameter",
        "torch._tensor._rebuild_from_type_v2",
        "torch._utils._rebuild_device_tensor_from_cpu_tensor",
        "torch._utils._rebuild_device_tensor_from_numpy",
        "torch._utils._rebuild_meta_tensor_no_storage", "torch._utils._rebuild_nested_tensor",
        "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
        "torch._utils._rebuild_qtensor", "torch._utils._rebuild_sparse_tensor",
        "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3", "torch._utils._rebuild_wrapper_subclass",
        "torch.serialization._get_layout", "torch.storage.TypedStorage",
        "torch.storage.UntypedStorage",
        "torch.QInt32Storage", "torch.QInt8Storage", "torch.QUInt2x4Storage",
        "torch.QUInt4x2Storage", "torch.QUInt8Storage",
    ]
    + [f"torch.{n}Storage" for n in _TORCH_STORAGES]
    + [f"torch.cuda.{n}Storage" for n in _TORCH_STORAGES]
    + [f"torch.{n}Tensor" for n in _TENSOR_TYPES]
    + [f"torch.cuda.{n}Tensor" for n in _TENSOR_TYPES]
    + [f"torch.sparse.{n}Tensor" for n in _TENSOR_TYPES if n != "Bool"]
    + [f"torch.cuda.sparse.{n}Tensor" for n in _TENSOR_TYPES if n != "Bool"]
    + [f"torch.{d}" for d in _DTYPES]
)

# Harmless builtins a pickle may name (containers and numbers); every other builtin is dangerous.
_SAFE_BUILTINS = frozenset({
    "set", "frozenset", "bytearray", "bytes", "complex", "slice", "range", "int", "float",
    "str", "list", "tuple", "dict", "bool", "object", "NoneType", "Ellipsis", "NotImplemented",
})

# Modules whose every member can run code, touch files or the network, or load another pickle.
_DANGEROUS_MODULES = (
    "os", "posix", "nt", "subprocess", "sys", "runpy", "importlib", "ctypes", "cProfile",
    "profile", "pdb", "bdb", "pty", "shutil", "socket", "webbrowser", "pip", "setuptools",
    "distutils", "code", "codeop", "commands", "multiprocessing", "asyncio", "concurrent",
    "timeit", "trace", "pickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle",
    "joblib", "types", "inspect", "gc", "threading", "_thread", "signal", "atexit", "site",
    "zipimport", "pkgutil", "io", "_io", "tempfile", "glob", "urllib", "http", "ftplib",
    "smtplib", "telnetlib", "xmlrpc", "functools", "operator", "_operator", "codecs",
    "_codecs", "linecache", "tokenize", "ensurepip", "venv", "sysconfig", "imp", "builtins",
    "__builtin__", "torch._inductor", "torch._dynamo", "torch.hub", "torch.jit",
    "torch.package", "torch.utils.cpp_extension", "torch._C", "torch.ops", "torch.library",
    "torch.serialization", "torch.storage", "torch.fx", "torch.distributed", "torch.multiprocessing",
    "numpy.lib.npyio", "numpy.ctypeslib", "numpy.f2py", "numpy.testing", "numpy.distutils",
    "copyreg", "_posixsubprocess", "select", "selectors", "mmap", "resource", "fcntl",
    "platform", "ssl", "sqlite3", "logging.config",
    # more ways to run code, load a pickle, write files or reach the network
    "numpy.lib._npyio_impl", "numpy.lib.format", "numpy.lib._format_impl", "numpy.f2py",
    "torch._ops", "torch.classes", "torch.utils.model_zoo", "torch.utils.collect_env",
    "torch.utils.benchmark", "torch.utils.data", "torch.utils.tensorboard", "torch.testing",
    "torch.export", "torch._export", "torch.onnx", "torch.compiler", "torch._functorch",
    "torch._higher_order_ops", "torch._weights_only_unpickler", "torch._load_global_deps",
    "_ctypes", "_imp", "_frozen_importlib", "_frozen_importlib_external", "_functools",
    "_multiprocessing", "_posixshmem", "_socket", "_sqlite3", "_lsprof", "_winapi", "msvcrt",
    "winreg", "_osx_support", "_aix_support", "_testcapi", "_testinternalcapi", "test",
    "unittest", "doctest", "pydoc", "pstats", "compileall", "py_compile", "rlcompleter",
    "dataclasses", "antigravity", "uuid", "zipfile", "tarfile", "gzip", "bz2", "lzma", "dbm",
    "mailbox", "fileinput", "socketserver", "wsgiref", "imaplib", "poplib", "nntplib",
    "logging.handlers", "cgi", "cgitb", "idlelib", "tkinter", "turtle", "ipykernel", "IPython",
    "requests", "httpx", "urllib3", "aiohttp", "yaml", "jinja2", "sympy", "numexpr",
    "pandas.io", "cffi",
)
# Specific names that are dangerous although their module is not.
_DANGEROUS_NAMES = frozenset({
    "torch.load", "torch.save", "torch.compile", "torch.from_file", "numpy.load",
    "numpy.fromfile", "numpy.save", "numpy.memmap", "pathlib.Path.write_text",
    "numpy.savez", "numpy.savetxt", "numpy.loadtxt", "numpy.genfromtxt", "numpy.vectorize",
    "numpy.frompyfunc", "numpy.DataSource", "pandas.read_pickle", "pandas.eval",
    "logging.FileHandler", "logging.basicConfig", "torch.hub", "torch.jit",
})
# Names in dangerous modules that are plain data constructors used by real checkpoints.
_DATA_EXCEPTIONS = frozenset({"copyreg._reconstructor", "builtins.object"})


def classify(module: str, name: str) -> str:
    """Return "allowed", "opaque" or "dangerous" for the global ``module.name``.

    Protocol 0-2 pickles are loaded with ``fix_imports``: Python 2 names such as
    ``cPickle.loads`` or ``__builtin__.reduce`` resolve to ``pickle.loads`` and
    ``functools.reduce``, so the mapped name is judged too and the stricter verdict wins.
    """
    verdict = _classify(module, name)
    mapped = _py2_mapped(module, name)
    if mapped is None:
        return verdict
    m = _classify(*mapped)
    if module in ("__builtin__", "exceptions"):  # these names exist only through the map
        return m
    return "dangerous" if "dangerous" in (verdict, m) else verdict


def _py2_mapped(module: str, name: str) -> tuple[str, str] | None:
    # _compat_pickle is the table pickle itself uses; it is data only and imports nothing
    import _compat_pickle as cp
    if (module, name) in cp.NAME_MAPPING:
        return cp.NAME_MAPPING[(module, name)]
    if module in cp.IMPORT_MAPPING:
        return cp.IMPORT_MAPPING[module], name
    return None


def _classify(module: str, name: str) -> str:
    mod = "builtins" if module == "__builtin__" else module
    qual = f"{mod}.{name}"
    if qual in ALLOWED:
        return "allowed"
    if mod == "builtins":
        return "opaque" if name in _SAFE_BUILTINS else "dangerous"
    if qual in _DATA_EXCEPTIONS:
        return "opaque"
    if qual in _DANGEROUS_NAMES or any(qual.startswith(n + ".") for n in _DANGEROUS_NAMES):
        return "dangerous"
    for d in _DANGEROUS_MODULES:
        if mod == d or mod.startswith(d + "."):
            return "dangerous"
    if "." in name or name.startswith("__"):  # attribute chains and dunders reach code
        return "dangerous"
    return "opaque"
