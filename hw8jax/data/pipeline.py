"""grain pipelines over memory-mapped image arrays.

Training: batch `s` of the run is a fixed function of (seed, s): epoch e = s // steps_per_epoch
reads its slice of a permutation drawn from (seed, e), so every epoch visits each image at most
once (exactly once when the batch size divides N; otherwise the N mod B left over differ from
epoch to epoch), and a restored iterator continues at the exact next batch. Each JAX process reads
only its own rows of every global batch.

Evaluation: file order, the last batch padded with zeros and masked, so every image is scored
exactly once and every batch has the same shape (no recompilation).

Batches are uint8; the transform runs inside the jitted step (see docs/performance.md).
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from hw8jax.data.io import release_pages


@dataclasses.dataclass(frozen=True)
class Shard:
  """Which rows of each global batch this process reads."""
  index: int = 0
  count: int = 1

  def rows(self, global_batch: int) -> slice:
    if global_batch % self.count:
      raise ValueError(f"batch size {global_batch} does not split over {self.count} processes")
    local = global_batch // self.count
    return slice(self.index * local, (self.index + 1) * local)


def steps_per_epoch(num_images: int, batch_size: int) -> int:
  steps = num_images // batch_size
  if steps == 0:
    raise ValueError(f"batch size {batch_size} is larger than the {num_images} training images")
  return steps


def epoch_permutation(num_images: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_images)


def num_held_out(num_images: int, val_fraction: float) -> int:
  """How many of `num_images` a validation split of `val_fraction` holds out."""
  return int(round(val_fraction * num_images))


def validation_split(num_images: int, num_held_out: int, seed: int):
  """(training indices, held-out indices), each sorted: a random `num_held_out` of the images,
  drawn from the seed (a stream of its own: three entropy words where epochs use two)."""
  held = np.sort(np.random.default_rng([seed, 0, 1]).permutation(num_images)[:num_held_out])
  return np.setdiff1d(np.arange(num_images), held), held


class _TrainBatch:
  """Picklable batch reader (grain may run it in threads or worker processes)."""

  def __init__(self, images, batch_size: int, seed: int, shard: Shard, index=None):
    self.images, self.batch_size, self.seed = images, batch_size, seed
    self.index = np.arange(len(images)) if index is None else np.asarray(index)
    self.rows = shard.rows(batch_size)
    self.steps = steps_per_epoch(len(self.index), batch_size)

  def __call__(self, step: int) -> dict:
    epoch, b = divmod(int(step), self.steps)
    perm = epoch_permutation(len(self.index), self.seed, epoch)
    idx = self.index[perm[b * self.batch_size:(b + 1) * self.batch_size][self.rows]]
    image = np.asarray(self.images[idx])
    release_pages(self.images)
    return {"image": image}


def train_dataset(images, *, batch_size: int, seed: int, num_steps: int,
                  shard: Shard = Shard(), num_threads: int = 2, prefetch: int = 4,
                  index=None) -> grain.IterDataset:
  """`num_steps` training batches {"image": uint8 (local_batch, 64, 64, 3)} from step 0, over
  the images at `index` (default: all; with all, the batches are what they were before
  validation splits existed)."""
  read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return (grain.MapDataset.range(num_steps)
          .map(_TrainBatch(images, batch_size, seed, shard, index))
          .to_iter_dataset(read))


class _EvalBatch:
  def __init__(self, images, batch_size: int, shard: Shard):
    self.images, self.batch_size, self.rows = images, batch_size, shard.rows(batch_size)

  def __call__(self, b: int) -> dict:
    n = len(self.images)
    index = np.arange(b * self.batch_size, (b + 1) * self.batch_size)[self.rows]
    mask = index < n
    image = np.zeros((len(index), *self.images.shape[1:]), self.images.dtype)
    image[mask] = self.images[index[mask]]
    release_pages(self.images)
    return {"image": image, "mask": mask, "index": np.where(mask, index, -1)}


def eval_dataset(images, *, batch_size: int, shard: Shard = Shard(),
                 num_threads: int = 2) -> grain.IterDataset:
  """Batches {"image", "mask", "index"} over the images in file order; padding has mask False
  and index -1."""
  num_batches = -(-len(images) // batch_size)
  read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2)
  return (grain.MapDataset.range(num_batches).map(_EvalBatch(images, batch_size, shard))
          .to_iter_dataset(read))
