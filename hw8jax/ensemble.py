"""Combine the test scores of several workdirs into one submission.

  python -m hw8jax.ensemble --workdirs runs/crop0 runs/crop1 runs/crop2 --out runs/ensemble \
      [--method rank|zscore] [--labels data/testing_labels.npy]

Each workdir must hold the scores.npy a scoring run wrote. "rank" averages each model's score
ranks (scaled to [0, 1]): robust to models whose scores live on different scales. "zscore"
averages the scores standardised per model.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from hw8jax import report
from hw8jax.data import DataError, open_labels, write_npy_atomic
from hw8jax.errors import UserError

METHODS = ("rank", "zscore")


def combine(scores: list[np.ndarray], method: str = "rank") -> np.ndarray:
  if method not in METHODS:
    raise UserError(f"ensemble method {method!r}: use rank or zscore")
  stacked = np.stack([np.asarray(s, np.float64) for s in scores])
  if method == "rank":  # tied scores share their mean rank: file order must not break ties
    from scipy.stats import rankdata

    ranks = rankdata(stacked, axis=1) - 1
    return ranks.mean(axis=0) / max(stacked.shape[1] - 1, 1)
  std = stacked.std(axis=1, keepdims=True)
  return ((stacked - stacked.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1)).mean(0)


def load_scores(workdirs: list[str]) -> list[np.ndarray]:
  scores = []
  for w in workdirs:
    path = os.path.join(w, "scores.npy")
    if not os.path.exists(path):
      raise UserError(f"{path}: no such file; score that workdir first (--mode=score)")
    scores.append(np.load(path, allow_pickle=False))
  lengths = {len(s) for s in scores}
  if len(lengths) != 1:
    raise UserError(f"workdirs scored different numbers of test images: {sorted(lengths)}")
  return scores


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdirs", nargs="+", required=True)
  p.add_argument("--out", required=True, help="folder for submission.csv (and eval.json)")
  p.add_argument("--method", default="rank", choices=METHODS)
  p.add_argument("--labels", default="", help="optional 0/1 labels .npy for the AUC")
  args = p.parse_args(argv)
  try:
    scores = combine(load_scores(args.workdirs), args.method)
    os.makedirs(args.out, exist_ok=True)
    report.write_submission(os.path.join(args.out, "submission.csv"), scores)
    write_npy_atomic(os.path.join(args.out, "scores.npy"), scores.astype(np.float32))
    print(f"wrote {os.path.join(args.out, 'submission.csv')} ({len(scores)} rows, "
          f"{args.method} of {len(args.workdirs)} models)")
    if args.labels:
      record = {**report.evaluate(open_labels(args.labels, len(scores)), scores),
                "method": args.method, "workdirs": args.workdirs}
      report.write_json(os.path.join(args.out, "eval.json"), record)
      report.print_evaluation(record)
  except (UserError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
