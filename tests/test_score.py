"""Scoring: the scorer's numbers, padded batches, printed AUC vs the CSV, outputs, CLI errors."""

from __future__ import annotations

import collections
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from hw8jax import data, evaluate, report
from hw8jax.configs import default
from hw8jax.data.demo import make_synthetic, synthetic_images
from hw8jax.main import run
from hw8jax.score import image_error, make_scorer, score_images

from conftest import CONFIGS, built, cli, config_walk, images, quick_config


def test_image_error_metrics(seed):
  rng = np.random.default_rng(seed)
  r, x = images(rng, 1)[0], images(rng, 1)[0]
  d2 = (r - x).astype(np.float64) ** 2
  cases = {"l2": np.sqrt(d2.sum()), "mse": d2.mean(), "mae": np.abs(r - x).mean(),
           "topk": np.sort(d2.ravel())[-100:].mean()}
  for metric, want in cases.items():
    got = float(image_error(jnp.asarray(r), jnp.asarray(x), metric, topk=100))
    assert got == pytest.approx(want, rel=1e-5), metric
  with pytest.raises(ValueError, match="unknown score metric 'psnr'"):
    image_error(jnp.asarray(r), jnp.asarray(x), "psnr")


def _eval_model(variant, seed):
  model = built(variant, seed)
  model.eval()
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  return model, graphdef, (params, stats)


@pytest.mark.parametrize("n", [13, 16, 1])
def test_padded_batches_score_each_image_once(n, seed):
  """N not a multiple of the batch: every image scored once, in file order, equal to the sample
  code's formula computed directly on the unbatched model. (That a model's eval output does not
  depend on its batch mates is the contract test's.)"""
  model, graphdef, state = _eval_model("ta_cnn", seed)
  imgs = synthetic_images(n, seed)
  batched = score_images(make_scorer(graphdef), state, imgs, batch_size=8,
                         key=jax.random.key(0))
  assert batched.shape == (n,)
  x = data.normalize(imgs)
  direct = np.sqrt(((np.asarray(model.decode(model.encode(x))) - np.asarray(x)) ** 2)
                   .sum(axis=(1, 2, 3)))
  np.testing.assert_allclose(batched, direct, rtol=1e-5)


def test_vae_scores_sampled_or_deterministic(seed):
  """Sampled scores are a function of the key and of each image alone: not of the batch it is
  scored in (noise keyed by the image's index); `sample=False` scores z = mu."""
  model, graphdef, state = _eval_model("ta_vae", seed)
  imgs = synthetic_images(6, seed)
  key = jax.random.key(seed)
  scorer = make_scorer(graphdef)
  sampled = score_images(scorer, state, imgs, batch_size=4, key=key)
  again = score_images(scorer, state, imgs, batch_size=5, key=key)
  other = score_images(scorer, state, imgs, batch_size=4, key=jax.random.key(seed + 1))
  mu = score_images(make_scorer(graphdef, sample=False), state, imgs, batch_size=4, key=key)
  np.testing.assert_allclose(again, sampled, rtol=1e-6)
  assert np.median(np.abs(other - sampled) / sampled) > 1e-5  # another key, other noise
  x = data.normalize(imgs)
  direct = np.sqrt(((np.asarray(model.decode(model.encode(x))) - np.asarray(x)) ** 2)
                   .sum(axis=(1, 2, 3)))
  np.testing.assert_allclose(mu, direct, rtol=1e-5)


def test_submission_roundtrip_is_atomic_and_exact(tmp_path, seed):
  scores = np.random.default_rng(seed).normal(size=37).astype(np.float32)
  path = str(tmp_path / "submission.csv")
  report.write_submission(path, scores)
  assert open(path).readline() == "ID,score\n"
  np.testing.assert_array_equal(report.read_submission(path).astype(np.float32), scores)
  assert os.listdir(tmp_path) == ["submission.csv"]  # no temporary left behind


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A quick run of the tiny variant with the boss crop and labels, trained and scored;
  returns (workdir, stdout, eval record, labels path, the config's walk: `config_walk`)."""
  d = tmp_path_factory.mktemp("scored")
  labels = make_synthetic(d / "data", num_train=32, num_test=21, seed=1)
  c = quick_config("tiny", str(d / "data"))
  c.batch_size, c.max_steps = 8, 12  # 4 steps an epoch: three epoch ends and best checkpoints
  c.data.transform = "crop"
  c.score.batch_size = 8  # 21 test images: the last batch is padded
  c.figures = True
  workdir = str(d / "work")
  import contextlib
  import io

  out, done = io.StringIO(), {}
  with contextlib.redirect_stdout(out):
    walk = config_walk(c, lambda: done.setdefault("record", run(c, workdir, "train_and_score")))
  yield workdir, out.getvalue(), done["record"], labels, walk


def test_printed_auc_is_the_auc_of_the_written_csv(trained):
  from sklearn.metrics import roc_auc_score

  workdir, out, record, labels_path, _ = trained
  printed = float(re.search(r"ROC AUC (\d\.\d{4})", out).group(1))
  scores = report.read_submission(os.path.join(workdir, "submission.csv"))
  labels = np.load(labels_path)
  assert len(scores) == len(labels) == 21
  recomputed = roc_auc_score(labels, scores)
  assert printed == round(recomputed, 4)
  saved = json.load(open(os.path.join(workdir, "eval.json")))
  assert saved["auc"] == pytest.approx(recomputed, abs=1e-12) and saved == record
  np.testing.assert_array_equal(np.load(os.path.join(workdir, "scores.npy")),
                                scores.astype(np.float32))


def test_a_run_hands_its_config_to_no_room_more_than_twice(trained):
  """A run's facts are resolved once (`hw8jax.plan`) and each stage takes them from there: the
  walk of the config through training, epoch ends, best checkpoints, figures and scoring
  enters each room at most twice."""
  workdir, walk = trained[0], trained[4]
  entered = collections.Counter(room for room, _ in walk)
  steps = "\n".join(step for _, step in walk)
  assert {"hw8jax.config", "hw8jax.plan", "hw8jax.train", "hw8jax.assemble", "hw8jax.workdir",
          "hw8jax.score_run"} <= set(entered), steps  # every stage is on the walk
  assert max(entered.values()) <= 2, steps
  # One record a run: a run that trains and scores is recorded as its training.
  assert os.listdir(os.path.join(workdir, "runs")) == ["001-train.json"]


def test_outputs_and_figures_are_written(trained):
  workdir = trained[0]
  for name in ("submission.csv", "scores.npy", "eval.json", "config.json", "metrics.jsonl",
               "roc.png", "reconstructions.png", "latent_edits.png"):
    path = os.path.join(workdir, name)
    assert os.path.getsize(path) > 0, name
  for name in ("roc.png", "reconstructions.png", "latent_edits.png"):
    assert open(os.path.join(workdir, name), "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_best_and_latest_checkpoints_both_score(trained):
  workdir = trained[0]
  c = default.for_model("tiny")
  from hw8jax.assemble import assemble
  from hw8jax.plan import plan
  from hw8jax.runtime import make_mesh

  for which in ("latest", "best"):
    step = assemble(plan(c), "checkpoint", workdir=workdir, which=which, mesh=make_mesh()).step
    assert 0 < step <= 12
  # best holds no optimiser state (Adam's two moments would triple it: fcn_boss 0.43 GB, not
  # 1.3 GB) and no data iterator.
  saved = {}
  for which in ("latest", "best"):
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints", which)) as m:
      step = m.latest_step()
      saved[which] = (sorted(os.listdir(os.path.join(workdir, "checkpoints", which, str(step)))),
                      m.restore(step, args=ocp.args.Composite(
                          state=ocp.args.StandardRestore()))["state"])
  assert set(saved["best"][1]) == {"params", "batch_stats", "step"}
  assert {"params", "batch_stats", "step", "opt_state"} <= set(saved["latest"][1])
  assert "data" in saved["latest"][0] and "data" not in saved["best"][0]


def test_cli_missing_data_says_where_to_put_it(tmp_path):
  r = cli(f"--workdir={tmp_path / 'w'}", f"--config.data.dir={tmp_path / 'data'}",
          config="fcn_boss.py", tiny=False)
  assert r.returncode == 1
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
  assert lines[0].startswith(f"error: {tmp_path / 'data'}: no such folder. Put the Kaggle files")
  assert "configs/fcn_boss.py:demo" in lines[0]
  assert "kaggle competitions download -c ml2022spring-hw8" in lines[0]


def test_cli_bad_file_is_one_line_naming_it(tmp_path, launch_here):
  """launch.py in this process (the test above runs it as a process of its own)."""
  d = tmp_path / "data"
  d.mkdir()
  np.save(d / data.TRAIN_FILE, np.zeros((4, 64, 64, 3), np.float32))
  np.save(d / data.TEST_FILE, np.zeros((4, 64, 64, 3), np.uint8))
  r = launch_here(f"--workdir={tmp_path / 'w'}", f"--config.data.dir={d}",
                  config="ta_cnn.py:quick", tiny=False)
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
  assert r.stderr.strip() == (f"error: {d / data.TRAIN_FILE}: dtype float32, expected uint8 "
                              "pixels 0..255 (convert with np.clip(a, 0, 255).astype(np.uint8))")
  labels = d / "labels.npy"
  np.save(labels, np.zeros(3, np.int64))
  np.save(d / data.TRAIN_FILE, np.zeros((4, 64, 64, 3), np.uint8))
  r = launch_here(f"--workdir={tmp_path / 'w'}", f"--config.data.dir={d}",
                  f"--config.data.test_labels={labels}", config="ta_cnn.py:quick", tiny=False)
  assert r.returncode == 1
  assert r.stderr.strip() == f"error: {labels}: 3 labels for 4 test images"


def test_ensemble_rank_and_zscore(tmp_path, seed):
  from hw8jax.ensemble import combine, main

  rng = np.random.default_rng(seed)
  labels = np.repeat([0, 1], 20)
  a = labels + rng.normal(0, 0.8, 40)
  b = 100 * (labels + rng.normal(0, 0.8, 40))  # same kind of signal, another scale
  rank = combine([a, b], "rank")
  np.testing.assert_allclose(rank, (a.argsort().argsort() + b.argsort().argsort()) / 2 / 39)
  z = combine([a, b], "zscore")
  np.testing.assert_allclose(z, ((a - a.mean()) / a.std() + (b - b.mean()) / b.std()) / 2)
  for i, s in enumerate((a, b)):
    (tmp_path / f"w{i}").mkdir()
    np.save(tmp_path / f"w{i}" / "scores.npy", s.astype(np.float32))
  np.save(tmp_path / "labels.npy", labels)
  assert main(["--workdirs", str(tmp_path / "w0"), str(tmp_path / "w1"), "--out",
               str(tmp_path / "out"), "--labels", str(tmp_path / "labels.npy")]) == 0
  written = report.read_submission(str(tmp_path / "out" / "submission.csv"))
  np.testing.assert_allclose(written, combine([a.astype(np.float32), b.astype(np.float32)]),
                             rtol=1e-6)
  from sklearn.metrics import roc_auc_score

  saved = json.load(open(tmp_path / "out" / "eval.json"))
  assert saved["auc"] == pytest.approx(roc_auc_score(labels, written))
  assert main(["--workdirs", str(tmp_path / "w0"), str(tmp_path / "nope"), "--out",
               str(tmp_path / "o2")]) == 1


def test_f1_best_threshold_is_the_best_cut(seed):
  """Against every distinct threshold, tried one by one, with ties in the scores."""
  rng = np.random.default_rng(seed)
  for _ in range(50):
    n = int(rng.integers(3, 40))
    labels = rng.integers(0, 2, n)
    labels[:2] = (0, 1)
    scores = rng.integers(0, 8, n).astype(np.float32)
    record = evaluate.evaluate(labels, scores, threshold=float(np.median(scores)))
    candidates = np.unique(scores)[:-1]
    f1 = [2 * np.sum((scores > t) & (labels == 1)) / (np.sum(scores > t) + labels.sum())
          for t in candidates]
    if not len(candidates):
      assert "f1_best" not in record
      continue
    assert record["f1_best"]["f1"] == pytest.approx(max(f1))
    # The same F1 at two cuts may differ in the last bit (computed in different orders).
    assert record["f1_best"]["f1"] >= record["f1"] - 1e-12


def test_ensemble_rank_gives_tied_scores_one_rank():
  """Ties share their mean rank whatever their order in the file (an argsort ranked them by
  position: equal scores got different ranks)."""
  from hw8jax.ensemble import combine

  a = np.array([0.5, 0.1, 0.5, 0.9, 0.5])
  b = np.array([3.0, 1.0, 2.0, 4.0, 5.0])
  rank = combine([a, b], "rank")
  # a's ranks (from 0): 2, 0, 2, 4, 2; b's: 2, 0, 1, 3, 4.
  np.testing.assert_allclose(rank, np.array([4, 0, 3, 7, 6]) / 2 / 4)
  np.testing.assert_allclose(combine([a[::-1], b[::-1]], "rank"), rank[::-1])


def test_multi_crop_configs(seed):
  """`configs/fcn_crops.py:N` crops the report's box N (checked on pixels, against
  `data.crop`), with the report's batch and epochs; `:N,quick` shrinks it like `:quick`."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("fcn_crops", f"{CONFIGS}/fcn_crops.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  x = np.random.default_rng(seed).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
  boxes = ((16, 16, 28, 32), (10, 12, 40, 44), (12, 14, 36, 40))
  crops = []
  for i, box in enumerate(boxes):
    c = mod.get_config(str(i))
    assert (c.model, c.batch_size, c.num_epochs, c.schedule.name) == (
        "fcn_boss", 512, 80, "warmup_cosine")
    crops.append(np.asarray(data.get_transform(c.data.transform)(x)))
    np.testing.assert_array_equal(crops[-1], np.asarray(data.crop(x, *box)))
  assert not np.array_equal(crops[0], crops[1])  # three different views
  quick = mod.get_config("2,quick")
  assert (quick.max_steps, quick.batch_size, quick.data.transform) == (20, 16, "12,14,36,40")
