"""Export a trained workdir's model: its original's state_dict, or its scorer as StableHLO.

  python -m hw8jax.export WORKDIR --format=safetensors|stablehlo --out=FILE [--which=...]

A safetensors file holds the state_dict of the variant's PyTorch original (the sample code's and the
seed's classes): their key names, shapes and layouts, float32 weights and BatchNorm statistics,
each BatchNorm's int64 `num_batches_tracked`, written with safetensors' numpy API (no torch).
`model.load_state_dict(safetensors.torch.load_file(FILE), strict=True)` loads it, and hw8jax
reads it back with `--config.init_from=FILE`. Metadata: `format: pt`, `model`, `hw8jax`
(the version), `step` and `config_sha256` (of the config the weights were trained and scored
with).

A stablehlo file holds the workdir's scorer, serialised by `jax.export` for CPU and CUDA:
(images uint8 (B, 64, 64, 3), their int32 indices in the file (B,)) -> (B,) float32 scores,
B symbolic, the weights and the scoring key inside; jax alone runs it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import jax
import numpy as np
import safetensors.numpy
from flax import nnx

import hw8jax
from hw8jax import atomic
from hw8jax.errors import UserError
from hw8jax.torch_import.weights import state_dict_of

FORMATS = ("safetensors", "stablehlo")
PLATFORMS = ("cpu", "cuda")  # one StableHLO file runs on either


def check_output(out, overwrite: bool) -> str:
  """`out` as a path that may be written: its folder exists and is writable, and it is not a
  file already (unless `overwrite`) nor a folder."""
  if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):
    raise UserError(f"out={out!r}: give the path of the file to write")
  out = os.fspath(out)
  if os.path.isdir(out):
    raise UserError(f"{out}: is a folder; give the path of the file to write")
  if os.path.lexists(out) and not overwrite:
    raise UserError(f"{out}: exists; pass --overwrite (overwrite=True) to replace it")
  folder = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(folder):
    raise UserError(f"{out}: its folder {folder} does not exist")
  if not os.access(folder, os.W_OK | os.X_OK):
    raise UserError(f"{out}: cannot write in {folder} (permission denied)")
  return out


def write_safetensors(model, out: str, *, overwrite: bool = False) -> str:
  """Write the assembled `model` (`hw8jax.assemble.Assembled`) to `out` as its original's
  state_dict; returns `out`. Written whole or not at all."""
  out = check_output(out, overwrite)
  local = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), model.state)
  tensors = state_dict_of(nnx.merge(model.eval_def, *local), num_batches_tracked=model.step)
  config = model.plan.config
  digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()
  metadata = {"format": "pt", "model": config.model, "hw8jax": hw8jax.__version__,
              "step": str(model.step), "config_sha256": digest}
  with atomic.replaced(out, "wb") as f:
    f.write(safetensors.numpy.save(tensors, metadata=metadata))
  return out


def write_stablehlo(model, out: str, *, overwrite: bool = False) -> str:
  """Write the scorer of the assembled `model` to `out` as a serialised `jax.export.Exported`:
  (images uint8 (B, 64, 64, 3), their int32 indices in the file (B,)) -> (B,) float32 scores,
  B symbolic, the weights and the scoring key inside, for CPU and CUDA. Only jax is needed to
  run it: `jax.export.deserialize(data).call(images, index)`."""
  out = check_output(out, overwrite)
  state = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), model.state)
  key_data = np.asarray(jax.random.key_data(model.plan.keys["score"]))
  impl = jax.random.key_impl(model.plan.keys["score"])

  def scores(images, index):
    # The key travels as its bits: the program holds plain arrays only.
    key = jax.random.wrap_key_data(key_data, impl=impl)
    # The scorer's own function: its jit holds CPU compiler options, which only a top-level
    # jit may carry (and which a CUDA program could not use).
    return model.scorer.__wrapped__(state, images, index, key)

  b = jax.export.symbolic_shape("b")
  exported = jax.export.export(jax.jit(scores), platforms=PLATFORMS)(
      jax.ShapeDtypeStruct((*b, 64, 64, 3), np.uint8), jax.ShapeDtypeStruct(b, np.int32))
  with atomic.replaced(out, "wb") as f:
    f.write(exported.serialize())
  return out


WRITERS = {"safetensors": write_safetensors, "stablehlo": write_stablehlo}


def export(workdir, out, format: str = "safetensors", which: str | None = None,
           overwrite: bool = False) -> str:
  """The workdir's model (as `hw8jax.load(workdir, which)` holds it) written to `out` in
  `format`; every mistake is one line before anything is written."""
  if format not in FORMATS:
    raise UserError(f"format={format!r}: use one of {', '.join(FORMATS)}")
  check_output(out, overwrite)
  # Imported here: the detector module imports this one (for Detector.export).
  from hw8jax.detector import load

  return WRITERS[format](load(workdir, which).model, out, overwrite=overwrite)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m hw8jax.export", description=__doc__.split(
      "\n")[0])
  parser.add_argument("workdir")
  parser.add_argument("--format", default="safetensors")
  parser.add_argument("--out", required=True)
  parser.add_argument("--which", choices=("latest", "best"), default=None)
  parser.add_argument("--overwrite", action="store_true")
  args = parser.parse_args(argv)
  try:
    path = export(args.workdir, args.out, args.format, args.which, args.overwrite)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
