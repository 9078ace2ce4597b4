"""What each epoch end measures, and which measure picks the best checkpoint.

The measures: the mean anomaly score of held-out training images (a validation split), the test
AUC (with labels of both classes; reported as what it is, and picking the best only when
asked), or the epoch's mean training loss. Also the reconstruction grid TensorBoard shows at
each epoch end."""

from __future__ import annotations

import numpy as np

from hw8jax import evaluate
from hw8jax.assemble import Assembled
from hw8jax.runtime import log
from hw8jax.score import autoencode, score_images

# What `checkpoint.best_by` names: the record's key, and +1 where higher is better.
BEST_BY = {"val_score": ("val_score", -1.0), "train_loss": ("epoch_mean_loss", -1.0),
           "test_auc": ("test_auc", 1.0)}
GRID_IMAGES = 8


class EpochEvaluator:
  """`run(model_state) -> {"val_score", "test_auc"}` (each where there is what it needs),
  `quality(record)` (higher is better, by `best_by`) and `grid(model_state)`."""

  def __init__(self, model: Assembled, train_images, val_index, test_images, test_labels,
               *, mesh):
    run = model.plan
    self.config, self.key, self.mesh = run.config, run.keys["score"], mesh
    self.val_images = np.asarray(train_images[val_index]) if len(val_index) else None
    reason = evaluate.single_class(test_labels) if test_labels is not None else None
    with_labels = test_labels is not None and reason is None
    self.best_by = run.best_by
    if reason:
      log(f"no test AUC: {reason}" + ("; the best checkpoint follows the epoch loss"
                                      if self.best_by == "test_auc" else ""))
      self.best_by = "train_loss" if self.best_by == "test_auc" else self.best_by
    if self.val_images is not None:
      log(f"validation: {len(self.val_images)} held-out training images, never trained on")
    self.test = (test_images, test_labels) if with_labels else None
    self.scorer = model.scorer
    self.transform = run.transform
    self.reconstruct = autoencode(model.eval_def)
    self.grid_images = None if test_images is None or not len(test_images) else \
        np.asarray(test_images[:GRID_IMAGES])

  def _scores(self, model_state, images) -> np.ndarray:
    return score_images(self.scorer, model_state, images,
                        batch_size=self.config.score.batch_size, key=self.key, mesh=self.mesh)

  def run(self, model_state) -> dict:
    record = {}
    if self.val_images is not None:
      record["val_score"] = float(np.mean(self._scores(model_state, self.val_images)))
    if self.test is not None:
      images, labels = self.test
      record["test_auc"] = evaluate.evaluate(labels, self._scores(model_state, images))["auc"]
    return record

  def quality(self, record: dict) -> float:
    key, sign = BEST_BY[self.best_by]
    return sign * record[key]

  def grid(self, model_state) -> np.ndarray | None:
    """(2 * 64, 8 * 64, 3) in [0, 1]: the first eight test images over their reconstructions;
    None without test images."""
    if self.grid_images is None:
      return None
    shown = self.transform(self.grid_images)
    # This process's copy of the (replicated) result: in a multi-process run it is global.
    recon = np.asarray(self.reconstruct(model_state, shown).addressable_data(0))
    rows = np.stack([np.asarray(shown), recon])  # (2, n, 64, 64, 3)
    return (rows.transpose(0, 2, 1, 3, 4).reshape(2 * 64, -1, 3) + 1) / 2
