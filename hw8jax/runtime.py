"""What a run shares between training and scoring: the processes and devices it runs on, its
mesh, its random keys, its compute dtypes, the compilation cache and the CPU fast-path switch
(with the host allocator settings it brings)."""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import math
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import define_prng_impl, threefry_prng_impl

from hw8jax.config import CPU_FAST_PATHS
from hw8jax.errors import UserError

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compilation_cache_dir(setting: str) -> str:
  """The folder of the persistent compilation cache for the config's `compilation_cache`
  ("" when off). "auto" keeps a folder JAX was already given (JAX_COMPILATION_CACHE_DIR)."""
  if setting != "auto":
    return os.path.expanduser(setting)
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "hw8jax", "xla")


def use_compilation_cache(setting: str) -> None:
  """Keep compiled programs across processes, so that a resumed run, a rescoring or the next
  run of the same model loads its programs instead of compiling them again (fcn_boss's train
  step: 2.4 s to compile). Programs that compile in under 0.2 s are not kept: loading one costs
  about as much. JAX reads the folder once, at the next compilation; a different folder later in
  the same process starts it afresh."""
  from jax.experimental.compilation_cache import compilation_cache as cc

  path = compilation_cache_dir(setting)
  if path == (jax.config.jax_compilation_cache_dir or ""):
    return
  if path:
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:
      raise UserError(f"compilation_cache={setting!r}: cannot create {path}: {e.strerror}; "
                      "name another folder, or '' to turn the cache off") from None
  jax.config.update("jax_compilation_cache_dir", path or None)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  cc.reset_cache()


def _check_fast_paths(setting: str) -> None:
  if setting not in CPU_FAST_PATHS:
    raise ValueError(f"cpu_fast_paths {setting!r}: use one of {', '.join(CPU_FAST_PATHS)}")


def cpu_fast_paths(setting: str) -> bool:
  """Whether hw8jax's CPU-tuned paths run under the `cpu_fast_paths` setting ("auto": on the
  CPU backend only; "on"; "off": XLA's own forms and compiler defaults everywhere)."""
  _check_fast_paths(setting)
  return setting == "on" or (setting == "auto" and jax.default_backend() == "cpu")


def _cpu_backend_expected() -> bool:
  """Whether JAX will run on its CPU backend, told without starting a backend: the first
  platform JAX was asked for, else whether any accelerator plugin (CUDA, ROCm, TPU) is
  installed for JAX to find."""
  if jax.config.jax_platforms:
    return jax.config.jax_platforms.split(",")[0] == "cpu"
  plugins = {e.name for e in importlib.metadata.entry_points(group="jax_plugins")}
  if importlib.util.find_spec("jax_plugins") is not None:
    import pkgutil

    import jax_plugins

    plugins |= {m.name for m in pkgutil.iter_modules(jax_plugins.__path__)}
  return not plugins and importlib.util.find_spec("libtpu") is None


def _backend_started() -> bool:
  # JAX has no public way to ask this; without the private one, assume it has not started.
  from jax._src import xla_bridge

  started = getattr(xla_bridge, "backends_are_initialized", None)
  return bool(started and started())


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def tune_allocator(setting: str) -> bool:
  """Under the `cpu_fast_paths` setting, have glibc's malloc keep the large blocks XLA's CPU
  backend frees after every step, instead of unmapping them and faulting fresh zeroed pages in
  at the next one (about 70,000 page faults and 120 ms of kernel time per fcn_boss, resnet_boss
  or multi_encoder step at batch 32 on 2 cores; docs/performance.md). Blocks above 64 MB can only
  live in the main heap, hence one arena; up to 1 GiB comes from that heap, and up to 2 GiB of
  free space at its top is kept. Works only before JAX's backend starts (its threads pick their
  arenas then), so it runs first in a run, and "auto" predicts the backend rather than starting
  it. Not made once the backend has started (a notebook that used JAX before `run`): they would
  then keep freed memory without the gain. True when applied; glibc Linux only (elsewhere a
  no-op)."""
  _check_fast_paths(setting)
  if setting == "off" or (setting == "auto" and not _cpu_backend_expected()):
    return False
  if _backend_started():
    return False
  if platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL("libc.so.6")
  return all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, 1 << 30), (_M_TRIM_THRESHOLD, (1 << 31) - 1)))


# What XLA's CPU backend hands to YNNPACK in each program (jaxlib 0.10.2's default: single dots,
# single convs and reductions). Convs stay on XLA's own path in both: YNNPACK's were slower for
# every conv variant at every batch measured (train steps 1.03x to 1.48x, scorers 1.26x to 1.43x;
# docs/performance.md). The scorer also leaves the reductions to XLA: as one YNNPACK fusion with
# them, fcn_strong's scorer ran at half the speed.
YNN_FUSIONS = {"train_step": ("INDIVIDUAL_DOT", "REDUCE"), "scorer": ("INDIVIDUAL_DOT",)}


def compiler_options(setting: str, program: str) -> dict:
  """XLA options for compiling `program` ("train_step" or "scorer") under the `cpu_fast_paths`
  setting: on CPU, what YNNPACK takes (`YNN_FUSIONS`); elsewhere or with "off", XLA's defaults."""
  if not cpu_fast_paths(setting) or jax.default_backend() != "cpu":
    return {}
  return {"xla_cpu_experimental_ynn_fusion_type":
          ",".join(f"LIBRARY_FUSION_TYPE_{kind}" for kind in YNN_FUSIONS[program])}


def prepare(config) -> None:
  """What a run or a load sets before JAX starts its backend: the host allocator under
  `cpu_fast_paths` and the compilation cache."""
  tune_allocator(config.cpu_fast_paths)
  use_compilation_cache(config.compilation_cache)


def init_distributed(config) -> None:
  """Join a multi-process run when the config names a coordinator (each process is started
  with its own process_id). CPU processes exchange collectives through gloo."""
  if config.coordinator_address and not jax.distributed.is_initialized():
    if os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(config.coordinator_address, num_processes=config.num_processes,
                               process_id=config.process_id)


def make_mesh() -> jax.sharding.Mesh:
  """One `data` axis over every device of every process."""
  return jax.make_mesh((jax.device_count(),), ("data",))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def batch_sharded(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def run_keys(seed: int) -> dict:
  """Every key of a run, from the config's one seed: model init, training noise (folded with
  the step) and scoring noise (folded with each image's index in the test file)."""
  init, noise, score = _split_seed(seed)
  return {"init": init, "noise": noise, "score": score}


@jax.jit
def _split_seed(seed):
  # One program: op by op, the key, the split and the unstacking compiled four (0.2 s).
  return tuple(jax.random.split(jax.random.key(seed), 3))


# Threefry-2x32's rotations, in two alternating groups of four rounds.
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k1, k2, x1, x2):
  """Threefry-2x32 as straight-line elementwise code, which XLA fuses into one loop. JAX's CPU
  lowering of the same function rolls its five groups of rounds into a while loop, and each
  trip writes both uint32 arrays out and reads them back."""
  ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
  x1, x2 = x1 + ks[0], x2 + ks[1]
  for i in range(5):
    for r in _THREEFRY_ROTATIONS[i % 2]:
      x1 = x1 + x2
      x2 = x1 ^ ((x2 << np.uint32(r)) | (x2 >> np.uint32(32 - r)))
    x1 = x1 + ks[(i + 1) % 3]
    x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x1, x2


def _fused_random_bits(key, bit_width, shape):
  """JAX's partitionable threefry bits (its default): element i of the flattened array hashes
  the 64-bit counter i. Computed here for 32-bit draws under 2**32 elements; the rest by JAX."""
  size = math.prod(shape)
  if bit_width != 32 or size >= 2**32 or not jax.config.jax_threefry_partitionable:
    return threefry_prng_impl.random_bits(key, bit_width, shape)
  counts = jax.lax.iota(np.uint32, size).reshape(shape)
  bits_hi, bits_lo = _threefry2x32(key[0], key[1], jnp.zeros(shape, np.uint32), counts)
  return bits_hi ^ bits_lo


# JAX's threefry2x32 keys, splits and folds, with its bits computed by `_fused_random_bits`.
FUSED_THREEFRY = define_prng_impl(
    key_shape=threefry_prng_impl.key_shape, seed=threefry_prng_impl.seed,
    split=threefry_prng_impl.split, fold_in=threefry_prng_impl.fold_in,
    random_bits=_fused_random_bits, name="hw8jax_fused_threefry2x32", tag="hw8fry")


def draw_key(key: jax.Array, setting: str) -> jax.Array:
  """`key` as a model's weights are drawn with it. Under the `cpu_fast_paths` setting, its
  threefry bits come from one fused loop (`FUSED_THREEFRY`): the same bits, bit for bit, as JAX's
  CPU form, which goes through memory five times (fcn_boss's 122 M weights: 1.1 s -> 0.22 s on
  2 cores; its draw program also compiles in 1.34 s instead of 1.83 s)."""
  if not cpu_fast_paths(setting):
    return key
  return jax.random.wrap_key_data(jax.random.key_data(key), impl=FUSED_THREEFRY)


def is_main_process() -> bool:
  return jax.process_index() == 0


def log(message: str) -> None:
  """A progress line, printed once per run (by process 0)."""
  if is_main_process():
    print(message, flush=True)
