"""Where a training process's fixed cost goes, hw8jax against the PyTorch script (not a test).

For each variant: a whole training process on the demo set (batch 14, a few steps, every step
logged), launch.py against a PyTorch script doing the same work (imports, data, the original
model from seed 0, Adam, the steps, `torch.save` of model and optimiser). The fixed cost is the
process's wall time less its steps: start-up (launch to the first step's line, less one steady
step) plus wind-down (the last step's line to the exit). Each process also says when its phases
end, so the table splits both sides the same way. hw8jax runs with a warm compilation cache (a
rerun, a resumed run, any run after a model's first on a machine; the cold figure is printed
too), as launch.py runs it, through a wrapper that only timestamps the functions named in
`HW8JAX_PHASES`. Medians of `--reps`, the sides alternating; each process starts on a quiet disk
(the one before's outputs are removed and the disk flushed).

  python bench/fixed_cost.py                       # ta_cnn, resnet_boss, fcn_boss; ~4 minutes
  python bench/fixed_cost.py --variants=fcn_boss --reps=5

Needs torch (the test extra) for the PyTorch side.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (label, module, attribute): when the first call of each ends, in the hw8jax process.
HW8JAX_PHASES = [
    ("flags, config, checks, data headers, keys", "hw8jax.main", "plan"),
    ("initial draw", "hw8jax.train", "assemble"),
    ("train state, step and evaluator set up", "hw8jax.train", "EpochEvaluator"),
    ("data loader, resume check", "hw8jax.train", "_resume"),
    ("run record, logs opened", "hw8jax.metrics", "open_sinks"),
    ("final checkpoint handed to orbax", "hw8jax.train", "_save"),
    ("training curves figure", "hw8jax.figures", "plot_training_curves"),
    ("checkpoint on disk, managers closed", "hw8jax.checkpoint", "finish"),
]

TORCH_SCRIPT = """\
import time
print("phase interpreter", time.time(), flush=True)
import sys
import numpy as np, torch
sys.path.insert(0, {tests!r})
import torch_reference
print("phase imports", time.time(), flush=True)
torch.manual_seed(0)
images = np.load({data!r} + "/trainingset.npy")
print("phase data", time.time(), flush=True)
model = torch_reference.BUILDERS[{variant!r}]().train()
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
print("phase model, optimiser", time.time(), flush=True)
for step in range({steps}):
  x = torch.from_numpy(images[step * 14:(step + 1) * 14].transpose(0, 3, 1, 2).copy()).float()
  x = 2 * x / 255 - 1
  loss = torch.nn.functional.mse_loss(model(x)[0], x)
  opt.zero_grad(); loss.backward(); opt.step()
  print(f"step {{step + 1}}/{steps}  loss {{loss.item():.4f}}", flush=True)
torch.save({{"model": model.state_dict(), "opt": opt.state_dict()}}, {out!r})
print("phase final save", time.time(), flush=True)
"""


def child(argv: list[str]) -> None:
  """Run launch.py with `argv`, printing "phase <label> <time>" when each of HW8JAX_PHASES'
  first calls ends (and when the imports are done, and at exit). Importing hw8jax here, before
  launch.py would, moves no work: launch.py imports the same modules."""
  print("phase interpreter", time.time(), flush=True)
  import atexit
  import functools
  import importlib
  import runpy

  from hw8jax import cpu_tuning

  cpu_tuning.tune_allocator("auto")  # as launch.py does before the imports below start JAX
  import hw8jax.main  # noqa: F401

  print("phase imports", time.time(), flush=True)
  for label, module, attr in HW8JAX_PHASES:
    owner = importlib.import_module(module)
    fn = getattr(owner, attr)

    def timed(*a, _fn=fn, _label=label, **k):
      result = _fn(*a, **k)
      print(f"phase {_label}", time.time(), flush=True)
      return result

    setattr(owner, attr, functools.wraps(fn)(timed))
  atexit.register(lambda: print("phase exit handlers", time.time(), flush=True))
  sys.argv = [os.path.join(ROOT, "launch.py"), *argv]
  runpy.run_path(sys.argv[0], run_name="__main__")


def timed_process(command: list[str], steps: int) -> dict[str, float]:
  """Seconds from launch at which each phase of a process ended, first-seen order, plus
  "steps" (its steps, from the first step's line less one steady step to the last step's line),
  "step" (a steady step) and "exit" (the process gone)."""
  t0 = time.time()
  proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=ROOT)
  marks, step_at = {}, {}
  for line in proc.stdout:
    if line.startswith("phase "):
      label, stamp = line[6:].rsplit(" ", 1)
      marks.setdefault(label, float(stamp) - t0)
    found = re.search(rf"step (\d+)/{steps}\b", line)
    if found:
      step_at[int(found.group(1))] = time.time() - t0
  err = proc.stderr.read()
  if proc.wait() != 0 or len(step_at) != steps:
    raise RuntimeError(f"{' '.join(command)} failed (exit {proc.returncode}): {err[-2000:]}")
  step = statistics.median([step_at[k + 1] - step_at[k] for k in range(1, steps)])
  first = step_at[1] - step
  marks["step"] = step
  marks["first step begins"] = first
  marks["last step done"] = step_at[steps]
  marks["exit"] = time.time() - t0
  return marks


def commands(variant: str, data_dir: str, out: str, cache: str, steps: int) -> dict:
  hw8jax = [sys.executable, os.path.abspath(__file__), "--child", "--",
            f"--config=configs/{variant}.py:demo", f"--workdir={out}", "--mode=train",
            f"--config.data.dir={data_dir}", f"--config.max_steps={steps}",
            "--config.num_epochs=100", "--config.log_every_seconds=0",
            f"--config.compilation_cache={cache}"]
  script = TORCH_SCRIPT.format(tests=os.path.join(ROOT, "tests"), data=data_dir, steps=steps,
                               out=out, variant=variant)
  return {"hw8jax": hw8jax, "PyTorch": [sys.executable, "-c", script]}


def fixed(marks: dict) -> float:
  return marks["first step begins"] + marks["exit"] - marks["last step done"]


def breakdown(marks: dict) -> list[tuple[str, float]]:
  """(phase, seconds) in order: start-up phases up to the first step, then the wind-down's."""
  order = sorted((v, k) for k, v in marks.items()
                 if k not in ("step", "first step begins", "last step done", "exit"))
  rows, prev = [], 0.0
  start = [(v, k) for v, k in order if v <= marks["first step begins"]]
  end = [(v, k) for v, k in order if v > marks["last step done"]]
  for v, k in start:
    rows.append((k, v - prev))
    prev = v
  rows.append(("until the first step (compile or cache load)", marks["first step begins"] - prev))
  prev = marks["last step done"]
  for v, k in end:
    rows.append((k, v - prev))
    prev = v
  rows.append(("interpreter exit", marks["exit"] - prev))
  return rows


def run(variants: list[str], reps: int, steps: int) -> None:
  sys.path.insert(0, ROOT)
  from hw8jax.data.demo import make_demo

  with tempfile.TemporaryDirectory() as tmp:
    data_dir = os.path.join(tmp, "data")
    make_demo(data_dir)
    out = os.path.join(tmp, "out")
    for variant in variants:
      cache = os.path.join(tmp, f"cache_{variant}")
      results = {"hw8jax (cold cache)": [], "hw8jax": [], "PyTorch": []}

      def one(name, command, results=results):
        results[name].append(timed_process(command, steps))
        if os.path.isdir(out):
          shutil.rmtree(out)
        elif os.path.exists(out):
          os.remove(out)
        os.sync()

      one("hw8jax (cold cache)", commands(variant, data_dir, out, cache, steps)["hw8jax"])
      for _ in range(reps):
        for name, command in commands(variant, data_dir, out, cache, steps).items():
          one(name, command)
      report(variant, results, reps)


def report(variant: str, results: dict, reps: int) -> None:
  med = {name: statistics.median(fixed(m) for m in runs) for name, runs in results.items()}
  step = {name: statistics.median(m["step"] for m in runs) for name, runs in results.items()}
  print(f"\n{variant}: fixed cost (s), median of {reps} (cold: one run); steady step in brackets")
  for name in results:
    print(f"  {name:20s} {med[name]:6.2f}   ({step[name]:.3f} s a step)")
  print(f"  ratio hw8jax / PyTorch (warm cache): {med['hw8jax'] / med['PyTorch']:.2f}")
  for name in ("hw8jax", "PyTorch"):
    rows = [breakdown(m) for m in results[name]]
    labels = [label for label, _ in rows[0]]
    print(f"  {name} phases (median s):")
    for i, label in enumerate(labels):
      values = [r[i][1] for r in rows if len(r) > i and r[i][0] == label]
      print(f"    {label:48s} {statistics.median(values):6.2f}")


def main():
  if len(sys.argv) > 1 and sys.argv[1] == "--child":
    child(sys.argv[3:] if sys.argv[2:3] == ["--"] else sys.argv[2:])
    return
  p = argparse.ArgumentParser()
  p.add_argument("--variants", default="ta_cnn,resnet_boss,fcn_boss")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--steps", type=int, default=4)
  args = p.parse_args()
  import platform

  print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.processor() or ''}"
        f"{_cpu_name()}; python {platform.python_version()}")
  run(args.variants.split(","), args.reps, args.steps)


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                  "")
  except OSError:
    return ""


if __name__ == "__main__":
  main()
