"""hw8jax against the PyTorch originals, side by side on this machine (not a test).

For every variant: train-step and scoring throughput (images/s) of hw8jax's jitted step and
scorer against the PyTorch original (forward, loss, backward, Adam step; eval forward and the
per-image error), timed alternately in one process after warm-up; medians and the ratio
hw8jax / PyTorch. Then one fcn_boss epoch with the crop transform end to end: hw8jax's grain
pipeline with the transform in the step, against the seed's pipeline (a torch DataLoader whose
Dataset applies the transform to one image at a time, as torchvision's Resize on a tensor does).
Last, the fixed cost of whole training processes of ta_cnn, resnet_boss and fcn_boss against
PyTorch scripts doing the same work, phase by phase (bench/fixed_cost.py).
Scoring runs at score.batch_size (500), the batch a scoring run uses.

Each side runs as its users run it: hw8jax in this process with the host allocator settings a
run makes (`cpu_fast_paths`, hw8jax.cpu_tuning.tune_allocator), PyTorch in a worker process of its
own with glibc's defaults, driven step by step from here so the alternation holds. A second
PyTorch worker with hw8jax's allocator settings shows what PyTorch would gain from them (the
"torch*" column). The single-layer table runs both sides in this process.

  python bench/compare_torch.py --quick          # about 7 minutes on a 2-core CPU
  python bench/compare_torch.py --batch=2000 --epoch_images=100000

Needs torch (the test extra). The PyTorch originals are the test suite's references
(tests/torch_reference.py), built from the spec with the originals' layer lists.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx

from hw8jax import cpu_tuning, data, models, train_step
from hw8jax.configs import default
from hw8jax.data.demo import synthetic_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import fixed_cost  # noqa: E402
import timing  # noqa: E402

import torch_reference  # noqa: E402


def with_torch_weights(variant: str):
  """hw8jax's model of `variant` holding the weights of PyTorch's, built from seed 0 (as the
  workers build theirs), through a torch.save file as a run's `init_from` takes it."""
  torch.manual_seed(0)
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, f"{variant}.pt")
    torch.save(torch_reference.BUILDERS[variant]().state_dict(), path)
    return timing.assembled(variant, init_from=path)


def machine() -> str:
  return f"{timing.machine()}; torch {torch.__version__} with {torch.get_num_threads()} threads"


def normalize(images: np.ndarray) -> np.ndarray:
  """data.normalize in numpy: a worker need not start JAX."""
  return images.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def nchw(x) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def bench_variant(variant: str, batch: int, score_batch: int, reps: int, workers):
  """((train img/s hw8jax, torch, torch*), (score img/s ...)): `workers` run PyTorch's side."""
  model = with_torch_weights(variant)
  graphdef, (params, stats) = model.train_def, model.state
  imgs = synthetic_images(max(batch, score_batch), 0)
  jax_train, _, current = timing.train_step_runner(
      variant, graphdef, *jax.tree.map(jnp.copy, (params, stats)), jax.device_put(imgs[:batch]))
  for worker in workers:
    worker(("variant", variant, batch, score_batch))
  times = timing.alternate([jax_train, *(lambda w=w: w(("train",)) for w in workers)], reps)
  train_row = tuple(batch / t for t in times)

  scorer = model.scorer
  s_u8 = jax.device_put(imgs[:score_batch])
  index = jax.numpy.arange(score_batch)
  key = jax.random.key(0)
  state = current()[0]
  model_state = (state["params"], state["batch_stats"])

  def jax_score():
    jax.block_until_ready(scorer(model_state, s_u8, index, key))

  times = timing.alternate([jax_score, *(lambda w=w: w(("score",)) for w in workers)], reps)
  return train_row, tuple(score_batch / t for t in times)


def torch_variant(variant: str, batch: int, score_batch: int) -> dict:
  """PyTorch's train step (forward, loss, backward, Adam) and scoring pass (eval forward, the
  per-image error) of `variant`, as functions; built in a worker."""
  torch.manual_seed(0)
  ref = torch_reference.BUILDERS[variant]().train()
  imgs = synthetic_images(max(batch, score_batch), 0)
  xt, st = nchw(normalize(imgs[:batch])), nchw(normalize(imgs[:score_batch]))
  opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
  noise, s_noise = torch_noise(variant, batch), torch_noise(variant, score_batch)

  def train_step():
    ref.train()
    recon, aux = ref(xt, **noise)
    loss = torch_reference.loss(variant, xt, recon, aux)
    opt.zero_grad()
    loss.backward()
    opt.step()

  def score():
    ref.eval()
    with torch.no_grad():
      recon, _ = ref(st, **s_noise)
      torch.sqrt(((recon - st) ** 2).sum(dim=(1, 2, 3))).numpy()

  return {"train": train_step, "score": score}


def torch_worker(conn, tuned: bool) -> None:
  """A process running PyTorch's side on request: ("variant", ...) builds a variant's
  functions, ("train",) / ("score",) runs one, ("epoch", images, batch) times the seed's
  epoch; each answered when done. `tuned`: with hw8jax's allocator settings."""
  if tuned:
    cpu_tuning.tune_allocator("on")
  torch.set_num_threads(os.cpu_count())
  fns = {}
  while (request := conn.recv()) is not None:
    kind, *args = request
    if kind == "variant":
      fns = torch_variant(*args)
      conn.send(None)
    elif kind == "epoch":
      conn.send(torch_epoch(*args))
    else:
      fns[kind]()
      conn.send(None)


def start_torch_workers():
  """(default worker, tuned worker) as functions of a request, blocking until it is done, and
  a function stopping both."""
  context = multiprocessing.get_context("spawn")
  calls, stops = [], []
  for tuned in (False, True):
    parent, child = context.Pipe()
    process = context.Process(target=torch_worker, args=(child, tuned), daemon=True)
    process.start()

    def call(request, parent=parent):
      parent.send(request)
      return parent.recv()

    calls.append(call)
    stops.append(lambda parent=parent, process=process: (parent.send(None), process.join()))
  return calls, lambda: [stop() for stop in stops]


def torch_noise(variant: str, batch: int) -> dict:
  if variant in ("ta_vae", "multi_encoder"):
    return {"eps": torch.randn(batch, 48, 8, 8)}
  if variant == "resnet_boss":
    return {"noise": torch.randn(batch, 256)}
  return {}


def bench_ops(batch: int, reps: int):
  """Forward time of single layers, hw8jax (nnx layer under jit) vs PyTorch: where the gap is."""
  from hw8jax.models import layers

  rngs = nnx.Rngs(0)
  cases = [
      ("conv 3x3 64->64 on 16x16", layers.conv(64, 64, 3, 1, 1, rngs=rngs),
       torch.nn.Conv2d(64, 64, 3, 1, 1), (batch, 16, 16, 64)),
      ("conv 7x7 s2 3->64 on 64x64", layers.conv(3, 64, 7, 2, 3, rngs=rngs),
       torch.nn.Conv2d(3, 64, 7, 2, 3), (batch, 64, 64, 3)),
      ("conv-T k4 s2 48->24 on 8x8", layers.conv_transpose(48, 24, rngs=rngs),
       torch.nn.ConvTranspose2d(48, 24, 4, 2, 1), (batch, 8, 8, 48)),
      ("conv-T k4 s2 64->32 on 16x16", layers.conv_transpose(64, 32, rngs=rngs),
       torch.nn.ConvTranspose2d(64, 32, 4, 2, 1), (batch, 16, 16, 64)),
      ("linear 12288->4096", layers.Linear(12288, 4096, rngs=rngs),
       torch.nn.Linear(12288, 4096), (batch, 12288)),
  ]
  rows = []
  for name, jlayer, tlayer, shape in cases:
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape).astype(np.float32))
    xt = torch.from_numpy(np.ascontiguousarray(
        np.array(x).transpose(0, 3, 1, 2) if len(shape) == 4 else np.array(x)))
    graphdef, state = nnx.split(jlayer)
    fwd = jax.jit(lambda s, a, g=graphdef: nnx.merge(g, s)(a))

    def run_jax(fwd=fwd, state=state, x=x):
      jax.block_until_ready(fwd(state, x))

    def run_torch(tlayer=tlayer, xt=xt):
      with torch.no_grad():
        tlayer(xt)

    t_jax, t_torch = timing.alternate([run_jax, run_torch], reps)
    rows.append((name, t_jax, t_torch))
  return rows


class SeedDataset(torch.utils.data.Dataset):
  """The seed's data path: a uint8 array, one image at a time through the crop transform."""

  def __init__(self, images):
    self.images = images

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    x = torch.from_numpy(np.ascontiguousarray(self.images[i].transpose(2, 0, 1))).float()
    x = F.interpolate(x[None], size=(256, 256), mode="bilinear", antialias=True)
    x = x[:, :, 30:226, 30:226]
    x = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True)[0]
    return 2.0 * x / 255.0 - 1.0


def bench_epoch(num_images: int, batch: int, worker):
  """Seconds for one fcn_boss epoch with the crop transform, hw8jax vs the seed's pipeline (in
  the PyTorch `worker`)."""
  images = synthetic_images(num_images, 1)
  steps = num_images // batch
  model = with_torch_weights("fcn_boss")
  graphdef, (params, stats) = model.train_def, model.state
  cfg = default.for_model("fcn_boss")
  cfg.schedule.name = "warmup_cosine"
  tx = train_step.make_optimizer(cfg, train_step.make_schedule(cfg, steps))
  step = jax.jit(train_step.make_train_step(graphdef, tx, models.variant("fcn_boss").loss,
                                            data.crop_transform,
                                       jax.random.key(0)), donate_argnums=0)
  state = train_step.init_state(params, stats, tx)
  # Compile outside the timed epoch, as a long run amortises it.
  state, m = step(state, jnp.asarray(images[:batch]))
  jax.block_until_ready(m)

  t = time.perf_counter()
  for b in data.train_dataset(images, batch_size=batch, seed=0, num_steps=steps):
    state, m = step(state, b["image"])
  jax.block_until_ready(m)
  t_jax = time.perf_counter() - t

  return t_jax, worker(("epoch", num_images, batch))


def torch_epoch(num_images: int, batch: int) -> float:
  """Seconds for one fcn_boss epoch through the seed's pipeline (DataLoader, per-image crop)."""
  images = synthetic_images(num_images, 1)
  torch.manual_seed(0)
  ref = torch_reference.BUILDERS["fcn_boss"]().train()
  opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
  loader = torch.utils.data.DataLoader(SeedDataset(images), batch_size=batch, shuffle=True,
                                       drop_last=True)
  t = time.perf_counter()
  for x in loader:
    recon, _ = ref(x)
    loss = F.mse_loss(recon, x)
    opt.zero_grad()
    loss.backward()
    opt.step()
  return time.perf_counter() - t


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true", help="small batches, few repeats")
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--score_batch", type=int,
                 default=default.for_model("fcn_boss").score.batch_size,
                 help="default: the scoring batch of a run (score.batch_size)")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--epoch_images", type=int, default=4096)
  p.add_argument("--epoch_batch", type=int, default=256)
  p.add_argument("--variants", default=",".join(models.VARIANTS))
  p.add_argument("--skip_variants", action="store_true", help="only layers, epoch, fixed cost")
  p.add_argument("--skip_fixed", action="store_true", help="no whole-process fixed cost")
  args = p.parse_args()
  if args.quick:
    args.batch, args.reps = 32, 3
    args.epoch_images, args.epoch_batch = 1024, 64
  cpu_tuning.tune_allocator("auto")  # as a run does, before JAX starts
  torch.set_num_threads(os.cpu_count())
  workers, stop_workers = start_torch_workers()
  print("machine:", machine())
  print(f"train batch {args.batch}, score batch {args.score_batch}, median of {args.reps}, "
        "images/s; torch: PyTorch with glibc's allocator defaults, torch*: with hw8jax's "
        "allocator settings; ratio = hw8jax / torch")
  print(f"{'variant':14s} {'train hw8jax':>13s} {'torch':>9s} {'torch*':>9s} {'ratio':>6s}   "
        f"{'score hw8jax':>13s} {'torch':>9s} {'torch*':>9s} {'ratio':>6s}")
  for v in [] if args.skip_variants else args.variants.split(","):
    (tj, tt, tt2), (sj, st, st2) = bench_variant(v, args.batch, args.score_batch, args.reps,
                                                 workers)
    print(f"{v:14s} {tj:13.1f} {tt:9.1f} {tt2:9.1f} {tj / tt:6.2f}   {sj:13.1f} {st:9.1f} "
          f"{st2:9.1f} {sj / st:6.2f}", flush=True)
  print(f"single layers, forward, batch {args.batch}, median of {args.reps}, ms (both sides in "
        "this process):")
  for name, t_jax, t_torch in bench_ops(args.batch, args.reps):
    print(f"  {name:30s} hw8jax {t_jax * 1e3:8.2f}  torch {t_torch * 1e3:8.2f}  "
          f"ratio (torch time / hw8jax time) {t_torch / t_jax:5.2f}", flush=True)
  t_jax, t_torch = bench_epoch(args.epoch_images, args.epoch_batch, workers[0])
  print(f"fcn_boss epoch with crop, {args.epoch_images} images, batch {args.epoch_batch}: "
        f"hw8jax {t_jax:.1f} s, seed pipeline {t_torch:.1f} s, speed-up {t_torch / t_jax:.2f}x",
        flush=True)
  stop_workers()
  if not args.skip_fixed:  # bench/fixed_cost.py: the three variants the issue names
    fixed_cost.run(["ta_cnn", "resnet_boss", "fcn_boss"], args.reps, steps=4)

if __name__ == "__main__":
  main()
