"""PyTorch files as the originals write them: whole models pickled from a notebook (classes in
`__main__`), read without running anything in them; pickles that ask for more are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from hw8jax import models, report
from hw8jax.data.demo import make_synthetic
from hw8jax.torch_import import load_state_dict
from hw8jax.torch_pickle import UnsafePickleError

from conftest import TESTS, cli, quick_config, require_torch

# Run as `python -c` so that every class the file pickles is `__main__.<name>`, as a notebook's.
WRITE_WHOLE_MODELS = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    exec(open(sys.argv[1]).read())  # the originals' classes, defined in __main__
    out, seed = sys.argv[2], int(sys.argv[3])
    x = np.random.default_rng(seed).uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
    np.save(f"{out}/x.npy", x)
    for name, build in BUILDERS.items():
        torch.manual_seed(seed)
        model = build()
        with torch.no_grad():  # BatchNorm statistics and PReLU slopes as after training
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.running_mean.normal_(0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.1)
                elif isinstance(m, torch.nn.PReLU):
                    m.weight.uniform_(0.1, 0.4)
        model.eval()
        assert type(model).__module__ == "__main__"
        with torch.no_grad():
            np.save(f"{out}/{name}_recon.npy", model(torch.from_numpy(x))[0].numpy())
        if name == "fcn_medium":  # the sample code's score of each test image: sqrt(SSE)
            test = np.load(f"{sys.argv[4]}/testingset.npy").transpose(0, 3, 1, 2)
            t = torch.from_numpy(2.0 * test.astype(np.float32) / 255.0 - 1.0)
            with torch.no_grad():
                err = (model(t)[0] - t).pow(2).sum(dim=(1, 2, 3)).sqrt()
            np.save(f"{out}/{name}_scores.npy", err.numpy())
        torch.save(model, f"{out}/last_model_{name}.pt")
        del model
""")


@pytest.fixture(scope="module")
def whole_model_files(tmp_path_factory):
  require_torch()
  out = tmp_path_factory.mktemp("whole_models")
  make_synthetic(out / "data", num_train=8, num_test=11, seed=4)
  seed = int(os.environ.get("HW8JAX_TEST_SEED", int.from_bytes(os.urandom(3), "little")))
  r = subprocess.run([sys.executable, "-c", WRITE_WHOLE_MODELS,
                      os.path.join(TESTS, "torch_reference.py"), str(out), str(seed),
                      str(out / "data")], capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr
  return out, seed


@pytest.mark.parametrize("variant", models.VARIANTS)
def test_whole_model_saved_from_a_notebook_loads_without_its_classes(variant,
                                                                      whole_model_files):
  """This process has no `__main__.<class>` of the originals: the file is read with inert
  stand-ins, and the imported model's eval output matches the original's within 1e-5."""
  out, seed = whole_model_files
  print(f"seed={seed}")
  import __main__

  path = out / f"last_model_{variant}.pt"
  model = nnx.eval_shape(lambda: models.build(variant, rngs=nnx.Rngs(0)))
  load_state_dict(model, path)
  model.eval()
  x = np.load(out / "x.npy").transpose(0, 2, 3, 1)
  got = nnx.jit(lambda m, x: m(x)[0])(model, jnp.asarray(x))
  want = np.load(out / f"{variant}_recon.npy").transpose(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
  assert not hasattr(__main__, "FCN") and not hasattr(__main__, "ResNetAE")


def test_launch_scores_a_pytorch_trained_file(whole_model_files, tmp_path):
  """`--mode=score --config.init_from=FILE.pt` on a fresh workdir scores the original's weights
  with hw8jax's scorer: the submission equals the PyTorch model's own sqrt-SSE scores (1e-4
  relative), and the workdir's outputs say where the weights came from."""
  out, seed = whole_model_files
  print(f"seed={seed}")
  path = out / "last_model_fcn_medium.pt"
  r = cli(f"--workdir={tmp_path / 'w'}", "--mode=score", f"--config.init_from={path}",
          f"--config.data.dir={out / 'data'}", config="fcn_medium.py", tiny=False)
  assert r.returncode == 0, r.stderr
  assert f"from the PyTorch weights in {path}" in r.stdout
  got = report.read_submission(str(tmp_path / "w" / "submission.csv"))
  want = np.load(out / "fcn_medium_scores.npy")
  assert got.shape == want.shape == (11,)
  np.testing.assert_allclose(got, want, rtol=1e-4)
  config = json.load(open(tmp_path / "w" / "runs" / "001-score.json"))
  assert config["init_from"] == str(path)
  assert not (tmp_path / "w" / "config.json").exists()  # the record of training: none here


def test_training_starts_from_a_pytorch_file(whole_model_files, tmp_path):
  """`init_from` with training: a run at a rate too small to move a float32 weight (a rate
  must be > 0) checkpoints the file's weights. Exactly, except where a weight is exactly 0
  (PyTorch's uniform init hits 0 with probability 2**-24 per weight: about one run in ten
  here), which the rate moves by about 1e-35."""
  from hw8jax.main import run

  out, _ = whole_model_files
  c = quick_config("ta_fcn", str(out / "data"), labels="")
  c.init_from = str(out / "last_model_ta_fcn.pt")
  c.batch_size, c.max_steps = 4, 2
  c.optimizer.name, c.optimizer.learning_rate = "sgd", 1e-30
  run(c, str(tmp_path / "w"), "train")
  want = nnx.eval_shape(lambda: models.build("ta_fcn", rngs=nnx.Rngs(0)))
  load_state_dict(want, c.init_from)
  with ocp.CheckpointManager(tmp_path / "w" / "checkpoints" / "latest") as m:
    saved = m.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  want_leaves = jax.tree.leaves(nnx.state(want, nnx.Param))
  assert len(jax.tree.leaves(saved["params"])) == len(want_leaves) == 16  # 8 Linear
  for a, b in zip(jax.tree.leaves(saved["params"]), want_leaves, strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-30)


def _touch(path):
  open(path, "w").close()


class _Payload:
  """Pickles as `call(*args)`: what a malicious file does with `__reduce__`."""

  def __init__(self, call, *args):
    self.call, self.args = call, args

  def __reduce__(self):
    return self.call, self.args


def _payloads(marker):
  return {
      "os.system": (_Payload(os.system, f"touch {marker}"), f"{os.system.__module__}.system"),
      "builtins.eval": (_Payload(eval, f"open({str(marker)!r}, 'w').close()"), "builtins.eval"),
      "subprocess.Popen": (_Payload(subprocess.Popen, ["touch", str(marker)]),
                           "subprocess.Popen"),
      "unknown callable": (_Payload(_touch, str(marker)), f"{__name__}._touch"),
  }


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "subprocess.Popen",
                                  "unknown callable"])
def test_a_file_that_asks_to_run_code_is_refused_in_one_line(kind, tmp_path):
  torch = require_torch()
  marker = tmp_path / "ran"
  payload, global_name = _payloads(marker)[kind]
  path = tmp_path / "model.pt"
  torch.save({"encoder.0.weight": torch.zeros(3), "extra": payload}, path)
  with pytest.raises(UnsafePickleError) as err:
    load_state_dict(nnx.eval_shape(lambda: models.build("ta_fcn", rngs=nnx.Rngs(0))), path)
  assert str(err.value) == (f"{path}: refused: it asks to call {global_name}, which is not a "
                            "tensor or a module; nothing in the file was run")
  assert not marker.exists()
