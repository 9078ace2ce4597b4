"""hw8jax's convolution forms against XLA's own, for every conv shape the variants use, and the
switch that turns them off."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hw8jax import cpu_tuning, data, models, runtime, train_step
from hw8jax.models import convolution, layers
from hw8jax.score import make_scorer


def conv_layers_in(variant: str) -> dict:
  """{(layer type, input shape, kernel size, stride, padding, in, out): None} for every conv and
  transposed conv a forward pass of `variant` calls, at batch 2 (abstract: nothing computed)."""
  seen = {}
  originals = {cls: cls.__call__ for cls in (layers.Conv, layers.ConvTranspose)}

  def recording(cls):
    def call(self, x):
      kernel = self.kernel.shape
      io = (kernel[2], kernel[3]) if cls is layers.Conv else (kernel[3], kernel[2])
      padding = self.padding[0][0] if cls is layers.Conv else self.torch_padding
      seen[(cls, x.shape, self.kernel_size[0], self.strides, padding, *io)] = None
      return originals[cls](self, x)
    return call

  graphdef, state = nnx.split(nnx.eval_shape(lambda: models.build(variant, rngs=nnx.Rngs(0))))
  forward = lambda state: nnx.merge(graphdef, state)(jnp.zeros((2, 64, 64, 3)),  # noqa: E731
                                                    rngs=nnx.Rngs(noise=0))
  try:
    for cls in originals:
      cls.__call__ = recording(cls)
    jax.eval_shape(forward, state)
  finally:
    for cls, call in originals.items():
      cls.__call__ = call
  return seen


def every_conv_shape() -> list:
  shapes = {}
  for variant in models.VARIANTS:
    shapes.update(conv_layers_in(variant))
  return list(shapes)


def test_every_conv_variant_shape_is_found():
  shapes = every_conv_shape()
  convs = [s for s in shapes if s[0] is layers.Conv]
  assert len(convs) >= 30 and len(shapes) - len(convs) >= 8
  # The shapes the forms exist for: ResNet-18's last stage (2x2) and its strided 4x4 conv.
  assert (layers.Conv, (2, 2, 2, 512), 3, 1, 1, 512, 512) in shapes
  assert (layers.Conv, (2, 4, 4, 256), 3, 2, 1, 256, 512) in shapes


def test_conv_forms_match_xla_for_every_shape_the_variants_use(seed):
  """Each conv and transposed conv of every variant, in the forms the CPU policy gives it,
  against XLA's own conv (the nnx layers they subclass): the output within float32 rounding
  (1e-5 relative in L2), and where hw8jax's own form runs (patches, sub-pixel), the gradients of
  the input, kernel and bias too (where XLA's form runs, they are autodiff of the same op). One
  program for all shapes: compiling them one by one took 36 s."""
  rng = np.random.default_rng(seed)
  cases = []
  for cls, shape, k, stride, padding, cin, cout in every_conv_shape():
    make = layers.conv if cls is layers.Conv else layers.conv_transpose
    # Abstract, then filled from numpy: initialising 46 layers op by op compiled for 18 s.
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda make=make, k=k, stride=stride, padding=padding, cin=cin, cout=cout:
        make(cin, cout, k, stride, padding, rngs=nnx.Rngs(0))))
    state = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.1, a.dtype), state)
    layer = nnx.merge(graphdef, state)
    layer.fast_paths = True
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=jax.eval_shape(layer, x).shape), jnp.float32)
    own_form = cls is layers.ConvTranspose or convolution.plan(shape, (k, k, cin, cout),
                                                               stride) != "xla"
    cases.append((layer, x, cotangent, own_form))

  def results(call, layer, x, cotangent, gradients):
    if not gradients:
      return [call(layer, x)]

    def objective(layer, x):
      y = call(layer, x)
      return jnp.vdot(y, cotangent), y
    (_, y), (g_layer, g_x) = nnx.value_and_grad(objective, argnums=(0, 1), has_aux=True)(layer, x)
    return [y, g_x, g_layer.kernel[...], g_layer.bias[...]]

  graphdefs, states = zip(*(nnx.split(case[0]) for case in cases), strict=True)
  own_forms = [case[3] for case in cases]

  # Without XLA's backend optimisations: compiling dominates, and the sums are the same.
  @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
  def errors(states, xs, cotangents):
    out = []
    for graphdef, state, x, cotangent, own in zip(graphdefs, states, xs, cotangents, own_forms,
                                                  strict=True):
      layer = nnx.merge(graphdef, state)
      xla_call = (nnx.Conv if isinstance(layer, layers.Conv) else nnx.ConvTranspose).__call__
      ours = results(lambda layer, x: layer(x), layer, x, cotangent, own)
      xla = results(xla_call, layer, x, cotangent, own)
      out.append([jnp.linalg.norm(a - b) / jnp.linalg.norm(b)
                  for a, b in zip(ours, xla, strict=True)])
    return out

  found = errors(states, [c[1] for c in cases], [c[2] for c in cases])
  assert sum(own_forms) >= 20  # 11 transposed convs, 1x1s, 2x2 maps, strided small maps
  for (layer, x, _, _), errs in zip(cases, found, strict=True):
    names = ("output", "input grad", "kernel grad", "bias grad")[:len(errs)]
    for name, err in zip(names, errs, strict=True):
      assert float(err) <= 1e-5, (type(layer).__name__, x.shape, layer.kernel.shape, name, err)


@pytest.mark.parametrize("shape,kernel,stride,form", [
    ((32, 2, 2, 512), 3, 1, "patches"),    # window larger than the map
    ((32, 4, 4, 256), 3, 2, "patches"),    # strided on a small map: XLA's input grad is slow
    ((32, 16, 16, 64), 1, 2, "patches"),   # 1x1: a matmul
    ((32, 4, 4, 256), 3, 1, "xla"),
    ((32, 16, 16, 64), 3, 2, "xla"),
    ((32, 64, 64, 3), 7, 2, "xla"),        # ResNet's stem
    ((32, 32, 32, 12), 4, 2, "xla"),
])
def test_plan_picks_the_measured_form(shape, kernel, stride, form):
  assert convolution.plan(shape, (kernel, kernel, shape[-1], 8), stride) == form


def primitives(layer, x) -> set:
  jaxpr = jax.make_jaxpr(lambda x: layer(x))(x)
  return {str(e.primitive) for e in jaxpr.eqns}


def test_fast_paths_off_runs_xla_forms_and_a_built_layer_follows_the_backend():
  x = jnp.zeros((2, 2, 2, 16))
  conv = layers.conv(16, 8, 3, 1, 1, rngs=nnx.Rngs(0))
  up = layers.conv_transpose(16, 8, rngs=nnx.Rngs(0))
  assert jax.default_backend() == "cpu"  # the suite runs on CPU, where "auto" means on
  for layer in (conv, up):
    assert layer.fast_paths is True and "dot_general" in primitives(layer, x)
    models.set_fast_paths(layer, False)
    assert "conv_general_dilated" in primitives(layer, x)
    assert "dot_general" not in primitives(layer, x)
    models.set_fast_paths(layer, True)
    assert "dot_general" in primitives(layer, x)
  # Off gives XLA's own computation exactly: nnx's layer on the same parameters.
  models.set_fast_paths(up, False)
  np.testing.assert_array_equal(up(x + 1), nnx.ConvTranspose.__call__(up, x + 1))
  # The policy is resolved before it reaches a model: a setting's name is refused there.
  with pytest.raises(TypeError, match="fast_paths='auto': a bool, the resolved CPU policy"):
    models.set_fast_paths(conv, "auto")


def ynnpack_convs(hlo: str) -> int:
  """How many convs of a compiled CPU program run in YNNPACK (XLA names those fusions
  ynn_fusion; each calls a computation holding the conv)."""
  called = re.findall(r"%ynn_fusion[\w.\-]* = .*calls=%([\w.\-]+)", hlo)
  bodies = dict(re.findall(r"^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S | re.M))
  return sum(" convolution(" in bodies.get(name, "") for name in called)


def test_fast_paths_keep_convs_off_ynnpack_in_the_train_step_and_the_scorer():
  """Under `cpu_fast_paths` the convs of a run's train step and scorer stay on XLA's own CPU
  path (YNNPACK's were slower for every conv variant: docs/performance.md); "off" gives XLA's
  defaults, where YNNPACK takes ta_cnn's convs of more than 16 channels."""
  images = np.zeros((4, 64, 64, 3), np.uint8)
  mesh = runtime.make_mesh()
  found = {}
  for setting in ("auto", "off"):
    policy = cpu_tuning.cpu_fast_paths(setting)
    model = models.build("ta_cnn", rngs=nnx.Rngs(0))
    models.set_fast_paths(model, policy)
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    tx = optax.sgd(1e-3)
    step = train_step.jit_train_step(train_step.make_train_step(
        graphdef, tx, models.variant("ta_cnn").loss, data.normalize, jax.random.key(0)), mesh,
        policy)
    state = train_step.init_state(params, stats, tx)
    model.eval()
    scorer = make_scorer(nnx.graphdef(model), stochastic=False, fast_paths=policy)
    score_args = ((params, stats), images, np.arange(4), jax.random.key(0))
    found[setting] = [ynnpack_convs(fn.lower(*args).compile().as_text())
                      for fn, args in ((step, (state, images)), (scorer, score_args))]
  assert found["auto"] == [0, 0]
  assert min(found["off"]) > 0, found


FAULTS_OF_REPEATED_BLOCKS = """
import ctypes, resource, sys, threading
from hw8jax import cpu_tuning
applied = cpu_tuning.tune_allocator(sys.argv[1])
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
size, faults = 128 << 20, []

def work():
  for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    libc.memset(block, 1, size)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

thread = threading.Thread(target=work)
thread.start()
thread.join()
print(applied, *faults)
"""


@pytest.mark.parametrize("setting", ["auto", "off"])
def test_fast_paths_keep_large_blocks_of_worker_threads(setting):
  """Under `cpu_fast_paths`, set before JAX's backend starts (as launch.py does), glibc keeps
  the large blocks a worker thread frees, as XLA's threads free their buffers after each step: a
  128 MiB block allocated, written and freed again faults its 32,768 pages in only the first
  time. "off" leaves the allocator alone: every block is mapped afresh. A thread, with its own
  glibc arena, is what needs the one-arena setting; it is driven here directly (through XLA
  buffers, freed asynchronously, the count of fault-free calls varied with the machine's
  load)."""
  import subprocess
  import sys

  out = subprocess.run([sys.executable, "-c", FAULTS_OF_REPEATED_BLOCKS, setting],
                       capture_output=True, text=True, timeout=120, check=True).stdout.split()
  applied, faults = out[0], [int(f) for f in out[1:]]
  assert len(faults) == 6 and faults[0] > 30_000, out
  if setting == "auto":
    assert applied == "True" and max(faults[1:]) < 100, out
  else:
    assert applied == "False" and min(faults[1:]) > 30_000, out
