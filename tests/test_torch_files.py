"""PyTorch files: what torch.save writes (whole models pickled from a notebook, classes in
`__main__`; state_dicts; every storage dtype, shared storages and views) read as torch.load
reads it, without torch; hand-written hostile files (tests/hostile_files.py) read as data or
refused in one line, from the reader and from launch.py."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import textwrap
import time
import zipfile

import hostile_files
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from hw8jax import models, report
from hw8jax.data.demo import make_synthetic
from hw8jax.torch_import import load_state_dict, read_file

from conftest import TESTS, cli, quick_config, require_torch

# Run as `python -c` so that every class the file pickles is `__main__.<name>`, as a notebook's.
WRITE_WHOLE_MODELS = textwrap.dedent("""
    import hashlib
    import json
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
        with open(f"{out}/{name}_state_dict.json", "w") as f:  # what torch.load gives
            json.dump([[k, str(v.numpy().dtype), list(v.shape),
                        hashlib.sha256(v.numpy().tobytes()).hexdigest()]
                       for k, v in model.state_dict().items()], f)
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


READ_WITHOUT_TORCH = textwrap.dedent("""
    import hashlib
    import json
    import sys
    import numpy as np
    sys.modules["torch"] = None  # `import torch` fails in this process
    from hw8jax.torch_import import read_file
    print(json.dumps({"jax": "jax" in sys.modules, "files": [
        [[k, str(v.dtype), list(v.shape),
          hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()]
         for k, v in read_file(path).items()] for path in sys.argv[1:]]}))
""")


def _same_arrays(got: dict, want: dict) -> None:
  """The same keys in the same order, and per key the same dtype, shape and bytes."""
  assert list(got) == list(want)
  for key, expected in want.items():
    assert (got[key].dtype, got[key].shape) == (expected.dtype, expected.shape), key
    assert np.ascontiguousarray(got[key]).tobytes() == np.ascontiguousarray(expected).tobytes()


def _same_as_torch_load(path, got: dict) -> None:
  """`got` holds exactly what torch.load gives for the state_dict file `path`."""
  import ml_dtypes

  torch = require_torch()
  want = {k: t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
          if t.dtype == torch.bfloat16 else t.numpy() for k, t in torch.load(path).items()}
  _same_arrays(got, want)


def test_the_originals_files_are_read_as_torch_load_reads_them_without_torch(
    whole_model_files):
  """The whole-model files of all eight originals, read in a process where `import torch`
  fails (and JAX is not loaded either), equal torch.load's state_dict of each."""
  out, seed = whole_model_files
  print(f"seed={seed}")
  paths = [str(out / f"last_model_{v}.pt") for v in models.VARIANTS]
  r = subprocess.run([sys.executable, "-c", READ_WITHOUT_TORCH, *paths], capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  read = json.loads(r.stdout)
  assert not read["jax"]
  for variant, got in zip(models.VARIANTS, read["files"], strict=True):
    # Keys in order, dtypes, shapes and the bytes' digests.
    assert got == json.load(open(out / f"{variant}_state_dict.json")), variant


def test_the_reader_matches_torch_load_on_every_dtype_shared_storage_and_view(tmp_path, seed):
  """torch.save files of every storage dtype; tensors sharing one storage, with offsets,
  transposes and steps; a module's state_dict; the same archive under another top folder and
  rewritten big-endian: read_file gives what torch.load gives."""
  torch = require_torch()
  torch.manual_seed(seed)
  base = torch.randn(4, 6, dtype=torch.float64)
  tensors = {
      "float32": torch.randn(3, 5), "float64": base, "float16": torch.randn(7).half(),
      "bfloat16": torch.randn(2, 3).bfloat16(), "int8": torch.randint(-128, 128, (9,),
                                                                       dtype=torch.int8),
      "int16": torch.randint(-999, 999, (4,), dtype=torch.int16),
      "int32": torch.randint(-99999, 99999, (2, 2), dtype=torch.int32),
      "int64": torch.randint(-2**40, 2**40, (3,)), "uint8": torch.randint(0, 256, (5,),
                                                                          dtype=torch.uint8),
      "bool": torch.rand(6) > 0.5, "offset": base[1:3], "transposed": base.t(),
      "stepped": base[1:, ::2], "element": base[2, 3], "empty": base[:0],
  }
  assert tensors["stepped"].untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
  paths = {"tensors": tmp_path / "tensors.pt", "module": tmp_path / "module.pt"}
  torch.save(tensors, paths["tensors"])
  torch.save(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)).state_dict(),
             paths["module"])
  paths["renamed"] = _rewrite(paths["tensors"], tmp_path / "renamed.pt", top="my_model")
  paths["big_endian"] = _rewrite(paths["tensors"], tmp_path / "big.pt",
                                 itemsizes=_itemsizes(tensors))
  for path in paths.values():
    got = read_file(path)
    _same_as_torch_load(path, got)
  got = read_file(paths["tensors"])
  assert got["stepped"].base is not None and not got["stepped"].flags.writeable  # a view


def _rewrite(source, target, top: str | None = None, itemsizes: dict | None = None):
  """The archive `source` under another top folder, or with its storages byte-swapped
  (`itemsizes`: element size per storage key) and `byteorder` saying big: what torch.save
  writes on a big-endian machine."""
  swap = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
  with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
    old = src.namelist()[0].split("/")[0]
    for info in src.infolist():
      raw, rest = src.read(info), info.filename.split("/", 1)[1]
      if itemsizes and rest == "byteorder":
        raw = b"big"
      elif itemsizes and rest.startswith("data/") and rest[5:] in itemsizes:
        raw = np.frombuffer(raw, swap[itemsizes[rest[5:]]]).byteswap().tobytes()
      dst.writestr(f"{top or old}/{rest}", raw)
  return target


def _itemsizes(tensors: dict) -> dict:
  """{storage key: element size}: torch.save numbers storages in order of first use."""
  first = {}
  for t in tensors.values():
    first.setdefault(t.untyped_storage().data_ptr(), t.element_size())
  return {str(i): size for i, size in enumerate(first.values())}


CHECK_ONE_FILE = textwrap.dedent("""
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # 1 GiB of address space
    sys.modules["torch"] = None
    from hw8jax.torch_import import TorchFileError, read_file
    try:
        state = read_file(sys.argv[1])
    except TorchFileError as e:
        print(f"error: {e}")
    else:
        print(f"read {len(state)} tensors")
""")


def _snapshot(folder, skip=None) -> dict:
  """Every path under `folder` (but `skip`) with its type, mode, owner, size, mtime and, for
  files, bytes."""
  out = {}
  for root, dirs, files in os.walk(folder):
    dirs[:] = [d for d in dirs if os.path.join(root, d) != str(skip)]
    for name in dirs + files:
      path = os.path.join(root, name)
      st = os.lstat(path)
      content = open(path, "rb").read() if os.path.isfile(path) and \
          not os.path.islink(path) else None
      out[path] = (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns, content)
  return out


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
  root = tmp_path_factory.mktemp("hostile")
  outside = root / "outside.txt"
  outside.write_text("not yours\n")
  os.chmod(outside, 0o640)
  files = hostile_files.write_all(str(root / "files"), str(root / "MARKER"), str(outside))
  assert len(files) >= 30
  return root, files


def _one_line(text: str) -> str:
  lines = text.splitlines()
  assert len(lines) == 1, text
  assert lines[0].isprintable(), lines[0]  # no escape sequences or other control characters
  return lines[0]


def test_hostile_files_are_read_as_data_or_refused_in_one_line(hostile):
  """Each file, in a process of its own with 1 GiB of address space and no torch: read or
  refused in one line saying why, within a few seconds, creating no marker and changing no
  file."""
  root, files = hostile
  before = _snapshot(root)

  def check(item):
    name, (path, refusal) = item
    began = time.time()
    r = subprocess.run([sys.executable, "-c", CHECK_ONE_FILE, path], capture_output=True,
                       text=True, timeout=20)
    took = time.time() - began
    problems = []
    if r.returncode != 0 or r.stderr:
      problems.append(f"exit {r.returncode}, stderr {r.stderr[-500:]!r}")
    elif len(r.stdout.splitlines()) != 1 or not r.stdout.strip().isprintable():
      problems.append(f"not one printable line: {r.stdout!r}")
    elif refusal is None and not r.stdout.startswith("read "):
      problems.append(f"refused a file of plain data: {r.stdout.strip()}")
    elif refusal is not None and not (r.stdout.startswith(f"error: {path}: ") and
                                      refusal in r.stdout):
      problems.append(f"expected a line naming the file and {refusal!r}: {r.stdout.strip()}")
    if took > 5:
      problems.append(f"took {took:.1f} s")
    return [f"{name}: {p}" for p in problems]

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    problems = [p for found in pool.map(check, files.items()) for p in found]
  assert not problems, "\n".join(problems)
  assert not (root / "MARKER").exists()
  assert _snapshot(root) == before


def test_launch_with_a_hostile_init_from_says_one_line_and_writes_only_its_workdir(
    hostile, launch_here, tmp_path):
  """`--mode=score --config.init_from=FILE` with each hostile file: exit 1, one printable
  `error:` line, no marker, nothing written outside the workdir."""
  root, files = hostile
  data = tmp_path / "data"
  make_synthetic(data, num_train=4, num_test=3, seed=0)
  workdir = tmp_path / "w"
  before = {**_snapshot(root), **_snapshot(tmp_path, skip=workdir)}
  for name, (path, _) in files.items():
    r = launch_here(f"--workdir={workdir}", "--mode=score", f"--config.init_from={path}",
                    f"--config.data.dir={data}", config="ta_fcn.py", tiny=False)
    assert r.returncode == 1, (name, r.stdout, r.stderr)
    assert _one_line(r.stderr).startswith("error: "), name
    assert not r.stdout.strip(), (name, r.stdout)
  assert not (root / "MARKER").exists()
  assert {**_snapshot(root), **_snapshot(tmp_path, skip=workdir)} == before
  assert not (workdir / "submission.csv").exists()


def test_every_assembly_of_a_model_follows_cpu_fast_paths(whole_model_files, tmp_path):
  """Scoring a PyTorch file (init_from on a workdir without checkpoints), training from one and
  a fresh model: every conv follows the config's `cpu_fast_paths` (the scoring path for
  init_from once built its model apart and kept the default)."""
  from hw8jax.assemble import assemble
  from hw8jax.configs import default
  from hw8jax.models import layers
  from hw8jax.plan import plan
  from hw8jax.runtime import make_mesh

  out, _ = whole_model_files
  c = default.for_model("ta_cnn")
  for setting in ("on", "off"):
    c.cpu_fast_paths = setting
    for init_from, weights in ((str(out / "last_model_ta_cnn.pt"), "scoring"),
                               (str(out / "last_model_ta_cnn.pt"), "init"), ("", "init")):
      c.init_from = init_from
      model = assemble(plan(c), weights, key=jax.random.key(0), workdir=str(tmp_path),
                       mesh=make_mesh())
      for graphdef in (model.train_def, model.eval_def):
        found = {m.fast_paths for _, m in nnx.iter_modules(nnx.merge(graphdef, *model.state))
                 if isinstance(m, (layers.Conv, layers.ConvTranspose))}
        assert found == {setting == "on"}, (init_from, weights, found)
