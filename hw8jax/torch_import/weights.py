"""The weights of a PyTorch original in the matching hw8jax model, and back (`state_dict_of`).

hw8jax models mirror their originals' module trees (see `hw8jax.models.layers`), so a PyTorch key
maps to a layer by its path with nnx.Sequential's `layers` level left out. What differs is layout:

- Linear (out, in) -> kernel (in, out); layers that take or give a flattened feature map also have
  their rows or columns permuted from PyTorch's (C, H, W) order to NHWC's (H, W, C) order.
- Conv2d (out, in, kh, kw) -> (kh, kw, in, out); ConvTranspose2d (in, out, kh, kw) ->
  (kh, kw, out, in), the layout of a `transpose_kernel=True` kernel: the same axis permutation.
- BatchNorm weight/bias/running_mean/running_var -> scale/bias/mean/var; `num_batches_tracked` is
  not needed (momentum is fixed) and is accepted and ignored.
- PReLU weight (1,) -> the scalar slope.

No torch is needed: files are read by `hw8jax.torch_import.read_file`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

from hw8jax import models
from hw8jax.errors import UserError
from hw8jax.models import layers
from hw8jax.torch_import import read_file
from hw8jax.torch_import.archive import TorchFileError, shown

Converter = Callable[[np.ndarray, nnx.Module], np.ndarray]


def _chw_rows_to_hwc(w: np.ndarray, chw) -> np.ndarray:
  c, h, wd = chw
  return w.reshape(c, h, wd, -1).transpose(1, 2, 0, 3).reshape(w.shape)


def _linear_kernel(w: np.ndarray, layer: layers.Linear) -> np.ndarray:
  k = w.T
  if layer.in_chw is not None:
    k = _chw_rows_to_hwc(k, layer.in_chw)
  if layer.out_chw is not None:
    k = _chw_rows_to_hwc(k.T, layer.out_chw).T
  return k


def _linear_bias(b: np.ndarray, layer: layers.Linear) -> np.ndarray:
  if layer.out_chw is not None:
    b = _chw_rows_to_hwc(b[:, None], layer.out_chw)[:, 0]
  return b


def _hwc_rows_to_chw(w: np.ndarray, chw) -> np.ndarray:
  c, h, wd = chw
  return w.reshape(h, wd, c, -1).transpose(2, 0, 1, 3).reshape(w.shape)


def _linear_weight(k: np.ndarray, layer: layers.Linear) -> np.ndarray:
  """`_linear_kernel` undone: hw8jax's kernel as the original's weight."""
  if layer.out_chw is not None:
    k = _hwc_rows_to_chw(k.T, layer.out_chw).T
  if layer.in_chw is not None:
    k = _hwc_rows_to_chw(k, layer.in_chw)
  return k.T


def _linear_bias_back(b: np.ndarray, layer: layers.Linear) -> np.ndarray:
  if layer.out_chw is not None:
    b = _hwc_rows_to_chw(b[:, None], layer.out_chw)[:, 0]
  return b


def _conv_weight(k: np.ndarray, layer) -> np.ndarray:
  del layer
  return k.transpose(3, 2, 0, 1)


def _one(a: np.ndarray, layer) -> np.ndarray:
  del layer
  return a.reshape(1)


def _conv_kernel(w: np.ndarray, layer) -> np.ndarray:
  del layer
  return w.transpose(2, 3, 1, 0)


def _same(a: np.ndarray, layer) -> np.ndarray:
  del layer
  return a


def _scalar(a: np.ndarray, layer) -> np.ndarray:
  del layer
  return a.reshape(())


# Per layer type: (PyTorch name, nnx attribute, PyTorch -> hw8jax, hw8jax -> PyTorch).
_CONV = [("weight", "kernel", _conv_kernel, _conv_weight), ("bias", "bias", _same, _same)]
_RULES: list[tuple[type, list[tuple[str, str, Converter, Converter]]]] = [
    (layers.Linear, [("weight", "kernel", _linear_kernel, _linear_weight),
                     ("bias", "bias", _linear_bias, _linear_bias_back)]),
    (nnx.Conv, _CONV),
    (nnx.ConvTranspose, _CONV),
    (layers.BatchNorm, [("weight", "scale", _same, _same), ("bias", "bias", _same, _same),
                        ("running_mean", "mean", _same, _same),
                        ("running_var", "var", _same, _same)]),
    (nnx.PReLU, [("weight", "negative_slope", _scalar, _one)]),
]
_IGNORED_SUFFIXES = (".num_batches_tracked",)


def _rules_for(module: nnx.Module):
  for cls, rules in _RULES:
    if isinstance(module, cls):
      return rules
  return None


def torch_prefix(path) -> str:
  """'encoder.3' for the nnx path ('encoder', 'layers', 3)."""
  return ".".join(str(p) for p in path if p != "layers")


class WeightsMismatch(UserError, ValueError):
  """A state_dict that does not fit the model; one line listing every difference."""


def read_state_dict(source) -> dict[str, np.ndarray]:
  """A state_dict as numpy arrays, from a mapping (of numpy arrays or torch tensors) or the path
  of a `torch.save` file (`read_file`) or of a `.safetensors` file (`read_safetensors`)."""
  if isinstance(source, (str, os.PathLike)):
    if os.fspath(source).endswith(".safetensors"):
      return read_safetensors(source)
    return read_file(source)
  out = {}
  for key, value in source.items():
    if hasattr(value, "detach"):
      value = value.detach().cpu().numpy()
    out[key] = np.asarray(value)
  return out


def read_safetensors(path) -> dict[str, np.ndarray]:
  """The arrays of a `.safetensors` file (hw8jax's exports, or any state_dict saved so). The
  format is data only (a JSON header of names, dtypes, shapes and offsets, then the bytes), and
  the library checks the header against the file; anything it refuses is one line naming it."""
  path = os.fspath(path)
  try:
    return safetensors.numpy.load_file(path)
  except OSError as e:
    raise TorchFileError(f"{shown(path)}: cannot read it ({e.strerror or e})") from None
  except Exception as e:  # the library raises its own error kinds (and TypeError on bf16)
    reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    raise TorchFileError(f"{shown(path)}: not a readable safetensors file "
                         f"({type(e).__name__}: {shown(reason)})") from None


def torch_targets(model: nnx.Module, back: bool = False):
  """(PyTorch key, nnx Variable, converter, PyTorch shape) for every array the original's
  state_dict fills, in module order; the converter takes a PyTorch array to hw8jax's layout, or
  with `back`, hw8jax's to PyTorch's."""
  for path, module in nnx.iter_modules(model):
    rules = _rules_for(module)
    if rules is None:
      continue
    prefix = torch_prefix(path)
    for torch_name, attr, convert, undo in rules:
      target = getattr(module, attr, None)
      if target is None:  # a conv without bias
        continue
      key = f"{prefix}.{torch_name}" if prefix else torch_name
      yield key, target, functools.partial(undo if back else convert, layer=module), \
          _torch_shape(target.shape, attr)


def state_dict_of(model: nnx.Module, num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
  """The original's state_dict of `model`'s weights, as numpy arrays in PyTorch's layouts and
  key order: float32 parameters and BatchNorm statistics, and each BatchNorm's int64
  `num_batches_tracked` (PyTorch counts the batches seen in training: the step)."""
  out = {}
  for key, target, undo, expected in torch_targets(model, back=True):
    value = np.ascontiguousarray(undo(np.asarray(target[...], np.float32)))
    if value.shape != expected:  # the rules' own promise, checked whatever Python's -O says
      raise RuntimeError(f"{key}: exported as {value.shape}, the original holds {expected}")
    out[key] = value
    if key.endswith(".running_var"):
      out[key[:-len("running_var")] + "num_batches_tracked"] = np.array(num_batches_tracked,
                                                                        np.int64)
  return out


def load_state_dict(model: nnx.Module, state_dict) -> nnx.Module:
  """Copy a PyTorch original's weights (a state_dict or a `torch.save` file) into `model`.

  Every parameter and BatchNorm statistic of `model` must be filled and every entry of the
  state_dict used; otherwise a WeightsMismatch (a ValueError) lists the missing, unexpected and
  mis-shaped entries, and `model` is left unchanged. `model` may be abstract
  (`nnx.eval_shape(lambda: models.build(...))`): that skips drawing initial weights that would
  be overwritten, which costs seconds on CPU for the convolutional variants.
  """
  sd = read_state_dict(state_dict)
  used, problems, updates = set(), [], []
  for key, target, convert, expected in torch_targets(model):
    if key not in sd:
      problems.append(f"missing {key} {expected}")
      continue
    used.add(key)
    if not np.issubdtype(sd[key].dtype, np.floating):
      problems.append(f"dtype of {key}: {sd[key].dtype}, model needs floating point")
      continue
    if sd[key].shape != expected:
      problems.append(f"shape of {key}: got {sd[key].shape}, model needs {expected}")
      continue
    with np.errstate(over="ignore"):  # counted below
      value = sd[key].astype(np.float32)
    bad = int(np.size(value) - np.isfinite(value).sum())
    if bad:
      problems.append(f"{key} has {bad} of {np.size(value)} values that are not finite in "
                      "float32 (NaN, infinite, or beyond 3.4e38)")
      continue
    updates.append((target, convert(value)))
  unexpected = [k for k in sd if k not in used and not k.endswith(_IGNORED_SUFFIXES)]
  problems += [f"unexpected {shown(k)} {sd[k].shape}" for k in unexpected]
  if problems:
    more = f"; and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise WeightsMismatch(f"state_dict does not fit {type(model).__name__}: "
                          + "; ".join(problems[:20]) + more)
  for target, value in updates:
    target.set_value(jnp.asarray(value, target.dtype))  # unlike `[...] =`, fills abstract ones
  return model


def _torch_shape(shape, attr) -> tuple:
  """The PyTorch shape of an nnx array, for error messages."""
  if attr == "kernel" and len(shape) == 2:
    return (shape[1], shape[0])
  if attr == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if attr == "negative_slope":
    return (1,)
  return tuple(shape)


def load_torch_weights(variant: str, path: str) -> nnx.Module:
  """The variant holding a PyTorch file's weights; a file that cannot be read or does not fit
  is one line."""
  try:
    return load_state_dict(nnx.eval_shape(lambda: models.build(variant, rngs=nnx.Rngs(0))), path)
  except TorchFileError:  # names the file already
    raise
  except WeightsMismatch as e:
    raise UserError(f"init_from {shown(path)}: {e}") from None
