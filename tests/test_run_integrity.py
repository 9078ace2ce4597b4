"""The paths beside the happy one, through launch.py: config mistakes, a workdir shared by runs,
damaged checkpoints, non-finite states, signals, stale outputs, batching, progress figures.

Most runs go through launch.py in this process (`launch_here`: its flags and its main(), no new
JAX start-up); a signal sent from outside needs a process of its own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from hw8jax import report, train_step
from hw8jax.data.demo import make_synthetic

from conftest import launch_command, quick_config, tensorboard_scalars

# Without figures (about 0.3 s each), except where a test looks at them.
QUICK = ["--config.max_steps=10", "--config.checkpoint.every_steps=5",
         "--config.log_every_seconds=0", "--config.figures=false"]
FIGURES = "--config.figures=true"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  make_synthetic(d, num_train=32, num_test=12, seed=4)
  return str(d)


def _one_line_error(result, *fragments):
  """The run failed with error lines only (no traceback), each fragment in them."""
  lines = result.stderr.strip().splitlines()
  assert result.returncode not in (0, None), result.stdout
  assert lines and all(line.startswith("error: ") for line in lines), result.stderr
  assert "Traceback" not in result.stderr + result.stdout
  for fragment in fragments:
    assert fragment in result.stderr, (fragment, result.stderr)


# --- 1. every config mistake: one line, before anything is written

MISTAKES = {
    "batch zero": (["--config.batch_size=0"], "batch_size=0: must be at least 1"),
    "batch negative": (["--config.batch_size=-4"], "batch_size=-4: must be at least 1"),
    "batch over the data": (["--config.batch_size=64"],
                            "batch_size=64: larger than the 32 training images in"),
    "every_steps negative": (["--config.checkpoint.every_steps=-1"],
                             "checkpoint.every_steps=-1: must be at least 0"),
    "every_minutes negative": (["--config.checkpoint.every_minutes=-5"],
                               "checkpoint.every_minutes=-5.0: must be a finite number >= 0"),
    "keep zero": (["--config.checkpoint.keep=0"], "checkpoint.keep=0: must be at least 1"),
    "unknown key": (["--config.foo=1"], "--config.foo: no such config key"),
    "unknown nested key": (["--config.data.trnasform=crop"],
                           "--config.data.trnasform: no such config key"),
    "metric": (["--config.score.metric=bogus", "--config.data.test_labels="],
               "score.metric='bogus': use one of l2, mse, mae, topk"),
    "box outside": (["--config.data.transform=10,10,60,20"],
                    "data.transform='10,10,60,20': the box must lie inside the 64x64 image"),
    "transform name": (["--config.data.transform=flip"], "data.transform='flip': use 'none'"),
    "dtype": (["--config.compute_dtype=float16"],
              "compute_dtype='float16': use one of float32, bfloat16"),
    "seed": (["--config.seed=-1"], "seed=-1: must be between 0 and 2**32 - 1"),
    "precision": (["--config.matmul_precision=bogus"], "matmul_precision='bogus': use one of"),
    "fast paths": (["--config.cpu_fast_paths=fast"],
                   "cpu_fast_paths='fast': use one of auto, on, off"),
    "compilation cache": (["--config.compilation_cache=/dev/null/xla"],
                          "compilation_cache='/dev/null/xla': cannot create /dev/null/xla: Not a "
                          "directory; name another folder, or '' to turn the cache off"),
    "topk zero": (["--config.score.topk=0"], "score.topk=0: must be between 1 and 12288"),
    "topk over": (["--config.score.topk=20000"], "score.topk=20000: must be between 1 and"),
    "score batch zero": (["--config.score.batch_size=0"], "score.batch_size=0: must be at least"),
    "score batch negative": (["--config.score.batch_size=-8"], "score.batch_size=-8"),
    "negative rate": (["--config.optimizer.learning_rate=-0.001"],
                      "optimizer.learning_rate=-0.001: must be a finite number > 0"),
    "nan rate": (["--config.optimizer.learning_rate=nan"], "optimizer.learning_rate=nan"),
    "no epochs": (["--config.num_epochs=0"], "num_epochs=0: must be at least 1"),
    "allow_changes": (["--config.allow_changes=seed"], "allow_changes='seed': comma-separated"),
    "wrong type": (["--config.batch_size=abc"], "--config.batch_size=abc"),
    "unknown arg": (["--config=CONFIGS/ta_vae.py:bogus"], "unknown config arg 'bogus'"),
}


@pytest.mark.parametrize("case", sorted(MISTAKES))
def test_config_mistakes_are_one_line_before_anything_is_written(case, data_dir, tmp_path,
                                                                 launch_here):
  flags, message = MISTAKES[case]
  flags = [f.replace("CONFIGS", os.path.join(os.path.dirname(__file__), "..", "configs"))
           for f in flags]
  workdir = tmp_path / "w"
  result = launch_here(f"--workdir={workdir}", f"--config.data.dir={data_dir}", *flags)
  _one_line_error(result, message)
  assert not workdir.exists()


def test_several_mistakes_are_listed_together(data_dir, tmp_path, launch_here):
  result = launch_here(f"--workdir={tmp_path / 'w'}", f"--config.data.dir={data_dir}",
                       "--config.checkpoint.keep=0", "--config.seed=-2")
  _one_line_error(result, "checkpoint.keep=0", "seed=-2")
  assert len(result.stderr.strip().splitlines()) == 2


@pytest.mark.parametrize("kind", ["file", "read-only"])
def test_an_unusable_workdir_is_one_line(kind, data_dir, tmp_path, launch_here):
  workdir = tmp_path / "w"
  if kind == "file":
    workdir.write_text("not a folder")
    expected = "is a file, not a folder"
  else:
    workdir.mkdir()
    workdir.chmod(0o500)
    if os.access(workdir, os.W_OK):  # root writes anywhere: make it a file's child instead
      workdir.chmod(0o700)
      blocker = tmp_path / "blocker"
      blocker.write_text("")
      workdir = blocker / "w"
      expected = "is a file"
    else:
      expected = "permission denied"
  result = launch_here(f"--workdir={workdir}", f"--config.data.dir={data_dir}")
  _one_line_error(result, expected)


@pytest.mark.parametrize("blocked, expected", [
    ("checkpoints", "checkpoints: a file where the run keeps a folder"),
    ("checkpoints/latest", "checkpoints/latest: cannot write checkpoints there")])
def test_unwritable_checkpoint_folder_fails_in_seconds(data_dir, tmp_path, launch_here, blocked,
                                                       expected):
  """orbax waited 5 minutes and then raised a 140-line TimeoutError."""
  workdir = tmp_path / "w"
  (workdir / blocked).parent.mkdir(parents=True)
  (workdir / blocked).write_text("in the way")
  start = time.time()
  result = launch_here(f"--workdir={workdir}", f"--config.data.dir={data_dir}", *QUICK)
  _one_line_error(result, expected)
  assert time.time() - start < 20


# --- 2. the workdir remembers its run


def _train(launch_here, workdir, data_dir, *flags, mode="train"):
  return launch_here(f"--workdir={workdir}", f"--mode={mode}", f"--config.data.dir={data_dir}",
                     *QUICK, *flags)


def test_resuming_or_scoring_with_another_config_stops_and_names_each_key(data_dir, tmp_path,
                                                                          launch_here):
  workdir = tmp_path / "w"
  first = _train(launch_here, workdir, data_dir, FIGURES)
  assert first.returncode == 0, first.stderr
  # Progress lines say how long the run has taken and how long it has left.
  progress = [line for line in first.stdout.splitlines() if line.startswith("epoch ") and
              " step " in line]
  assert len(progress) == 10 and all(
      re.search(r" img/s  elapsed \d+:\d\d:\d\d  eta \d+:\d\d:\d\d$", p) for p in progress)
  assert progress[-1].endswith("eta 0:00:00")
  assert (workdir / "training_curves.png").stat().st_size > 10_000
  logged = [json.loads(line) for line in open(workdir / "metrics.jsonl") if '"eta_s"' in line]
  assert len(logged) == 10 and logged[-1]["eta_s"] == 0 and logged[-1]["elapsed_s"] > 0
  record = (workdir / "config.json").read_bytes()
  assert json.loads(record)["batch_size"] == 16
  changed = {
      ("--config.batch_size=8", "--config.seed=5"):
          ["batch_size 8 (trained with 16)", "seed 5 (trained with 0)", "another --workdir"],
      ("--config.data.transform=crop",): ["data.transform 'crop' (trained with 'none')"],
      ("--config.optimizer.name=sgd",): ["optimizer.name 'sgd' (trained with 'adam')"],
      ("--config.max_steps=5",): ["max_steps 5 (trained with 10)",
                                  "--config.allow_changes=max_steps"],
  }
  for flags, fragments in changed.items():
    _one_line_error(_train(launch_here, workdir, data_dir, *flags), *fragments)
  # Scoring uses the model and transform the checkpoints were trained with.
  _one_line_error(_train(launch_here, workdir, data_dir, "--config.data.transform=crop",
                         mode="score"), "data.transform 'crop' (trained with 'none')")
  # A shorter run, opted into: already finished (was an IndexError from the iterator).
  shorter = _train(launch_here, workdir, data_dir, "--config.max_steps=5",
                   "--config.allow_changes=max_steps")
  assert shorter.returncode == 0, shorter.stderr
  assert "training already finished (10 steps); not retraining" in shorter.stdout
  # A longer one continues from step 10 and is remembered for the next resume.
  longer = _train(launch_here, workdir, data_dir, "--config.max_steps=14",
                  "--config.allow_changes=max_steps")
  assert longer.returncode == 0, longer.stderr
  assert "resumed from step 10 of 14" in longer.stdout
  again = _train(launch_here, workdir, data_dir, "--config.max_steps=14")
  assert "training already finished (14 steps)" in again.stdout, again.stderr
  # Keys that do not change the trained model may differ; scoring does not rewrite the record.
  scored = _train(launch_here, workdir, data_dir, "--config.max_steps=14",
                  "--config.score.batch_size=5", "--config.checkpoint.every_steps=3",
                  mode="score")
  assert scored.returncode == 0, scored.stderr
  assert (workdir / "config.json").read_bytes() == record
  runs = sorted(os.listdir(workdir / "runs"))
  # The refused runs and the ones that found nothing to train are not recorded.
  assert runs == ["001-train.json", "002-train.json", "003-score.json"]
  assert json.load(open(workdir / "runs" / "002-train.json"))["max_steps"] == 14


def test_a_busy_workdir_names_the_process_holding_it(data_dir, tmp_path, launch_here):
  workdir = tmp_path / "w"
  workdir.mkdir()
  holder = subprocess.Popen(
      [sys.executable, "-c",
       "import fcntl, os, sys, time\n"
       f"fd = os.open({str(workdir / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
       "fcntl.flock(fd, fcntl.LOCK_EX)\n"
       "os.write(fd, f'process {os.getpid()} (a test holder)'.encode())\n"
       "print('held', flush=True)\n"
       "time.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    busy = _train(launch_here, workdir, data_dir)
    _one_line_error(busy, f"is in use by process {holder.pid} (a test holder)")
    assert not (workdir / "checkpoints").exists() and not (workdir / "runs").exists()
  finally:
    holder.kill()
    holder.wait()
  # The holder died without unlocking (as a SIGKILLed run does): its lock file stays, and
  # blocks nothing.
  assert (workdir / ".lock").exists()
  free = _train(launch_here, workdir, data_dir)
  assert free.returncode == 0, free.stderr


# --- 4. checkpoints that cannot lose work


def _damage(step_dir):
  """Truncate every data file of a checkpoint's state to half its size."""
  hit = 0
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      path = os.path.join(root, name)
      size = os.path.getsize(path)
      if size > 64 and not name.endswith(".json"):
        with open(path, "r+b") as f:
          f.truncate(size // 2)
        hit += 1
  assert hit


def _params_at(workdir, step):
  m = ocp.CheckpointManager(os.path.join(workdir, "checkpoints", "latest"))
  try:
    state = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  finally:
    m.close()
  return [np.asarray(x) for x in jax.tree.leaves(state["params"])]


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(data_dir, tmp_path,
                                                                     launch_here):
  """Scoring and resuming skip it with one line each; the resumed run rewrites the same step
  bit for bit. A partial last line in metrics.jsonl (a kill mid-write) is dropped."""
  workdir = tmp_path / "w"
  flags = ["--config.checkpoint.keep=2", "--config.data.test_labels="]
  assert _train(launch_here, workdir, data_dir, *flags).returncode == 0
  want = _params_at(str(workdir), 10)
  latest = workdir / "checkpoints" / "latest"
  _damage(str(latest / "10"))
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"step": 11, "loss": 0.')
  scored = _train(launch_here, workdir, data_dir, *flags, mode="score")
  assert scored.returncode == 0, scored.stderr
  assert f"skipped checkpoint {latest}/10: cannot read it" in scored.stdout
  assert "from the latest checkpoint (step 5)" in scored.stdout
  resumed = _train(launch_here, workdir, data_dir, *flags)
  assert resumed.returncode == 0, resumed.stderr
  assert f"skipped checkpoint {latest}/10" in resumed.stdout
  assert "resumed from step 5 of 10" in resumed.stdout
  for x, y in zip(_params_at(str(workdir), 10), want, strict=True):
    np.testing.assert_array_equal(x, y)
  steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")
           if '"loss"' in line]
  assert steps == list(range(1, 11))
  # TensorBoard shows each step once: the resumed run's events replace the killed run's past
  # step 5, which are still in the first run's file.
  shown, written = tensorboard_scalars(workdir / "tensorboard")
  assert sorted(shown["train/loss"]) == list(range(1, 11))
  assert sorted(written["train/loss"]) == sorted([*range(1, 11), *range(6, 11)])
  assert sorted(shown["epoch/epoch_mean_loss"]) == [2, 4, 6, 8, 10]
  grids = shown["epoch/reconstructions"]  # originals over reconstructions, 8 test images
  assert sorted(grids) == [2, 4, 6, 8, 10]
  assert (grids[10].height, grids[10].width) == (128, 512)
  losses = {json.loads(line)["step"]: json.loads(line)["loss"]
            for line in open(workdir / "metrics.jsonl") if '"loss"' in line}
  assert all(shown["train/loss"][s] == pytest.approx(losses[s], rel=1e-6) for s in losses)
  # Nothing readable left: one line.
  for step in ("5", "10"):
    _damage(str(latest / step))
  _one_line_error(_train(launch_here, workdir, data_dir, *flags, mode="score"),
                  "no readable checkpoint: step 10 (", "step 5 (")


def test_no_checkpoint_holds_a_non_finite_state(data_dir, tmp_path, launch_here):
  """SGD at 1e38 overflows the parameters in the first update while the first loss (computed
  before it) is finite: the guard said "the last good checkpoint (step 1) is kept" of a
  checkpoint holding inf, and scoring it failed with "an image was not scored"."""
  workdir = tmp_path / "w"
  result = _train(launch_here, workdir, data_dir, "--config.optimizer.name=sgd",
                  "--config.optimizer.learning_rate=1e38", "--config.checkpoint.every_steps=1",
                  "--config.data.test_labels=")
  _one_line_error(result, "training stopped: the parameters became non-finite by step 1; no "
                  "checkpoint was written. Try a lower optimizer.learning_rate")
  assert not os.listdir(workdir / "checkpoints" / "latest")


# --- 4. signals


def test_ctrl_c_saves_the_step_it_is_at_and_the_rerun_resumes_there(data_dir, tmp_path,
                                                                    launch_here):
  workdir = tmp_path / "w"
  metrics = workdir / "metrics.jsonl"
  flags = ["--config.max_steps=3000", "--config.checkpoint.every_steps=1000",
           "--config.data.test_labels="]

  def interrupt():  # Ctrl-C once training is under way
    deadline = time.time() + 120
    while time.time() < deadline:
      if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
        os.kill(os.getpid(), signal.SIGINT)
        return
      time.sleep(0.01)

  threading.Thread(target=interrupt, daemon=True).start()
  result = _train(launch_here, workdir, data_dir, *flags)
  assert result.returncode == 130, result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("interrupted at step ") and last.endswith(
      "; run the same command to resume"), result.stderr
  step = int(last.split()[3])
  assert 1 <= step < 3000
  assert os.path.isdir(workdir / "checkpoints" / "latest" / str(step))
  # The rerun (shortened: every step is checked by the SIGKILL test) resumes at that step.
  rerun = _train(launch_here, workdir, data_dir, *flags, "--config.max_steps=" + str(step + 2),
                 "--config.allow_changes=max_steps")
  assert rerun.returncode == 0 and f"resumed from step {step} of {step + 2}" in rerun.stdout


# --- 5. outputs; 6. scores independent of batching


def test_scoring_outputs_are_atomic_fresh_and_independent_of_batching(data_dir, tmp_path,
                                                                      launch_here):
  """Each output replaced by a rename (a new inode: never half-written in place); a rescoring
  without labels removes the eval.json and roc.png that no longer describe it, one without
  figures (`figures=False`) the figures; the sampled scores of the VAE do not change with the
  scoring batch."""
  workdir = tmp_path / "w"
  labels = f"--config.data.test_labels={os.path.join(data_dir, 'testing_labels.npy')}"
  first_run = _train(launch_here, workdir, data_dir, labels, FIGURES, mode="train_and_score")
  assert first_run.returncode == 0, first_run.stderr
  outputs = ["submission.csv", "scores.npy", "eval.json", "roc.png", "reconstructions.png",
             "latent_edits.png", "anomaly_maps.png", "predictions.csv", "threshold.json",
             "reference_scores.npy"]
  inodes = {name: os.stat(workdir / name).st_ino for name in outputs}
  first = report.read_submission(str(workdir / "submission.csv"))
  _check_predictions(workdir, data_dir, first)
  again = _train(launch_here, workdir, data_dir, labels, "--config.score.batch_size=5", FIGURES,
                 mode="score")
  assert again.returncode == 0, again.stderr
  for name in outputs:
    assert os.stat(workdir / name).st_ino != inodes[name], name
  np.testing.assert_allclose(report.read_submission(str(workdir / "submission.csv")), first,
                             rtol=1e-6)
  unlabelled = _train(launch_here, workdir, data_dir, "--config.data.test_labels=",
                      mode="score")
  assert unlabelled.returncode == 0, unlabelled.stderr
  assert not (workdir / "eval.json").exists() and not (workdir / "roc.png").exists()
  assert (workdir / "submission.csv").exists()
  assert not [n for n in os.listdir(workdir) if ".tmp" in n]
  # Without figures, a rescoring removes the earlier run's, and so does training to its end.
  assert _train(launch_here, workdir, data_dir, "--config.figures=false",
                mode="score").returncode == 0
  assert not [n for n in os.listdir(workdir) if n.endswith(".png") and n !=
              "training_curves.png"], os.listdir(workdir)
  np.testing.assert_allclose(report.read_submission(str(workdir / "submission.csv")), first,
                             rtol=1e-6)
  longer = _train(launch_here, workdir, data_dir, "--config.figures=false",
                  "--config.max_steps=12", "--config.allow_changes=max_steps")
  assert longer.returncode == 0 and "resumed from step 10 of 12" in longer.stdout, longer.stderr
  assert not [n for n in os.listdir(workdir) if n.endswith(".png")], os.listdir(workdir)


def _check_predictions(workdir, data_dir, scores):
  """predictions.csv flags the scores above threshold.json's threshold (the 0.95 quantile of
  the training images' scores: all 32 here, a sample of 2,000 at most); eval.json's precision,
  recall and F1 are of those flags, and its F1-best threshold is at least as good."""
  scores = np.asarray(scores).astype(np.float32)  # the CSV's 9 digits are float32's values
  threshold = json.load(open(workdir / "threshold.json"))
  assert threshold["quantile"] == 0.95
  assert threshold["from"] == "32 training images (the model trained on them)"
  lines = open(workdir / "predictions.csv").read().splitlines()
  assert lines[0] == "ID,score,is_anomaly,p_value" and len(lines) == 13
  rows = np.array([[float(v) for v in line.split(",")] for line in lines[1:]])
  np.testing.assert_array_equal(rows[:, 0], np.arange(12))
  np.testing.assert_array_equal(rows[:, 1].astype(np.float32), scores)
  flags = rows[:, 2].astype(bool)
  np.testing.assert_array_equal(flags, scores > threshold["threshold"])
  labels = np.load(os.path.join(data_dir, "testing_labels.npy")).astype(bool)
  record = json.load(open(workdir / "eval.json"))
  tp = np.sum(flags & labels)
  precision = tp / max(flags.sum(), 1)
  recall = tp / labels.sum()
  assert record["threshold"] == threshold["threshold"]
  assert record["precision"] == pytest.approx(precision) and \
      record["recall"] == pytest.approx(recall)
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  assert record["f1"] == pytest.approx(f1)
  best = record["f1_best"]
  best_flags = scores > best["threshold"]
  assert best["f1"] >= f1 and best["f1"] == pytest.approx(
      2 * np.sum(best_flags & labels) / (best_flags.sum() + labels.sum()))


def test_single_class_labels_give_valid_json_and_a_best_checkpoint(data_dir, tmp_path,
                                                                    launch_here):
  labels = tmp_path / "all_normal.npy"
  np.save(labels, np.zeros(12, np.int64))
  workdir = tmp_path / "w"
  result = _train(launch_here, workdir, data_dir, f"--config.data.test_labels={labels}",
                  mode="train_and_score")
  assert result.returncode == 0, result.stderr
  assert "no test AUC: the test labels hold only normal images (0)" in result.stdout
  assert "ROC AUC undefined: the test labels hold only normal images (0)" in result.stdout
  text = (workdir / "eval.json").read_text()
  record = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in eval.json"))
  assert record["auc"] is None and record["aupr"] is None and "both classes" in \
      record["auc_undefined"]
  assert os.listdir(workdir / "checkpoints" / "best")
  assert not (workdir / "roc.png").exists()


# --- honest validation (issue: the test labels picked the best checkpoint)


@pytest.mark.parametrize("best_by", ["auto", "test_auc"])
def test_the_best_checkpoint_follows_the_held_out_images(best_by, data_dir, tmp_path,
                                                          launch_here):
  """With a validation split the best checkpoint is the epoch of the lowest mean score of the
  held-out images; the test AUC is reported as test_auc and picks the best only when asked,
  which eval.json then says."""
  workdir = tmp_path / "w"
  labels = f"--config.data.test_labels={os.path.join(data_dir, 'testing_labels.npy')}"
  result = _train(launch_here, workdir, data_dir, labels, "--config.data.val_fraction=0.25",
                  "--config.batch_size=8", "--config.max_steps=12",
                  f"--config.checkpoint.best_by={best_by}", "--config.checkpoint.restore=best",
                  mode="train_and_score")
  assert result.returncode == 0, result.stderr
  assert "validation: 8 held-out training images, never trained on" in result.stdout
  epochs = [json.loads(line) for line in open(workdir / "metrics.jsonl")
            if '"epoch_mean_loss"' in line]
  assert [r["step"] for r in epochs] == [3, 6, 9, 12]  # 24 training images, batch 8
  measure = [-r["val_score"] for r in epochs] if best_by == "auto" else \
      [r["test_auc"] for r in epochs]
  best_step = epochs[int(np.argmax(measure))]["step"]
  assert os.listdir(workdir / "checkpoints" / "best") == [str(best_step)]
  record = json.load(open(workdir / "eval.json"))
  assert record["step"] == best_step
  if best_by == "auto":
    assert record["best_by"] == "val_score" and "best_chosen_on_test_set" not in record
  else:
    assert record["best_by"] == "test_auc" and record["best_chosen_on_test_set"] is True


# --- 7. honest progress


def test_images_per_second_counts_finished_steps(data_dir, tmp_path, monkeypatch):
  """A dispatched step returns at once and its result is ready later: here each step's 0.05 s
  is spent when its loss is read, as with an asynchronously dispatched step (what XLA does with
  any step large enough). A rate timed before reading the logged loss counted steps still
  queued (an fcn_boss run on 2 cores printed 2.5x what that machine can do). Whenever it is
  logged, no rate may exceed batch / 0.05 s."""
  real = train_step.jit_train_step
  queued = []

  class Pending:
    def __init__(self, value):
      self.value = value

    def __float__(self):
      time.sleep(0.05 * len(queued))  # the device works through the queued steps
      queued.clear()
      return float(self.value)

  def dispatching(*args):
    compiled = real(*args)

    def step(state, images):
      state, metrics = compiled(state, images)
      queued.append(1)
      return state, dict(metrics, loss=Pending(metrics["loss"]))

    step.trace = compiled.trace  # train loads the program before the first step
    return step

  monkeypatch.setattr(train_step, "jit_train_step", dispatching)
  from hw8jax.main import run

  c = quick_config("tiny", data_dir, labels="")
  c.batch_size, c.max_steps, c.log_every_seconds, c.checkpoint.every_steps = 2, 24, 0.5, 100
  run(c, str(tmp_path / "w"), "train")
  rates = [json.loads(line)["images_per_s"] for line in open(tmp_path / "w" / "metrics.jsonl")
           if '"images_per_s"' in line]
  assert len(rates) >= 2 and max(rates) <= 2 / 0.05


def test_a_second_run_loads_the_first_runs_programs_from_the_compilation_cache(
    data_dir, tmp_path):
  """`compilation_cache` names a folder: a training run fills it, and the same training in
  another workdir, in a new process, loads the model's initialisation and the train step from
  there instead of compiling them (JAX logs each hit when asked to log compilations). Processes
  of their own: this one's programs are compiled already, so an in-process run would write
  none. A run prints nothing on stderr, orbax's notes at each save included."""
  cache = tmp_path / "xla"
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  common = (f"--config.data.dir={data_dir}", f"--config.compilation_cache={cache}",
            "--config.max_steps=4", "--config.data.test_labels=", "--mode=train")
  first = subprocess.run(launch_command(*common, f"--workdir={tmp_path / 'w1'}"),
                         capture_output=True, text=True, timeout=300, env=env)
  assert first.returncode == 0, first.stderr
  assert first.stderr == ""
  assert len(os.listdir(cache)) >= 2
  result = subprocess.run(launch_command(*common, f"--workdir={tmp_path / 'w2'}"),
                          capture_output=True, text=True, timeout=300,
                          env={**env, "JAX_LOG_COMPILES": "1"})
  assert result.returncode == 0, result.stderr
  hits = re.findall(r"Persistent compilation cache hit for '(\w+)'", result.stderr)
  assert "jit_step_fn" in hits and len(hits) >= 3, hits
