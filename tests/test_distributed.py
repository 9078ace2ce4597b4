"""Data parallelism: 8 simulated CPU devices and 2 local processes against 1 device.

Runs start in subprocesses because the device count and jax.distributed must be set before jax
initialises. The same short fcn_boss run must give the same losses (1e-5 relative) at every step
and the same parameters (1e-6 absolute) after 6 steps: the sharded forward pass with
cross-device BatchNorm statistics, the gradient all-reduce and the updates agree.

The runs use SGD. With Adam they agree to about 1e-6 for a step or two and then drift (seen: 1e-4
in the third loss, parameters up to about lr per step): cross-device sums add in another order,
and Adam divides each gradient by its own magnitude, so rounding-level differences of gradients
that are near zero (a bias before BatchNorm, whose exact gradient is 0) become full-size updates
of either sign. That is Adam amplifying rounding, not a data-parallel difference.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from hw8jax import report
from hw8jax.data.demo import make_synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Workdirs of the same short fcn_boss run on 1 device, 8 devices and 2 processes."""
  root = tmp_path_factory.mktemp("dist")
  labels = make_synthetic(root / "data", num_train=64, num_test=13, seed=2)
  common = [f"--config={REPO}/configs/fcn_boss.py:quick", "--mode=train",
            f"--config.data.dir={root / 'data'}", f"--config.max_steps={STEPS}",
            "--config.log_every_seconds=0", "--config.seed=3", "--config.schedule.name=constant",
            "--config.optimizer.name=sgd", "--config.optimizer.learning_rate=0.01"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  launch = [sys.executable, os.path.join(REPO, "launch.py")]
  procs = {
      "one": subprocess.Popen([*launch, *common, f"--workdir={root / 'one'}"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
      "eight": subprocess.Popen(
          [*launch, *common, f"--workdir={root / 'eight'}"],
          env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8"),
          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
  }
  for name, p in procs.items():
    out = p.communicate(timeout=900)[0]
    assert p.returncode == 0, f"{name}:\n{out}"
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  two = [subprocess.Popen(
      [*launch, *common, f"--workdir={root / 'two'}",
       f"--config.coordinator_address=127.0.0.1:{port}", "--config.num_processes=2",
       f"--config.process_id={i}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(2)]
  for i, p in enumerate(two):
    out = p.communicate(timeout=900)[0]
    assert p.returncode == 0, f"process {i}:\n{out}"
  yield root, labels
  shutil.rmtree(root)  # three fcn_boss workdirs: free the disk before the next module


def _losses(workdir):
  rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
  return np.array([r["loss"] for r in rows if "loss" in r])


def _params(workdir):
  """Params, restored onto this process's one device."""
  from hw8jax import config as config_lib
  from hw8jax.main import restore_model_state
  from hw8jax.train import make_mesh

  _, (params, _), step = restore_model_state(config_lib.base_config("fcn_boss"),
                                             str(workdir), "latest", make_mesh())
  assert step == STEPS
  return jax.tree.leaves(params)


@pytest.mark.parametrize("name", ["eight", "two"])
def test_data_parallel_run_matches_one_device(runs, name):
  root, _ = runs
  one, other = _losses(root / "one"), _losses(root / name)
  assert len(one) == len(other) == STEPS
  np.testing.assert_allclose(other, one, rtol=1e-5)
  a, b = _params(root / "one"), _params(root / name)
  assert len(a) == len(b) == 44  # 10 Linear, 8 BatchNorm (2 each), 8 PReLU
  for x, y in zip(a, b, strict=True):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=1e-6)


def test_checkpoint_from_8_devices_scores_on_1(runs):
  """The 8-device checkpoint scored on 8 devices (subprocess) and on this process's 1 device
  gives the same scores, and they match the 1-device run's."""
  from hw8jax import config as config_lib
  from hw8jax.main import run

  root, labels = runs
  assert jax.device_count() == 1
  score_args = [f"--config.data.dir={root / 'data'}", f"--config.data.test_labels={labels}",
                "--config.score.batch_size=8", "--mode=score"]
  p = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch.py"),
       f"--config={REPO}/configs/fcn_boss.py:quick", f"--workdir={root / 'eight'}",
       *score_args], capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  assert p.returncode == 0, p.stdout + p.stderr
  on_eight = report.read_submission(str(root / "eight" / "submission.csv"))
  record = {}
  for name in ("one", "eight"):
    c = config_lib.apply_arg(config_lib.base_config("fcn_boss"), "quick")
    c.data.dir, c.data.test_labels, c.data.transform = str(root / "data"), labels, "crop"
    c.score.batch_size = 8
    record[name] = run(c, str(root / name), "score")
  on_one = report.read_submission(str(root / "eight" / "submission.csv"))
  assert len(on_one) == 13
  np.testing.assert_allclose(on_one, on_eight, rtol=1e-5)
  one_device_run = report.read_submission(str(root / "one" / "submission.csv"))
  np.testing.assert_allclose(on_one, one_device_run, rtol=1e-4)
  assert record["eight"]["auc"] == pytest.approx(record["one"]["auc"], abs=1e-6)
