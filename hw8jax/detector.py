"""A trained workdir as a detector in Python, in PyOD's terms: `hw8jax.load(workdir)` (or
`hw8jax.fit`), then `score(images)` (alias `decision_function`), `threshold` and
`predict(images)`, and `reconstruct(images)`. Scores equal those of the workdir's
submission.csv for the test images in file order (the same scorer, keys and checkpoint), and
predictions those of its predictions.csv."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import ml_collections
import numpy as np
from flax import nnx

from hw8jax import config as config_lib
from hw8jax import data, runtime
from hw8jax import workdir as workdir_lib
from hw8jax.assemble import assemble
from hw8jax.errors import UserError
from hw8jax.score import autoencode, score_images, scorer_for


@dataclasses.dataclass(frozen=True)
class Detector:
  """A model restored from a workdir, with the config it was trained with."""
  config: ml_collections.ConfigDict
  step: int
  graphdef: nnx.GraphDef
  state: tuple  # (params, batch_stats), replicated over `mesh`
  mesh: jax.sharding.Mesh
  threshold: float | None = None  # threshold.json's, from the workdir's scoring run

  def score(self, images) -> np.ndarray:
    """(N,) float32 anomaly scores of uint8 images (N, 64, 64, 3); image i's sampling noise is
    keyed by i, as in a scoring run over a file."""
    images = _checked(images)
    if not len(images):
      return np.zeros(0, np.float32)
    return score_images(scorer_for(self.config, self.graphdef), self.state, images,
                        batch_size=self.config.score.batch_size,
                        key=runtime.run_keys(self.config.seed)["score"], mesh=self.mesh)

  decision_function = score  # PyOD's name: higher is more anomalous

  def predict(self, images) -> np.ndarray:
    """(N,) int32: 1 where an image's score is above `threshold` (an anomaly), else 0; for the
    test images, predictions.csv's `is_anomaly`."""
    if self.threshold is None:
      raise UserError("no threshold: the workdir has no threshold.json; score it first "
                      "(--mode=score or hw8jax.run)")
    return (self.score(images) > self.threshold).astype(np.int32)

  def reconstruct(self, images) -> np.ndarray:
    """(N, 64, 64, 3) float32 deterministic reconstructions decode(encode(x)) in [-1, 1] of
    the transformed images (what the model is trained to reproduce)."""
    local = jax.tree.map(lambda a: a.addressable_data(0), self.state)
    transform = data.get_transform(self.config.data.transform)
    reconstruct = autoencode(self.graphdef)
    x = _checked(images)
    out = [np.asarray(reconstruct(local, transform(x[i:i + 256])))
           for i in range(0, len(x), 256)]
    return np.concatenate(out) if out else np.zeros((0, 64, 64, 3), np.float32)


def _checked(images) -> np.ndarray:
  """uint8 (N, 64, 64, 3) images; one (64, 64, 3) image counts as N = 1."""
  given = np.asarray(images)
  shaped = given[None] if given.shape == (64, 64, 3) else given
  if shaped.ndim != 4 or shaped.shape[1:] != (64, 64, 3) or shaped.dtype != np.uint8:
    raise UserError(f"images: shape {given.shape} dtype {given.dtype}; expected uint8 "
                    "(N, 64, 64, 3) pixels 0..255, as in testingset.npy")
  return shaped


def load(workdir: str, which: str = "latest") -> Detector:
  """The `which` ("latest" or "best") checkpoint of `workdir`, with the config it was trained
  with, on every device of this process."""
  if not isinstance(workdir, (str, os.PathLike)):
    raise UserError(f"workdir={workdir!r}: give the path of a trained workdir")
  workdir = os.fspath(workdir)
  if which not in ("latest", "best"):
    raise UserError(f"which={which!r}: use latest or best")
  recorded = workdir_lib.trained_config(workdir)
  if recorded is None:
    raise UserError(f"{workdir}: no config.json of a training run; train first "
                    "(hw8jax.run or launch.py)")
  config_lib.validate(recorded, "score")
  runtime.use_compilation_cache(recorded.compilation_cache)
  mesh = runtime.make_mesh()
  model = assemble(recorded, "checkpoint", workdir=workdir, which=which, mesh=mesh)
  return Detector(recorded, model.step, model.eval_def, model.state, mesh,
                  _threshold(os.path.join(workdir, "threshold.json")))


def _threshold(path: str) -> float | None:
  """threshold.json's threshold (None without the file), read as data."""
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)["threshold"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f"{path}: not a threshold record ({type(e).__name__}); score the workdir "
                    "again to rewrite it") from None
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise UserError(f"{path}: threshold {value!r} is not a finite number; score the workdir "
                    "again to rewrite it")
  return float(value)
