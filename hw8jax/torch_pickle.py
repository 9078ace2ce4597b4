"""Read a `torch.save` file without running anything in it.

The originals save whole models (`torch.save(model, "last_model_fcn.pt")`), whose pickle names
the model's classes (often `__main__.fcn_autoencoder`, defined in a notebook) and may name any
other callable. Unpickling normally imports and calls them: a file can run any code. Here the
unpickler resolves every global itself:

- torch's tensor rebuild functions, `collections.OrderedDict` and the few builtins a module's
  state uses are the real ones (torch reads the storages from the zip archive as usual);
- every other name becomes an inert stand-in class. Built the way pickle builds an object
  (a new instance, then its state), it keeps only what an `nn.Module` holds (`_parameters`,
  `_buffers`, `_modules`) and refuses any other state; called like a function (`os.system(...)`,
  `builtins.eval(...)`, `subprocess.Popen(...)`, a custom `__reduce__`), it refuses.

Nothing is imported by name and nothing named by the file is called, so a refusal happens before
any of its code could run. There is no fallback to full unpickling.
"""

from __future__ import annotations

import _compat_pickle
import collections
import copyreg
import os
import pickle
import types

from hw8jax.errors import UserError


class UnsafePickleError(UserError, ValueError):
  """A file asked for something other than tensors and module trees; one line naming both."""


_MODULE_STATE = ("_parameters", "_buffers", "_modules")


def _allowed():
  import torch

  return {
      ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
      ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
      ("torch._utils", "_rebuild_parameter_with_state"):
          torch._utils._rebuild_parameter_with_state,
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("copyreg", "_reconstructor"): copyreg._reconstructor,
      ("builtins", "object"): object,
      ("builtins", "set"): set,
      ("builtins", "frozenset"): frozenset,
      ("torch", "Size"): torch.Size,
  }


class StandIn:
  """What a pickled class becomes: inert; `global_name` says what the file named."""

  global_name = "?"
  source = "?"

  def __init__(self, *args, **kwargs):
    # Reached only when the file calls the name (pickle's REDUCE); building an object of a
    # pickled class goes through __new__ and __setstate__ alone.
    del args, kwargs
    raise UnsafePickleError(
        f"{self.source}: refused: it asks to call {self.global_name}, which is not a tensor or "
        "a module; nothing in the file was run")

  def __setstate__(self, state):
    if not (isinstance(state, dict) and all(k in state for k in _MODULE_STATE)):
      raise UnsafePickleError(
          f"{self.source}: refused: it builds a {self.global_name} that is not a torch module "
          "(no _parameters, _buffers and _modules); nothing in the file was run")
    for key in _MODULE_STATE:
      setattr(self, key, dict(state[key]))
    self._non_persistent = set(state.get("_non_persistent_buffers_set") or ())


def _stand_in(module: str, name: str, source: str) -> type:
  return types.new_class(name.rpartition(".")[2] or "StandIn", (StandIn,), {},
                         lambda ns: ns.update(global_name=f"{module}.{name}", source=source))


def _unpickler_module(source: str):
  """A stand-in for the `pickle` module whose Unpickler resolves globals as above (torch.load
  subclasses `pickle_module.Unpickler` and gives it torch's storage loader)."""
  allowed = _allowed()

  class Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
      # Protocol 2 (torch.save's) writes Python 2 names (`__builtin__.set`); map them as
      # pickle's own find_class does.
      if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
      module = _compat_pickle.IMPORT_MAPPING.get(module, module)
      if (module, name) in allowed:
        return allowed[(module, name)]
      return _stand_in(module, name, source)

  def load(file, **kwargs):  # torch's legacy (pre-zip) format reads its header with this
    return Unpickler(file, **kwargs).load()

  return types.SimpleNamespace(Unpickler=Unpickler, load=load, __name__="hw8jax_pickle")


def module_state_dict(root: StandIn) -> dict:
  """The `state_dict()` an `nn.Module` tree would give: parameters, then persistent buffers,
  then each child's under its name, skipping None."""
  out = collections.OrderedDict()

  def walk(node, prefix):
    for name, value in node._parameters.items():
      if value is not None:
        out[prefix + name] = value
    for name, value in node._buffers.items():
      if value is not None and name not in node._non_persistent:
        out[prefix + name] = value
    for name, child in node._modules.items():
      if child is not None:
        walk(child, f"{prefix}{name}.")

  walk(root, "")
  return out


def load(path) -> dict:
  """The state_dict in a `torch.save` file of a state_dict or a whole model."""
  import torch

  path = os.fspath(path)
  try:
    # weights_only=False only because torch refuses a pickle_module otherwise; the unpickler
    # above is the restriction (torch's own weights-only mode cannot take unknown classes).
    obj = torch.load(path, map_location="cpu", weights_only=False,
                     pickle_module=_unpickler_module(path))
  except UserError:  # a refusal, already one line
    raise
  except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
    raise UserError(f"{path}: not a readable torch.save file ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None
  if isinstance(obj, StandIn):
    return module_state_dict(obj)
  if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
    return obj
  raise UserError(f"{path}: holds a {type(obj).__name__}, not a state_dict or a model")
