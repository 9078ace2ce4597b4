"""One epoch of the boss recipe at full size, as a whole process: time, rate, memory, disk.

Writes a seeded stand-in for the homework's data (100,000 training and 19,636 test images of
64x64x3 uint8 and 0/1 test labels, about 1.5 GB; coarse colour blocks, so the crop has
something to do), then runs `launch.py --config=configs/fcn_boss.py --mode=train` for one
epoch (batch 2000, 50 steps, the test AUC at the epoch's end) with `cpu_fast_paths` on (the
default, "auto") and off, alternating, and prints for each: wall time, steady img/s (the
median of the logged rates after the first), peak resident memory (the process's maximum RSS,
which counts the pages of the memory-mapped training file it has read) and the bytes it wrote.
The data and the runs' outputs are removed afterwards.

  python bench/full_size.py                       # about 12 minutes on a 2-core CPU
  python bench/full_size.py --reps=2 --settings=auto
  python bench/full_size.py --num_train=10000 --num_test=2000   # a smaller stand-in
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = """\
import atexit, runpy, sys
def said():
  io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
  print("written", int(io["write_bytes"]), flush=True)
atexit.register(said)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def write_stand_in(folder: str, num_train: int, num_test: int, seed: int = 0) -> None:
  """The data set, written in chunks: each image is 8x8 random colour blocks, upsampled."""
  rng = np.random.default_rng(seed)
  os.makedirs(folder)
  for name, n in (("trainingset.npy", num_train), ("testingset.npy", num_test)):
    out = np.lib.format.open_memmap(os.path.join(folder, name), "w+", np.uint8, (n, 64, 64, 3))
    for start in range(0, n, 5000):
      stop = min(n, start + 5000)
      blocks = rng.integers(0, 256, (stop - start, 8, 8, 3), dtype=np.uint8)
      out[start:stop] = blocks.repeat(8, axis=1).repeat(8, axis=2)
    out.flush()
    del out
  np.save(os.path.join(folder, "testing_labels.npy"), rng.integers(0, 2, num_test))


def one_run(data_dir: str, workdir: str, setting: str, cache: str) -> dict:
  command = [sys.executable, "-c", CHILD, os.path.join(ROOT, "launch.py"),
             "--config=configs/fcn_boss.py", f"--workdir={workdir}", "--mode=train",
             f"--config.data.dir={data_dir}", "--config.num_epochs=1",
             f"--config.data.test_labels={os.path.join(data_dir, 'testing_labels.npy')}",
             "--config.log_every_seconds=10", f"--config.cpu_fast_paths={setting}",
             f"--config.compilation_cache={cache}"]
  t0 = time.perf_counter()
  proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=ROOT)
  rates, written, lines = [], 0, []
  for line in proc.stdout:
    lines.append(line)
    found = re.search(r"step \d+/\d+ .* ([\d.]+) img/s", line)
    if found:
      rates.append(float(found.group(1)))
    if line.startswith("written "):
      written = int(line.split()[1])
  _, status, usage = os.wait4(proc.pid, 0)
  wall = time.perf_counter() - t0
  if status != 0:
    raise RuntimeError(f"the run failed:\n{''.join(lines[-20:])}")
  return {"wall": wall, "rate": statistics.median(rates[1:] or rates),
          "peak_gb": usage.ru_maxrss * 1024 / 1e9, "written_gb": written / 1e9,
          "epoch": next((ln.strip() for ln in lines if "test AUC" in ln), "")}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--num_train", type=int, default=100_000)
  p.add_argument("--num_test", type=int, default=19_636)
  p.add_argument("--settings", default="auto,off", help="cpu_fast_paths values to run")
  p.add_argument("--reps", type=int, default=1)
  p.add_argument("--dir", default=None, help="where to write the data (default: a temp dir)")
  args = p.parse_args()
  cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
              if ln.startswith("model name")), platform.processor())
  print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {cpu}; "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB")
  with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
    data_dir = os.path.join(tmp, "data")
    t = time.perf_counter()
    write_stand_in(data_dir, args.num_train, args.num_test)
    os.sync()  # the runs start on a quiet disk, not behind 1.5 GB of writes
    size = sum(os.path.getsize(os.path.join(data_dir, f)) for f in os.listdir(data_dir))
    print(f"stand-in: {args.num_train} training and {args.num_test} test images, "
          f"{size / 1e9:.2f} GB, written in {time.perf_counter() - t:.0f} s")
    cache = os.path.join(tmp, "xla_cache")
    results = {s: [] for s in args.settings.split(",")}
    for _ in range(args.reps):
      for setting in results:
        workdir = os.path.join(tmp, "run")
        results[setting].append(one_run(data_dir, workdir, setting, cache))
        shutil.rmtree(workdir)
        r = results[setting][-1]
        print(f"  cpu_fast_paths={setting}: {r['wall']:.0f} s, {r['rate']:.1f} img/s, "
              f"peak {r['peak_gb']:.2f} GB, wrote {r['written_gb']:.2f} GB; {r['epoch']}",
              flush=True)
  print("boss recipe (fcn_boss, crop, batch 2000), one epoch, --mode=train; medians:")
  for setting, runs in results.items():
    wall = statistics.median(r["wall"] for r in runs)
    print(f"  cpu_fast_paths={setting:5s} wall {int(wall) // 60} min {wall % 60:.0f} s, "
          f"steady {statistics.median(r['rate'] for r in runs):.1f} img/s, peak "
          f"{statistics.median(r['peak_gb'] for r in runs):.2f} GB, wrote "
          f"{statistics.median(r['written_gb'] for r in runs):.2f} GB")


if __name__ == "__main__":
  main()
