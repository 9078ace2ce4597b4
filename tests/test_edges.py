"""Damaged or hostile inputs at the edges, met where a user meets them: ensembles of bad scores,
a demo set cut in the middle, a full disk, a damaged metrics.jsonl, mistakes in the Python API."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

# --- ensembles


def _member(root, name: str, scores) -> str:
  folder = root / name
  folder.mkdir()
  if isinstance(scores, bytes):
    (folder / "scores.npy").write_bytes(scores)
  else:
    np.save(folder / "scores.npy", scores)
  return str(folder)


def _ensemble(capsys, *argv: str) -> tuple[int, str]:
  from hw8jax.ensemble import main

  capsys.readouterr()
  code = main(list(argv))
  err = capsys.readouterr().err
  return code, err


@pytest.mark.parametrize("method", ["rank", "zscore"])
def test_an_ensemble_member_with_nan_or_inf_is_refused_before_anything_is_written(
    tmp_path, capsys, method):
  good = _member(tmp_path, "good", np.linspace(0, 1, 50, dtype=np.float32))
  for name, bad_value, what in (("nan", np.nan, "NaN"), ("inf", np.inf, "infinite")):
    scores = np.linspace(0, 1, 50, dtype=np.float32)
    scores[[3, 7, 11]] = bad_value
    bad = _member(tmp_path, f"{name}_{method}", scores)
    out = tmp_path / f"out_{name}_{method}"
    code, err = _ensemble(capsys, "--workdirs", good, bad, "--out", str(out), "--method", method)
    assert code == 1
    assert err == f"error: {bad}/scores.npy: 3 of 50 scores are {what}; rescore that " \
        "workdir (its model may have diverged)\n"
    assert not out.exists()


def test_ensemble_inputs_that_are_not_scores_are_one_line_each(tmp_path, capsys):
  good = _member(tmp_path, "good", np.arange(4, dtype=np.float32))
  (tmp_path / "a_file").write_text("x")
  labels = tmp_path / "labels.npy"
  np.save(labels, np.array([0, 1, 0]))
  cases = {
      "text": (_member(tmp_path, "text", b"0.1\n0.2\n"), [], "not a .npy file of scores"),
      "2-D": (_member(tmp_path, "two_d", np.zeros((4, 2), np.float32)), [],
              "shape (4, 2), expected (N,) scores"),
      "strings": (_member(tmp_path, "strings", np.array(["a", "b", "c", "d"])), [],
                  "dtype <U1, expected float scores"),
      "shorter": (_member(tmp_path, "short", np.arange(3, dtype=np.float32)), [],
                  "workdirs scored different numbers of test images"),
      "labels": (good, ["--labels", str(labels)], "3 labels for 4 test images"),
      "out is a file": (good, ["--out", str(tmp_path / "a_file")], "is a file, not a folder"),
      "out under a file": (good, ["--out", str(tmp_path / "a_file" / "x")],
                           "is a file, not a folder"),
  }
  for name, (member, extra, expected) in cases.items():
    out = tmp_path / f"out_{name.replace(' ', '_')}"
    argv = ["--workdirs", good, member, "--out", str(out), *extra]
    if "--out" in extra:
      argv = ["--workdirs", good, member, *extra]
    code, err = _ensemble(capsys, *argv)
    assert code == 1, name
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, (name, err)
    assert not out.exists(), name


def test_python_m_ensemble_refuses_a_nan_member(tmp_path):
  """The command a user types; exit 1, one line, no submission."""
  good = _member(tmp_path, "good", np.arange(5, dtype=np.float32))
  bad = _member(tmp_path, "bad", np.array([0, 1, np.nan, 3, 4], np.float32))
  r = subprocess.run([sys.executable, "-m", "hw8jax.ensemble", "--workdirs", good, bad, "--out",
                      str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
  assert r.returncode == 1
  assert r.stderr.splitlines() == [f"error: {bad}/scores.npy: 1 of 5 scores are NaN; rescore "
                                   "that workdir (its model may have diverged)"]
  assert not (tmp_path / "out").exists()
