"""PyTorch originals' weights in hw8jax models, from a state_dict or a `torch.save` file.

  from hw8jax.torch_import import load_state_dict
  model = load_state_dict(models.build("fcn_boss", rngs=nnx.Rngs(0)), "last_model_fcn.pt")

Files are read as data, without torch and without JAX (`archive`: the zip archive and its
storages; `unpickle`: data.pkl with nothing in it run); `weights` maps PyTorch's names and
layouts to hw8jax's (and imports JAX, on first use).
"""

from hw8jax.torch_import.archive import TorchFileError
from hw8jax.torch_import.unpickle import read_file

__all__ = ["TorchFileError", "WeightsMismatch", "load_state_dict", "load_torch_weights",
           "read_file", "read_state_dict", "torch_targets"]


def __getattr__(name):
  if name in __all__:
    from hw8jax.torch_import import weights

    return getattr(weights, name)
  raise AttributeError(f"module 'hw8jax.torch_import' has no attribute {name!r}")
