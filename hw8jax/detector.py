"""A trained workdir as a detector in Python: `hw8jax.load(workdir)` (or `hw8jax.fit`).

In PyOD's terms, a detector has `score(images)` (alias `decision_function`), `threshold` and
`predict(images)`, and `reconstruct(images)`.

A detector follows the workdir's last scoring run (its threshold.json): the same checkpoint,
score keys and threshold, so its scores equal that run's scores.npy for the test images in file
order and its predictions that run's predictions.csv. Its programs are compiled once per
detector (and per power-of-two batch size).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from hw8jax import config as config_lib
from hw8jax import evaluate, report, runtime
from hw8jax import export as export_lib
from hw8jax import workdir as workdir_lib
from hw8jax.assemble import Assembled, assemble
from hw8jax.data.io import open_npy
from hw8jax.errors import UserError
from hw8jax.plan import plan
from hw8jax.score import autoencode, batch_size_for, score_images

THRESHOLD_FILE = "threshold.json"
RECONSTRUCT_BATCH = 256


@dataclasses.dataclass(frozen=True)
class Detector:
  """A model restored from a workdir, assembled from the plan it scores with (the training
  run's config, with the score keys of the workdir's last scoring run)."""
  model: Assembled                # its plan, graphdefs, scorer and weights
  mesh: jax.sharding.Mesh
  threshold: float | None = None  # threshold.json's, where it is of this checkpoint
  no_threshold: str = ""          # why `threshold` is None, in one line
  reconstructor: Callable | None = None
  reference: np.ndarray | None = None  # the threshold's reference scores: p-values count them
  fdr: float = 0.0                     # the workdir's rule: Benjamini-Hochberg at this, or 0

  @property
  def config(self) -> ml_collections.ConfigDict:
    return self.model.plan.config

  @property
  def step(self) -> int:
    return self.model.step

  @property
  def weights(self) -> str:
    """Which checkpoint, as the outputs say it."""
    return self.model.source

  def score(self, images) -> np.ndarray:
    """(N,) float32 anomaly scores of uint8 images (N, 64, 64, 3); image i's sampling noise is
    keyed by i, as in a scoring run over a file."""
    images = _checked(images)
    if not len(images):
      return np.zeros(0, np.float32)
    model = self.model
    return score_images(model.scorer, model.state, images,
                        batch_size=self.config.score.batch_size, key=model.plan.keys["score"],
                        mesh=self.mesh, weights=model.source)

  decision_function = score  # PyOD's name: higher is more anomalous

  def predict(self, images) -> np.ndarray:
    """(N,) int32: 1 where the workdir's rule flags an image (an anomaly), else 0: its score
    above `threshold`, or with `score.fdr`, Benjamini-Hochberg over these images' p-values.
    For the test images, predictions.csv's `is_anomaly`."""
    if self.threshold is None:
      raise UserError(self.no_threshold)
    scores = self.score(images)
    p = evaluate.p_values(self.reference, scores) if self.fdr else None
    return evaluate.flagged(scores, p, self.threshold, self.fdr).astype(np.int32)

  def p_values(self, images) -> np.ndarray:
    """(N,) float64 conformal p-values: (1 + #{reference scores >= score}) / (n + 1), against
    the scores the threshold was taken from (predictions.csv's `p_value` for the test
    images); small where an image scores above most normal ones."""
    if self.reference is None:
      raise UserError(self.no_threshold or "no reference scores: score the workdir again")
    return evaluate.p_values(self.reference, self.score(images))

  def export(self, path, format: str = "safetensors", overwrite: bool = False) -> str:
    """Write this model to `path` (`hw8jax.export`): "safetensors", its PyTorch original's
    state_dict, or "stablehlo", its scorer for plain jax; returns the path."""
    if format not in export_lib.FORMATS:
      raise UserError(f"format={format!r}: use one of {', '.join(export_lib.FORMATS)}")
    return export_lib.WRITERS[format](self.model, path, overwrite=overwrite)

  def inputs(self, images) -> np.ndarray:
    """(N, 64, 64, 3) float32 in [-1, 1]: the images as the model sees them (its transform),
    where its reconstructions and anomaly maps lie (`hw8jax.figures.anomaly_map_figure`)."""
    x = _checked(images)
    return np.asarray(self.model.plan.transform(x), np.float32) if len(x) else \
        np.zeros((0, 64, 64, 3), np.float32)

  def anomaly_map(self, images) -> np.ndarray:
    """(N, 64, 64) float32 >= 0: each image's reconstruction error per pixel, summed over
    channels, from the reconstruction its score comes from (`score.pixel_error`: for "l2",
    the score is the square root of the map's sum). One program per detector and batch size."""
    images = _checked(images)
    if not len(images):
      return np.zeros((0, 64, 64), np.float32)
    model = self.model
    return score_images(model.mapper, model.state, images,
                        batch_size=self.config.score.batch_size, key=model.plan.keys["score"],
                        mesh=self.mesh, weights=model.source)

  def reconstruct(self, images) -> np.ndarray:
    """(N, 64, 64, 3) float32 deterministic reconstructions decode(encode(x)) in [-1, 1] of
    the transformed images (what the model is trained to reproduce)."""
    x = _checked(images)
    if not len(x):
      return np.zeros((0, 64, 64, 3), np.float32)
    local = jax.tree.map(lambda a: a.addressable_data(0), self.model.state)
    transform = self.model.plan.transform
    size = batch_size_for(RECONSTRUCT_BATCH, len(x))
    out = []
    for i in range(0, len(x), size):  # padded to `size`: one program per detector and size
      chunk = x[i:i + size]
      padded = np.concatenate([chunk, np.zeros((size - len(chunk), 64, 64, 3), np.uint8)])
      out.append(np.asarray(self.reconstructor(local, transform(padded)))[:len(chunk)])
    return np.concatenate(out)


def _checked(images) -> np.ndarray:
  """uint8 (N, 64, 64, 3) images; one (64, 64, 3) image counts as N = 1."""
  given = np.asarray(images)
  shaped = given[None] if given.shape == (64, 64, 3) else given
  if shaped.ndim != 4 or shaped.shape[1:] != (64, 64, 3) or shaped.dtype != np.uint8:
    raise UserError(f"images: shape {given.shape} dtype {given.dtype}; expected uint8 "
                    "(N, 64, 64, 3) pixels 0..255, as in testingset.npy")
  return shaped


def load(workdir: str, which: str | None = None) -> Detector:
  """The model of `workdir` on every device of this process, as its last scoring run scored it:
  that run's checkpoint ("latest" or "best"; `which` picks another, which then has no
  threshold), score keys and threshold. A workdir never scored loads its latest checkpoint with
  the training run's score keys, and no threshold."""
  if not isinstance(workdir, (str, os.PathLike)):
    raise UserError(f"workdir={workdir!r}: give the path of a trained workdir")
  workdir = os.fspath(workdir)
  if which not in (None, "latest", "best"):
    raise UserError(f"which={which!r}: use latest or best (or leave it out: the checkpoint the "
                    "workdir's last scoring run scored)")
  config = workdir_lib.trained_config(workdir)
  if config is None:
    raise UserError(f"{workdir}: no config.json of a training run; train first "
                    "(hw8jax.run or launch.py)")
  path = os.path.join(workdir, THRESHOLD_FILE)
  config_lib.validate(config, "score")
  scored = _scoring_record(path, config)
  scored_which = scored.get("checkpoint") if scored.get("checkpoint") in ("latest", "best") \
      else None
  which = which or scored_which or "latest"
  runtime.use_compilation_cache(config.compilation_cache)
  mesh = runtime.make_mesh()
  model = assemble(plan(config), "checkpoint", workdir=workdir, which=which, mesh=mesh)
  threshold, why = scored.get("threshold"), ""
  if threshold is None:
    why = f"no threshold: {workdir} has no {THRESHOLD_FILE}; score it first (--mode=score or " \
        "hw8jax.run)"
  elif scored_which and (which, model.step) != (scored_which, scored.get("step")):
    threshold = None
    why = (f"no threshold: {path} is of the {scored_which} checkpoint (step "
           f"{scored.get('step')}), this detector holds {model.source}; score the workdir "
           f"again with checkpoint.restore={which}, or load it without `which`")
  reference = _reference(workdir, scored) if threshold is not None else None
  return Detector(model, mesh, threshold, why, autoencode(model.eval_def), reference,
                  config.score.fdr)


def _reference(workdir: str, scored: dict) -> np.ndarray | None:
  """The reference scores a scoring run kept (None where an older version's run kept none):
  a 1-D array of finite numbers, or a one-line error naming the file."""
  if scored.get("reference_scores") != report.REFERENCE_FILE:
    return None
  path = os.path.join(workdir, report.REFERENCE_FILE)
  try:
    found = open_npy(path)
  except OSError as e:
    raise UserError(f"{path}: cannot read it ({e.strerror}); score the workdir again") from None
  if found.ndim != 1 or found.dtype.kind != "f" or not np.isfinite(found).all():
    raise UserError(f"{path}: not reference scores (shape {found.shape}, dtype {found.dtype}); "
                    "score the workdir again to rewrite it")
  return np.asarray(found, np.float32)


def _scoring_record(path: str, config: ml_collections.ConfigDict) -> dict:
  """threshold.json read as data ({} without it), its score keys and CPU setting applied to
  `config` (a valid one) after the same checks as any config's. A record of an older version
  that names no keys leaves `config` as trained."""
  if not os.path.exists(path):
    return {}
  record = report.read_json(path)
  value = record.get("threshold") if record else None
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise UserError(f"{path}: not a threshold record (its threshold is {value!r}); score the "
                    "workdir again to rewrite it")
  if "score" in record or "cpu_fast_paths" in record:
    flat = config_lib.flatten({"score": record.get("score", {})})
    if "cpu_fast_paths" in record:
      flat["cpu_fast_paths"] = record["cpu_fast_paths"]
    try:
      config.update_from_flattened_dict(flat)
      config_lib.validate(config, "score")
    except (config_lib.ConfigError, AttributeError, KeyError, TypeError, ValueError) as e:
      raise UserError(f"{path}: its score keys are not a valid config "
                      f"({str(e).splitlines()[0]}); score the workdir again") from None
  step = record.get("step")
  return {**record, "threshold": float(value),
          "step": step if isinstance(step, int) and not isinstance(step, bool) else None}
