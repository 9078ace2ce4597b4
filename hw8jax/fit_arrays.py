"""hw8jax.fit: train on images held in memory, PyOD's way (`fit`, then `decision_function` /
`predict` / `threshold_` on the returned detector)."""

from __future__ import annotations

import hashlib
import os

import ml_collections
import numpy as np

from hw8jax import config as config_lib
from hw8jax import data
from hw8jax.errors import UserError

FIT_DATA = "fit_data"


def _recipe(config_or_recipe) -> ml_collections.ConfigDict:
  """A config from a ConfigDict, a dict of its keys, or a recipe name ("fcn_boss",
  "fcn_boss:quick", "fcn_crops:1")."""
  if isinstance(config_or_recipe, str):
    from hw8jax.configs import get_config

    name, _, arg = config_or_recipe.partition(":")
    return get_config(name, arg or None)
  if isinstance(config_or_recipe, dict):
    return ml_collections.ConfigDict(config_or_recipe)
  if isinstance(config_or_recipe, ml_collections.ConfigDict):
    return ml_collections.ConfigDict(config_or_recipe.to_dict())  # the caller's stays as it was
  raise UserError(f"config: a {type(config_or_recipe).__name__}; give a recipe name such as "
                  "'fcn_boss', a ConfigDict (hw8jax.get_config) or a dict of its keys")


def _images(images, what: str) -> np.ndarray:
  array = np.asarray(images)
  if array.ndim != 4 or array.shape[1:] != (64, 64, 3) or array.dtype != np.uint8 or \
      not len(array):
    raise UserError(f"{what}: shape {array.shape} dtype {array.dtype}; expected uint8 "
                    "(N, 64, 64, 3) pixels 0..255, N >= 1")
  return array


def _digest(array: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _keep(path: str, array: np.ndarray) -> None:
  """`array` as the .npy at `path`: written once; a second fit with other images is refused
  (its checkpoints would mix two data sets)."""
  if os.path.exists(path):
    kept = data.open_images(path)
    if kept.shape != array.shape or _digest(kept) != _digest(array):
      raise UserError(f"{path}: this workdir was fit on other images ({kept.shape[0]}); fit "
                      "these in another workdir")
    return
  data.write_npy_atomic(path, array)


def fit(images, config_or_recipe, workdir: str, test_images=None):
  """Train an autoencoder on uint8 images (N, 64, 64, 3) held in memory and return its
  `Detector` (`hw8jax.load`), as a run over files would: the same checkpoints, records, resume
  and outputs. The images are kept in `workdir/fit_data/` as trainingset.npy (and
  testingset.npy: `test_images`, or the training images themselves, which the scoring run then
  scores: submission.csv, predictions.csv and threshold.json describe them). A second `fit` on
  the same workdir with the same images resumes (or, finished, only rescores)."""
  from hw8jax.detector import load
  from hw8jax.main import run

  config = _recipe(config_or_recipe)
  train = _images(images, "images")
  test = train if test_images is None else _images(test_images, "test_images")
  if not isinstance(workdir, (str, os.PathLike)) or not os.fspath(workdir):
    raise UserError(f"workdir={workdir!r}: give the path of a folder for the run's outputs")
  workdir = os.fspath(workdir)
  folder = os.path.join(workdir, FIT_DATA)
  config.data.dir, config.data.demo, config.data.test_labels = folder, False, ""
  config_lib.validate(config)  # every mistake before the images are written
  os.makedirs(folder, exist_ok=True)
  _keep(os.path.join(folder, data.TRAIN_FILE), train)
  _keep(os.path.join(folder, data.TEST_FILE), test)
  run(config, workdir)
  return load(workdir, config.checkpoint.restore)
