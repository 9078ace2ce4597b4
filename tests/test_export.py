"""Export: a workdir's model as its PyTorch original's state_dict (safetensors), and back.

Tolerances: the original in eval mode reconstructs as hw8jax's model does to 1e-4 absolute
(outputs in [-1, 1]; float32 rounding of two implementations); the round trip through
`init_from` is exact: the same weights bit for bit, so the same scores bit for bit.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hw8jax import export as export_lib
from hw8jax import models
from hw8jax.errors import UserError
from hw8jax.score import score_images

from conftest import images, nchw, nhwc, require_torch


def _moved(variant: str, seed: int):
  """An assembled model of `variant` with fresh weights, its BatchNorm scales, statistics and
  PReLU slopes moved from their constant initial values as test_parity moves PyTorch's (so the
  export of each is tested), and its biases moved a little (BatchNorm's start at zero)."""
  from hw8jax.assemble import assemble
  from hw8jax.configs import default
  from hw8jax.plan import plan

  model = assemble(plan(default.for_model(variant)), key=jax.random.key(seed))
  rng = np.random.default_rng(seed)
  moves = {"scale": lambda n: 0.5 + rng.random(n), "var": lambda n: 0.5 + rng.random(n),
           "mean": lambda n: 0.1 * rng.standard_normal(n),
           "negative_slope": lambda n: 0.1 + 0.3 * rng.random(n)}

  def move(path, a):
    name = str(getattr(path[-1], "key", path[-1]))
    if name in moves:
      return jnp.asarray(moves[name](a.shape), a.dtype)
    if name == "bias":
      return a + jnp.asarray(0.01 * rng.standard_normal(a.shape), a.dtype)
    return a

  params, stats = (jax.tree_util.tree_map_with_path(move, t) for t in model.state)
  return dataclasses.replace(model, params=params, batch_stats=stats, step=17)


@pytest.mark.parametrize("variant", models.VARIANTS)
def test_the_export_loads_strictly_into_the_original_and_back_into_hw8jax(variant, seed,
                                                                         tmp_path):
  """Into the original's class (tests/torch_reference.py, not hw8jax code), strictly, and it
  reconstructs as hw8jax's model does; back through `init_from`, the same weights bit for bit
  (and so the same scores, shown for a conv and an FCN variant)."""
  torch = require_torch()
  import safetensors
  import safetensors.torch

  from hw8jax.assemble import assemble
  from hw8jax.configs import default
  from hw8jax.plan import plan

  import torch_reference

  model = _moved(variant, seed)
  path = export_lib.write_safetensors(model, str(tmp_path / f"{variant}.safetensors"))
  ref = torch_reference.BUILDERS[variant]()
  ref.load_state_dict(safetensors.torch.load_file(path), strict=True)
  ref.eval()
  x = images(np.random.default_rng(seed), 4)
  with torch.no_grad():
    want = nhwc(ref(nchw(torch, x))[0])
  got = jax.jit(lambda s, x: nnx.merge(model.eval_def, *s)(x)[0])(model.state, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
  meta = safetensors.safe_open(path, "np").metadata()
  assert meta["format"] == "pt" and meta["model"] == variant and meta["step"] == "17"
  assert len(meta["config_sha256"]) == 64

  c = default.for_model(variant)
  c.init_from = path
  back = assemble(plan(c), "init")
  for a, b in zip(jax.tree.leaves(model.state), jax.tree.leaves(back.state), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  if variant in ("ta_cnn", "fcn_medium"):
    x = ((x + 1) * 127.5).astype(np.uint8)
    kwargs = dict(batch_size=8, key=model.plan.keys["score"])
    np.testing.assert_array_equal(score_images(model.scorer, model.state, x, **kwargs),
                                  score_images(back.scorer, back.state, x, **kwargs))


def test_export_mistakes_are_one_line_and_write_nothing(tmp_path, capsys):
  out = tmp_path / "m.safetensors"
  cases = [
      ([str(tmp_path / "nowhere"), f"--out={out}"], "no config.json of a training run"),
      ([str(tmp_path), f"--out={out}", "--format=onnx"], "format='onnx': use one of"),
      ([str(tmp_path), f"--out={tmp_path}"], "is a folder"),
      ([str(tmp_path), f"--out={tmp_path / 'no' / 'm.safetensors'}"], "does not exist"),
  ]
  for argv, fragment in cases:
    capsys.readouterr()
    assert export_lib.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err and err.count("\n") == 1, err
  out.write_bytes(b"mine")
  assert export_lib.main([str(tmp_path), f"--out={out}"]) == 1
  assert "exists; pass --overwrite" in capsys.readouterr().err
  assert out.read_bytes() == b"mine"
  assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def test_a_safetensors_init_from_that_does_not_fit_names_the_key(tmp_path):
  import safetensors.numpy

  from hw8jax.torch_import import load_torch_weights

  model = _moved("ta_fcn", 3)
  path = export_lib.write_safetensors(model, str(tmp_path / "ok.safetensors"))
  tensors = safetensors.numpy.load_file(path)
  bad = dict(tensors, **{"encoder.0.weight": tensors["encoder.0.weight"].astype(np.int32)})
  safetensors.numpy.save_file(bad, str(tmp_path / "dtype.safetensors"))
  with pytest.raises(UserError, match=r"dtype of encoder\.0\.weight: int32, model needs floating"):
    load_torch_weights("ta_fcn", str(tmp_path / "dtype.safetensors"))
  bad = dict(tensors, **{"encoder.0.weight": tensors["encoder.0.weight"][:, :10]})
  safetensors.numpy.save_file(bad, str(tmp_path / "shape.safetensors"))
  with pytest.raises(UserError, match=r"shape of encoder\.0\.weight: got \(128, 10\)"):
    load_torch_weights("ta_fcn", str(tmp_path / "shape.safetensors"))
  (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
  with pytest.raises(UserError, match=r"junk\.safetensors: not a readable safetensors file"):
    load_torch_weights("ta_fcn", str(tmp_path / "junk.safetensors"))


def test_export_from_the_command_line_then_init_from_scores_as_the_workdir_did(tmp_path,
                                                                                launch_here,
                                                                                capsys):
  from hw8jax.data.demo import make_synthetic

  data = tmp_path / "data"
  make_synthetic(data, num_train=16, num_test=8, seed=4)
  tiny = [f"--config.data.dir={data}", "--config.batch_size=8", "--config.max_steps=4",
          "--config.log_every_seconds=0", "--config.score.batch_size=8", "--config.figures=false"]
  trained, again = tmp_path / "trained", tmp_path / "again"
  assert launch_here(f"--workdir={trained}", *tiny).returncode == 0
  out = tmp_path / "tiny.safetensors"
  capsys.readouterr()
  assert export_lib.main([str(trained), f"--out={out}"]) == 0
  assert capsys.readouterr().out == f"wrote {out}\n"
  scored = launch_here(f"--workdir={again}", *tiny, f"--config.init_from={out}", "--mode=score")
  assert scored.returncode == 0, scored.stderr
  assert (again / "submission.csv").read_text() == (trained / "submission.csv").read_text()
  assert export_lib.main([str(trained), f"--out={out}", "--overwrite"]) == 0


CALL_WITH_JAX_ONLY = """
import sys
sys.modules["hw8jax"] = None  # neither can be imported here: the file must need jax only
sys.modules["flax"] = None
import numpy as np
from jax import export
exported = export.deserialize(bytearray(open(sys.argv[1], "rb").read()))
test = np.load(sys.argv[2])
for n in (3, len(test)):  # B is symbolic: two batch sizes, one file
  print(" ".join(repr(float(s)) for s in exported.call(test[:n], np.arange(n, dtype=np.int32))))
"""


@pytest.mark.parametrize("recipe", ["ta_fcn.py:quick", "ta_vae.py:quick"],
                         ids=["deterministic", "sampled"])
def test_the_stablehlo_scorer_runs_with_jax_alone_and_gives_the_submissions_scores(
    tmp_path, launch_here, recipe):
  """Scores to 1e-6 relative: the run's scorer compiled with hw8jax's CPU options, the exported
  program with XLA's defaults, so float sums may round differently (measured: 2e-7)."""
  import subprocess
  import sys

  from hw8jax.data.demo import make_synthetic

  data = tmp_path / "data"
  make_synthetic(data, num_train=16, num_test=8, seed=5)
  workdir = tmp_path / "w"
  assert launch_here(f"--workdir={workdir}", f"--config.data.dir={data}",
                     "--config.batch_size=8", "--config.max_steps=4", "--config.figures=false",
                     "--config.log_every_seconds=0", config=recipe, tiny=False).returncode == 0
  out = tmp_path / "scorer.stablehlo"
  assert export_lib.main([str(workdir), f"--out={out}", "--format=stablehlo"]) == 0
  result = subprocess.run([sys.executable, "-c", CALL_WITH_JAX_ONLY, str(out),
                           str(data / "testingset.npy")], capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr
  want = np.loadtxt(workdir / "submission.csv", delimiter=",", skiprows=1)[:, 1]
  few, every = ([float(v) for v in line.split()] for line in result.stdout.splitlines())
  np.testing.assert_allclose(few, want[:3], rtol=1e-6)
  np.testing.assert_allclose(every, want, rtol=1e-6)
