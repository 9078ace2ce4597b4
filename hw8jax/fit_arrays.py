"""hw8jax.fit: train on images held in memory, PyOD's way.

`fit`, then `decision_function` / `predict` / `threshold` on the returned detector."""

from __future__ import annotations

import contextlib
import hashlib
import os

import ml_collections
import numpy as np

from hw8jax import checkpoint, data
from hw8jax import config as config_lib
from hw8jax import workdir as workdir_lib
from hw8jax.configs import get_config
from hw8jax.detector import load
from hw8jax.errors import UserError
from hw8jax.main import run


def _recipe(config_or_recipe) -> ml_collections.ConfigDict:
  """A config from a ConfigDict, a dict of its keys, or a recipe name ("fcn_boss",
  "fcn_boss:quick", "fcn_crops:1")."""
  if isinstance(config_or_recipe, str):
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


def _keep(path: str, array: np.ndarray, replaceable: bool) -> bool:
  """`array` as the .npy at `path`; True where this call wrote it. What an earlier fit left
  there is replaced only where no checkpoint was trained on it (`replaceable`); otherwise a fit
  with other images is refused (its checkpoints would mix two data sets)."""
  if os.path.exists(path):
    kept = data.open_images(path)
    if kept.shape == array.shape and _digest(kept) == _digest(array):
      return False
    if not replaceable:
      raise UserError(f"{path}: this workdir was fit on other images ({kept.shape[0]}); fit "
                      "these in another workdir")
  data.write_npy_atomic(path, array)
  return True


def _trained_on(workdir: str) -> str | None:
  """The fingerprint of what the workdir's checkpoints were trained on: None without
  checkpoints, "" where checkpoints exist but no record says (a workdir of an older version)."""
  if not (checkpoint.exists(workdir, "latest") or checkpoint.exists(workdir, "best")):
    return None
  return workdir_lib.trained_on(workdir) or ""


def fit(images, config_or_recipe, workdir: str, test_images=None):
  """Train an autoencoder on uint8 images (N, 64, 64, 3) held in memory and return its
  `Detector` (`hw8jax.load`), as a run over files would: the same checkpoints, records, resume
  and outputs. The images are kept in `workdir/fit_data/` as trainingset.npy (and
  testingset.npy: `test_images`, or the training images themselves, which the scoring run then
  scores: submission.csv, predictions.csv and threshold.json describe them). A second `fit` on
  the same workdir with the same images resumes (or, finished, only rescores); a fit whose run
  stops before its first checkpoint keeps none of its images."""
  config = _recipe(config_or_recipe)
  train = _images(images, "images")
  test = train if test_images is None else _images(test_images, "test_images")
  if not isinstance(workdir, (str, os.PathLike)) or not os.fspath(workdir):
    raise UserError(f"workdir={workdir!r}: give the path of a folder for the run's outputs")
  workdir = os.fspath(workdir)
  folder = os.path.join(workdir, workdir_lib.FIT_DATA)
  config.data.dir, config.data.demo, config.data.test_labels = folder, False, ""
  config_lib.validate(config)  # every mistake before the images are written
  workdir_lib.check_layout(workdir)
  train_path = os.path.join(folder, data.TRAIN_FILE)
  trained_on = _trained_on(workdir)
  replaceable = trained_on is None or (
      bool(trained_on) and os.path.exists(train_path) and
      trained_on != data.fingerprint(data.open_images(train_path)))
  os.makedirs(folder, exist_ok=True)
  written = [path for path, array in ((train_path, train),
                                      (os.path.join(folder, data.TEST_FILE), test))
             if _keep(path, array, replaceable)]
  try:
    run(config, workdir)
  except BaseException:
    # Images no checkpoint was trained on are not kept: a later fit starts clean.
    if _trained_on(workdir) != data.fingerprint(train):
      for path in written:
        os.remove(path)
      with contextlib.suppress(OSError):
        os.rmdir(folder)
    raise
  return load(workdir)
