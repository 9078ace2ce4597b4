"""PyTorch originals' weights in hw8jax models, from a state_dict or a `torch.save` file.

  from hw8jax.torch_import import load_state_dict
  model = load_state_dict(models.build("fcn_boss", rngs=nnx.Rngs(0)), "last_model_fcn.pt")

Files are read as data, without torch and without JAX (`archive`: the zip archive and its
storages; `unpickle`: data.pkl with nothing in it run); `weights` maps PyTorch's names and
layouts to hw8jax's (and imports JAX, on first use).
"""

from __future__ import annotations

import os

import numpy as np

from hw8jax.torch_import.archive import Archive, Refused, TorchFileError, open_regular, shown
from hw8jax.torch_import.unpickle import state_dict

__all__ = ["TorchFileError", "WeightsMismatch", "load_state_dict", "load_torch_weights",
           "read_file", "read_state_dict", "torch_targets"]


def read_file(path) -> dict[str, np.ndarray]:
  """The state_dict of a `torch.save` file (a state_dict or a whole model) as read-only numpy
  arrays, read without torch and without running anything in the file. Anything else is one
  TorchFileError line naming the file."""
  path = os.fspath(path)
  try:
    f = open_regular(path)
  except Refused as e:
    raise TorchFileError(f"{shown(path)}: {e}") from None
  try:
    with f:
      return state_dict(Archive(f))
  except Refused as e:
    raise TorchFileError(f"{shown(path)}: refused: {e}; nothing in the file was run") from None
  except Exception as e:  # zipfile, pickle and numpy raise many kinds on damaged files
    detail = str(e).splitlines()[0] if str(e) else "no detail"
    raise TorchFileError(f"{shown(path)}: not a readable torch.save file ({type(e).__name__}: "
                         f"{shown(detail)}); nothing in the file was run") from None


def __getattr__(name):
  if name in __all__:  # on first use: the reader itself needs no JAX, `weights` imports it
    from hw8jax.torch_import import weights

    return getattr(weights, name)
  raise AttributeError(f"module 'hw8jax.torch_import' has no attribute {name!r}")
