"""Damaged or hostile inputs at the edges, met where a user meets them: ensembles of bad scores,
a demo set cut in the middle, a full disk, a damaged metrics.jsonl, mistakes in the Python API."""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from hw8jax import atomic
from hw8jax.data import demo
from hw8jax.data.demo import make_synthetic
from hw8jax.errors import UserError

from conftest import one_line_error

# A tiny run (tests/tiny.py): 4 steps of batch 8, a latest checkpoint every 2 steps.
TINY = ["--config.batch_size=8", "--config.max_steps=4", "--config.checkpoint.every_steps=2",
        "--config.log_every_seconds=0", "--config.score.batch_size=8", "--config.figures=false"]

# --- ensembles


def _member(root, name: str, scores) -> str:
  folder = root / name
  folder.mkdir()
  if isinstance(scores, bytes):
    (folder / "scores.npy").write_bytes(scores)
  else:
    np.save(folder / "scores.npy", scores)
  return str(folder)


def _ensemble(capsys, *argv: str) -> tuple[int, str]:
  from hw8jax.ensemble import main

  capsys.readouterr()
  code = main(list(argv))
  err = capsys.readouterr().err
  return code, err


@pytest.mark.parametrize("method", ["rank", "zscore"])
def test_an_ensemble_member_with_nan_or_inf_is_refused_before_anything_is_written(
    tmp_path, capsys, method):
  good = _member(tmp_path, "good", np.linspace(0, 1, 50, dtype=np.float32))
  for name, bad_value, what in (("nan", np.nan, "NaN"), ("inf", np.inf, "infinite")):
    scores = np.linspace(0, 1, 50, dtype=np.float32)
    scores[[3, 7, 11]] = bad_value
    bad = _member(tmp_path, f"{name}_{method}", scores)
    out = tmp_path / f"out_{name}_{method}"
    code, err = _ensemble(capsys, "--workdirs", good, bad, "--out", str(out), "--method", method)
    assert code == 1
    assert err == f"error: {bad}/scores.npy: 3 of 50 scores are {what}; rescore that " \
        "workdir (its model may have diverged)\n"
    assert not out.exists()


def test_ensemble_inputs_that_are_not_scores_are_one_line_each(tmp_path, capsys):
  good = _member(tmp_path, "good", np.arange(4, dtype=np.float32))
  (tmp_path / "a_file").write_text("x")
  labels = tmp_path / "labels.npy"
  np.save(labels, np.array([0, 1, 0]))
  cases = {
      "text": (_member(tmp_path, "text", b"0.1\n0.2\n"), [], "not a .npy file"),
      "2-D": (_member(tmp_path, "two_d", np.zeros((4, 2), np.float32)), [],
              "shape (4, 2), expected (N,) scores"),
      "strings": (_member(tmp_path, "strings", np.array(["a", "b", "c", "d"])), [],
                  "dtype <U1, expected float scores"),
      "shorter": (_member(tmp_path, "short", np.arange(3, dtype=np.float32)), [],
                  "workdirs scored different numbers of test images"),
      "labels": (good, ["--labels", str(labels)], "3 labels for 4 test images"),
      "out is a file": (good, ["--out", str(tmp_path / "a_file")], "is a file, not a folder"),
      "out under a file": (good, ["--out", str(tmp_path / "a_file" / "x")],
                           "cannot be created: "),
  }
  for name, (member, extra, expected) in cases.items():
    out = tmp_path / f"out_{name.replace(' ', '_')}"
    argv = ["--workdirs", good, member, "--out", str(out), *extra]
    if "--out" in extra:
      argv = ["--workdirs", good, member, *extra]
    code, err = _ensemble(capsys, *argv)
    assert code == 1, name
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, (name, err)
    assert not out.exists(), name


def test_python_m_ensemble_refuses_a_nan_member(tmp_path):
  """The command a user types; exit 1, one line, no submission."""
  good = _member(tmp_path, "good", np.arange(5, dtype=np.float32))
  bad = _member(tmp_path, "bad", np.array([0, 1, np.nan, 3, 4], np.float32))
  r = subprocess.run([sys.executable, "-m", "hw8jax.ensemble", "--workdirs", good, bad, "--out",
                      str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
  assert r.returncode == 1
  assert r.stderr.splitlines() == [f"error: {bad}/scores.npy: 1 of 5 scores are NaN; rescore "
                                   "that workdir (its model may have diverged)"]
  assert not (tmp_path / "out").exists()


# --- runs: shared set-up


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  make_synthetic(d, num_train=16, num_test=8, seed=6)
  return str(d)


def _temporaries(workdir) -> list:
  return [p for p in glob.glob(os.path.join(workdir, "**", "*"), recursive=True)
          if ".tmp" in os.path.basename(p)]


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  """A tiny workdir trained to the end and scored: the uninterrupted run, with the config the
  launches below give (configs/ta_vae.py:quick, the tiny model, TINY)."""
  import hw8jax

  cfg = hw8jax.get_config("ta_vae", "quick")
  cfg.model, cfg.data.dir = "tiny", data_dir
  cfg.batch_size, cfg.max_steps, cfg.checkpoint.every_steps = 8, 4, 2  # TINY's values
  cfg.log_every_seconds, cfg.score.batch_size, cfg.figures = 0.0, 8, False
  workdir = str(tmp_path_factory.mktemp("trained") / "w")
  hw8jax.run(cfg, workdir)
  return workdir


def _params(workdir):
  import orbax.checkpoint as ocp

  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints", "latest")) as m:
    step = m.latest_step()
    return step, m.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]["params"]


# --- the demo set


def test_the_demo_set_appears_whole_and_a_cut_or_half_built_one_is_rebuilt(
    tmp_path, launch_here, monkeypatch):
  """A fault injected into the second file's write (a full disk) leaves no demo folder and no
  temporary one; the next run builds it whole. A folder an older version left half-built (no
  labels) is rebuilt, not trusted. Probed with --mode=score on an untrained workdir, which
  builds the set and then stops for want of a checkpoint."""
  workdir = tmp_path / "w"
  flags = [f"--workdir={workdir}", "--mode=score"]
  real, calls = demo.write_npy_atomic, []

  def failing(path, array):
    calls.append(path)
    if len(calls) == 2:
      raise OSError(errno.ENOSPC, "No space left on device")
    real(path, array)

  monkeypatch.setattr(demo, "write_npy_atomic", failing)
  r = launch_here(*flags, config="ta_vae.py:demo")
  line = one_line_error(r, "demo_data: cannot write the data set there (No space left on device)")
  assert len(calls) == 2 and "Traceback" not in line
  assert os.listdir(workdir) == []  # no demo_data, no demo_data.tmpPID
  monkeypatch.setattr(demo, "write_npy_atomic", real)
  r = launch_here(*flags, config="ta_vae.py:demo")
  one_line_error(r, "no latest checkpoint; train first")
  folder = workdir / "demo_data"
  assert sorted(os.listdir(folder)) == sorted([demo.MARKER, *demo.FILES])
  whole = {name: np.load(folder / name) for name in demo.FILES}
  (folder / demo.LABELS_FILE).unlink()  # what a cut in an older version's writes left
  r = launch_here(*flags, config="ta_vae.py:demo")
  one_line_error(r, "no latest checkpoint; train first")
  for name in demo.FILES:
    np.testing.assert_array_equal(np.load(folder / name), whole[name])


def test_a_demo_folder_that_cannot_be_written_is_one_line(tmp_path, launch_here, monkeypatch):
  """Kaggle's input folders are read-only: data.demo pointed there says so in one line."""

  def read_only(path, array):
    raise OSError(errno.EROFS, "Read-only file system")

  monkeypatch.setattr(demo, "write_npy_atomic", read_only)
  target = tmp_path / "input"
  r = launch_here(f"--workdir={tmp_path / 'w'}", "--mode=score", f"--config.data.dir={target}",
                  config="ta_vae.py:demo")
  one_line_error(r, f"{target}: cannot write the data set there (Read-only file system); pass "
            "--config.data.dir=a folder this run can write")
  assert not target.exists()


# --- a full disk


def test_a_full_disk_while_scoring_is_one_line_and_a_rerun_writes_the_same(
    trained, data_dir, tmp_path, launch_here, monkeypatch):
  """ENOSPC injected into the atomic writer at submission.csv: one line with the free space,
  no temporary file, the earlier submission untouched; with space again, the same command
  writes what the uninterrupted run wrote."""
  workdir = str(tmp_path / "w")
  shutil.copytree(trained, workdir)
  before = open(os.path.join(workdir, "submission.csv")).read()
  real_open = open

  def full(path, *args, **kwargs):
    if "submission.csv" in str(path):
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_open(path, *args, **kwargs)

  monkeypatch.setattr(atomic, "open", full, raising=False)
  flags = [f"--workdir={workdir}", "--mode=score", f"--config.data.dir={data_dir}", *TINY]
  r = launch_here(*flags)
  one_line_error(r, "submission.csv: no space left on the device (", " free); what was already "
            "saved is unchanged")
  assert not _temporaries(workdir)
  assert open(os.path.join(workdir, "submission.csv")).read() == before
  monkeypatch.undo()
  assert launch_here(*flags).returncode == 0
  assert open(os.path.join(workdir, "submission.csv")).read() == before


@pytest.mark.parametrize("where", ["record", "checkpoint"])
def test_a_full_disk_while_training_is_one_line_and_a_rerun_ends_as_an_uninterrupted_run(
    where, trained, data_dir, tmp_path, launch_here, monkeypatch):
  """At a run's start (its record in runs/) or at a checkpoint (less free space than the state
  needs): one line, nothing half-written, no temporary file or unfinished checkpoint folder;
  the same command then ends with the parameters of the uninterrupted run, bit for bit."""
  workdir = str(tmp_path / "w")
  if where == "record":
    real_open = open

    def full(path, *args, **kwargs):
      if os.sep + "runs" + os.sep in str(path):
        raise OSError(errno.ENOSPC, "No space left on device")
      return real_open(path, *args, **kwargs)

    monkeypatch.setattr(atomic, "open", full, raising=False)
    expected = "001-train.json: no space left on the device"
  else:
    real_free = atomic.free_bytes
    monkeypatch.setattr(atomic, "free_bytes", lambda path: 4096 if "checkpoints" in str(path)
                        else real_free(path))
    expected = "no space left for checkpoint 2 ("
  flags = [f"--workdir={workdir}", "--mode=train", f"--config.data.dir={data_dir}", *TINY]
  one_line_error(launch_here(*flags), expected, "4.1 KB free" if where == "checkpoint" else "")
  assert not _temporaries(workdir)
  assert not glob.glob(os.path.join(workdir, "checkpoints", "*", "*orbax-checkpoint-tmp*"))
  monkeypatch.undo()
  assert launch_here(*flags).returncode == 0
  (step, got), (want_step, want) = _params(workdir), _params(trained)
  assert step == want_step == 4
  import jax

  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture
def small_disk(tmp_path):
  """A real 16 MiB filesystem (tmpfs) that can be filled; needs `mount` and the right to use
  it (root). Where the machine refuses, the tests above, which inject ENOSPC at each writer,
  stand for it."""
  where = tmp_path / "disk"
  where.mkdir()
  mounted = shutil.which("mount") and subprocess.run(
      ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)],
      capture_output=True).returncode == 0
  if not mounted:
    pytest.skip("cannot mount a tmpfs here; the injected-ENOSPC tests cover a full disk")
  yield where
  subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(disk, leave: int = 0) -> str:
  """Fill `disk` with one file until it is full, then free `leave` bytes of it."""
  filler = os.path.join(disk, "filler")
  with open(filler, "wb", buffering=0) as f:
    for chunk in (2**20, 2**12):
      try:
        while f.write(b"\0" * chunk):
          pass
      except OSError as e:
        assert e.errno == errno.ENOSPC, e
  os.truncate(filler, max(os.path.getsize(filler) - leave, 0))
  return filler


@pytest.mark.parametrize("where", ["start", "checkpoint", "scoring"])
def test_a_real_full_disk_is_one_line_and_a_rerun_ends_as_the_uninterrupted_run(
    where, small_disk, trained, data_dir, launch_here):
  """The cases above on a filesystem that is really full: a run's start (no byte free: its
  lock file's first write), a checkpoint (256 KiB free: the run starts, its first checkpoint
  does not fit) and scoring (no byte free, an earlier submission there: its run record's
  write): one line, no temporary file, what was saved unchanged; with space again the same
  command ends as the uninterrupted run did."""
  workdir = str(small_disk / "w")
  mode = "score" if where == "scoring" else "train"
  if where == "scoring":
    shutil.copytree(trained, workdir)
  before = open(os.path.join(trained, "submission.csv")).read()
  filler = _fill(small_disk, leave=256 * 1024 if where == "checkpoint" else 0)
  flags = [f"--workdir={workdir}", f"--mode={mode}", f"--config.data.dir={data_dir}", *TINY]
  one_line_error(launch_here(*flags), "no space left for checkpoint 2 (" if where == "checkpoint"
            else "no space left on the device (0 bytes free)")
  assert not _temporaries(small_disk)
  assert not glob.glob(os.path.join(workdir, "checkpoints", "*", "*orbax-checkpoint-tmp*"))
  if where == "scoring":
    assert open(os.path.join(workdir, "submission.csv")).read() == before
  os.remove(filler)
  assert launch_here(*flags).returncode == 0
  if where == "scoring":
    assert open(os.path.join(workdir, "submission.csv")).read() == before
    return
  (step, got), (want_step, want) = _params(workdir), _params(trained)
  assert step == want_step == 4
  import jax

  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- a damaged workdir


def test_a_damaged_metrics_tail_is_dropped_with_one_line(trained, data_dir, tmp_path,
                                                          launch_here):
  workdir = str(tmp_path / "w")
  shutil.copytree(trained, workdir)
  metrics = os.path.join(workdir, "metrics.jsonl")
  with open(metrics, "ab") as f:
    f.write(b'{"step": 3, "loss": 1.0}\n\xff\xfe not utf-8\n[1, 2]\n{"step": 4, "lo')
  r = launch_here(f"--workdir={workdir}", "--mode=train", f"--config.data.dir={data_dir}",
                  *TINY, "--config.max_steps=6", "--config.allow_changes=max_steps")
  assert r.returncode == 0, r.stderr
  assert f"{metrics}: dropped 3 damaged line(s) (cut short, bad bytes or not JSON)" in r.stdout
  records = [json.loads(line) for line in open(metrics, encoding="utf-8")]
  assert [r["step"] for r in records if "loss" in r][-2:] == [5, 6]


def test_records_gone_the_checkpoint_says_what_trained_it(trained, data_dir, tmp_path,
                                                          launch_here):
  """config.json damaged and runs/ deleted: a resume with another rate is refused in one line
  (the checkpoint carries its config), and so is scoring it as another model."""
  workdir = str(tmp_path / "w")
  shutil.copytree(trained, workdir)
  open(os.path.join(workdir, "config.json"), "w").write("{damaged")
  shutil.rmtree(os.path.join(workdir, "runs"))
  r = launch_here(f"--workdir={workdir}", "--mode=train", f"--config.data.dir={data_dir}",
                  *TINY, "--config.max_steps=6", "--config.allow_changes=max_steps",
                  "--config.optimizer.learning_rate=0.01")
  one_line_error(r, "holds checkpoints trained with another config: optimizer.learning_rate 0.01 "
            "(trained with 0.001)")
  r = launch_here(f"--workdir={workdir}", "--mode=score", f"--config.data.dir={data_dir}",
                  *TINY, "--config.model=ta_fcn", tiny=False)
  one_line_error(r, "model 'ta_fcn' (trained with 'tiny')")


# --- the Python API


def test_python_api_mistakes_are_one_line_each(trained, tmp_path):
  import hw8jax

  with pytest.raises(UserError, match="arg 1: give a string"):
    hw8jax.get_config("fcn_crops", 1)
  with pytest.raises(UserError, match="workdir=None: give the path of a folder"):
    hw8jax.run(hw8jax.get_config("ta_fcn", "quick"), None)
  with pytest.raises(UserError, match="config: a list; give a ConfigDict"):
    hw8jax.run([], str(tmp_path / "w"))
  with pytest.raises(UserError, match="workdir=None: give the path of a trained workdir"):
    hw8jax.load(None)
  det = hw8jax.load(trained)
  assert det.reconstruct(np.zeros((0, 64, 64, 3), np.uint8)).shape == (0, 64, 64, 3)
  assert det.score(np.zeros((0, 64, 64, 3), np.uint8)).shape == (0,)
  with pytest.raises(UserError, match=r"images: shape \(40, 64, 64\) dtype uint8"):
    det.score(np.zeros((40, 64, 64), np.uint8))
  assert det.score(np.zeros((64, 64, 3), np.uint8)).shape == (1,)


def test_run_takes_a_plain_dict_of_the_config(data_dir, tmp_path):
  """hw8jax.run(cfg.to_dict(), W) runs as hw8jax.run(cfg, W)."""
  import hw8jax

  cfg = hw8jax.get_config("ta_vae", "quick")
  cfg.model, cfg.data.dir, cfg.data.test_labels = "tiny", data_dir, ""
  cfg.batch_size, cfg.max_steps, cfg.score.batch_size = 8, 2, 8
  assert hw8jax.run(cfg.to_dict(), str(tmp_path / "w")) is None  # no labels: no eval record
  assert os.path.exists(tmp_path / "w" / "submission.csv")


def test_loading_a_workdir_while_it_trains(data_dir, tmp_path):
  """hw8jax.load in a loop beside a training run that saves every step and keeps one latest
  checkpoint (so it deletes the one before as each is saved): every load returns a model or,
  before the first checkpoint, says to train first; none says the workdir is damaged."""
  import hw8jax

  from conftest import launch

  workdir = str(tmp_path / "w")
  run = launch(f"--workdir={workdir}", "--mode=train", f"--config.data.dir={data_dir}",
               "--config.batch_size=8", "--config.max_steps=12",
               "--config.checkpoint.every_steps=1", "--config.checkpoint.keep=1",
               "--config.log_every_seconds=0")
  loaded, waited = [], 0
  try:
    while run.poll() is None:
      try:
        loaded.append(hw8jax.load(workdir).step)
      except UserError as e:
        assert "train first" in str(e) or "no config.json" in str(e), str(e)
        waited += 1
  finally:
    out = run.communicate(timeout=120)[0]
  assert run.returncode == 0, out
  assert len(loaded) >= 3 and loaded == sorted(loaded), (loaded, waited)


def test_the_same_run_on_the_same_machine_gives_the_same_digits(trained, data_dir, tmp_path,
                                                                launch_here):
  """What the README's demo figures can promise: on one machine a run gives the same scores
  twice, to the last digit (another processor may not: XLA's CPU code differs)."""
  workdir = str(tmp_path / "again")
  assert launch_here(f"--workdir={workdir}", f"--config.data.dir={data_dir}", *TINY).returncode \
      == 0
  for name in ("submission.csv", "predictions.csv", "threshold.json"):
    assert open(os.path.join(workdir, name)).read() == open(os.path.join(trained, name)).read()
