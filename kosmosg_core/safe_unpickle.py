"""Restricted loader for official Kosmos-G fairseq `.pt` checkpoints (torch zip format, torch >= 1.6).

Why not `torch.load`: a `.pt` file is a pickle, and unpickling runs whatever the file names.
`torch.load(weights_only=True)` refuses fairseq checkpoints (they hold numpy scalars, and may hold
an omegaconf `DictConfig` or an argparse `Namespace`), and `weights_only=False` would run any code
the file carries. This module unpickles with a restricted `pickle.Unpickler`:

- Allow-listed callables only: torch's tensor-rebuild functions (re-implemented here so they
  build *lazy* tensors), storage types, dtypes, `torch.Size`, `collections.OrderedDict`,
  `collections.defaultdict` (read as a plain dict; omegaconf pickles one), `torch.device`,
  `set`/`frozenset`/`complex`/`bytearray` (from text or bytes only)/`slice`, `_codecs.encode`
  (latin-1/utf-8 only: protocol-2 `bytes`). None of these runs code chosen by the file.
- Before anything is built, the opcodes are walked once (`_check_pickle_ops`): containers nested more
  than `MAX_NESTING` deep, memo indices or frames beyond the pickle, and integers beyond 64 bits are refused (they
  need no call to crash the process or exhaust memory and time). Compressed or encrypted zip records
  are refused too (torch.save writes neither; a compressed record can expand without bound).
- Every other `(module, name)` becomes an inert placeholder class; nothing is imported. Objects of
  such classes (omegaconf configs, argparse namespaces) arrive through NEWOBJ + BUILD and become
  `PickledObject`s that only record their arguments and state. numpy scalars / arrays / dtypes
  (fairseq's `extra_state["best"]`) are recorded the same way without calling numpy.
- *Calling* anything else (pickle REDUCE / INST / OBJ of a non-allow-listed name: `os.system`,
  `builtins.eval`, `subprocess.Popen`, any function) raises `UnsafeCheckpointError`.
  `copyreg._reconstructor` / `copyreg.__newobj__` are accepted only for placeholder classes.
  Consequence: pickled enum members (REDUCE of their class) are refused too; fairseq writes its
  config with `enum_to_str=True`, so official files hold none.

Storages are lazy: the pickle only names them (`<archive>/data/<key>` records of the zip); after
unpickling, only the tensors under `state[key]` are read (an official file may also hold an
optimizer state larger than memory: `last_optimizer_state` is never read). Tensors that share a
storage in the file (the official tied `embed_tokens` / `output_projection`) share memory here.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import logging
import pickle
import pickletools
import sys
import threading
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import CheckpointError, CheckpointNotFoundError, UnsafeCheckpointError

logger = logging.getLogger(__name__)

__all__ = ["check_pickle_shape", "load_pt_state_dict", "safe_load", "LazyTensor", "PickledObject"]

_RE_DOWNLOAD = "The file is truncated or corrupt; re-download it (or copy it again) and check its size."


# --- values the pickle may build ---------------------------------------------------------------
class _StorageType:
    """Stand-in for `torch.FloatStorage` & co. in persistent ids: only says which dtype the bytes hold."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype

    def __call__(self, *args, **kwargs):
        raise _RefusedCall(f"torch.{self.name}")

    def __setstate__(self, state):
        raise CheckpointError(f"The pickle tries to modify the storage type torch.{self.name}.")

    def __repr__(self) -> str:
        return f"<storage type torch.{self.name}>"


def _storage_types() -> dict[str, _StorageType]:
    names = {name: dtype for dtype, name in torch.storage._dtype_to_storage_type_map().items()}
    types = {name: _StorageType(name, dtype) for name, dtype in names.items()}
    # Untyped storages count bytes (torch >= 2.0 may pickle them directly).
    types["UntypedStorage"] = _StorageType("UntypedStorage", torch.uint8)
    return types


_STORAGE_TYPES = _storage_types()
_DTYPES = {name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}


class LazyStorage:
    """A storage record named by the pickle, not yet read: `<archive>/data/<key>`, `numel` elements."""

    __slots__ = ("key", "dtype", "numel", "location")

    def __init__(self, key: str, dtype: torch.dtype, numel: int, location: str):
        self.key, self.dtype, self.numel, self.location = key, dtype, numel, location

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)

    def __setstate__(self, state):
        raise CheckpointError("The pickle tries to modify a tensor storage.")

    def __repr__(self) -> str:
        return f"LazyStorage(key={self.key!r}, dtype={self.dtype}, numel={self.numel})"


class LazyTensor:
    """A tensor the pickle described (storage, offset, size, stride) whose bytes are read on `materialize()`."""

    __slots__ = ("storage", "offset", "shape", "stride", "_archive")

    def __init__(self, storage: LazyStorage, offset: int, shape: tuple, stride: tuple, archive: "_Archive"):
        self.storage, self.offset, self.shape, self.stride, self._archive = storage, offset, shape, stride, archive

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def materialize(self) -> torch.Tensor:
        """Read this tensor's storage (once per storage; shared storages stay shared)."""
        return self._archive.materialize(self)

    def __setstate__(self, state):
        raise CheckpointError("The pickle tries to modify a tensor.")

    def __repr__(self) -> str:
        return f"LazyTensor(shape={self.shape}, dtype={self.dtype}, storage={self.storage.key!r})"


class _RefusedCall(Exception):
    """Internal: the pickle asked to call `ref`; turned into UnsafeCheckpointError with the path."""

    def __init__(self, ref: str):
        super().__init__(ref)
        self.ref = ref


class _PlaceholderMeta(type):
    # Calling the class (REDUCE, INST, OBJ) would run the real callable: refuse. NEWOBJ goes through
    # `cls.__new__` directly and is allowed: it only creates an inert record.
    def __call__(cls, *args, **kwargs):
        raise _RefusedCall(cls.pickle_ref)

    def __setattr__(cls, name, value):  # BUILD on a class object: never let a file change a class
        raise CheckpointError(f"The pickle tries to modify the class {cls.pickle_ref}.")


class PickledObject(metaclass=_PlaceholderMeta):
    """Inert stand-in for an object of a class outside the allow-list (never imported).

    `pickle_ref` is "module.name" of the class; `args` / `kwargs` what NEWOBJ passed; `state` what
    BUILD set (e.g. a DictConfig's `_content`); `items` / `list_items` what SETITEMS / APPENDS added.
    """

    pickle_ref = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__.update(args=args, kwargs=kwargs, state=None, items={}, list_items=[])
        return obj

    def __setstate__(self, state):
        self.__dict__["state"] = state

    def __setitem__(self, key, value):
        self.items[key] = value

    def append(self, value):
        self.list_items.append(value)

    def extend(self, values):
        self.list_items.extend(values)

    def add(self, value):
        self.list_items.append(value)

    def __call__(self, *args, **kwargs):
        raise _RefusedCall(type(self).pickle_ref + "(instance)")

    def __repr__(self) -> str:
        return f"<inert {type(self).pickle_ref} object>"


def _placeholder_class(module: str, name: str) -> type:
    """The inert class standing for `module.name` in the file being read (one set per load: nothing a file
    does to them reaches another load, and they are freed with its objects)."""
    placeholders = _LOADING.placeholders
    key = (module, name)
    if key not in placeholders:
        placeholders[key] = _PlaceholderMeta(name.rpartition(".")[2] or "_", (PickledObject,),
                                             {"pickle_ref": f"{module}.{name}", "__module__": __name__})
    return placeholders[key]


def _is_placeholder_class(obj) -> bool:
    return isinstance(obj, type) and issubclass(obj, PickledObject)


# --- allow-listed callables (our own implementations; none calls into the file's choices) -------
def _check_ints(what: str, values) -> tuple:
    if not isinstance(values, (tuple, list, torch.Size)) or len(values) > 64 or \
            not all(isinstance(v, int) and 0 <= v < 2 ** 63 for v in values):
        raise CheckpointError(f"Malformed tensor record: {what} {values!r:.200} is not a tuple of non-negative "
                              "int64 values.")
    return tuple(values)


def _make_lazy_tensor(storage, offset, size, stride, dtype: torch.dtype | None = None) -> LazyTensor:
    if not isinstance(storage, LazyStorage):
        raise CheckpointError(f"Malformed tensor record: storage is {type(storage).__name__}, not a file storage.")
    if not isinstance(offset, int) or not 0 <= offset < 2 ** 63:
        raise CheckpointError(f"Malformed tensor record: storage offset {offset!r:.50}.")
    size, stride = _check_ints("size", size), _check_ints("stride", stride)
    if len(size) != len(stride):
        raise CheckpointError(f"Malformed tensor record: size {size} and stride {stride} differ in length.")
    if dtype is not None and dtype != storage.dtype:
        if storage.dtype != torch.uint8:  # _rebuild_tensor_v3 over an untyped (byte) storage
            raise CheckpointError(f"Malformed tensor record: dtype {dtype} over a {storage.dtype} storage.")
        if storage.numel % _itemsize(dtype):
            raise CheckpointError(f"Malformed tensor record: {storage.numel} bytes do not hold whole {dtype} items.")
        storage = LazyStorage(storage.key, dtype, storage.numel // _itemsize(dtype), storage.location)
    if all(size):  # non-empty: the last element must lie inside the storage
        last = offset + sum((s - 1) * st for s, st in zip(size, stride))
        if last >= storage.numel:
            raise CheckpointError(f"Malformed tensor record: a tensor of size {size} at offset {offset} reaches past "
                                  f"its storage of {storage.numel} elements.")
        numel = 1
        for s in size:
            numel *= s
        if numel > 2 ** 40:  # stride 0 can view a small storage as any size; no real weight is this large
            raise CheckpointError(f"Malformed tensor record: a tensor of size {size} ({numel} elements).")
    return LazyTensor(storage, offset, size, stride, _LOADING.archive)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _make_lazy_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return _make_lazy_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"Malformed tensor record: dtype {dtype!r}.")
    return _make_lazy_tensor(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, LazyTensor):
        raise CheckpointError(f"Malformed parameter record: data is {type(data).__name__}.")
    return data  # a state dict needs the values only


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return _rebuild_parameter(data, requires_grad, backward_hooks)


def _rebuild_from_type_v2(func, new_type, args, state):
    # Tensor subclasses: torch wraps the plain rebuild; we keep the plain (lazy) tensor.
    if getattr(func, "function", None) not in _TENSOR_REBUILDERS or not isinstance(args, tuple):
        raise _RefusedCall(f"torch._utils._rebuild_from_type_v2({getattr(func, 'pickle_ref', func)!r})")
    return func(*args)


def _reconstructor(cls, base, state):
    # Protocol 0/1 spelling of "make an object of cls": only for inert placeholder classes.
    if not (_is_placeholder_class(cls) and _is_placeholder_class(base)):
        raise _RefusedCall(f"copyreg._reconstructor({getattr(cls, 'pickle_ref', cls)!r})")
    obj = cls.__new__(cls)
    obj.__dict__["args"] = (state,) if state is not None else ()
    return obj


def _newobj(cls, *args):
    if not _is_placeholder_class(cls):
        raise _RefusedCall(f"copyreg.__newobj__({getattr(cls, 'pickle_ref', cls)!r})")
    return cls.__new__(cls, *args)


def _newobj_ex(cls, args, kwargs):
    if not _is_placeholder_class(cls) or not isinstance(args, tuple) or not isinstance(kwargs, dict):
        raise _RefusedCall(f"copyreg.__newobj_ex__({getattr(cls, 'pickle_ref', cls)!r})")
    return cls.__new__(cls, *args, **kwargs)


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    # Protocol 2 pickles `bytes` as _codecs.encode(str, "latin1"); nothing else is accepted.
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8") or errors != "strict":
        raise _RefusedCall("_codecs.encode")
    return obj.encode(encoding)


def _bytearray(source=b"", encoding=None, errors="strict"):
    # Protocol 2 pickles `bytearray` as bytearray(str, "latin-1"); a size (bytearray(n): n bytes whatever the
    # file's size) or another codec (an import) is refused.
    if isinstance(source, str) and encoding in ("latin1", "latin-1", "utf-8", "utf8") and errors == "strict":
        return bytearray(source, encoding)
    if isinstance(source, bytes) and encoding is None:
        return bytearray(source)
    raise _RefusedCall("builtins.bytearray(size or codec)")


def _complex(real=0.0, imag=0.0):
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 2.0 ** 1023 for v in (real, imag)):
        raise CheckpointError(f"Malformed complex number ({real!r:.50}, {imag!r:.50}).")
    return complex(real, imag)


# Containers (tuples...) as dict keys or set members: a checkpoint needs none. Crafted ones all hash alike
# (hash(-1) == hash(-2)), which makes building the dict quadratic: a review's 2 MB file took a minute. Counted in
# the opcodes (SETITEM(S), DICT, ADDITEMS, FROZENSET) and, for dicts and sets built by a call (OrderedDict(pairs),
# set(list)), by the allow-listed constructors as they run.
MAX_CONTAINER_KEYS = 100
_CONTAINER_KEYS_REFUSED = (f"its pickle uses more than {MAX_CONTAINER_KEYS} tuples or other containers as dict "
                           "keys or set members (a checkpoint needs none); refused.")


def _count_container_keys(keys) -> None:
    """Add the containers among `keys` (a dict's keys or a set's members, about to be hashed) to this load's count."""
    _LOADING.container_keys = getattr(_LOADING, "container_keys", 0) + sum(
        1 for key in keys if isinstance(key, (tuple, frozenset)))
    if _LOADING.container_keys > MAX_CONTAINER_KEYS:
        raise CheckpointError(_CONTAINER_KEYS_REFUSED)


def _pairs(items) -> list:
    """The (key, value) pairs a dict is built from, as a list (an iterable arrives as a list in a pickle)."""
    pairs = list(items.items() if isinstance(items, dict) else items)
    if not all(isinstance(pair, (tuple, list)) and len(pair) == 2 for pair in pairs):
        raise CheckpointError("Malformed dict record: its items are not (key, value) pairs.")
    return pairs


def _ordered_dict(items=()):
    pairs = _pairs(items)
    _count_container_keys(key for key, _ in pairs)
    return collections.OrderedDict(pairs)


def _set(items=()):
    members = list(items)
    _count_container_keys(members)
    return set(members)


def _frozenset(items=()):
    members = list(items)
    _count_container_keys(members)
    return frozenset(members)


def _defaultdict(default_factory=None, *args):
    # omegaconf pickles `defaultdict(dict)` (flags caches); the factory is never needed: a plain dict.
    if args:
        raise _RefusedCall("collections.defaultdict(with items)")
    return {}


class _InertConstructor:
    """A data constructor we recognise but never run (numpy scalars/arrays/dtypes): records its arguments."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):
        cls = _placeholder_class(self.module, self.name)
        return cls.__new__(cls, *args)

    def __setstate__(self, state):  # shared by every load: a file must not change it
        raise CheckpointError(f"The pickle tries to modify {self.module}.{self.name}.")


class _AllowedFunction:
    """An allow-listed function as the pickle gets it: it calls the function, and a file cannot change it (BUILD on a
    plain function sets its attributes, e.g. its __defaults__, for every later load in the process: a review broke
    the loading of good files that way)."""

    __slots__ = ("function",)

    def __init__(self, function: Callable):
        self.function = function

    def __call__(self, *args, **kwargs):
        return self.function(*args, **kwargs)

    def __setstate__(self, state):
        raise CheckpointError(f"The pickle tries to modify {self.function.__name__}.")


_TENSOR_REBUILDERS = {_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter,
                      _rebuild_parameter_with_state}

# the classes here are immutable types (a BUILD on one fails); the functions are handed over as _AllowedFunction
# (dicts and sets too: their constructors count container keys)
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _AllowedFunction(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): _AllowedFunction(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor_v3"): _AllowedFunction(_rebuild_tensor_v3),
    ("torch._utils", "_rebuild_parameter"): _AllowedFunction(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _AllowedFunction(_rebuild_parameter_with_state),
    ("torch._utils", "_rebuild_from_type_v2"): _AllowedFunction(_rebuild_from_type_v2),
    ("torch._tensor", "_rebuild_from_type_v2"): _AllowedFunction(_rebuild_from_type_v2),
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("collections", "OrderedDict"): _AllowedFunction(_ordered_dict),
    ("collections", "defaultdict"): _AllowedFunction(_defaultdict),
    ("builtins", "set"): _AllowedFunction(_set),
    ("builtins", "frozenset"): _AllowedFunction(_frozenset),
    ("builtins", "complex"): _AllowedFunction(_complex),
    ("builtins", "bytearray"): _AllowedFunction(_bytearray),
    ("builtins", "slice"): slice,
    ("copyreg", "_reconstructor"): _AllowedFunction(_reconstructor),
    ("copyreg", "__newobj__"): _AllowedFunction(_newobj),
    ("copyreg", "__newobj_ex__"): _AllowedFunction(_newobj_ex),
    ("_codecs", "encode"): _AllowedFunction(_codecs_encode),
}
for _np in ("numpy.core.multiarray", "numpy._core.multiarray"):
    for _name in ("scalar", "_reconstruct"):
        _SAFE_GLOBALS[(_np, _name)] = _InertConstructor(_np, _name)
_SAFE_GLOBALS[("numpy", "dtype")] = _InertConstructor("numpy", "dtype")


# --- the unpickler -------------------------------------------------------------------------------
_LOADING = threading.local()  # .archive: the archive whose pickle this thread is reading (for LazyTensor)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: "_Archive"):
        super().__init__(file, encoding="utf-8")
        self._archive = archive
        self._storages: dict[str, LazyStorage] = {}

    def find_class(self, module: str, name: str):
        # Python 2 names (`__builtin__`, `copy_reg`) as the default find_class maps them.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module in ("torch", "torch.storage", "torch.cuda") and name in _STORAGE_TYPES:
            return _STORAGE_TYPES[name]
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        return _placeholder_class(module, name)

    def persistent_load(self, pid):
        # torch zip format: ("storage", storage type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"Unsupported persistent id {pid!r:.200} in the pickle (not a torch storage).")
        _, storage_type, key, location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not isinstance(numel, int) \
                or numel < 0:
            raise CheckpointError(f"Malformed storage record {pid!r:.200}.")
        storage = self._storages.get(key)
        if storage is None:
            storage = self._storages[key] = LazyStorage(key, storage_type.dtype, numel, str(location))
        elif storage.dtype != storage_type.dtype:
            raise CheckpointError(f"Storage {key!r} is named with two dtypes ({storage.dtype}, {storage_type.dtype}).")
        return storage


# --- the pickle's shape, checked before it is run ----------------------------------------------------
MAX_NESTING = 200  # containers inside containers (an official checkpoint: ~10); deeper ones crash C code
_MUTATING = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}  # change the container below


def _check_pickle_ops(data: bytes, path: Path) -> None:
    """Refuse pickles whose shape, not their calls, is the attack: containers nested so deep that hashing or
    freeing them overflows the C stack (a segfault: a 1 KB file could kill ComfyUI), memo indices or frames
    far beyond the pickle's size (memory out of proportion to the file), integers beyond 64 bits (slow
    big-number arithmetic; dict keys k * (2**61 - 1) all hash alike, which makes building the dict quadratic). A walk over the opcodes (`pickletools.genops`) with the depth of
    every stack item; nothing is built."""
    mark, stack, memo = object(), [], {}
    container_keys = 0
    try:
        for count, (op, arg, _) in enumerate(pickletools.genops(data)):
            name = op.name
            if name in ("LONG1", "LONG4") and arg.bit_length() > 64:  # no checkpoint field needs more
                raise CheckpointError(f"{path}: its pickle holds a {arg.bit_length()}-bit integer; refused.")
            if name == "FRAME" and arg > len(data):
                raise CheckpointError(f"{path}: its pickle announces a {arg}-byte frame in {len(data)} bytes. "
                                      + _RE_DOWNLOAD)
            if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                index = len(memo) if name == "MEMOIZE" else int(arg)
                if index > count + 1:
                    raise CheckpointError(f"{path}: its pickle stores memo entry {index} after {count} operations; "
                                          "refused.")
                memo[index] = stack[-1] if stack and stack[-1] is not mark else 0
                continue
            if name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(int(arg), 0))
                continue
            popped = []  # the depths taken off the stack, top first
            for item in reversed(op.stack_before):  # top first: a slice, then the mark under it, then the rest
                if item is pickletools.stackslice:
                    while stack and stack[-1] is not mark:
                        popped.append(stack.pop())
                elif item is pickletools.markobject:
                    if stack and stack[-1] is mark:
                        stack.pop()
                elif stack:
                    popped.append(stack.pop())
            popped = [d for d in popped if d is not mark]
            if name in ("SETITEM", "SETITEMS"):  # above the dict: value, key, value, key... (top first)
                container_keys += sum(1 for d in popped[1:-1:2] if d > 0)
            elif name == "DICT":  # a dict built from the items above the mark
                container_keys += sum(1 for d in popped[1::2] if d > 0)
            elif name in ("ADDITEMS", "FROZENSET"):
                container_keys += sum(1 for d in (popped[:-1] if name == "ADDITEMS" else popped) if d > 0)
            if container_keys > MAX_CONTAINER_KEYS:
                raise CheckpointError(f"{path}: {_CONTAINER_KEYS_REFUSED}")
            if name in _MUTATING and popped:  # the container (bottom) gains the items
                depth = max([popped[-1]] + [d + 1 for d in popped[:-1]])
            else:
                depth = max(popped) + 1 if popped else 0
            if depth > MAX_NESTING:
                raise CheckpointError(f"{path}: its pickle nests containers more than {MAX_NESTING} deep (a "
                                      "checkpoint needs ~10); refused.")
            for item in op.stack_after:
                stack.append(mark if item is pickletools.markobject else depth)
    except CheckpointError:
        raise
    except Exception as e:  # genops: truncated or unknown opcodes
        raise CheckpointError(f"{path}: its pickle is corrupt ({type(e).__name__}: {str(e)[:200]}). "
                              + _RE_DOWNLOAD) from e


# --- the zip archive -----------------------------------------------------------------------------
def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def _describe_non_zip(path: Path, head: bytes, size: int) -> str:
    if size == 0:
        return f"{path} is empty (0 bytes). {_RE_DOWNLOAD}"
    if head.startswith(b"PK"):
        return f"{path} is truncated or corrupt (its zip directory cannot be read). {_RE_DOWNLOAD}"
    if head[:1] == b"\x80":
        return (f"{path} is in PyTorch's legacy (pre-1.6) format or is a raw pickle; this safe loader reads only "
                "the zip format that torch.save writes since torch 1.6. Re-save it with torch>=1.6 where it came "
                "from (a trusted environment): torch.save(torch.load(old, weights_only=False), new).")
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        return f"{path} is a .safetensors file, not a .pt checkpoint; rename it to .safetensors."
    return f"{path} is not a PyTorch .pt checkpoint (not a zip archive). Check that it is the right file."


class _Archive:
    """A torch zip checkpoint: its pickle (`<prefix>/data.pkl`) and storage records (`<prefix>/data/<key>`)."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointNotFoundError(f"Checkpoint not found: {self.path}. Check the path.")
        if self.path.is_dir():
            raise CheckpointError(f"{self.path} is a folder; give the .pt file inside it.")
        self._zip: zipfile.ZipFile | None = None
        self._raw: dict[str, torch.Tensor] = {}  # storage key -> its record's bytes (uint8), read once
        self._cache: dict[tuple[str, torch.dtype], torch.Tensor] = {}  # (key, dtype) -> 1-D tensor of its elements
        self.bytes_read = 0
        try:
            self._read_layout()
        except BaseException:
            self.close()
            raise

    def _read_layout(self) -> None:
        names = self._open().namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pickles:
            hint = " It looks like a TorchScript archive." if any(n.endswith("constants.pkl") for n in names) else ""
            raise CheckpointError(f"{self.path} is a zip archive but not a torch.save checkpoint (no data.pkl).{hint}")
        self.prefix = pickles[0][: -len("data.pkl")]
        for info in self._open().infolist():
            # torch.save stores records uncompressed; a compressed one could expand without bound (a zip bomb)
            if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
                raise CheckpointError(f"{self.path}: record {info.filename!r:.100} is compressed or encrypted, which "
                                      "torch.save never writes; refused. Use the file as it was published.")
        order = self._read(self.prefix + "byteorder", nbytes=None, limit=16).decode("ascii", "replace").strip() \
            if self.prefix + "byteorder" in names else "little"
        if order not in ("little", "big"):
            raise CheckpointError(f"{self.path}: unknown byte order {order!r:.40} in the archive. {_RE_DOWNLOAD}")
        self.byteorder = order

    def _open(self) -> zipfile.ZipFile:
        if self._zip is None:
            try:
                self._zip = zipfile.ZipFile(self.path)
            # a damaged directory can also be a name that is not UTF-8 (ValueError) or a zip feature (version,
            # flag) Python does not implement
            except (zipfile.BadZipFile, ValueError, NotImplementedError):
                with open(self.path, "rb") as f:
                    head = f.read(16)
                raise CheckpointError(_describe_non_zip(self.path, head, self.path.stat().st_size)) from None
            except OSError as e:
                raise CheckpointError(f"Cannot read {self.path}: {e}.") from e
        return self._zip

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _record_info(self, name: str, nbytes: int | None = None) -> zipfile.ZipInfo:
        """The zip entry `name`, checked to exist and to be able to hold `nbytes` (nothing read)."""
        try:
            info = self._open().getinfo(name)
        except KeyError:
            raise CheckpointError(f"{self.path} lacks the record {name!r}. {_RE_DOWNLOAD}") from None
        # Records are stored uncompressed (checked in _read_layout): none can hold more than the file. Checked
        # before reading, so a few-hundred-byte file claiming a 128 GB record cannot exhaust memory.
        archive_size = self.path.stat().st_size
        if info.file_size > archive_size or (nbytes is not None and info.file_size < nbytes):
            needs = f", the pickle needs {nbytes}" if nbytes is not None else ""
            raise CheckpointError(f"{self.path}: record {name!r} claims {info.file_size} bytes in a {archive_size}-byte "
                                  f"file{needs}; the file is truncated or corrupt. {_RE_DOWNLOAD}")
        return info

    def _read(self, name: str, nbytes: int | None = None, limit: int | None = None) -> bytes:
        info = self._record_info(name, nbytes)
        # each record is read once (storages are cached): a file reads at most its own size, unless its records
        # overlap (a review made 200 records of one 10 MB payload: 2 GB read)
        wanted = nbytes if nbytes is not None else min(info.file_size, limit if limit is not None else info.file_size)
        if self.bytes_read + wanted > self.path.stat().st_size:
            raise CheckpointError(f"{self.path}: its records hold more bytes than the file (they overlap); refused. "
                                  + _RE_DOWNLOAD)
        try:
            with self._open().open(info) as f:
                data = f.read(nbytes if nbytes is not None else (limit if limit is not None else -1))
        # ValueError: a local header's name that is not UTF-8; NotImplementedError: a record flag zipfile does not
        # support (e.g. strong encryption)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError) as e:
            raise CheckpointError(f"{self.path}: cannot read record {name!r} ({e or type(e).__name__}). "
                                  f"{_RE_DOWNLOAD}") from e
        if nbytes is not None and len(data) < nbytes:
            raise CheckpointError(f"{self.path}: record {name!r} holds {len(data)} bytes, the pickle needs {nbytes}. "
                                  + _RE_DOWNLOAD)
        self.bytes_read += len(data)
        return data

    def unpickle(self) -> Any:
        """The whole object tree, tensors as `LazyTensor`s. Raises UnsafeCheckpointError on code execution."""
        data = self._read(self.prefix + "data.pkl")
        _check_pickle_ops(data, self.path)
        previous = getattr(_LOADING, "archive", None), getattr(_LOADING, "placeholders", None)
        _LOADING.archive, _LOADING.placeholders, _LOADING.container_keys = self, {}, 0
        try:
            return _RestrictedUnpickler(io.BytesIO(data), self).load()
        except _RefusedCall as e:
            raise UnsafeCheckpointError(
                f"{self.path} tries to run code when loaded: its pickle calls `{e.ref}`, which is not a tensor "
                "rebuild function. It was refused and nothing was run. Only load checkpoints from sources you trust. "
                "If you do trust this one, re-save just its weights where it came from, in an environment allowed "
                "to run its code: torch.save(torch.load(path, weights_only=False)['model'], 'weights.pt') "
                "(or safetensors), and load that file instead.") from None
        except CheckpointError as e:
            if str(self.path) in str(e):
                raise
            raise type(e)(f"{self.path}: {e}") from e  # raised by a rebuild function, which knows no file
        except Exception as e:  # any other failure of a hostile or damaged pickle: named, never a traceback
            raise CheckpointError(f"{self.path}: its pickle is corrupt or unsupported ({type(e).__name__}: "
                                  f"{str(e)[:300]}). " + _RE_DOWNLOAD) from e
        finally:
            _LOADING.archive, _LOADING.placeholders = previous

    def _storage_elements(self, storage: LazyStorage) -> torch.Tensor:
        """1-D tensor of the storage's elements. Each record is read once (shared storages stay shared); views of
        one record as several dtypes (torch.save writes uint16 / float8 tensors over byte storages, and a byte view
        of them over the same one) share its bytes (a big-endian file: one swapped copy per dtype)."""
        cached = self._cache.get((storage.key, storage.dtype))
        if cached is not None:
            return cached
        itemsize = _itemsize(storage.dtype)
        nbytes = storage.numel * itemsize
        if nbytes == 0:
            elements = torch.empty(0, dtype=storage.dtype)
        else:
            raw = self._raw.get(storage.key)
            if raw is None or raw.numel() < nbytes:
                raw = torch.frombuffer(bytearray(self._read(f"{self.prefix}data/{storage.key}", nbytes)),
                                       dtype=torch.uint8)
                self._raw[storage.key] = raw
            raw = raw[:nbytes]
            if self.byteorder != sys.byteorder and itemsize > 1:
                word = itemsize // 2 if storage.dtype.is_complex else itemsize  # complex: each part on its own
                raw = raw.view(-1, word).flip(-1).reshape(-1)
            try:
                elements = raw.view(storage.dtype)
            except RuntimeError as e:
                raise CheckpointError(f"{self.path}: storage dtype {storage.dtype} is not supported ({e}).") from e
        self._cache[(storage.key, storage.dtype)] = elements
        return elements

    def check_record(self, lazy: LazyTensor) -> None:
        """What reading `lazy` checks first, without reading it: its storage's record is there and big enough."""
        nbytes = lazy.storage.numel * _itemsize(lazy.storage.dtype)
        if nbytes:
            self._record_info(f"{self.prefix}data/{lazy.storage.key}", nbytes)

    def materialize(self, lazy: LazyTensor) -> torch.Tensor:
        elements = self._storage_elements(lazy.storage)
        try:
            return torch.as_strided(elements, lazy.shape, lazy.stride, lazy.offset)
        except (RuntimeError, ValueError, TypeError, OverflowError) as e:
            raise CheckpointError(f"{self.path}: tensor record {lazy!r:.200} cannot be read ({str(e)[:200]}).") from e


# --- public API ----------------------------------------------------------------------------------
def safe_load(path) -> Any:
    """Unpickle a torch zip `.pt` file without running its code; read no tensor bytes.

    Returns the file's object tree with every tensor as a `LazyTensor` (`.shape`, `.dtype`,
    `.materialize()` reads it) and every non-allow-listed object as an inert `PickledObject`.
    Raises CheckpointNotFoundError / CheckpointError (unreadable) / UnsafeCheckpointError (code).
    """
    archive = _Archive(path)
    try:
        return archive.unpickle()
    finally:
        archive.close()  # LazyTensor.materialize() reopens the file when needed


def check_pickle_shape(path) -> None:
    """The checks `safe_load` makes of a torch zip file's pickle before running it (nesting, memo, frame, integer
    sizes, container dict keys), for files another unpickler reads: torch.load(weights_only=True) crashes the
    process (a segfault) on a dict key nested deep. Raises CheckpointError."""
    with _Archive(path) as archive:
        _check_pickle_ops(archive._read(archive.prefix + "data.pkl"), archive.path)


SD_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")  # U-Net, VAE, CLIP


def looks_like_stable_diffusion(keys) -> bool:
    """Keys of an original-layout Stable Diffusion checkpoint (what users most often give by mistake)."""
    return any(isinstance(k, str) and k.startswith(SD_CHECKPOINT_PREFIXES) for k in keys)


def _select_state_dict(path: Path, state: Any, key: str | None) -> dict:
    if key is None:
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict.")
        return state
    if isinstance(state, dict) and key in state:
        found = state[key]
        if not isinstance(found, dict):
            raise CheckpointError(f"{path}: state[{key!r}] is a {type(found).__name__}, not a state dict.")
        return found
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint dict with {key!r}.")
    inner = state.get("state_dict") if isinstance(state.get("state_dict"), dict) else {}
    if looks_like_stable_diffusion(state) or looks_like_stable_diffusion(inner):
        raise CheckpointError(f"{path} looks like a Stable Diffusion checkpoint (model.diffusion_model.* tensors), "
                              "not Kosmos-G. Load it with ComfyUI's checkpoint loader; give the Kosmos-G loader "
                              "checkpoint_final.pt or a converted Kosmos-G .safetensors.")
    if state and all(isinstance(v, LazyTensor) for v in state.values()):
        # A bare state dict (e.g. `torch.save(ckpt["model"], ...)`): the file IS the state dict.
        logger.info("%s has no %r entry; it is a bare state dict, using it as is", path, key)
        return state
    shown = ", ".join(repr(k)[:60] if isinstance(k, str) else f"<{type(k).__name__}>" for k in list(state)[:12]) \
        + (" ..." if len(state) > 12 else "")
    raise CheckpointError(f"{path} has no {key!r} entry; its top-level keys are: {shown or '(none)'}. "
                          "An official Kosmos-G checkpoint keeps its weights under 'model'.")


def load_pt_state_dict(path, key: str | None = "model", include: Callable[[str], bool] | None = None,
                       read: bool = True) -> dict[str, torch.Tensor]:
    """Read the tensors of `state[key]` from a torch zip `.pt` file without running pickled code.

    key: the entry holding the state dict ("model" for fairseq checkpoints). `key=None` means the
        file's top-level object IS the state dict; a file without `key` whose top level is a bare
        name -> tensor dict is accepted as that state dict too.
    include: optional filter on tensor names; tensors it rejects are never read (e.g. skip the
        official file's `diffusion_unet.*`).
    Only the storages of the returned tensors are read; shared storages stay shared.
    read: False = read no tensor at all: each is a meta tensor of its stored shape and dtype (to check a file
        and derive its config before reading gigabytes).
    """
    path = Path(path)
    with _Archive(path) as archive:
        state = archive.unpickle()
        state_dict = _select_state_dict(path, state, key)
        tensors: dict[str, torch.Tensor] = {}
        skipped = []
        for name, value in state_dict.items():
            if not isinstance(name, str):
                raise CheckpointError(f"{path}: the state dict has a {type(name).__name__} key; tensor names are "
                                      "text. Not a checkpoint this loader reads.")
            if include is not None and not include(name):
                continue
            if isinstance(value, LazyTensor):
                if read:
                    tensors[name] = archive.materialize(value)
                else:
                    archive.check_record(value)
                    tensors[name] = torch.empty(value.shape, dtype=value.dtype, device="meta")
            else:
                skipped.append(name)
        if skipped:
            logger.warning("%s: ignoring %d non-tensor entries in the state dict: %s", path, len(skipped), skipped[:8])
        logger.debug("%s: read %d tensors, %d bytes", path, len(tensors), archive.bytes_read)
    return tensors
