"""Hostile use, third round, met where a user meets it (launch.py, `python -m hw8jax.ensemble`,
the Python API): the demo never touches a user's files, scores are never NaN, the detector agrees
with its workdir, files and values that pass a first look are caught before any work, Ctrl-C
stops at any moment."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from hw8jax import report
from hw8jax.data import demo
from hw8jax.data.demo import make_synthetic, synthetic_images
from hw8jax.errors import UserError

from conftest import REPO, one_line_error, require_torch

# A tiny run (tests/tiny.py): 4 steps of batch 8, a latest checkpoint every 2 steps.
TINY = ["--config.batch_size=8", "--config.max_steps=4", "--config.checkpoint.every_steps=2",
        "--config.log_every_seconds=0", "--config.score.batch_size=8", "--config.figures=false"]


def _user_files(folder, n_train: int = 16, n_test: int = 8, seed: int = 0) -> dict:
  """A user's own Kaggle-layout files (no labels, nothing of hw8jax's); their bytes."""
  os.makedirs(folder, exist_ok=True)
  np.save(os.path.join(folder, "trainingset.npy"), synthetic_images(n_train, seed))
  np.save(os.path.join(folder, "testingset.npy"), synthetic_images(n_test, seed + 1))
  return _contents(folder)


def _contents(folder) -> dict:
  """The bytes of every file directly in `folder`."""
  return {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)
          if os.path.isfile(os.path.join(folder, name))}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  make_synthetic(d, num_train=16, num_test=8, seed=6)
  return str(d)


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  """A tiny workdir trained and scored with TINY's config."""
  import hw8jax

  workdir = str(tmp_path_factory.mktemp("trained") / "w")
  hw8jax.run(_tiny_config(data_dir), workdir)
  return workdir


def _tiny_config(data_dir: str):
  import hw8jax

  cfg = hw8jax.get_config("ta_vae", "quick")
  cfg.model, cfg.data.dir = "tiny", data_dir
  cfg.batch_size, cfg.max_steps, cfg.checkpoint.every_steps = 8, 4, 2  # TINY's values
  cfg.log_every_seconds, cfg.score.batch_size, cfg.figures = 0.0, 8, False
  return cfg


def _copy(workdir, tmp_path, name: str = "copy") -> str:
  target = str(tmp_path / name)
  shutil.copytree(workdir, target, ignore=shutil.ignore_patterns(".lock"))
  return target


# --- 1. the demo and a user's data


def test_the_demo_never_replaces_a_users_files(tmp_path, launch_here):
  """`:demo --config.data.dir=DIR` where DIR holds the user's own files (or anything not built
  by hw8jax) stops in one line naming DIR, every file unchanged. An empty folder, and a folder
  of an older version's demo set (the same files, no marker), are built into or used."""
  workdir = f"--workdir={tmp_path / 'w'}"
  user = tmp_path / "kaggle"
  before = _user_files(user)
  r = launch_here(workdir, "--mode=score", f"--config.data.dir={user}", config="ta_fcn.py:demo")
  one_line_error(r, f"{user}: holds files the demo did not write (testingset.npy, trainingset.npy)")
  assert _contents(user) == before
  other = tmp_path / "notes"
  other.mkdir()
  (other / "notes.txt").write_text("mine")
  r = launch_here(workdir, "--mode=score", f"--config.data.dir={other}", config="ta_fcn.py:demo")
  one_line_error(r, f"{other}: holds files the demo did not write (notes.txt)")
  assert os.listdir(other) == ["notes.txt"]

  empty = tmp_path / "empty"
  empty.mkdir()
  r = launch_here(workdir, "--mode=score", f"--config.data.dir={empty}", config="ta_fcn.py:demo")
  one_line_error(r, "no latest checkpoint; train first")
  assert sorted(os.listdir(empty)) == sorted([demo.MARKER, *demo.FILES])
  built = _contents(empty)
  os.remove(empty / demo.MARKER)  # what a version before the marker left: the demo's own files
  r = launch_here(workdir, "--mode=score", f"--config.data.dir={empty}", config="ta_fcn.py:demo")
  one_line_error(r, "no latest checkpoint; train first")
  assert _contents(empty) == built


# --- 2. non-finite weights and scores


def test_weights_whose_own_loss_was_not_finite_are_not_kept(data_dir, tmp_path, launch_here):
  """SGD at 1e30 with a checkpoint every step: step 1's weights (finite, about 1e30) give a NaN
  loss at step 2; that checkpoint is removed, not called "the last good one"."""
  workdir = tmp_path / "w"
  r = launch_here(f"--workdir={workdir}", "--mode=train", f"--config.data.dir={data_dir}",
                  *TINY, "--config.max_steps=40", "--config.optimizer.name=sgd",
                  "--config.optimizer.learning_rate=1e30", "--config.checkpoint.every_steps=1",
                  "--config.checkpoint.keep=3")
  one_line_error(r, "training stopped: the loss became nan by step 2; no checkpoint held weights "
            "with a finite loss, so none is kept. Try a lower optimizer.learning_rate")
  for which in ("latest", "best"):
    assert not [d for d in os.listdir(workdir / "checkpoints" / which) if d.isdigit()]
  r = launch_here(f"--workdir={workdir}", "--mode=score", f"--config.data.dir={data_dir}", *TINY)
  one_line_error(r, "no latest checkpoint; train first")


def _ta_fcn_file(path, change) -> str:
  """A state_dict of the course's FCN (tests/torch_reference.py) saved by torch, changed by
  `change(state_dict)`."""
  torch = require_torch()
  sys.path.insert(0, os.path.dirname(__file__))
  import torch_reference

  state = torch_reference.ta_fcn().state_dict()
  change(state, torch)
  torch.save(state, path)
  return str(path)


def test_non_finite_weights_and_scores_are_one_line_and_nothing_is_written(data_dir, tmp_path,
                                                                          launch_here):
  """A state_dict with one NaN weight, and a float64 one whose weight overflows float32: one
  line naming the file and the entry, before any work. Finite weights (3e38) whose scores
  overflow, scored under `python -O` (no assert can stand guard): one line naming the weights.
  Each: exit 1, no submission, scores or predictions."""
  def nan(state, torch):
    state["encoder.0.weight"].view(-1)[7] = float("nan")

  def overflow(state, torch):
    for key in state:
      state[key] = state[key].double()
    state["encoder.0.weight"][0, 0] = 1e300

  def huge(state, torch):
    state["encoder.0.weight"].fill_(3e38)

  outputs = ["submission.csv", "scores.npy", "predictions.csv", "threshold.json"]
  workdir = tmp_path / "w"
  for name, change, line in (
      ("nan", nan, "encoder.0.weight has 1 of 1572864 values that are not finite in float32"),
      ("overflow", overflow, "encoder.0.weight has 1 of 1572864 values that are not finite")):
    path = _ta_fcn_file(tmp_path / f"{name}.pt", change)
    r = launch_here(f"--workdir={workdir}", "--mode=score", f"--config.init_from={path}",
                    f"--config.data.dir={data_dir}", "--config.figures=false",
                    config="ta_fcn.py:quick", tiny=False)
    one_line_error(r, path, line)
    assert not [name for name in outputs if (workdir / name).exists()]
  path = _ta_fcn_file(tmp_path / "huge.pt", huge)
  r = subprocess.run([sys.executable, "-O", os.path.join(REPO, "launch.py"),
                      f"--config={REPO}/configs/ta_fcn.py:quick", f"--workdir={workdir}",
                      "--mode=score", f"--config.init_from={path}",
                      f"--config.data.dir={data_dir}", "--config.figures=false"],
                     capture_output=True, text=True, timeout=300)
  line = one_line_error(r, f"the PyTorch weights in {path}: ",
                        " of 8 anomaly scores are not finite")
  assert int(line.split(": ")[2].split()[0]) >= 1
  assert not [name for name in outputs if (workdir / name).exists()]


# --- 3. fit and the images a workdir was trained on


def test_a_workdir_trained_on_other_images_is_refused(trained, data_dir, tmp_path, launch_here):
  """launch.py trained W on A. `fit(B, ..., W)` and a launch training on B stop in one line
  (one model, two data sets); the refused fit keeps nothing, so a fit of A then works. Scoring
  B with the model of A stays allowed."""
  import hw8jax

  workdir = _copy(trained, tmp_path)
  other = tmp_path / "other"
  _user_files(other, seed=40)
  images_b = np.load(other / "trainingset.npy")
  recipe = _tiny_config(data_dir).to_dict()
  with pytest.raises(UserError, match="holds checkpoints trained on other images than .*fit_data"):
    hw8jax.fit(images_b, recipe, workdir)
  assert not os.path.exists(os.path.join(workdir, "fit_data"))
  r = launch_here(f"--workdir={workdir}", f"--config.data.dir={other}", *TINY)
  one_line_error(r, f"holds checkpoints trained on other images than {other}/trainingset.npy")
  r = launch_here(f"--workdir={workdir}", "--mode=score", f"--config.data.dir={other}", *TINY)
  assert r.returncode == 0, r.stderr
  detector = hw8jax.fit(np.load(os.path.join(data_dir, "trainingset.npy")), recipe, workdir)
  assert detector.step == 4


def test_a_fit_that_fails_at_its_start_keeps_nothing(data_dir, tmp_path):
  """A batch larger than the images: one line, no fit_data/ left; the next fit with enough
  images trains."""
  import hw8jax

  workdir = str(tmp_path / "w")
  images = np.load(os.path.join(data_dir, "trainingset.npy"))
  recipe = dict(_tiny_config(data_dir).to_dict(), max_steps=2)
  with pytest.raises(UserError, match="batch_size=8: larger than the 4 training images"):
    hw8jax.fit(images[:4], recipe, workdir)
  assert not os.path.exists(os.path.join(workdir, "fit_data"))
  assert hw8jax.fit(images, recipe, workdir).step == 2


# --- 4. the detector and its workdir's last scoring run


def test_the_detector_scores_and_predicts_as_the_last_scoring_run(trained, data_dir, tmp_path,
                                                                  launch_here):
  import hw8jax

  workdir = _copy(trained, tmp_path)
  test = np.load(os.path.join(data_dir, "testingset.npy"))

  def as_written(det):
    with open(os.path.join(workdir, "predictions.csv")) as f:
      flagged = np.array([int(line.split(",")[2]) for line in list(f)[1:]])
    np.testing.assert_array_equal(det.score(test), np.load(os.path.join(workdir, "scores.npy")))
    np.testing.assert_array_equal(det.predict(test), flagged)

  r = launch_here(f"--workdir={workdir}", "--mode=score", f"--config.data.dir={data_dir}", *TINY,
                  "--config.score.metric=mae", "--config.score.threshold_quantile=0.5")
  assert r.returncode == 0, r.stderr
  det = hw8jax.load(workdir)
  assert det.config.score.metric == "mae" and det.step == 4
  as_written(det)
  r = launch_here(f"--workdir={workdir}", "--mode=score", f"--config.data.dir={data_dir}", *TINY,
                  "--config.checkpoint.restore=best")
  assert r.returncode == 0, r.stderr
  best = hw8jax.load(workdir)
  assert best.config.score.metric == "l2" and "the best checkpoint" in best.weights
  as_written(best)
  latest = hw8jax.load(workdir, "latest")
  assert latest.threshold is None
  with pytest.raises(UserError, match=r"threshold.json is of the best checkpoint \(step \d\), "
                     r"this detector holds the latest checkpoint \(step 4\)"):
    latest.predict(test)


def test_the_detector_compiles_once(trained, data_dir, caplog):
  """A detector's second call of each kind compiles nothing (it built a new jitted function on
  every call: ta_cnn's 8 images took 78 ms against 255 ms for 512)."""
  import jax

  import hw8jax

  def compiled_by(calls) -> tuple[list, list[str]]:
    caplog.clear()
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
      out = [call(test[:3]) for call in calls]
    return out, [r.getMessage() for r in caplog.records if "ompil" in r.getMessage()]

  det = hw8jax.load(trained)
  test = np.load(os.path.join(data_dir, "testingset.npy"))
  first, said = compiled_by([det.score, det.predict, det.reconstruct])
  assert any("Compiling" in line for line in said), said  # what the log shows of a compilation
  again, said = compiled_by([det.score, det.predict, det.reconstruct])
  assert said == [], said
  for a, b in zip(first, again, strict=True):
    np.testing.assert_array_equal(a, b)


# --- 5. ensembles


def test_an_ensemble_never_overwrites_a_member_nor_mixes_test_sets(trained, data_dir, tmp_path,
                                                                   launch_here, capsys):
  from hw8jax.ensemble import main

  a, b = _copy(trained, tmp_path, "a"), _copy(trained, tmp_path, "b")
  kept = _contents(a)
  capsys.readouterr()
  assert main(["--workdirs", a, b, "--out", a]) == 1
  assert capsys.readouterr().err == f"error: --out={a} is the member {a}: its scores.npy and " \
      "submission.csv would be replaced; give the ensemble a folder of its own\n"
  assert _contents(a) == kept
  other = tmp_path / "other"
  make_synthetic(other, num_train=16, num_test=8, seed=77)  # as many test images, other ones
  r = launch_here(f"--workdir={b}", "--mode=score", f"--config.data.dir={other}", *TINY)
  assert r.returncode == 0, r.stderr
  capsys.readouterr()
  assert main(["--workdirs", a, b, "--out", str(tmp_path / "out")]) == 1
  err = capsys.readouterr().err
  assert err.startswith(f"error: {b} and {a} scored different test sets of 8 images") and \
      err.count("\n") == 1, err
  assert not (tmp_path / "out").exists()


# --- 6. Ctrl-C


def test_ctrl_c_at_any_moment_is_one_line_and_exit_130_and_a_rerun_ends_well(data_dir, tmp_path):
  """SIGINT while Python imports, while the flags are read, while JAX starts and compiles, while
  training: one line, exit 130 (it was ignored, or a traceback of 23-53 lines, once exit 134)."""
  workdir = tmp_path / "w"
  command = [sys.executable, os.path.join(REPO, "launch.py"), f"--config={REPO}/configs/"
             "ta_fcn.py:quick", f"--workdir={workdir}", f"--config.data.dir={data_dir}",
             "--config.figures=false", "--config.batch_size=8", "--config.max_steps=3000"]
  # The first lands in launch.py's imports: at 0.05 s, on a loaded machine, it once landed as
  # the interpreter was starting launch.py, before any line of it could set a handler.
  for delay in (0.15, 0.5, 1.0, 1.6, 2.4, 3.5):
    p = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, (delay, p.returncode, err[-2000:])
    assert len(err.strip().splitlines()) == 1 and "interrupted" in err, (delay, err)
  r = subprocess.run(command, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert os.path.exists(workdir / "submission.csv")


def test_a_ctrl_c_inside_a_garbage_collector_callback_is_not_lost():
  """Python drops an exception raised in a gc callback; a Ctrl-C landing in JAX's callback was
  lost that way (the run went on to exit 0). launch.py delivers it again, after the callback."""
  code = f"""if True:
    import gc, sys, time
    sys.path.insert(0, {REPO!r})
    import launch
    launch._deliver_lost_interrupts()
    def callback(phase, info):
      if phase == "start":
        raise KeyboardInterrupt  # as SIGINT's handler raises it, wherever the run is
    gc.callbacks.append(callback)
    try:
      gc.collect()
      time.sleep(5)  # the run going on
      print("lost")
    except KeyboardInterrupt:
      print("delivered")
  """
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert (r.stdout, r.stderr) == ("delivered\n", ""), (r.stdout, r.stderr)


# --- 7. several processes


def test_an_unreachable_coordinator_is_one_line_after_distributed_timeout(tmp_path, data_dir,
                                                                          launch_here):
  for process_id, num, expected in (
      (1, 2, "coordinator_address=127.0.0.1:1: process 0 did not answer within 1 s "
       "(distributed_timeout)"),
      (0, 3, "waited 1 s (distributed_timeout) for process(es) 1, 2 of 3")):
    address = "127.0.0.1:1" if process_id else f"127.0.0.1:{_free_port()}"
    began = time.monotonic()
    r = launch_here(f"--workdir={tmp_path / 'w'}", f"--config.data.dir={data_dir}", *TINY,
                    f"--config.coordinator_address={address}", f"--config.num_processes={num}",
                    f"--config.process_id={process_id}", "--config.distributed_timeout=1")
    assert time.monotonic() - began < 30
    one_line_error(r, expected)
    assert "waiting up to 1 s (distributed_timeout) for" in r.stdout
  assert not os.path.exists(tmp_path / "w")


def _free_port() -> int:
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# --- 8. files and values that pass a first look


def _npy_with_header(path, shape) -> None:
  with open(path, "wb") as f:
    np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                            "shape": shape})
    f.write(b"\0" * 1000)


@pytest.mark.parametrize("shape, problem", [((10**15, 64, 64, 3), "truncated: "),
                                            ((-5, 64, 64, 3), "has a negative size")])
def test_a_header_that_claims_too_much_is_one_line(shape, problem, data_dir, tmp_path,
                                                   launch_here, capsys):
  folder = tmp_path / "data"
  shutil.copytree(data_dir, folder)
  _npy_with_header(folder / "testingset.npy", shape)
  r = launch_here(f"--workdir={tmp_path / 'w'}", f"--config.data.dir={folder}", *TINY)
  one_line_error(r, f"{folder}/testingset.npy: ", problem)
  member = tmp_path / "member"
  member.mkdir()
  _npy_with_header(member / "scores.npy", (shape[0],))
  from hw8jax.ensemble import main

  capsys.readouterr()
  assert main(["--workdirs", str(member), str(member), "--out", str(tmp_path / "out")]) == 1
  err = capsys.readouterr().err
  assert err.startswith(f"error: {member}/scores.npy: ") and problem in err and \
      err.count("\n") == 1, err


def test_a_huge_scoring_batch_scores_as_a_small_one(trained, data_dir, tmp_path, launch_here):
  """score.batch_size=10**10 allocated 74.5 GiB after training: a batch is never padded past
  the images it scores (rounded up to a power of two)."""
  workdir = _copy(trained, tmp_path)
  r = launch_here(f"--workdir={workdir}", "--mode=score", f"--config.data.dir={data_dir}", *TINY,
                  "--config.score.batch_size=10000000000")
  assert r.returncode == 0, r.stderr
  np.testing.assert_array_equal(np.load(os.path.join(workdir, "scores.npy")),
                                np.load(os.path.join(trained, "scores.npy")))


@pytest.mark.parametrize("case", ["tensorboard is a file", "runs is a file",
                                  "metrics.jsonl is a folder", "tensorboard is a broken link"])
def test_a_workdir_path_of_the_wrong_kind_is_one_line_before_any_work(case, data_dir, tmp_path,
                                                                       launch_here):
  workdir = tmp_path / "w"
  workdir.mkdir()
  name = case.split()[0]
  if case.endswith("a file"):
    (workdir / name).write_text("x")
  elif case.endswith("a folder"):
    (workdir / name).mkdir()
  else:
    os.symlink(tmp_path / "nowhere", workdir / name)
  before = sorted(os.listdir(workdir))
  r = launch_here(f"--workdir={workdir}", f"--config.data.dir={data_dir}", *TINY)
  what = {"file": "a file where the run keeps a folder",
          "folder": "a folder where the run writes a file", "link": "a broken link"}
  one_line_error(r, f"{workdir / name}: {what[case.split()[-1]]}")
  assert sorted(os.listdir(workdir)) == before


# --- 9. run records


def test_run_records_count_as_numbers(trained, data_dir, tmp_path, launch_here):
  """After 999 runs, 1000-train.json is the newest record, not 500-train.json."""
  workdir = _copy(trained, tmp_path)
  runs = os.path.join(workdir, "runs")
  record = json.load(open(os.path.join(runs, "001-train.json")))
  os.remove(os.path.join(runs, "001-train.json"))
  report.write_json(os.path.join(runs, "500-train.json"), dict(record, max_steps=6))
  report.write_json(os.path.join(runs, "1000-train.json"), record)
  r = launch_here(f"--workdir={workdir}", "--mode=train", f"--config.data.dir={data_dir}", *TINY)
  assert r.returncode == 0, r.stderr
  assert "training already finished (4 steps)" in r.stdout


# --- 10. a notebook's plots


def test_drawing_a_runs_figures_leaves_the_plotting_backend_alone(trained, data_dir, tmp_path,
                                                                  launch_here):
  import matplotlib

  before = matplotlib.get_backend()
  matplotlib.use("svg")  # a backend other than Agg, as a notebook's inline one is
  try:
    workdir = _copy(trained, tmp_path)
    r = launch_here(f"--workdir={workdir}", "--mode=score", f"--config.data.dir={data_dir}",
                    *TINY, "--config.figures=true")
    assert r.returncode == 0, r.stderr
    assert os.path.getsize(os.path.join(workdir, "reconstructions.png")) > 1000
    assert matplotlib.get_backend() == "svg"
  finally:
    matplotlib.use(before)
