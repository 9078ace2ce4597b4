"""Shared test helpers. Every test that draws random weights or data takes a fresh `seed`.

The whole session (this process and every launch.py subprocess it starts) shares one persistent
XLA compilation cache under pytest's temp base: a subprocess loads what an earlier test or
process compiled instead of compiling it again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import secrets
import subprocess
import sys

import numpy as np
import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
CONFIGS = os.path.join(REPO, "configs")
# CI sets this so that a missing torch fails the run instead of skipping the parity tests.
REQUIRE_TORCH = os.environ.get("HW8JAX_REQUIRE_TORCH") == "1"


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
  """Before any test module imports jax: the compilation cache, through the environment so
  that subprocesses inherit it."""
  cache = config._tmp_path_factory.getbasetemp() / "xla_cache"
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  # Compiling dominates the suite. Two XLA settings make it cheaper; the programs compute the
  # same operations (library convs and dots are compiled already) and the tests' tolerances hold
  # either way. LLVM optimisation level 0: resnet_boss's train step compiled in 9.3 s at the
  # default level, 5.1 s at 0. XLA's elemental emitters instead of its newer fusion emitters: at
  # level 0, resnet_boss's gradient program compiles in 3.5 s instead of 7.4 s, multi_encoder's
  # in 1.3 s instead of 3.7 s, and test_train_variants.py with test_models.py ran in 154 s
  # instead of 185 s (2 cores). Users' runs keep XLA's defaults (the flag's name is jaxlib 0.10's,
  # as pinned in pyproject.toml).
  for flag in ["--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"]:
    if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
      os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), flag]).strip()
  import tiny  # imports jax: after the environment is set

  tiny.register()


def require_torch():
  """Import torch for a parity test: skip without it, unless HW8JAX_REQUIRE_TORCH=1."""
  if importlib.util.find_spec("torch") is None:
    if REQUIRE_TORCH:
      pytest.fail("torch is required (HW8JAX_REQUIRE_TORCH=1) but not installed")
    pytest.skip("torch not installed")
  import torch

  torch.set_num_threads(2)
  return torch


_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None)


def _resident_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(autouse=True)
def _return_freed_memory():
  """After a test that leaves this process above 768 MiB, drop JAX's compiled programs and hand
  glibc's freed heap back to the system. Compiled programs of large models hold hundreds of MB,
  and buffers of a few MB are freed into malloc arenas that glibc keeps: without this the
  process grew by 0.3 to 0.5 GB per large model tested and peaked at 9 GB. Below the threshold
  the programs stay, for the next test to reuse."""
  yield
  if not os.path.exists("/proc/self/statm") or _resident_bytes() < 3 * 2**28:
    return
  import jax

  jax.clear_caches()
  if hasattr(_LIBC, "malloc_trim"):  # glibc only
    _LIBC.malloc_trim(0)


@pytest.fixture
def seed(request):
  """A fresh seed per test, shown in the report so a failure can be replayed."""
  value = int(os.environ.get("HW8JAX_TEST_SEED", secrets.randbits(31)))
  request.node.user_properties.append(("seed", value))
  print(f"seed={value}")
  return value


def nchw(torch, x):
  """NHWC numpy images as an NCHW torch tensor."""
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t):
  """A torch tensor as numpy, NCHW maps back to NHWC."""
  a = t.detach().numpy()
  return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


def images(rng: np.random.Generator, n: int) -> np.ndarray:
  """n random NHWC float32 images in [-1, 1]."""
  return rng.uniform(-1, 1, (n, 64, 64, 3)).astype(np.float32)


# --- runs


def built(variant: str, seed: int):
  """A fresh model of `variant` (in training mode), initialised as a run initialises it: in one
  compiled program (`hw8jax.assemble`; op by op, resnet_boss's took 13 s)."""
  import jax
  from flax import nnx

  from hw8jax.assemble import assemble
  from hw8jax.configs import default
  from hw8jax.plan import plan

  model = assemble(plan(default.for_model(variant)), key=jax.random.key(seed))
  return nnx.merge(model.train_def, *model.state)


def one_line_error(result, *fragments) -> str:
  """The run failed with exactly one error line and no traceback; returns it."""
  assert result.returncode == 1, (result.stdout, result.stderr)
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  assert "Traceback" not in result.stdout + result.stderr
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])
  return lines[0]


def latest_step(workdir) -> int | None:
  """The newest step of a workdir's latest checkpoints (None: none)."""
  import orbax.checkpoint as ocp

  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints", "latest")) as m:
    return m.latest_step()


def quick_config(variant: str, data_dir: str, labels: str | None = None):
  """`configs/<any>.py:quick` for `variant` on `data_dir` (the synthetic set's labels by
  default; "" for none), without figures (about 0.3 s each; the tests that look at them turn
  them on)."""
  from hw8jax.configs import default

  c = default.for_model(variant, "quick")
  c.figures = False
  c.data.dir = data_dir
  c.data.test_labels = os.path.join(data_dir, "testing_labels.npy") if labels is None else labels
  return c


def config_walk(config, call) -> list[tuple[str, str]]:
  """The walk of `config` through `call()`: (room, "caller -> room.function") for each call from
  one of the package's modules (rooms) into a function of another that is handed the config,
  its plan or the assembled model (which carry it). Reading a property of the plan or the model
  is not entering a room. Follows the calling thread (where a run's stages run); the rooms are
  the package's modules imported before `call`."""
  from hw8jax.assemble import Assembled
  from hw8jax.plan import Plan

  properties = {v.fget.__code__ for cls in (Plan, Assembled) for v in vars(cls).values()
                if isinstance(v, property)}
  rooms = {id(vars(m)): name for name, m in list(sys.modules.items())
           if name.startswith("hw8jax") and m is not None}
  walk = []

  def follow(frame, event, _):  # a global trace function: called at each Python call only
    room = rooms.get(id(frame.f_globals))
    if room is None or frame.f_back is None or frame.f_code in properties:
      return
    caller = rooms.get(id(frame.f_back.f_globals))
    if caller is None or caller == room:
      return
    code = frame.f_code
    names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
    if any(frame.f_locals.get(n) is config or isinstance(frame.f_locals.get(n), (Plan, Assembled))
           for n in names):
      walk.append((room, f"{caller} -> {room}.{code.co_name}"))

  previous = sys.gettrace()  # a debugger's or coverage's, given back after
  sys.settrace(follow)
  try:
    call()
  finally:
    sys.settrace(previous)
  return walk


def launch_command(*flags: str, config: str = "ta_vae.py:quick", tiny: bool = True) -> list:
  """The command line of a launch.py run; `tiny` runs it with the test-only variant (on the
  config's keys, via tests/tiny_launch.py, which runs launch.py itself)."""
  script = os.path.join(TESTS, "tiny_launch.py") if tiny else os.path.join(REPO, "launch.py")
  model = ["--config.model=tiny"] if tiny else []
  return [sys.executable, script, f"--config={os.path.join(CONFIGS, config)}", *model, *flags]


def launch(*flags: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
  """Start a launch.py run (see `launch_command`); stdout and stderr together, as text."""
  return subprocess.Popen(launch_command(*flags, **kwargs), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})


def tensorboard_scalars(logdir) -> tuple[dict, dict]:
  """({tag: {step: value or image}} as TensorBoard shows it, {tag: [steps]} as written) of the
  event files in `logdir`, read in order. As TensorBoard does, a file that starts a session at
  step P (tensorboardX's purge_step) hides the earlier files' events from step P on."""
  import struct

  from tensorboardX.proto import event_pb2

  shown, written = {}, {}
  for name in sorted(os.listdir(logdir)):
    with open(os.path.join(logdir, name), "rb") as f:
      blob = f.read()
    at = 0
    while at < len(blob):
      (length,) = struct.unpack("<Q", blob[at:at + 8])
      event = event_pb2.Event.FromString(blob[at + 12:at + 12 + length])
      at += 12 + length + 4  # length, its crc, the record, its crc
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        for steps in shown.values():
          for step in [s for s in steps if s >= event.step]:
            del steps[step]
      for value in event.summary.value:
        if value.HasField("simple_value") or value.HasField("image"):
          shown.setdefault(value.tag, {})[event.step] = value.simple_value or value.image
          written.setdefault(value.tag, []).append(event.step)
  return shown, written


_LAUNCH_MODULE = []


@pytest.fixture
def launch_here(capsys):
  """Run launch.py in this process: its flag parsing and its main(), as a user's command
  meets them, without a new process (no JAX start-up, and this process's compiled programs).
  Returns a function of the flags (as `launch_command` takes them) giving a CompletedProcess
  with the exit code and what was printed."""
  from absl import flags as absl_flags

  if not _LAUNCH_MODULE:  # launch.py defines its flags once per process
    spec = importlib.util.spec_from_file_location("launch_script", os.path.join(REPO, "launch.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _LAUNCH_MODULE.append(module)
  module = _LAUNCH_MODULE[0]

  def call(*flags: str, **kwargs) -> subprocess.CompletedProcess:
    argv = ["launch.py", *launch_command(*flags, **kwargs)[2:]]
    absl_flags.FLAGS.unparse_flags()
    capsys.readouterr()
    code, saved_argv = 0, sys.argv
    sys.argv = argv  # config_flags reads the --config.KEY overrides from sys.argv
    try:
      module.main(module.parse_flags(argv))
    except SystemExit as e:
      code = e.code
    finally:
      sys.argv = saved_argv
      absl_flags.FLAGS.unparse_flags()
      for name in list(absl_flags.FLAGS):  # the overrides are defined anew by each parse
        if name.startswith("config."):
          delattr(absl_flags.FLAGS, name)
    out = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out.out, out.err)

  return call


def cli(*flags: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
  """Run launch.py to the end; stdout and stderr apart."""
  return subprocess.run(launch_command(*flags, **kwargs), capture_output=True, text=True,
                        timeout=timeout)
