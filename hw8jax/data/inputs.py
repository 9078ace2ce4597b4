"""A run's inputs: the training and test images and test labels its config names, validated.

With `data.demo`, the demo set is written first if missing."""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from hw8jax.data.demo import LABELS_FILE, is_complete, make_demo
from hw8jax.data.io import TEST_FILE, TRAIN_FILE, open_images, open_labels
from hw8jax.data.pipeline import num_held_out, validation_split
from hw8jax.errors import UserError

DEMO_HINT = "python launch.py --config=configs/fcn_boss.py:demo --workdir=DIR"


class RunData(NamedTuple):
  """A run's inputs, memory-mapped: only their headers have been read."""
  train: np.ndarray
  test: np.ndarray
  labels: np.ndarray | None
  train_path: str
  train_index: np.ndarray  # the training images trained on, sorted
  val_index: np.ndarray    # those held out (`data.val_fraction`), never trained on; sorted


def open_run_data(config, workdir: str) -> RunData:
  """The training and test images (and test labels, if any) a config names, validated. With
  `data.demo`, the bundled demo set is written first if missing (by process 0)."""
  directory, labels_path = config.data.dir, config.data.test_labels
  if config.data.demo:
    directory = directory or os.path.join(workdir, "demo_data")
    if not is_complete(directory):
      if jax.process_index() == 0:
        make_demo(directory)
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices("demo data written")
    labels_path = labels_path or os.path.join(directory, LABELS_FILE)
  elif not os.path.exists(directory):
    raise UserError(
        f"{directory}: no such folder. Put the Kaggle files {TRAIN_FILE} and {TEST_FILE} in "
        f"{directory}/ (kaggle competitions download -c ml2022spring-hw8, then unzip "
        f"ml2022spring-hw8.zip -d {directory}) or pass --config.data.dir=DIR; to see the "
        f"package work without them run: {DEMO_HINT}")
  train_path = os.path.join(directory, TRAIN_FILE)
  test = open_images(os.path.join(directory, TEST_FILE))
  labels = open_labels(labels_path, len(test)) if labels_path else None
  train = open_images(train_path, random_access=True)  # batches drawn from all over it
  split = validation_split(len(train), num_held_out(len(train), config.data.val_fraction),
                           config.seed)
  return RunData(train, test, labels, train_path, *split)
