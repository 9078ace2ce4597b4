"""`data.pkl` of a torch.save archive, unpickled with nothing in it run.

The pickle is scanned opcode by opcode first (no extension, buffer or protocol-0 instance
opcodes; memo indices no larger than the opcodes so far: an index of 2**31 alone would make
Python's unpickler allocate and clear 16 GB). Then every global it names is resolved here:

- torch's tensor and parameter rebuilds, OrderedDict, set, torch.Size and
  `copyreg._reconstructor` are this module's own functions, wrapped so that pickle's BUILD
  cannot change them (with torch's function objects, BUILD had set attributes on them for the
  rest of the process);
- storage types (`torch.FloatStorage`, ...) become dtypes;
- every other name becomes an inert stand-in class, which can only be built as a module (a
  bare instance, then a state holding `_parameters`, `_buffers` and `_modules`) and refuses to
  be called or changed.

Persistent ids name storages only. Tensors are read-only views of their storage, their offsets
and strides checked to stay inside it. A whole model's tree is walked without recursion,
refusing cycles, shared children, depth over MAX_DEPTH and more than MAX_ENTRIES entries.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import pickletools
import re

import numpy as np

from hw8jax.torch_import.archive import (
    MAX_BYTES,
    STORAGE_DTYPES,
    Archive,
    Refused,
    Storage,
    StorageType,
    shown,
)

MAX_PICKLE_BYTES = 16 * 2**20   # data.pkl of a whole resnet_boss: about 60 KB
MAX_ENTRIES = 100_000           # parameters, buffers and children in a module tree
MAX_DEPTH = 64
_REFUSED_OPCODES = {"EXT1", "EXT2", "EXT4", "NEXT_BUFFER", "READONLY_BUFFER", "PERSID", "INST",
                    "OBJ"}
_PUT_OPCODES = {"PUT", "BINPUT", "LONG_BINPUT"}
_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*\Z", re.ASCII)


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


class _Allowed:
  """A global the file may call."""

  __slots__ = ("name", "fn")

  def __init__(self, name: str, fn):
    self.name, self.fn = name, fn

  def __call__(self, *args):
    return self.fn(*args)

  def __setstate__(self, state):
    raise Refused(f"it tries to change {self.name}")


class _Tensor:
  """A tensor while the pickle is read (a bare numpy array's __setstate__ would let BUILD
  rebuild it from the file's bytes)."""

  __slots__ = ("array",)

  def __init__(self, array: np.ndarray):
    self.array = array

  def __setstate__(self, state):
    raise Refused("it tries to change a tensor")


def _ints(v, what: str) -> tuple:
  if not (isinstance(v, tuple) and len(v) <= 16 and all(_is_int(n) and 0 <= n < 2**40
                                                        for n in v)):
    raise Refused(f"a tensor's {what} is not a tuple of integers")
  return v


def _no_hooks(hooks) -> None:
  if not isinstance(hooks, dict) or hooks:
    raise Refused("a tensor carries backward hooks")


def _rebuild_tensor(storage, offset, size, stride, requires_grad, hooks, metadata=None):
  if not isinstance(storage, Storage) or not _is_int(offset) or offset < 0 or \
      not isinstance(requires_grad, bool) or not (metadata is None or isinstance(metadata, dict)):
    raise Refused("a tensor is not built from a storage, an offset and a shape")
  size, stride = _ints(size, "shape"), _ints(stride, "strides")
  _no_hooks(hooks)
  if len(size) != len(stride):
    raise Refused(f"a tensor has {len(size)} dimensions and {len(stride)} strides")
  base = storage.array
  numel = math.prod(size)
  if numel * base.itemsize > MAX_BYTES:
    raise Refused(f"a tensor of shape {size} takes more than {MAX_BYTES} bytes")
  if numel == 0:
    return _Tensor(np.zeros(size, base.dtype))
  last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
  if last >= base.size:
    raise Refused(f"a tensor (offset {offset}, shape {size}, strides {stride}) reaches element "
                  f"{last} of a storage of {base.size}")
  return _Tensor(np.lib.stride_tricks.as_strided(
      base[offset:], size, [s * base.itemsize for s in stride], writeable=False))


def _rebuild_parameter(data, requires_grad, hooks, state=None):
  del requires_grad
  _no_hooks(hooks)
  if not isinstance(data, _Tensor) or not (state is None or isinstance(state, (dict, tuple))):
    raise Refused("a parameter does not hold a tensor")
  return data


def _set(items=()):
  if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
    raise Refused("a set holds something other than names")
  return set(items)


def _size(dims=()):
  return _ints(tuple(dims) if isinstance(dims, (list, tuple)) else None, "shape")


def _object(*args):
  raise Refused("it asks to call builtins.object")


def _reconstructor(cls, base, state):
  """copyreg._reconstructor(cls, object, None): a bare instance of a module class."""
  if not (isinstance(cls, type) and issubclass(cls, StandIn)) or base is not _OBJECT or \
      state is not None:
    raise Refused("it asks copyreg._reconstructor for something other than a module")
  return cls.__new__(cls)


_OBJECT = _Allowed("builtins.object", _object)
_GLOBALS = {key: _Allowed(".".join(key), fn) for key, fn in {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): _set,
    ("torch", "Size"): _size,
    ("copyreg", "_reconstructor"): _reconstructor}.items()}
_GLOBALS["builtins", "object"] = _OBJECT
_PY2_NAMES = {("__builtin__", "set"): ("builtins", "set"),  # protocol 2 writes Python 2's names
              ("__builtin__", "object"): ("builtins", "object")}


class _StandInType(type):
  """BUILD on a class would set its attributes (or call the instances' __setstate__ on the
  state): stand-in classes refuse both."""

  def __setattr__(cls, name, value):
    raise Refused(f"it tries to change the class {cls.global_name}")

  @property
  def __setstate__(cls):
    def refuse(state):
      raise Refused(f"it tries to change the class {cls.global_name}")
    return refuse


class StandIn(metaclass=_StandInType):
  """What a class named by the file becomes."""

  global_name = "?"

  def __new__(cls, *args, **kwargs):
    if args or kwargs:
      raise Refused(f"it asks to call {cls.global_name}, which is not a tensor or a module")
    return object.__new__(cls)

  def __init__(self):
    raise Refused(f"it asks to call {self.global_name}, which is not a tensor or a module")

  def __setstate__(self, state):
    name = type(self).global_name
    if "_parameters" in self.__dict__:
      raise Refused(f"it builds the same {name} twice")
    if not (isinstance(state, dict) and all(
        isinstance(state.get(k), dict) for k in ("_parameters", "_buffers", "_modules"))):
      raise Refused(f"it builds a {name} that is not a torch module (no _parameters, _buffers "
                    "and _modules)")
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    if not isinstance(non_persistent, set):
      raise Refused(f"a {name}'s _non_persistent_buffers_set is not a set")
    self.__dict__.update({k: state[k] for k in ("_parameters", "_buffers", "_modules")},
                         _non_persistent=non_persistent)


def _scan(pickled: bytes) -> None:
  count = 0
  for op, arg, _ in pickletools.genops(pickled):
    count += 1
    if op.name in _REFUSED_OPCODES:
      raise Refused(f"its pickle uses the {op.name} opcode, which torch.save never writes")
    if op.name in _PUT_OPCODES and not (_is_int(arg) and 0 <= arg <= count):
      raise Refused(f"its pickle stores memo entry {shown(arg)} after {count} opcodes")


class _Unpickler(pickle.Unpickler):
  def __init__(self, pickled: bytes, archive: Archive):
    super().__init__(io.BytesIO(pickled))
    self.archive = archive

  def find_class(self, module, name):
    module, name = _PY2_NAMES.get((module, name), (module, name))
    if (module, name) in _GLOBALS:
      return _GLOBALS[module, name]
    if not (_NAME.match(module) and _NAME.match(name)):
      raise Refused(f"it names the global {shown(module)}.{shown(name)}")
    if module == "torch" and name in STORAGE_DTYPES:
      return StorageType(name)
    return _StandInType(name.rpartition(".")[2], (StandIn,), {"global_name": f"{module}.{name}"})

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and
            isinstance(pid[1], StorageType) and isinstance(pid[3], str)):
      what = pid[0] if isinstance(pid, tuple) and pid else pid
      raise Refused(f"it refers to a {shown(what)} outside the pickle; only storages are read")
    return self.archive.storage(pid[1], pid[2], pid[4])


def _entry(name, where: str) -> str:
  if not (isinstance(name, str) and name and "." not in name and len(name) <= 200):
    raise Refused(f"{where} has an entry named {shown(name)}")
  return name


def module_state_dict(root: StandIn) -> dict:
  """The `state_dict()` of a module tree: parameters, then persistent buffers, then each
  child's under its name (None skipped)."""
  out, seen, count = {}, {id(root)}, 0
  stack = [(root, "", 0)]
  while stack:
    node, prefix, depth = stack.pop()
    where = f"module {shown(prefix[:-1])}" if prefix else "the model"
    if not isinstance(node, StandIn) or "_parameters" not in node.__dict__:
      raise Refused(f"{where} is not a torch module")
    count += len(node._parameters) + len(node._buffers) + len(node._modules)
    if count > MAX_ENTRIES:
      raise Refused(f"its module tree has more than {MAX_ENTRIES} entries")
    buffers = [(k, v) for k, v in node._buffers.items() if k not in node._non_persistent]
    for name, value in [*node._parameters.items(), *buffers]:
      key = prefix + _entry(name, where)
      if value is None:
        continue
      if not isinstance(value, _Tensor):
        raise Refused(f"{shown(key)} is a {type(value).__name__}, not a tensor")
      if key in out:
        raise Refused(f"two entries are named {shown(key)}")
      out[key] = value.array
    children = []
    for name, child in node._modules.items():
      path = prefix + _entry(name, where)
      if child is None:
        continue
      if id(child) in seen:
        raise Refused(f"module {shown(path)} appears twice in the tree (shared or cyclic)")
      if depth >= MAX_DEPTH:
        raise Refused(f"its module tree is deeper than {MAX_DEPTH}")
      seen.add(id(child))
      children.append((child, path + ".", depth + 1))
    stack.extend(reversed(children))
  return out


def state_dict(archive: Archive) -> dict:
  """The state_dict of the archive's data.pkl (a state_dict or a whole model)."""
  pickled = archive.record("data.pkl", MAX_PICKLE_BYTES)
  _scan(pickled)
  obj = _Unpickler(pickled, archive).load()
  if isinstance(obj, StandIn):
    return module_state_dict(obj)
  if not isinstance(obj, dict):
    raise Refused(f"it holds a {type(obj).__name__}, not a state_dict or a model")
  if len(obj) > MAX_ENTRIES:
    raise Refused(f"its state_dict has more than {MAX_ENTRIES} entries")
  for key, value in obj.items():
    if not isinstance(key, str) or not isinstance(value, _Tensor):
      raise Refused(f"entry {shown(key)} is a {type(value).__name__}, not a tensor")
  return {key: value.array for key, value in obj.items()}
