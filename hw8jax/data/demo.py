"""Small data sets in the Kaggle layout: a real-face demo and a synthetic set for tests.

The demo comes from scikit-image's `data.lfw_subset()`, which ships with the package (no
download): 100 grey 25x25 face crops from Labeled Faces in the Wild and 100 grey 25x25 patches
that are not faces. Faces are split into training and held-out test faces; the non-faces are the
anomalies. Images are upsampled to 64x64 (bilinear) and repeated over three channels.
"""

from __future__ import annotations

import os
import shutil

import numpy as np

from hw8jax.data.io import TEST_FILE, TRAIN_FILE, write_npy_atomic
from hw8jax.data.transforms import SIZE, resize_matrix
from hw8jax.errors import UserError

LABELS_FILE = "testing_labels.npy"
DEMO_TRAIN_FACES = 70
DEMO_TEST_PER_CLASS = 30


def _to_rgb64(grey: np.ndarray) -> np.ndarray:
  """(N, h, w) floats in [0, 1] -> (N, 64, 64, 3) uint8."""
  rows = resize_matrix(grey.shape[1], SIZE)
  cols = resize_matrix(grey.shape[2], SIZE)
  big = np.einsum("oh,nhw,pw->nop", rows, grey, cols)
  pixels = np.clip(np.rint(big * 255.0), 0, 255).astype(np.uint8)
  return np.repeat(pixels[..., None], 3, axis=-1)


FILES = (TRAIN_FILE, TEST_FILE, LABELS_FILE)


def is_complete(directory) -> bool:
  """Whether `directory` holds the three files of a set; one cut short by an older version,
  which wrote them one by one into place, does not."""
  return all(os.path.isfile(os.path.join(directory, name)) for name in FILES)


def write_dataset(directory, train: np.ndarray, test: np.ndarray, labels: np.ndarray) -> str:
  """Write a set in the Kaggle layout so that it appears whole: built in a folder beside
  `directory`, then renamed into place (or, where `directory` exists, its files moved in one by
  one, the set counting as complete only with all three). Returns the labels file's path."""
  directory = os.path.abspath(os.fspath(directory))
  building = f"{directory}.tmp{os.getpid()}"
  try:
    os.makedirs(building)
    for name, array in zip(FILES, (train, test, labels.astype(np.int64)), strict=True):
      write_npy_atomic(os.path.join(building, name), array)
    if not os.path.exists(directory):
      os.rename(building, directory)
    else:
      for name in FILES:
        os.replace(os.path.join(building, name), os.path.join(directory, name))
      os.rmdir(building)
  except OSError as e:
    raise UserError(f"{directory}: cannot write the data set there ({e.strerror}); pass "
                    "--config.data.dir=a folder this run can write") from None
  finally:
    shutil.rmtree(building, ignore_errors=True)
  return os.path.join(directory, LABELS_FILE)


def make_demo(directory) -> str:
  """Write the demo set into `directory` (deterministic); returns the labels file's path."""
  from skimage import data as skdata

  grey = skdata.lfw_subset()
  faces, others = _to_rgb64(grey[:100]), _to_rgb64(grey[100:])
  rng = np.random.default_rng(0)
  face_order, other_order = rng.permutation(100), rng.permutation(100)
  train = faces[face_order[:DEMO_TRAIN_FACES]]
  test_faces = faces[face_order[DEMO_TRAIN_FACES:DEMO_TRAIN_FACES + DEMO_TEST_PER_CLASS]]
  test_others = others[other_order[:DEMO_TEST_PER_CLASS]]
  test = np.concatenate([test_faces, test_others])
  labels = np.repeat([0, 1], DEMO_TEST_PER_CLASS)
  order = rng.permutation(len(test))
  return write_dataset(directory, train, test[order], labels[order])


def synthetic_images(n: int, seed: int, anomalous: bool = False) -> np.ndarray:
  """n uint8 (64, 64, 3) images: smooth colour blobs (normal) or the same with a block of
  pixel noise (anomalous), for tests and benchmarks."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:64, 0:64] / 63.0
  out = np.empty((n, 64, 64, 3), np.uint8)
  for i in range(n):
    img = np.zeros((64, 64, 3))
    for _ in range(3):
      cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
      blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
      img += blob[..., None] * rng.uniform(0.2, 0.6, 3)
    if anomalous:
      y0, x0 = rng.integers(0, 40, 2)
      img[y0:y0 + 24, x0:x0 + 24] = rng.uniform(0, 1, (24, 24, 3))
    out[i] = np.clip(img * 255, 0, 255).astype(np.uint8)
  return out


def make_synthetic(directory, num_train: int, num_test: int, seed: int = 0) -> str:
  """A synthetic set in the Kaggle layout with half the test images anomalous; returns the
  labels file's path."""
  normal = num_test - num_test // 2
  test = np.concatenate([synthetic_images(normal, seed + 1),
                         synthetic_images(num_test // 2, seed + 2, anomalous=True)])
  labels = np.repeat([0, 1], [normal, num_test // 2])
  order = np.random.default_rng(seed + 3).permutation(num_test)
  return write_dataset(directory, synthetic_images(num_train, seed), test[order], labels[order])
