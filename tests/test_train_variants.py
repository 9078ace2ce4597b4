"""Every original through the whole training path at its real size."""

from __future__ import annotations

import json
import math
import os

import pytest

from hw8jax import models
from hw8jax.data.demo import make_synthetic
from hw8jax.main import run

from conftest import latest_step, quick_config


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("small")
  make_synthetic(d, num_train=16, num_test=8, seed=0)
  return str(d)


@pytest.mark.parametrize("variant", models.VARIANTS)
def test_quick_config_trains_every_variant(variant, small_dir, tmp_path):
  """Each original through the whole training path at its real size: 6 steps of batch 8 with
  a checkpoint at step 4 and the last, and a test AUC at each of the 3 epoch ends.

  SGD at 1e-5 (multi_encoder's summed error diverges at 1e-3): the subject is the variant in
  the sharded step, its checkpoints and its scorer, not the optimiser. Adam's two moments triple
  what a checkpoint holds and orbax copies it all while saving: fcn_boss peaked at 4.8 GB. Adam
  is followed step by step against PyTorch below and runs in every pipeline test."""
  workdir = str(tmp_path / variant)
  c = quick_config(variant, small_dir)
  c.batch_size, c.max_steps, c.checkpoint.every_steps = 8, 6, 4
  c.optimizer.name, c.optimizer.learning_rate = "sgd", 1e-5
  c.log_every_seconds = 0.0
  run(c, workdir, "train")
  assert latest_step(workdir) == 6
  lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
  steps = [r["step"] for r in lines if "loss" in r]
  assert steps == list(range(1, 7)) and all(math.isfinite(r["loss"]) for r in lines
                                             if "loss" in r)
  epochs = [r for r in lines if "epoch_mean_loss" in r]
  assert len(epochs) == 3 and all(0 <= r["test_auc"] <= 1 for r in epochs)  # 2 steps an epoch
  assert json.load(open(os.path.join(workdir, "config.json")))["model"] == variant
