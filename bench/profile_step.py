"""Where a variant's train step or scorer spends its time, per XLA operation (not a test).

Runs the jitted step (or scorer) a few times under `jax.profiler`, then sums the duration of
each executed operation (fusion) over the traced calls and prints the largest, each with the
main HLO op it wraps (convolution, dot, reduce-window...) and its shape. On CPU, operations of
one call may run concurrently on the cores, so their sum can exceed the call's wall time.

  python bench/profile_step.py resnet_boss              # train step, batch 32
  python bench/profile_step.py fcn_strong --score --batch=500
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile

import jax
import jax.numpy as jnp
import timing

from hw8jax.data.demo import synthetic_images


def compiled_call(variant: str, batch: int, score: bool):
  """(jitted fn, a function giving its current arguments, a function that runs it once and
  blocks)."""
  model = timing.assembled(variant)
  images = jax.device_put(synthetic_images(batch, 0))
  if score:
    fn = model.scorer
    args = [model.state, images, jnp.arange(batch), jax.random.key(0)]
    return fn, lambda: args, lambda: jax.block_until_ready(fn(*args))
  run, fn, current = timing.train_step_runner(variant, model.train_def, *model.state, images)
  return fn, current, run


ASYNC = "a conv XLA runs on its own threads (Eigen), its event shorter than its work"


def op_summaries(hlo_text: str) -> dict:
  """{instruction name: "shape :: main op"} for the fusions and calls of an HLO module."""
  bodies, current = {}, None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line) if not line.startswith(" ") else None
    if head:
      current = bodies.setdefault(head.group(1), [])
    elif current is not None:
      current.append(line.strip())
  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) .*calls=%?([\w.\-]+)", line)
    if m:
      ops = [op for op in bodies.get(m.group(3), [])
             if re.search(r" (convolution|dot|reduce-window|select-and-scatter|reduce|gather|"
                          r"scatter)\(", op)]
      main = re.sub(r", metadata=.*", "", ops[0])[:140] if ops else ""
      out[m.group(1)] = f"{m.group(2)} :: {main}"
  fused = set(re.findall(r"calls=%?([\w.\-]+)", hlo_text))
  for body, lines in bodies.items():
    for line in lines if body not in fused else ():  # a conv of its own, not in a fusion
      conv = re.match(r"(?:ROOT )?%?([\w.\-]+) = (\S+) convolution\(", line)
      if conv:
        out[conv.group(1)] = f"{conv.group(2)} :: {ASYNC}: {line[:100]}"
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("variant")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--score", action="store_true", help="the scorer instead of the train step")
  p.add_argument("--calls", type=int, default=5)
  p.add_argument("--top", type=int, default=30)
  args = p.parse_args()
  fn, fn_args, run = compiled_call(args.variant, args.batch, args.score)
  for _ in range(3):
    run()
  wall = timing.alternate([run], args.calls, warmup=0)[0]
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp, create_perfetto_trace=True)
    for _ in range(args.calls):
      run()
    jax.profiler.stop_trace()
    trace = json.load(gzip.open(glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)[0]))
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  hlo = fn.lower(*fn_args()).compile().as_text()
  described = op_summaries(hlo)
  per_op = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e["name"] in described:
      per_op[e["name"]] += e.get("dur", 0) / 1e3 / args.calls
  print("machine:", timing.machine())
  what = "scorer" if args.score else "train step"
  print(f"{args.variant} {what}, batch {args.batch}: {wall * 1e3:.1f} ms a call (median of "
        f"{args.calls}); operations summed {sum(per_op.values()):.1f} ms; largest, ms a call:")
  for name, ms in per_op.most_common(args.top):
    print(f"  {ms:8.2f}  {name}: {described[name]}")
  if any(ASYNC in described[name] for name in per_op):
    # Such a conv's event ends when its work is handed to the threads, so the wall time less
    # the listed operations is mostly these convs (ta_vae's scorer at batch 500: 56 ms of 187).
    print(f"wall time less the operations summed: {wall * 1e3 - sum(per_op.values()):.1f} ms "
          "(the convs run on their own threads hold more than their events show; operations run "
          "side by side count twice)")


if __name__ == "__main__":
  main()
