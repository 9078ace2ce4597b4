"""The Python API (hw8jax.get_config / run / load) from a wheel installed outside the checkout,
as a notebook on Colab or Kaggle meets it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from hw8jax.data.demo import make_synthetic
from hw8jax.errors import UserError

from conftest import CONFIGS, REPO

# Every config file and the args it takes (fcn_crops: a crop index, optionally ",quick").
ARGS = {"fcn_crops": ["0", "1", "2", "1,quick"]}
PLAIN_ARGS = [None, "quick", "demo"]

SCRIPT = """
import importlib.util, json, os, sys
import numpy as np
import hw8jax
from hw8jax import report

target, configs, data_dir, workdir = sys.argv[1:5]
args = json.loads(sys.argv[5])
assert hw8jax.__file__.startswith(target), hw8jax.__file__  # the wheel, not the checkout

checked = 0
# default.py is the base each recipe edits, not a recipe of its own.
for name in sorted(n for n in os.listdir(configs) if n.endswith(".py") and n[0] != "_"
                   and n != "default.py"):
  spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(configs, name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for arg in args.get(name[:-3], args["*"]):
    from_file = module.get_config() if arg is None else module.get_config(arg)
    assert from_file.to_dict() == hw8jax.get_config(name[:-3], arg).to_dict(), (name, arg)
    checked += 1

cfg = hw8jax.get_config("ta_fcn", "quick")
cfg.data.dir = data_dir
cfg.data.test_labels = os.path.join(data_dir, "testing_labels.npy")
cfg.batch_size, cfg.max_steps, cfg.score.batch_size = 8, 4, 5
record = hw8jax.run(cfg, workdir)
test = np.load(os.path.join(data_dir, "testingset.npy"))
for which in ("latest", "best"):
  det = hw8jax.load(workdir, which)
  scores = det.score(test)
  assert scores.dtype == np.float32 and scores.shape == (len(test),)
  if which == "latest":
    written = report.read_submission(os.path.join(workdir, "submission.csv"))
    assert np.array_equal(scores, written.astype(np.float32)), (scores, written)
# Where the scores come from, and how sure, from the installed package.
latest = hw8jax.load(workdir)
maps, scores = latest.anomaly_map(test), latest.score(test)
assert maps.shape == (len(test), 64, 64) and maps.dtype == np.float32 and (maps >= 0).all()
assert np.allclose(np.sqrt(maps.sum((1, 2))), scores, rtol=1e-4), (maps.sum((1, 2)), scores)
rows = np.loadtxt(os.path.join(workdir, "predictions.csv"), delimiter=",", skiprows=1)
assert np.allclose(latest.p_values(test), rows[:, 3], rtol=1e-8)
recon = det.reconstruct(test[:3])
assert recon.shape == (3, 64, 64, 3) and recon.dtype == np.float32
assert np.abs(recon).max() <= 1.0

# PyOD's way: fit on arrays in memory, then threshold and predict as the workdir's files say.
import io, json, contextlib
train = np.load(os.path.join(data_dir, "trainingset.npy"))
recipe = dict(cfg.to_dict(), max_steps=2, figures=False)
fitted = os.path.join(os.path.dirname(workdir), "fitted")
first = hw8jax.fit(train, recipe, fitted, test_images=test)
assert first.step == 2 and first.threshold == json.load(open(os.path.join(
    fitted, "threshold.json")))["threshold"]
with open(os.path.join(fitted, "predictions.csv")) as f:
  written = np.array([int(line.split(",")[2]) for line in list(f)[1:]])
assert np.array_equal(first.predict(test), written)
assert np.array_equal(written, (report.read_submission(os.path.join(
    fitted, "submission.csv")).astype(np.float32) > first.threshold).astype(int))
out = io.StringIO()
with contextlib.redirect_stdout(out):  # a second fit resumes where the first stopped
  second = hw8jax.fit(train, dict(recipe, max_steps=4, allow_changes="max_steps"), fitted,
                      test_images=test)
assert "resumed from step 2 of 4" in out.getvalue() and second.step == 4, out.getvalue()
print("checked", checked, "auc", record["auc"], "best step", det.step)
"""


def test_the_api_from_a_wheel_installed_outside_the_checkout(tmp_path):
  """Recipes from the package equal the config files for every variant and arg; a run from
  Python writes the workdir launch.py would; `load` scores equal to submission.csv."""
  source = tmp_path / "source"  # a copy: building in the checkout would write into it
  source.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(REPO, name), source)
  for folder in ("hw8jax", "configs"):
    shutil.copytree(os.path.join(REPO, folder), source / folder,
                    ignore=shutil.ignore_patterns("__pycache__"))
  pip = [sys.executable, "-m", "pip", "-q"]
  subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w",
                  str(tmp_path / "dist"), str(source)], check=True)
  wheel = next((tmp_path / "dist").glob("hw8jax-*.whl"))
  target = tmp_path / "site"
  subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
                 check=True)
  data_dir = tmp_path / "data"
  make_synthetic(data_dir, num_train=16, num_test=11, seed=5)
  elsewhere = tmp_path / "notebook"
  elsewhere.mkdir()
  args = {**ARGS, "*": PLAIN_ARGS}
  import json

  result = subprocess.run(
      [sys.executable, "-c", SCRIPT, str(target), CONFIGS, str(data_dir),
       str(elsewhere / "run"), json.dumps(args)],
      cwd=elsewhere, capture_output=True, text=True, timeout=600,
      env={**os.environ, "PYTHONPATH": str(target)})
  assert result.returncode == 0, result.stdout + result.stderr
  last = result.stdout.strip().splitlines()[-1]
  assert last.startswith(f"checked {8 * len(PLAIN_ARGS) + len(ARGS['fcn_crops'])} auc "), last
  assert int(last.split()[-1]) in (2, 4)  # best: an epoch end (2 steps an epoch)


def test_api_mistakes_are_one_line(tmp_path):
  import hw8jax

  with pytest.raises(UserError, match="recipe 'fcn_huge': use one of fcn_boss, fcn_crops, "):
    hw8jax.get_config("fcn_huge")
  with pytest.raises(UserError, match=r"no config.json of a training run; train first"):
    hw8jax.load(str(tmp_path))
  data_dir = tmp_path / "data"
  make_synthetic(data_dir, num_train=16, num_test=4, seed=1)
  cfg = hw8jax.get_config("ta_fcn", "quick")
  cfg.data.dir, cfg.batch_size, cfg.max_steps = str(data_dir), 8, 2
  hw8jax.run(cfg, str(tmp_path / "w"), "train")
  det = hw8jax.load(str(tmp_path / "w"))
  with pytest.raises(UserError, match=r"images: shape \(2, 64, 64, 3\) dtype float32; expected"):
    det.score(np.zeros((2, 64, 64, 3), np.float32))
  assert det.score(np.zeros((64, 64, 3), np.uint8)).shape == (1,)
  # A workdir written before data.val_fraction existed loads with that key's default.
  import json

  for path in [tmp_path / "w" / "config.json", *(tmp_path / "w" / "runs").glob("*.json")]:
    record = json.loads(path.read_text())
    del record["data"]["val_fraction"]
    path.write_text(json.dumps(record))
  old = hw8jax.load(str(tmp_path / "w"))
  assert old.config.data.val_fraction == 0.0 and old.config.batch_size == 8
  np.testing.assert_array_equal(old.score(np.zeros((2, 64, 64, 3), np.uint8)),
                                det.score(np.zeros((2, 64, 64, 3), np.uint8)))
