"""The one place a run's model is put together, from its plan (`hw8jax.plan`).

`assemble(plan, ...)` builds the model with fresh draws, a PyTorch original's file
(`init_from`) or a workdir's checkpoint, its train and eval graphdefs and its scorer. Training,
scoring, `hw8jax.load` and the threshold all take their model from here, so each follows one
policy.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
from flax import nnx

from hw8jax import checkpoint, cpu_tuning, models, runtime
from hw8jax.errors import UserError
from hw8jax.plan import Plan
from hw8jax.score import make_scorer
from hw8jax.torch_import import load_torch_weights


@dataclasses.dataclass(frozen=True)
class Assembled:
  plan: Plan
  train_def: nnx.GraphDef    # BatchNorm on batch statistics (model.train())
  eval_def: nnx.GraphDef     # BatchNorm on running statistics (model.eval())
  scorer: Callable           # score.make_scorer of eval_def, as the plan's config scores
  mapper: Callable           # the same, giving anomaly maps (maps=True)
  params: dict
  batch_stats: dict
  step: int                  # the checkpoint's step; 0 for fresh or PyTorch weights
  source: str                # where the weights came from, as the outputs say it

  @property
  def state(self) -> tuple:
    """(params, batch_stats): what the scorer and the figures take."""
    return self.params, self.batch_stats


def assemble(run: Plan, weights: str = "init", *, key: jax.Array | None = None,
             workdir: str | None = None, which: str | None = None, mesh=None) -> Assembled:
  """The model of the plan `run` with `weights`:
  - "init": what training starts from: the file of `init_from`, else weights drawn from `key`
    (default the plan's init key; replicated over `mesh` if given);
  - "checkpoint": the newest readable `which` checkpoint of `workdir` ("latest" or "best";
    default `checkpoint.restore`), replicated over `mesh`;
  - "scoring": what a scoring run scores: the `init_from` file while `workdir` has no such
    checkpoint, else the checkpoint (replicated over `mesh`)."""
  config = run.config
  which = which or config.checkpoint.restore
  if weights == "scoring":
    weights = "init" if config.init_from and not checkpoint.exists(workdir, which) else \
        "checkpoint"
  if weights == "checkpoint":
    return _restored(run, workdir, which, mesh)
  if weights != "init":
    raise ValueError(f"weights {weights!r}: use init, checkpoint or scoring")
  if config.init_from:
    model = load_torch_weights(config.model, config.init_from)
    found = _split(model, run, 0, f"the PyTorch weights in {config.init_from}")
  else:
    key = run.keys["init"] if key is None else key
    model = _drawn(run.variant, cpu_tuning.draw_key(key, run.fast_paths))
    found = _split(model, run, 0, "fresh weights")
  if mesh is None:
    return found
  params, stats = jax.device_put(found.state, runtime.replicated(mesh))
  return dataclasses.replace(found, params=params, batch_stats=stats)


def _split(model: nnx.Module, run: Plan, step: int, source: str) -> Assembled:
  models.set_fast_paths(model, run.fast_paths)
  model.train()
  train_def, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  model.eval()
  eval_def, score = nnx.graphdef(model), run.config.score
  scorer, mapper = (make_scorer(
      eval_def, metric=score.metric, topk=score.topk, sample=score.sample,
      stochastic=run.variant.stochastic, transform=run.transform,
      compute_dtype=run.compute_dtype, fast_paths=run.fast_paths, maps=maps)
      for maps in (False, True))
  return Assembled(run, train_def, eval_def, scorer, mapper, params, stats, step, source)


def _drawn(variant: models.Variant, key: jax.Array) -> nnx.Module:
  """A fresh model, its weights drawn by one compiled program (`_draw_program`)."""
  program, graphdefs = _draw_program(variant.build)
  state = program(key)  # traces on first use, which sets graphdefs
  return nnx.merge(graphdefs[0], state)


@functools.cache
def _draw_program(build) -> tuple:
  """(jitted draw(key) -> state, [graphdef]) for a variant's builder, kept for the process:
  a second model of the same variant (a notebook's next `fit`, a test's next run) reuses the
  trace and the compiled program. Op by op, initialisation ran dozens of small programs, each
  compiled on first use; as one program at LLVM optimisation level 1 it compiles fastest
  (docs/performance.md). The draws equal the op-by-op ones bit for bit, except that
  resnet_boss's normal draws may differ in the last bit (at any level)."""
  graphdefs = []  # the graphdef is static: kept from the trace rather than traced again

  def draw(key):
    graphdef, state = nnx.split(build(rngs=nnx.Rngs(params=key)))
    graphdefs[:] = [graphdef]
    return state

  return jax.jit(draw, compiler_options={"xla_backend_optimization_level": 1}), graphdefs


def _restored(run: Plan, workdir: str, which: str, mesh) -> Assembled:
  """From the newest readable checkpoint: params and BatchNorm statistics only (scoring needs
  neither the optimiser state nor the config that shaped it), laid out over `mesh` whatever
  device count wrote them."""
  config = run.config
  shape = _split(nnx.eval_shape(lambda: run.variant.build(rngs=nnx.Rngs(0))), run, 0, "")
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
