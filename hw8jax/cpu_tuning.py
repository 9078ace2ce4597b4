"""hw8jax's CPU tuning, one policy switched by the config's `cpu_fast_paths`.

The setting ("auto": on JAX's CPU backend only; "on"; "off": XLA's own forms and defaults
everywhere) is resolved once, by `cpu_fast_paths`, into the run's policy (`plan.Plan`), a
bool every piece below takes. Each piece was measured; docs/performance.md lists what it gains
and costs.

- conv forms (`hw8jax.models.convolution`, `layers.ConvTranspose`), fixed on a model's convs
  when it is assembled (`models.set_fast_paths`);
- `compiler_options`: what XLA's CPU backend hands to YNNPACK in the train step and the scorer;
- `draw_key`: the initial weights' threefry bits computed in one fused loop (the same bits);
- `tune_allocator`: glibc malloc keeping the large blocks XLA frees each step. Process-wide, so
  only a process's entry point calls it (launch.py, the benchmarks), before JAX starts, with
  the setting (it predicts the backend rather than start it); `release_free_memory` returns
  what a passing peak (an epoch's evaluation) left in the heap.

Always on, on every backend, so not behind the switch: the 3x3 stride-2 max pool as the maximum
of nine strided windows with its own gradient (`models.layers.max_pool_3x3_s2`), which is also
how PyTorch's gradient treats ties (the first maximum of a window takes it).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import importlib.util
import math
import pkgutil
import platform

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import define_prng_impl, threefry_prng_impl

SETTINGS = ("auto", "on", "off")


def _check_fast_paths(setting: str) -> None:
  if setting not in SETTINGS:
    raise ValueError(f"cpu_fast_paths {setting!r}: use one of {', '.join(SETTINGS)}")


def cpu_fast_paths(setting: str) -> bool:
  """Whether hw8jax's CPU-tuned paths run under the `cpu_fast_paths` setting ("auto": on the
  CPU backend only; "on"; "off": XLA's own forms and compiler defaults everywhere)."""
  _check_fast_paths(setting)
  return setting == "on" or (setting == "auto" and jax.default_backend() == "cpu")


def predicted_fast_paths(setting: str) -> bool:
  """The policy `cpu_fast_paths(setting)` gives, told without starting JAX's backend: what a
  model's convs follow from when they are built until a run assembles them, and what the
  allocator is tuned by (a multi-process run must not start the backend before
  `jax.distributed.initialize`, and a model may be built, or registered, before it)."""
  return setting == "on" or (setting == "auto" and _cpu_backend_expected())


def _cpu_backend_expected() -> bool:
  """Whether JAX will run on its CPU backend, told without starting a backend: the first
  platform JAX was asked for, else whether any accelerator plugin (CUDA, ROCm, TPU) is
  installed for JAX to find."""
  if jax.config.jax_platforms:
    return jax.config.jax_platforms.split(",")[0] == "cpu"
  return not _accelerators_installed()


@functools.cache
def _accelerators_installed() -> bool:
  """Whether a JAX plugin or libtpu is installed; kept for the process (every conv a model
  builds asks, and the search reads every installed package's metadata)."""
  plugins = {e.name for e in importlib.metadata.entry_points(group="jax_plugins")}
  if importlib.util.find_spec("jax_plugins") is not None:
    # An optional import: the namespace package exists only where a plugin is installed.
    import jax_plugins

    plugins |= {m.name for m in pkgutil.iter_modules(jax_plugins.__path__)}
  return bool(plugins) or importlib.util.find_spec("libtpu") is not None


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def tune_allocator(setting: str) -> bool:
  """Under the `cpu_fast_paths` setting, have glibc's malloc keep the large blocks XLA's CPU
  backend frees after every step, instead of unmapping them and faulting fresh zeroed pages in
  at the next one (tens of thousands of page faults a step for the large variants;
  docs/performance.md). Blocks above 64 MB can only live in the main heap, hence one arena; up
  to 512 MiB comes from that heap, and up to 2 GiB of free space at its top is kept. Larger
  blocks (the 1.05 GB of scratch of an fcn_boss step at batch 2000) are mapped apart: from the
  heap, where smaller blocks land in the hole each leaves, they fragmented it to 6.6 GB resident
  over a full-size epoch. Only of use before JAX's backend starts (its threads pick their
  arenas then): the caller owns the process and calls it first ("auto" predicts the backend
  rather than starting it). True when applied; glibc Linux only (elsewhere a no-op)."""
  if not predicted_fast_paths(setting):
    return False  # "off", or a setting config.validate will name
  if platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL("libc.so.6")
  return all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, 1 << 29), (_M_TRIM_THRESHOLD, (1 << 31) - 1)))


def release_free_memory() -> None:
  """Hand the free pages inside malloc's heap back to the system (glibc's `malloc_trim`), after
  a passing peak (an epoch's evaluation): with `tune_allocator`'s settings the heap keeps what
  XLA frees, and what a rare peak left would otherwise stay resident for the rest of the run.
  The next step faults its buffers in once more. Elsewhere than glibc, a no-op."""
  if platform.libc_ver()[0] == "glibc":
    ctypes.CDLL("libc.so.6").malloc_trim(0)


# What XLA's CPU backend hands to YNNPACK in each program (jaxlib 0.10.2's default: single dots,
# single convs and reductions). Convs stay on XLA's own path in both: YNNPACK's were slower for
# every conv variant at every batch measured (train steps 1.03x to 1.48x, scorers 1.26x to 1.43x;
# docs/performance.md). The scorer also leaves the reductions to XLA: as one YNNPACK fusion with
# them, fcn_strong's scorer ran at half the speed.
YNN_FUSIONS = {"train_step": ("INDIVIDUAL_DOT", "REDUCE"), "scorer": ("INDIVIDUAL_DOT",)}


def compiler_options(fast_paths: bool, program: str) -> dict:
  """XLA options for compiling `program` ("train_step" or "scorer") under the run's policy
  `fast_paths`: on CPU, what YNNPACK takes (`YNN_FUSIONS`); elsewhere or off, XLA's defaults."""
  if not fast_paths or jax.default_backend() != "cpu":
    return {}
  return {"xla_cpu_experimental_ynn_fusion_type":
          ",".join(f"LIBRARY_FUSION_TYPE_{kind}" for kind in YNN_FUSIONS[program])}


# Threefry-2x32's rotations, in two alternating groups of four rounds.
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k1, k2, x1, x2):
  """Threefry-2x32 as straight-line elementwise code, which XLA fuses into one loop. JAX's CPU
  lowering of the same function rolls its five groups of rounds into a while loop, and each
  trip writes both uint32 arrays out and reads them back. In `lax` operations: each is one
  primitive to trace, where jax.numpy's operators each go through a jitted wrapper (the draw is
  traced again as every process lowers it)."""
  add, xor = jax.lax.add, jax.lax.bitwise_xor
  ks = (k1, k2, xor(xor(k1, k2), np.uint32(0x1BD11BDA)))
  x1, x2 = add(x1, ks[0]), add(x2, ks[1])
  for i in range(5):
    for r in _THREEFRY_ROTATIONS[i % 2]:
      x1 = add(x1, x2)
      x2 = xor(x1, jax.lax.bitwise_or(jax.lax.shift_left(x2, np.uint32(r)),
                                      jax.lax.shift_right_logical(x2, np.uint32(32 - r))))
    x1 = add(x1, ks[(i + 1) % 3])
    x2 = add(add(x2, ks[(i + 2) % 3]), np.uint32(i + 1))
  return x1, x2


def _fused_random_bits(key, bit_width, shape):
  """JAX's partitionable threefry bits (its default): element i of the flattened array hashes
  the 64-bit counter i. Computed here for 32-bit draws under 2**32 elements; the rest by JAX."""
  size = math.prod(shape)
  if bit_width != 32 or size >= 2**32 or not jax.config.jax_threefry_partitionable:
    return threefry_prng_impl.random_bits(key, bit_width, shape)
  return _fused_bits(key, size).reshape(shape)


@functools.partial(jax.jit, static_argnums=1)
def _fused_bits(key, size: int):
  """The bits of `_fused_random_bits`, flat: jitted so that the arrays of one size (26 sizes
  among resnet_boss's 180) are traced once a process, and lowered once a draw."""
  counts = jax.lax.iota(np.uint32, size)
  bits_hi, bits_lo = _threefry2x32(key[0], key[1], jnp.zeros(size, np.uint32), counts)
  return bits_hi ^ bits_lo


# JAX's threefry2x32 keys, splits and folds, with its bits computed by `_fused_random_bits`.
FUSED_THREEFRY = define_prng_impl(
    key_shape=threefry_prng_impl.key_shape, seed=threefry_prng_impl.seed,
    split=threefry_prng_impl.split, fold_in=threefry_prng_impl.fold_in,
    random_bits=_fused_random_bits, name="hw8jax_fused_threefry2x32", tag="hw8fry")


def draw_key(key: jax.Array, fast_paths: bool) -> jax.Array:
  """`key` as a model's weights are drawn with it. Under the run's policy `fast_paths`, its
  threefry bits come from one fused loop (`FUSED_THREEFRY`): the same bits, bit for bit, as JAX's
  CPU form, which goes through memory five times (docs/performance.md)."""
  if not fast_paths:
    return key
  return jax.random.wrap_key_data(jax.random.key_data(key), impl=FUSED_THREEFRY)
