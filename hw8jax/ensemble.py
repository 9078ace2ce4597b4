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

from hw8jax import atomic, evaluate, report
from hw8jax.data import DataError, open_labels, write_npy_atomic
from hw8jax.data.io import open_npy
from hw8jax.errors import UserError

METHODS = ("rank", "zscore")


def combine(scores: list[np.ndarray], method: str = "rank") -> np.ndarray:
  if method not in METHODS:
    raise UserError(f"ensemble method {method!r}: use rank or zscore")
  stacked = np.stack([np.asarray(s, np.float64) for s in scores])
  if method == "rank":  # tied scores share their mean rank: file order must not break ties
    # Imported when ranking: over half a second, which a refused input or a zscore ensemble
    # would pay for nothing.
    from scipy.stats import rankdata

    ranks = rankdata(stacked, axis=1) - 1
    return ranks.mean(axis=0) / max(stacked.shape[1] - 1, 1)
  std = stacked.std(axis=1, keepdims=True)
  return ((stacked - stacked.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1)).mean(0)


def _scores_of(workdir: str) -> np.ndarray:
  """A workdir's scores.npy as float64, after checking it is what a scoring run writes: a .npy
  of one finite float per test image (its header checked before any of it is read)."""
  path = os.path.join(workdir, "scores.npy")
  if not os.path.isfile(path):
    raise UserError(f"{path}: no such file; score that workdir first (--mode=score)")
  scores = open_npy(path)
  if scores.ndim != 1:
    raise UserError(f"{path}: shape {scores.shape}, expected (N,) scores")
  if scores.dtype.kind not in "fiu":
    raise UserError(f"{path}: dtype {scores.dtype}, expected float scores")
  scores = np.asarray(scores, np.float64)
  bad = {"NaN": int(np.isnan(scores).sum()), "infinite": int(np.isinf(scores).sum())}
  for what, count in bad.items():
    if count:
      raise UserError(f"{path}: {count} of {len(scores)} scores are {what}; rescore that "
                      "workdir (its model may have diverged)")
  return scores


def _test_set_of(workdir: str) -> str | None:
  """The test set a workdir's scores.npy was computed on, as its threshold.json says (None for
  a workdir scored by a version that did not say)."""
  record = report.read_json(os.path.join(workdir, "threshold.json"))
  value = record.get("test_set") if isinstance(record, dict) else None
  return value if isinstance(value, str) else None


def load_scores(workdirs: list[str]) -> list[np.ndarray]:
  """Every workdir's scores, checked: all of one length and, where their scoring records say,
  of one test set."""
  scores = [_scores_of(w) for w in workdirs]
  lengths = {w: len(s) for w, s in zip(workdirs, scores, strict=True)}
  if len(set(lengths.values())) != 1:
    listing = ", ".join(f"{w}: {n}" for w, n in lengths.items())
    raise UserError(f"workdirs scored different numbers of test images ({listing})")
  sets = {w: _test_set_of(w) for w in workdirs}
  named = {s for s in sets.values() if s is not None}
  if len(named) > 1:
    first = next(w for w in workdirs if sets[w] is not None)
    other = next(w for w in workdirs if sets[w] not in (None, sets[first]))
    raise UserError(f"{other} and {first} scored different test sets of {len(scores[0])} "
                    "images (their threshold.json name other testingset.npy contents); score "
                    "every member on the same data.dir")
  return scores


def _check_out(out: str, workdirs: list[str]) -> None:
  """--out must be a folder of its own: writing into a member would replace its scores."""
  atomic.check_folder(out, "--out")
  for w in workdirs:
    if os.path.realpath(out) == os.path.realpath(w):
      raise UserError(f"--out={out} is the member {w}: its scores.npy and submission.csv would "
                      "be replaced; give the ensemble a folder of its own")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdirs", nargs="+", required=True)
  p.add_argument("--out", required=True, help="folder for submission.csv (and eval.json)")
  p.add_argument("--method", default="rank", choices=METHODS)
  p.add_argument("--labels", default="", help="optional 0/1 labels .npy for the AUC")
  args = p.parse_args(argv)
  try:
    # Every input is checked before anything is written.
    members = load_scores(args.workdirs)
    labels = open_labels(args.labels, len(members[0])) if args.labels else None
    _check_out(args.out, args.workdirs)
    scores = combine(members, args.method)
    os.makedirs(args.out, exist_ok=True)
    report.write_submission(os.path.join(args.out, "submission.csv"), scores)
    write_npy_atomic(os.path.join(args.out, "scores.npy"), scores.astype(np.float32))
    print(f"wrote {os.path.join(args.out, 'submission.csv')} ({len(scores)} rows, "
          f"{args.method} of {len(args.workdirs)} models)")
    if labels is not None:
      record = {**evaluate.evaluate(labels, scores), "method": args.method,
                "workdirs": args.workdirs}
      report.write_json(os.path.join(args.out, "eval.json"), record)
      report.print_evaluation(record)
  except (UserError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
