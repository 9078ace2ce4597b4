"""Reading the Kaggle .npy files: memory-mapped, validated, one-line errors."""

from __future__ import annotations

import hashlib
import math
import mmap
import os

import numpy as np

from hw8jax import atomic
from hw8jax.errors import UserError

TRAIN_FILE = "trainingset.npy"
TEST_FILE = "testingset.npy"
IMAGE_SHAPE = (64, 64, 3)


class DataError(UserError, ValueError):
  """Bad input data; the message is one line naming the file and the problem."""


def _header(path: str):
  """(shape, fortran_order, dtype, data offset) of a .npy file, without reading its data."""
  if not os.path.exists(path):
    raise DataError(f"{path}: no such file")
  if not os.path.isfile(path):
    raise DataError(f"{path}: not a file")
  try:
    with open(path, "rb") as f:
      version = np.lib.format.read_magic(f)
      read = {(1, 0): np.lib.format.read_array_header_1_0,
              (2, 0): np.lib.format.read_array_header_2_0}.get(version)
      if read is None:
        raise DataError(f"{path}: unsupported .npy format version {version}")
      shape, fortran, dtype = read(f)
      return shape, fortran, dtype, f.tell()
  except DataError:
    raise
  except (ValueError, OSError, SyntaxError) as e:
    raise DataError(f"{path}: not a .npy file ({str(e).splitlines()[0]})") from None


def open_npy(path, random_access: bool = False) -> np.ndarray:
  """The array of a .npy file, memory-mapped read-only, after checking that its header
  describes an array the file holds whole and that it is not pickled. `random_access` tells
  the kernel not to read ahead around each page touched: a batch of images drawn from all over
  a training file would otherwise map most of it (see `release_pages`)."""
  path = os.fspath(path)
  shape, fortran, dtype, offset = _header(path)
  if dtype.hasobject:
    raise DataError(f"{path}: holds Python objects (dtype {dtype}); refusing to unpickle")
  if any(not isinstance(d, int) or d < 0 for d in shape):
    raise DataError(f"{path}: the header's shape {shape} has a negative size")
  count = math.prod(shape)  # Python integers: a header claiming 10**15 images cannot overflow
  need, have = offset + count * dtype.itemsize, os.path.getsize(path)
  if have < need:
    raise DataError(f"{path}: truncated: {have} bytes, the header promises {need}")
  if count == 0:
    raise DataError(f"{path}: empty array of shape {shape}")
  with open(path, "rb") as f:
    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  if random_access and hasattr(mmap, "MADV_RANDOM"):
    mapped.madvise(mmap.MADV_RANDOM)
  return np.ndarray(shape, dtype, buffer=mapped, offset=offset, order="F" if fortran else "C")


def release_pages(images: np.ndarray) -> None:
  """Unmap the pages of a memory-mapped file that `images` (from `open_npy`) has read: they stay
  in the system's file cache, but no longer count as this process's memory (an epoch reads the
  whole 1.2 GB training file). Reading them again maps them again. Other arrays: a no-op."""
  if isinstance(images.base, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
    images.base.madvise(mmap.MADV_DONTNEED)


def open_images(path, random_access: bool = False) -> np.ndarray:
  """A (N, 64, 64, 3) uint8 image file, memory-mapped.

  Only uint8 is accepted: the images are 8-bit photographs and every transform assumes 0..255.
  Any other dtype is an error that says how to convert, rather than a silent guess at its range.
  """
  path = os.fspath(path)
  shape, _, dtype, _ = _header(path)
  if len(shape) != 4 or tuple(shape[1:]) != IMAGE_SHAPE:
    raise DataError(f"{path}: shape {tuple(shape)}, expected (N, 64, 64, 3) images")
  if not dtype.hasobject and dtype != np.uint8:
    raise DataError(f"{path}: dtype {dtype}, expected uint8 pixels 0..255 "
                    "(convert with np.clip(a, 0, 255).astype(np.uint8))")
  return open_npy(path, random_access)


def open_labels(path, num_images: int) -> np.ndarray:
  """0/1 anomaly labels (1 = anomaly), shape (num_images,), as an int32 array in memory."""
  path = os.fspath(path)
  shape, _, dtype, _ = _header(path)
  if len(shape) != 1:
    raise DataError(f"{path}: shape {tuple(shape)}, expected ({num_images},) labels")
  if dtype.hasobject or dtype.kind not in "biuf":
    raise DataError(f"{path}: dtype {dtype}, expected 0/1 integer labels")
  labels = np.asarray(open_npy(path))
  if labels.shape[0] != num_images:
    raise DataError(f"{path}: {labels.shape[0]} labels for {num_images} test images")
  if not np.isin(labels, (0, 1)).all():
    raise DataError(f"{path}: labels must be 0 (normal) or 1 (anomaly), found "
                    f"{sorted(set(np.unique(labels).tolist()) - {0, 1})[:5]}")
  return labels.astype(np.int32)


FINGERPRINT_ROWS = 256


def fingerprint(images: np.ndarray) -> str:
  """A short name for a set of images that tells two sets apart without reading a whole
  training file: its shape and a SHA-256 of up to FINGERPRINT_ROWS images spread over it
  (3 MB, read in milliseconds from a memory-mapped file)."""
  n = len(images)
  rows = np.unique(np.linspace(0, n - 1, min(n, FINGERPRINT_ROWS)).astype(np.int64))
  digest = hashlib.sha256(repr(tuple(images.shape)).encode())
  for i in rows:
    digest.update(np.ascontiguousarray(images[i]).tobytes())
  return f"{n}x{'x'.join(str(d) for d in images.shape[1:])}:{digest.hexdigest()[:32]}"


def write_npy_atomic(path, array: np.ndarray) -> None:
  """np.save through a temporary file and a rename, so a reader never sees half a file."""
  with atomic.replaced(path, "wb") as f:
    np.save(f, array, allow_pickle=False)
