"""The recipes: `default.py`, the sample code's, and one file per variant stating its changes.

fcn_crops.py is a member of the multi-crop ensemble. Each file's `get_config(arg=None)` holds
its original's values and says where each comes from. launch.py reads them by path
(`--config=configs/fcn_boss.py:quick`); the package ships the same files as `hw8jax.configs`,
and `hw8jax.get_config("fcn_boss", "quick")` calls the same function.
"""

from __future__ import annotations

import importlib
import pkgutil

from hw8jax.config import ConfigError


def names() -> list[str]:
  """The recipes `get_config` knows: every file but default.py, which each of them edits."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "default")


def get_config(recipe: str, arg: str | None = None):
  """The config of `recipe` (a variant name, or "fcn_crops") with its optional arg ("quick",
  "demo"; for fcn_crops "N", "N,quick" or "N,demo")."""
  if not (arg is None or isinstance(arg, str)):
    raise ConfigError(f"arg {arg!r}: give a string ('quick', 'demo'; for fcn_crops '0', '1', "
                      "'2', optionally with ',quick' or ',demo')")
  if recipe not in names():
    raise ConfigError(f"recipe {recipe!r}: use one of {', '.join(names())}")
  module = importlib.import_module(f"{__name__}.{recipe}")
  return module.get_config() if arg is None else module.get_config(arg)
