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
from skimage import data as skdata

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
# Written first into every set this module builds: only a folder that holds it (or an empty
# one) is ever written into, so a data.dir holding a user's own files is never replaced.
MARKER = ".hw8jax-built-set"


def _entries(directory) -> list[str] | None:
  """The names in `directory` (None where it does not exist)."""
  try:
    return os.listdir(directory)
  except FileNotFoundError:
    return None
  except NotADirectoryError:
    raise UserError(f"{directory}: a file, not a folder; pass --config.data.dir=a folder for "
                    "the demo set") from None
  except OSError as e:
    raise UserError(f"{directory}: cannot be read ({e.strerror})") from None


def is_complete(directory) -> bool:
  """Whether `directory` holds a whole set this module built: its marker and the three files
  (a set cut short by an older version, which wrote them one by one, lacks the last)."""
  names = _entries(directory) or []
  return MARKER in names and all(name in names for name in FILES)


def _same(path: str, array: np.ndarray) -> bool:
  try:
    kept = np.load(path, mmap_mode="r", allow_pickle=False)
  except (OSError, ValueError, EOFError):
    return False
  return kept.shape == array.shape and kept.dtype == array.dtype and np.array_equal(kept, array)


def check_buildable(directory, arrays: dict) -> None:
  """Refuse, in one line, to write a set into a folder that holds anything but a set built
  here (its marker; or, from a version before the marker, only files equal to `arrays`, the set
  being written): a user's own trainingset.npy must never be replaced by the demo's."""
  names = _entries(directory)
  if not names or MARKER in names:
    return
  if set(names) <= set(arrays) and all(_same(os.path.join(directory, n), arrays[n])
                                       for n in names):
    return
  listing = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
  raise UserError(f"{directory}: holds files the demo did not write ({listing}); a demo set is "
                  "only built into a new or empty folder: pass --config.data.dir=another "
                  "folder, or drop data.demo to use the files there")


def write_dataset(directory, train: np.ndarray, test: np.ndarray, labels: np.ndarray) -> str:
  """Write a set in the Kaggle layout so that it appears whole: built in a folder beside
  `directory`, then renamed into place (or, where `directory` exists, empty or holding a set
  built here, the marker first and then the files moved in one by one, the set counting as
  complete only with all of them). Returns the labels file's path."""
  directory = os.path.abspath(os.fspath(directory))
  arrays = dict(zip(FILES, (train, test, labels.astype(np.int64)), strict=True))
  check_buildable(directory, arrays)
  building = f"{directory}.tmp{os.getpid()}"
  try:
    os.makedirs(building)
    with open(os.path.join(building, MARKER), "w") as f:
      f.write("built by hw8jax (hw8jax.data.demo); rebuilt whenever it is incomplete\n")
    for name, array in arrays.items():
      write_npy_atomic(os.path.join(building, name), array)
    if not os.path.exists(directory):
      os.rename(building, directory)
    else:
      for name in (MARKER, *FILES):
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
