"""Training's pipeline on the tiny variant: a finished run is not retrained, resume past a best
checkpoint, the NaN stop, SIGTERM and SIGKILL then an exact resume, bfloat16 compute.
(Every variant's quick run: test_train_variants.py; against PyTorch: test_train_vs_torch.py.)"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import shutil
import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from hw8jax.data.demo import make_synthetic
from hw8jax.main import run

from conftest import latest_step, launch, quick_config


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("synthetic")
  make_synthetic(d, num_train=64, num_test=20, seed=0)
  return str(d)


def test_rerun_on_a_finished_workdir_does_not_retrain(synthetic_dir, tmp_path, capsys):
  c = quick_config("tiny", synthetic_dir)
  workdir = str(tmp_path / "w")
  run(c, workdir, "train")
  ckpt = os.path.join(workdir, "checkpoints", "latest", "20")
  before = os.path.getmtime(ckpt)
  metrics_before = open(os.path.join(workdir, "metrics.jsonl")).read()
  capsys.readouterr()
  run(c, workdir, "train_and_score")
  assert "training already finished (20 steps); not retraining" in capsys.readouterr().out
  assert os.path.getmtime(ckpt) == before
  assert open(os.path.join(workdir, "metrics.jsonl")).read() == metrics_before
  # Trained nothing, so it is recorded as the scoring it did (one record a run).
  assert sorted(os.listdir(os.path.join(workdir, "runs"))) == ["001-train.json", "002-score.json"]


def test_resume_past_a_best_checkpoint_the_killed_run_wrote(synthetic_dir, tmp_path):
  """A run killed after saving a best checkpoint but before the next latest one: the resumed
  run reaches that step again, replaces the best checkpoint and ends as an uninterrupted run.
  (The SIGKILL test hits this only when the kill lands in that window; this makes it certain.)"""
  c = quick_config("tiny", synthetic_dir, labels="")  # best by the falling training loss
  c.checkpoint.keep = 2  # latest at 10 and 20
  full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
  run(c, full, "train")
  run(c, cut, "train")
  shutil.rmtree(os.path.join(cut, "checkpoints", "latest", "20"))
  best_steps = os.listdir(os.path.join(cut, "checkpoints", "best"))
  assert [int(x) for x in best_steps if x.isdigit()][0] > 10  # loss falls: epoch 3, 4 or 5
  run(c, cut, "train")
  (step_a, a), (step_b, b) = _restore_params(full), _restore_params(cut)
  assert step_a == step_b == 20
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_nan_loss_stops_with_a_clear_message(synthetic_dir, tmp_path):
  c = quick_config("tiny", synthetic_dir)
  c.optimizer.learning_rate = 1e30
  from hw8jax.errors import UserError

  with pytest.raises(UserError, match=r"training stopped: the loss became nan by step \d+; "
                                      r"no checkpoint was written"):
    run(c, str(tmp_path / "w"), "train")


def _restore_params(workdir):
  m = ocp.CheckpointManager(os.path.join(workdir, "checkpoints", "latest"))
  try:
    step = m.latest_step()
    restored = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  finally:
    m.close()
  return step, restored["state"]


def _flags(workdir, data_dir) -> list:
  return [f"--workdir={workdir}", "--mode=train", f"--config.data.dir={data_dir}",
          "--config.batch_size=8", f"--config.max_steps={KILL_RUN_STEPS}",
          "--config.checkpoint.every_steps=7", "--config.seed=7", "--config.figures=false"]


def _launch(workdir, data_dir, env=None):
  # The session's compilation cache (conftest): later launches load the programs an earlier one
  # (or this process) compiled instead of compiling them (the same programs, the same results).
  return launch(*_flags(workdir, data_dir), env=env)


# 8 steps an epoch and a checkpoint every 7 steps: every checkpoint before the last is mid-epoch.
KILL_RUN_STEPS = 50


def _wait_for_checkpoint(p, workdir, at_least):
  latest = os.path.join(workdir, "checkpoints", "latest")
  deadline = time.time() + 300
  while time.time() < deadline and p.poll() is None:
    done = [int(d) for d in os.listdir(latest) if d.isdigit()] if os.path.isdir(latest) else []
    if done and max(done) >= at_least:
      return
    time.sleep(0.02)
  assert p.poll() is None, "finished before it could be stopped:\n" + p.communicate()[0]


def test_sigterm_then_sigkill_mid_epoch_then_resume_is_bit_identical(synthetic_dir, tmp_path,
                                                                     launch_here):
  """The tiny variant (BatchNorm, PReLU, VAE noise; 8 steps an epoch), launched through
  launch.py: stopped by SIGTERM once training is under way (it saves the step it is at and
  exits 143 with one line), resumed there, then killed by SIGKILL after its step-28 or later
  checkpoint, mid-epoch, and restarted: it ends bit-identical to an uninterrupted run (the same
  command, run in this process: one JAX start-up fewer). launch.py freezes the libraries'
  objects out of the garbage collector's reach in its own process, never in a caller's."""
  whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
  frozen = gc.get_freeze_count()
  done = launch_here(*_flags(whole, synthetic_dir))
  assert done.returncode == 0, done.stderr
  assert gc.get_freeze_count() == frozen

  p = _launch(killed, synthetic_dir)
  _wait_for_checkpoint(p, killed, 7)
  os.kill(p.pid, signal.SIGTERM)
  out = p.communicate(timeout=120)[0]
  assert p.returncode == 143, out
  last = out.strip().splitlines()[-1]
  stopped_at = int(last.split()[5])
  assert last == (f"stopped by SIGTERM at step {stopped_at} of {KILL_RUN_STEPS}; a checkpoint "
                  f"of step {stopped_at} is saved; run the same command to resume"), out
  assert latest_step(killed) == stopped_at

  p = _launch(killed, synthetic_dir)
  _wait_for_checkpoint(p, killed, 28)
  os.kill(p.pid, signal.SIGKILL)
  out = p.communicate()[0]
  assert f"resumed from step {stopped_at} of {KILL_RUN_STEPS}" in out
  killed_at = latest_step(killed)
  assert killed_at is not None and killed_at < KILL_RUN_STEPS and killed_at % 8 != 0, killed_at

  p = _launch(killed, synthetic_dir, env={"HW8JAX_TEST_SAY_FROZEN": "1"})
  out = p.communicate(timeout=600)[0]
  assert p.returncode == 0, out
  assert f"resumed from step {killed_at} of {KILL_RUN_STEPS}" in out
  frozen_at_exit = re.search(r"frozen at exit: (\d+)", out)
  assert frozen_at_exit and int(frozen_at_exit.group(1)) > 100_000, out

  step_a, a = _restore_params(whole)
  step_b, b = _restore_params(killed)
  assert step_a == step_b == KILL_RUN_STEPS
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  metrics = [json.loads(x) for x in open(os.path.join(killed, "metrics.jsonl"))]
  steps = [r["step"] for r in metrics if "loss" in r]
  assert steps == sorted(steps) and len(steps) == len(set(steps))


def test_bfloat16_compute_keeps_float32_state(synthetic_dir, tmp_path):
  """Mixed precision: bf16 compute trains (finite losses close to float32's) while params,
  BatchNorm statistics and the optimiser state stay float32 in the checkpoint."""
  losses = {}
  for dtype in ("float32", "bfloat16"):
    c = quick_config("tiny", synthetic_dir)
    c.compute_dtype = dtype
    c.max_steps = 4
    c.log_every_seconds = 0.0
    c.data.test_labels = ""
    workdir = str(tmp_path / dtype)
    run(c, workdir, "train")
    losses[dtype] = [json.loads(x)["loss"] for x in open(os.path.join(workdir, "metrics.jsonl"))
                     if '"loss"' in x]
  assert len(losses["bfloat16"]) == 4 and all(math.isfinite(v) for v in losses["bfloat16"])
  np.testing.assert_allclose(losses["bfloat16"][0], losses["float32"][0], rtol=2e-2)
  m = ocp.CheckpointManager(os.path.join(str(tmp_path / "bfloat16"), "checkpoints", "latest"))
  try:
    meta = m.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  finally:
    m.close()
  dtypes = {np.asarray(x).dtype for x in jax.tree.leaves(
      (meta["params"], meta["batch_stats"], meta["opt_state"])) if np.asarray(x).ndim > 0}
  assert dtypes == {np.dtype(np.float32)}


@pytest.mark.parametrize("every_minutes,latest_saves", [(0.0, 1), (1e-9, 8)])
def test_checkpoints_are_written_as_often_as_their_cadence_says(synthetic_dir, tmp_path,
                                                                monkeypatch, every_minutes,
                                                                latest_saves):
  """Step cadence off: with the time cadence off only the last step is saved; with a cadence
  shorter than a step, every step. The best checkpoint (an improved epoch) is written only with
  a latest one, never more often, and holds the best epoch's step."""
  from hw8jax import checkpoint

  saves, real = [], checkpoint.save

  def counted(mngr, step, *args, **kwargs):
    saves.append((os.path.basename(str(mngr.directory)), step))
    return real(mngr, step, *args, **kwargs)

  monkeypatch.setattr(checkpoint, "save", counted)
  c = quick_config("tiny", synthetic_dir, labels="")  # best by the epoch's training loss
  c.checkpoint.every_steps, c.checkpoint.every_minutes = 0, every_minutes
  c.max_steps = 8  # two epochs of 4 steps
  workdir = str(tmp_path / "w")
  run(c, workdir, "train")
  latest = [step for which, step in saves if which == "latest"]
  best = [step for which, step in saves if which == "best"]
  assert len(latest) == latest_saves and latest[-1] == 8
  assert 1 <= len(best) <= len(latest) and all(step % 4 == 0 for step in best)  # epoch ends
  on_disk = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints", "best"))
             if d.isdigit()]
  assert on_disk == [best[-1]]
