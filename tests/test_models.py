"""Model contract, PyTorch-default initialisation and weight-import errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hw8jax import models
from hw8jax.models import layers
from hw8jax.torch_import import load_state_dict, torch_targets

from conftest import built, images, require_torch

AUX_KEYS = {
    "ta_fcn": {"z"}, "ta_cnn": {"z"}, "fcn_medium": {"z"}, "fcn_strong": {"z"},
    "fcn_boss": {"z"}, "ta_vae": {"mu", "logvar"},
    "multi_encoder": {"mu", "logvar", "fcn_feat", "cnn_feat"},
    "resnet_boss": {"z", "recon_noise", "logits", "logits_noise"},
}
LATENT_SHAPE = {
    "ta_fcn": (3,), "ta_cnn": (8, 8, 48), "ta_vae": (8, 8, 48), "fcn_medium": (10,),
    "fcn_strong": (128,), "fcn_boss": (128,), "multi_encoder": (8, 8, 144), "resnet_boss": (256,),
}
HAS_BATCHNORM = {"fcn_boss", "multi_encoder", "resnet_boss"}


def test_unknown_variant_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown model 'fcn_huge'; choose one of ta_fcn"):
    models.build("fcn_huge", rngs=nnx.Rngs(0))


def test_registering_a_model_that_keeps_other_state_is_a_clear_error():
  """A run keeps only parameters and BatchNorm statistics; a model that keeps a key (Dropout
  given rngs) is refused when registered, naming what it keeps, and is not registered."""
  class KeepsAKey(nnx.Module):
    def __init__(self, rngs):
      self.linear = layers.Linear(4, 4, rngs=rngs)
      self.dropout = nnx.Dropout(0.5, rngs=rngs)

  with pytest.raises(ValueError, match=r"model 'keeps_a_key' keeps state other than nnx.Param "
                     r"and nnx.BatchStat \(dropout\.rngs\.count, dropout\.rngs\.key\); "):
    models.register("keeps_a_key", KeepsAKey, loss=lambda x, recon, aux: (0.0, {}))
  assert "keeps_a_key" not in models.REGISTRY


@nnx.jit
def sampled_call(model, x, key):
  return model(x, rngs=nnx.Rngs(noise=key))


@nnx.jit
def deterministic_calls(model, x):
  z = model.encode(x)
  return z, model.decode(z), model(x)[0]


@pytest.mark.parametrize("variant", models.VARIANTS)
def test_contract(variant, seed):
  """Calls are jitted, as training and scoring run them (op by op, multi_encoder compiled for
  16 s)."""
  model = built(variant, seed)
  x = jnp.asarray(images(np.random.default_rng(seed), 2))
  stats_before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))

  # Train mode: batch statistics, and the running statistics move.
  recon, aux = sampled_call(model, x, jax.random.key(seed))
  assert recon.shape == (2, 64, 64, 3) and recon.dtype == jnp.float32
  assert float(jnp.abs(recon).max()) <= 1.0  # Tanh output
  assert set(aux) == AUX_KEYS[variant]
  stats_after = nnx.state(model, nnx.BatchStat)
  moved = [not np.array_equal(a, b) for a, b in
           zip(jax.tree.leaves(stats_before), jax.tree.leaves(stats_after), strict=True)]
  assert (len(moved) > 0 and all(moved)) == (variant in HAS_BATCHNORM)

  # Eval mode: running statistics, nothing moves, each image independent of its batch mates.
  model.eval()
  frozen = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  z, det, called = deterministic_calls(model, x)
  assert z.shape == (2, *LATENT_SHAPE[variant])
  np.testing.assert_allclose(np.asarray(called), np.asarray(det), atol=1e-6)
  # Image 0 beside another mate: the batch shape (and so the compiled program) stays the same.
  other_mate = jnp.stack([x[0], -x[1]])
  np.testing.assert_allclose(np.asarray(deterministic_calls(model, other_mate)[1])[0],
                             np.asarray(det)[0], atol=1e-5)
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(nnx.state(model, nnx.BatchStat)),
                  strict=True):
    np.testing.assert_array_equal(a, np.asarray(b))

  # Randomness comes only from the rngs passed in.
  def sampled(seed_):
    recon_, aux_ = sampled_call(model, x, jax.random.key(seed_))
    return np.asarray(aux_["recon_noise"] if variant == "resnet_boss" else recon_)

  np.testing.assert_array_equal(sampled(seed + 1), sampled(seed + 1))
  stochastic = models.variant(variant).stochastic
  assert np.array_equal(sampled(seed + 1), sampled(seed + 2)) == (not stochastic)


def test_the_config_seed_alone_draws_the_initial_weights(seed):
  """runtime.run_keys / assemble, as a run initialises: the same seed gives the same
  weights; another seed changes every tensor (none is drawn from a fixed key), all but the
  elements two independent draws share by chance (one of 18,432 at seed 1249023942); the run's
  init, noise and scoring keys are three different keys."""
  from hw8jax import runtime
  from hw8jax.assemble import assemble
  from hw8jax.configs import default
  from hw8jax.plan import plan

  c = default.for_model("ta_vae")

  def weights(s):
    c.seed = s
    return [np.asarray(a) for a in jax.tree.leaves(assemble(plan(c)).params)]

  a, b, other = weights(seed), weights(seed), weights(seed + 1)
  assert len(a) == 14  # 7 convs and transposed convs, kernel and bias each
  for x, y, z in zip(a, b, other, strict=True):
    np.testing.assert_array_equal(x, y)
    assert np.mean(x == z) < 1e-3 if x.size > 1 else x != z
  keys = runtime.run_keys(seed)
  data = {name: np.asarray(jax.random.key_data(k)).tobytes() for name, k in keys.items()}
  assert set(data) == {"init", "noise", "score"} and len(set(data.values())) == 3


def test_weights_drawn_under_cpu_fast_paths_are_jax_default_threefry_bits(seed):
  """cpu_tuning.FUSED_THREEFRY, the key kind the initial weights are drawn with under
  cpu_fast_paths: JAX's own threefry bits, splits and folds, bit for bit, from a program without
  the while loop of JAX's CPU form. Through assemble: the same weights with the fast path
  on and off."""
  from hw8jax import cpu_tuning
  from hw8jax.assemble import assemble
  from hw8jax.configs import default
  from hw8jax.plan import plan

  key = jax.random.key(seed)
  fused = cpu_tuning.draw_key(key, True)
  assert cpu_tuning.draw_key(key, False) is key
  assert jax.random.key_impl(fused) != jax.random.key_impl(key)
  for shape in [(7,), (3, 5, 2), (64, 3, 3, 3), (0,)]:
    for draw in (jax.random.uniform, jax.random.normal,
                 lambda k, s: jax.random.bits(k, s, jnp.uint32),
                 lambda k, s: jax.random.bits(k, s, jnp.uint8)):
      np.testing.assert_array_equal(draw(fused, shape), draw(key, shape))
  for derive in (lambda k: jax.random.split(k, 3), lambda k: jax.random.fold_in(k, 17)):
    np.testing.assert_array_equal(jax.random.key_data(derive(fused)),
                                  jax.random.key_data(derive(key)))
  program = jax.jit(lambda k: jax.random.uniform(k, (1000,))).lower(fused).as_text()
  assert "while" not in program

  c = default.for_model("ta_vae")
  weights = {}
  for setting in ("on", "off"):
    c.cpu_fast_paths = setting
    weights[setting] = jax.tree.leaves(assemble(plan(c), key=key).state)
  assert len(weights["on"]) == 14
  for a, b in zip(weights["on"], weights["off"], strict=True):
    np.testing.assert_array_equal(a, b)


def _stats(a: np.ndarray):
  """(mean, std, max |a|, kurtosis). Squares, not `** 4`: numpy's float power calls pow() per
  element, 20 s over fcn_boss's tensors."""
  a = a.astype(np.float64).ravel()
  mean = a.mean()
  d2 = np.square(a - mean)
  var = d2.mean()
  kurt = np.square(d2).mean() / var**2 if var > 0 else 0.0
  return mean, np.sqrt(var), np.abs(a).max(), kurt


@pytest.mark.parametrize("variant", models.VARIANTS)
def test_initialisation_matches_pytorch(variant, seed):
  """Each tensor's distribution matches what PyTorch draws for the same layer.

  Constants (BatchNorm, PReLU) must be equal. Random tensors: the std within 15% (n >= 200) or
  60% (16 <= n < 200), the max |w| within 15% for uniform inits (n >= 200, where the sample max
  is near the bound), the kurtosis within 0.4 (n >= 2000: uniform is 1.8, normal 3.0), the mean
  within 6 standard errors. Tensors of fewer than 16 values are checked only to be finite.
  """
  torch = require_torch()
  import torch_reference

  torch.manual_seed(seed)
  ref = {k: v.numpy() for k, v in torch_reference.BUILDERS[variant]().state_dict().items()}
  model = built(variant, seed)
  checked = 0
  for key, target, _, _ in torch_targets(model):
    got, want = np.asarray(target[...]), ref[key]
    assert got.size == want.size, key
    checked += 1
    if np.all(want == want.ravel()[0]):
      np.testing.assert_array_equal(got.ravel(), want.ravel(), err_msg=key)
      continue
    assert np.all(np.isfinite(got)), key
    n = got.size
    if n < 16:
      continue
    mg, sg, xg, kg = _stats(got)
    mw, sw, xw, kw = _stats(want)
    assert abs(sg / sw - 1) < (0.15 if n >= 200 else 0.6), (key, sg, sw)
    assert abs(mg - mw) < 6 * sw / np.sqrt(n), (key, mg, mw)
    if n >= 2000:
      assert abs(kg - kw) < 0.4, (key, kg, kw)
    if n >= 200 and kw < 2.2:  # uniform
      assert abs(xg / xw - 1) < 0.15, (key, xg, xw)
  assert checked == len([k for k in ref if not k.endswith("num_batches_tracked")])


def test_import_reports_every_mismatch_and_changes_nothing(seed):
  model = models.build("ta_cnn", rngs=nnx.Rngs(seed))
  before = jax.tree.map(np.asarray, nnx.state(model))
  rng = np.random.default_rng(seed)
  sd = {k: rng.normal(size=s).astype(np.float32) for k, s in [
      ("encoder.0.weight", (12, 3, 4, 4)), ("encoder.0.bias", (12,)),
      ("encoder.2.weight", (24, 12, 3, 3)),  # wrong kernel size
      ("encoder.2.bias", (24,)), ("encoder.4.weight", (48, 24, 4, 4)), ("encoder.4.bias", (48,)),
      ("decoder.0.weight", (48, 24, 4, 4)), ("decoder.0.bias", (24,)),
      ("decoder.2.weight", (24, 12, 4, 4)), ("decoder.2.bias", (12,)),
      ("decoder.4.weight", (12, 3, 4, 4)),  # decoder.4.bias missing
      ("decoder.6.weight", (3, 3)),  # no such layer
  ]}
  with pytest.raises(ValueError) as err:
    load_state_dict(model, sd)
  msg = str(err.value)
  assert "missing decoder.4.bias (3,)" in msg
  assert "shape of encoder.2.weight: got (24, 12, 3, 3), model needs (24, 12, 4, 4)" in msg
  assert "unexpected decoder.6.weight (3, 3)" in msg
  assert "\n" not in msg
  after = jax.tree.map(np.asarray, nnx.state(model))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("whole_model", [False, True])
def test_import_from_torch_save_file(tmp_path, seed, whole_model):
  torch = require_torch()
  import torch_reference

  torch.manual_seed(seed)
  ref = torch_reference.TACNN().eval()
  path = tmp_path / "model.pt"
  torch.save(ref if whole_model else ref.state_dict(), path)
  model = load_state_dict(models.build("ta_cnn", rngs=nnx.Rngs(0)), path)
  model.eval()
  x = images(np.random.default_rng(seed), 2)
  with torch.no_grad():
    want = ref(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))[0].numpy()
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))[0]), want.transpose(0, 2, 3, 1),
                             atol=1e-5)


def test_import_of_a_missing_file_names_it(tmp_path):
  from hw8jax.torch_import import TorchFileError

  with pytest.raises(TorchFileError, match=r"nope.pt: cannot read it \(No such file"):
    load_state_dict(models.build("ta_cnn", rngs=nnx.Rngs(0)), tmp_path / "nope.pt")


@pytest.mark.parametrize("kernel,stride,padding,size", [(4, 2, 1, 6), (4, 2, 1, 2), (6, 2, 2, 6),
                                                        (3, 3, 0, 6), (3, 1, 1, 6), (5, 2, 1, 6)])
def test_subpixel_transposed_conv_matches_xla(kernel, stride, padding, size, seed):
  """layers.ConvTranspose's sub-pixel form against XLA's transposed conv (the nnx.ConvTranspose
  it subclasses): outputs and gradients within float32 rounding (1e-5 relative in L2). Inputs of
  2x2 take the patches-and-matmul branch; (5, 2, 1) does not upsample exactly by its stride and
  must take XLA's path."""
  layer = layers.conv_transpose(5, 7, kernel, stride, padding, rngs=nnx.Rngs(seed))
  assert (layer._subpixel_plan() is None) == ((kernel, stride, padding) == (5, 2, 1))
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(2, size, size, 5)), jnp.float32)
  out_shape = jax.eval_shape(layer, x).shape
  assert out_shape == (2, (size - 1) * stride - 2 * padding + kernel, out_shape[1], 7)
  cotangent = jnp.asarray(rng.normal(size=out_shape), jnp.float32)

  def run(call):
    def objective(layer, x):
      y = call(layer, x)
      return jnp.sum(y * cotangent), y
    (_, y), (g_layer, g_x) = nnx.value_and_grad(objective, argnums=(0, 1), has_aux=True)(layer, x)
    return [y, g_x, g_layer.kernel[...], g_layer.bias[...]]

  ours = run(lambda layer, x: layer(x))
  xla = run(lambda layer, x: nnx.ConvTranspose.__call__(layer, x))
  for a, b in zip(ours, xla, strict=True):
    assert a.shape == b.shape
    assert float(jnp.linalg.norm(a - b)) <= 1e-5 * float(jnp.linalg.norm(b))


def test_max_pool_and_its_gradient_match_torch_with_ties(seed):
  """layers.max_pool_3x3_s2 (nine strided windows, a custom gradient) against PyTorch's
  MaxPool2d(3, 2, 1): outputs equal, and with many tied maxima (small integers, as after a ReLU
  many zeros) each window's gradient goes to its first maximum in row-major order. Odd and even
  sizes. Tolerance 1e-6: overlapping windows add their shares in another order."""
  torch = require_torch()
  rng = np.random.default_rng(seed)
  for shape in [(2, 8, 8, 3), (2, 7, 9, 4)]:
    x = rng.integers(-1, 3, size=shape).astype(np.float32)
    g = rng.normal(size=(shape[0], (shape[1] + 1) // 2, (shape[2] + 1) // 2, shape[3]))
    g = g.astype(np.float32)
    y, vjp = jax.vjp(layers.max_pool_3x3_s2, jnp.asarray(x))
    (dx,) = vjp(jnp.asarray(g))
    xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    yt = torch.nn.functional.max_pool2d(xt, 3, 2, 1)
    yt.backward(torch.from_numpy(np.ascontiguousarray(g.transpose(0, 3, 1, 2))))
    np.testing.assert_array_equal(np.asarray(y), yt.detach().numpy().transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(dx), xt.grad.numpy().transpose(0, 2, 3, 1), atol=1e-6)
