"""Data: transform parity with PyTorch, input validation, grain pipelines, demo set."""

from __future__ import annotations

import mmap
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from hw8jax import data
from hw8jax.data.demo import LABELS_FILE, make_demo, make_synthetic

from conftest import require_torch


def torch_pipeline(torch, images, size_chain):
  """The seed's transform with PyTorch ops (what torchvision's tensor Resize calls)."""
  import torch.nn.functional as F

  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float()
  for op in size_chain:
    if op[0] == "resize":
      x = F.interpolate(x, size=op[1], mode="bilinear", antialias=True, align_corners=False)
    else:
      _, top, left, h, w = op
      x = x[:, :, top:top + h, left:left + w]
  return (2.0 * x / 255.0 - 1.0).numpy().transpose(0, 2, 3, 1)


def random_uint8(seed, n=6):
  return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


def test_normalize_and_crop_transform_match_torch(seed):
  """Tolerance 1e-5 absolute on [-1, 1] outputs."""
  torch = require_torch()
  x = random_uint8(seed)
  np.testing.assert_allclose(np.asarray(data.normalize(x)), torch_pipeline(torch, x, []),
                             atol=1e-6, rtol=0)
  want = torch_pipeline(torch, x, [("resize", (256, 256)), ("crop", 30, 30, 196, 196),
                                   ("resize", (64, 64))])
  got = np.asarray(jax.jit(data.crop_transform)(x))
  assert got.shape == (6, 64, 64, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("box", [(16, 16, 28, 32), (10, 12, 40, 44), (12, 14, 36, 40)])
def test_multi_crop_boxes_match_torch(box, seed):
  torch = require_torch()
  x = random_uint8(seed)
  want = torch_pipeline(torch, x, [("crop", *box), ("resize", (64, 64))])
  np.testing.assert_allclose(np.asarray(data.crop(x, *box)), want, atol=1e-5, rtol=0)


def test_get_transform():
  x = random_uint8(0, 2)
  assert data.get_transform("none") is data.normalize
  assert data.get_transform("crop") is data.crop_transform
  for spec in ([16, 16, 28, 32], "16,16,28,32"):
    np.testing.assert_array_equal(np.asarray(data.get_transform(spec)(x)),
                                  np.asarray(data.crop(x, 16, 16, 28, 32)))
  with pytest.raises(ValueError, match="unknown transform 'zoom'"):
    data.get_transform("zoom")
  with pytest.raises(ValueError, match=r"crop \[50, 90\) does not fit in 64 pixels"):
    data.crop(x, 50, 0, 40, 10)


# --- validation: each bad input gives one line naming the file and the problem.

def _save(path, array):
  np.save(path, array, allow_pickle=True)
  return str(path)


BAD_IMAGES = {
    "missing": (lambda p: str(p / "nope.npy"), "no such file"),
    "not_npy": (lambda p: (p / "x.npy").write_text("hello") and str(p / "x.npy"),
                "not a .npy file"),
    "truncated": (lambda p: _truncate(_save(p / "t.npy", np.zeros((4, 64, 64, 3), np.uint8))),
                  "truncated: 24640 bytes, the header promises 49280"),
    "objects": (lambda p: _save(p / "o.npy", np.array([None] * 2 + [1], dtype=object)),
                "shape (3,), expected (N, 64, 64, 3) images"),
    "objects_4d": (lambda p: _save(p / "o4.npy", np.empty((1, 64, 64, 3), dtype=object)),
                   "holds Python objects (dtype object); refusing to unpickle"),
    "rank": (lambda p: _save(p / "r.npy", np.zeros((4, 64, 64), np.uint8)),
             "shape (4, 64, 64), expected (N, 64, 64, 3) images"),
    "size": (lambda p: _save(p / "s.npy", np.zeros((4, 32, 32, 3), np.uint8)),
             "shape (4, 32, 32, 3), expected (N, 64, 64, 3) images"),
    "dtype": (lambda p: _save(p / "d.npy", np.zeros((4, 64, 64, 3), np.float32)),
              "dtype float32, expected uint8 pixels 0..255"),
    "empty": (lambda p: _save(p / "e.npy", np.zeros((0, 64, 64, 3), np.uint8)),
              "empty array of shape (0, 64, 64, 3)"),
}


def _truncate(path):
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size // 2)
  return path


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_image_files_give_one_line_errors(tmp_path, case):
  make, problem = BAD_IMAGES[case]
  path = make(tmp_path)
  with pytest.raises(data.DataError) as err:
    data.open_images(path)
  msg = str(err.value)
  assert msg.startswith(f"{path}: ") and problem in msg and "\n" not in msg, msg


@pytest.mark.parametrize("labels,problem", [
    (np.zeros(5, np.int64), "5 labels for 4 test images"),
    (np.array([0, 1, 2, 1]), "labels must be 0 (normal) or 1 (anomaly), found [2]"),
    (np.zeros((4, 1), np.int64), "shape (4, 1), expected (4,) labels"),
    (np.array(["a", "b", "c", "d"]), "dtype <U1, expected 0/1 integer labels"),
])
def test_bad_label_files(tmp_path, labels, problem):
  path = _save(tmp_path / "labels.npy", labels)
  with pytest.raises(data.DataError) as err:
    data.open_labels(path, 4)
  assert str(err.value) == f"{path}: {problem}"


def test_good_files_are_memory_mapped(tmp_path, seed):
  x = random_uint8(seed, 5)
  path = _save(tmp_path / "good.npy", x)
  images = data.open_images(path)
  assert isinstance(images.base, mmap.mmap) and not images.flags.writeable
  np.testing.assert_array_equal(images, x)
  labels = data.open_labels(_save(tmp_path / "l.npy", np.array([0, 1, 1, 0, 1], bool)), 5)
  np.testing.assert_array_equal(labels, [0, 1, 1, 0, 1])


# --- pipelines


def _index_images(n):
  """Images whose first pixel encodes their index, to follow them through the pipeline."""
  x = np.zeros((n, 64, 64, 3), np.uint8)
  x[:, 0, 0, 0], x[:, 0, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
  return x


def _ids(batch):
  img = batch["image"]
  return img[:, 0, 0, 0].astype(int) + 256 * img[:, 0, 0, 1].astype(int)


@pytest.mark.parametrize("n,batch", [(40, 8), (43, 8)])
def test_each_epoch_sees_each_image_once_reshuffled(n, batch, seed):
  images = _index_images(n)
  spe = data.steps_per_epoch(n, batch)
  ds = data.train_dataset(images, batch_size=batch, seed=seed, num_steps=3 * spe)
  batches = [_ids(b) for b in ds]
  assert len(batches) == 3 * spe and all(len(b) == batch for b in batches)
  epochs = [np.concatenate(batches[e * spe:(e + 1) * spe]) for e in range(3)]
  for ids in epochs:
    assert len(set(ids.tolist())) == len(ids) == spe * batch  # no image twice in an epoch
    if n % batch == 0:
      assert sorted(ids.tolist()) == list(range(n))
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled
  again = [_ids(b) for b in data.train_dataset(images, batch_size=batch, seed=seed,
                                               num_steps=3 * spe)]
  np.testing.assert_array_equal(np.concatenate(again), np.concatenate(batches))


def test_held_out_images_never_reach_a_training_batch(seed):
  """data.val_fraction: a seeded quarter of the images is held out; every training batch of
  three epochs draws only from the rest, each epoch visiting each of them once; another seed
  holds out others."""
  images = _index_images(48)
  train_index, held = data.validation_split(48, 12, seed)
  assert len(held) == 12 and len(train_index) == 36
  assert set(train_index.tolist()) | set(held.tolist()) == set(range(48))
  spe = data.steps_per_epoch(36, 6)
  ds = data.train_dataset(images, batch_size=6, seed=seed, num_steps=3 * spe, index=train_index)
  seen = np.concatenate([_ids(b) for b in ds])
  assert not set(seen.tolist()) & set(held.tolist())
  for e in range(3):
    assert sorted(seen[e * 36:(e + 1) * 36].tolist()) == train_index.tolist()
  np.testing.assert_array_equal(data.validation_split(48, 12, seed)[1], held)
  assert not np.array_equal(data.validation_split(48, 12, seed + 1)[1], held)


def test_process_shards_partition_each_global_batch(seed):
  images = _index_images(48)
  whole = [_ids(b) for b in data.train_dataset(images, batch_size=12, seed=seed, num_steps=8)]
  parts = [[_ids(b) for b in data.train_dataset(images, batch_size=12, seed=seed, num_steps=8,
                                                shard=data.Shard(i, 3))] for i in range(3)]
  for step, want in enumerate(whole):
    np.testing.assert_array_equal(np.concatenate([p[step] for p in parts]), want)


@pytest.mark.parametrize("n", [21, 24, 3])
def test_eval_batches_pad_and_mask_each_image_once(n):
  images = _index_images(n)
  batches = list(data.eval_dataset(images, batch_size=8))
  assert len(batches) == -(-n // 8)
  assert all(b["image"].shape == (8, 64, 64, 3) for b in batches)
  index = np.concatenate([b["index"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(index[mask], np.arange(n))
  np.testing.assert_array_equal(np.concatenate([_ids(b) for b in batches])[mask], np.arange(n))
  assert (index[~mask] == -1).all() and mask.sum() == n
  padded = np.concatenate([b["image"] for b in batches])[~mask]
  assert (padded == 0).all()


def test_restored_iterator_continues_at_the_exact_next_batch(tmp_path, seed):
  images = _index_images(30)

  def fresh():
    return iter(data.train_dataset(images, batch_size=4, seed=seed, num_steps=20))

  uninterrupted = [_ids(b) for b in fresh()]
  it = fresh()
  head = [_ids(next(it)) for _ in range(9)]  # into the second epoch (7 steps an epoch)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(9, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  del it
  restored = fresh()
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.restore(9, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  tail = [_ids(b) for b in restored]
  assert len(head) + len(tail) == 20
  for got, want in zip(head + tail, uninterrupted, strict=True):
    np.testing.assert_array_equal(got, want)


def test_demo_set_is_deterministic_real_faces(tmp_path):
  labels_path = make_demo(tmp_path / "a")
  make_demo(tmp_path / "b")
  for name in (data.TRAIN_FILE, data.TEST_FILE, LABELS_FILE):
    a, b = np.load(tmp_path / "a" / name), np.load(tmp_path / "b" / name)
    np.testing.assert_array_equal(a, b)
  train = data.open_images(tmp_path / "a" / data.TRAIN_FILE)
  test = data.open_images(tmp_path / "a" / data.TEST_FILE)
  labels = data.open_labels(labels_path, len(test))
  assert train.shape == (70, 64, 64, 3) and test.shape == (60, 64, 64, 3)
  assert labels.sum() == 30
  # Grey photographs: equal channels, a real spread of intensities.
  assert (train[..., 0] == train[..., 2]).all() and train.std() > 30


def test_synthetic_set_layout(tmp_path):
  labels_path = make_synthetic(tmp_path, num_train=10, num_test=7, seed=3)
  assert data.open_images(tmp_path / data.TRAIN_FILE).shape == (10, 64, 64, 3)
  assert data.open_labels(labels_path, 7).sum() == 3


def _mapped_kb(path) -> int:
  """Resident kB of this process's mappings of the file `path` (/proc/self/smaps)."""
  total, inside = 0, False
  for line in open("/proc/self/smaps"):
    fields = line.split()
    if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
      inside = len(fields) >= 6 and fields[5] == str(path)
    elif inside and fields[0] == "Rss:":
      total += int(fields[1])
  return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux's /proc")
def test_a_training_batch_leaves_none_of_the_file_mapped(tmp_path, seed):
  """A training file read in random batches: the pages a batch read are handed back once it is
  copied out (an epoch would otherwise leave the whole 1.2 GB file counted as the run's memory),
  and the batches are still the images."""
  x = random_uint8(seed, 600)  # 7 MB
  path = _save(tmp_path / "train.npy", x)
  images = data.open_images(path, random_access=True)
  np.testing.assert_array_equal(images[::7], x[::7])
  assert _mapped_kb(path) > 1000  # reading maps the pages it touches
  dataset = data.train_dataset(images, batch_size=200, seed=seed, num_steps=3, num_threads=1)
  for step, batch in enumerate(dataset):
    epoch, b = divmod(step, 3)
    perm = np.random.default_rng([seed, epoch]).permutation(600)  # the pipeline's epoch order
    np.testing.assert_array_equal(batch["image"], x[perm[b * 200:(b + 1) * 200]])
  assert step == 2 and _mapped_kb(path) < 200  # every batch read; each let its pages go
