"""The one place a run's model is put together: its structure for a config, its weights from
fresh draws, a PyTorch original's file (`init_from`) or a workdir's checkpoint, and its train
and eval graphdefs. Training, scoring, `hw8jax.load`, the threshold and the benchmarks all take
their model from `assemble`, so each follows the config's `cpu_fast_paths` alike."""

from __future__ import annotations

import dataclasses
import functools

import jax
from flax import nnx

from hw8jax import checkpoint, cpu_tuning, models, runtime
from hw8jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Assembled:
  train_def: nnx.GraphDef    # BatchNorm on batch statistics (model.train())
  eval_def: nnx.GraphDef     # BatchNorm on running statistics (model.eval())
  params: dict
  batch_stats: dict
  step: int                  # the checkpoint's step; 0 for fresh or PyTorch weights
  source: str                # where the weights came from, as the outputs say it

  @property
  def state(self) -> tuple:
    """(params, batch_stats): what the scorer and the figures take."""
    return self.params, self.batch_stats


def assemble(config, weights: str = "init", *, key: jax.Array | None = None,
             workdir: str | None = None, which: str | None = None, mesh=None) -> Assembled:
  """The model of `config` with `weights`:
  - "init": what training starts from: the file of `config.init_from`, else weights drawn from
    `key` (replicated over `mesh` if given);
  - "checkpoint": the newest readable `which` checkpoint of `workdir` ("latest" or "best";
    default `config.checkpoint.restore`), replicated over `mesh`;
  - "scoring": what a scoring run scores: the `init_from` file while `workdir` has no such
    checkpoint, else the checkpoint (replicated over `mesh`)."""
  which = which or config.checkpoint.restore
  if weights == "scoring":
    weights = "init" if config.init_from and not checkpoint.exists(workdir, which) else \
        "checkpoint"
  if weights == "checkpoint":
    return _restored(config, workdir, which, mesh)
  if weights != "init":
    raise ValueError(f"weights {weights!r}: use init, checkpoint or scoring")
  if config.init_from:
    from hw8jax.torch_import import load_torch_weights

    model = load_torch_weights(config.model, config.init_from)
    found = _split(model, config, 0, f"the PyTorch weights in {config.init_from}")
  else:
    model = _drawn(config.model, cpu_tuning.draw_key(key, config.cpu_fast_paths))
    found = _split(model, config, 0, "fresh weights")
  if mesh is None:
    return found
  params, stats = jax.device_put(found.state, runtime.replicated(mesh))
  return dataclasses.replace(found, params=params, batch_stats=stats)


def _split(model: nnx.Module, config, step: int, source: str) -> Assembled:
  models.set_fast_paths(model, config.cpu_fast_paths)
  model.train()
  train_def, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  model.eval()
  return Assembled(train_def, nnx.graphdef(model), params, stats, step, source)


def _drawn(variant: str, key: jax.Array) -> nnx.Module:
  """A fresh model, its weights drawn by one compiled program (`_draw_program`)."""
  program, graphdefs = _draw_program(models.variant(variant).build)
  state = program(key)  # traces on first use, which sets graphdefs
  return nnx.merge(graphdefs[0], state)


@functools.cache
def _draw_program(build) -> tuple:
  """(jitted draw(key) -> state, [graphdef]) for a variant's builder, kept for the process:
  a second model of the same variant (a notebook's next `fit`, a test's next run) reuses the
  trace and the compiled program (multi_encoder: 1.6 s of tracing and 1.5 s of lowering each
  time otherwise). Op by op, initialisation ran dozens of small programs, each compiled on
  first use (fcn_boss 3.9 s, multi_encoder 16 s, resnet_boss 13 s on 2 cores). Compiled at
  LLVM optimisation level 1: 1.7 s, 5.4 s and 4.2 s (level 2: 2.1 s, 12.6 s, 10 s). The draws
  equal the op-by-op ones bit for bit, except that resnet_boss's normal draws may differ in the
  last bit (at any level)."""
  graphdefs = []  # the graphdef is static: kept from the trace (fcn_boss: 0.14 s a trace)

  def draw(key):
    graphdef, state = nnx.split(build(rngs=nnx.Rngs(params=key)))
    graphdefs[:] = [graphdef]
    return state

  return jax.jit(draw, compiler_options={"xla_backend_optimization_level": 1}), graphdefs


def _restored(config, workdir: str, which: str, mesh) -> Assembled:
  """From the newest readable checkpoint: params and BatchNorm statistics only (scoring needs
  neither the optimiser state nor the config that shaped it), laid out over `mesh` whatever
  device count wrote them."""
  shape = _split(nnx.eval_shape(lambda: models.build(config.model, rngs=nnx.Rngs(0))), config,
                 0, "")
  target = checkpoint.abstract({"params": shape.params, "batch_stats": shape.batch_stats},
                               runtime.replicated(mesh))
  mngrs = checkpoint.managers(workdir, config.checkpoint.keep)
  try:
    def read(step):
      checkpoint.check_model(mngrs[which], step, config.model)
      return checkpoint.restore_model(mngrs[which], target, step)

    found = checkpoint.newest_intact(mngrs[which], read)
  finally:
    for m in mngrs.values():
      m.close()
  if found is None:
    raise UserError(f"{workdir}: no {which} checkpoint; train first (--mode=train)")
  step, state = found
  return dataclasses.replace(shape, params=state["params"], batch_stats=state["batch_stats"],
                             step=int(step), source=f"the {which} checkpoint (step {step})")
