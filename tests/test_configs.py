"""The recipes in configs/, the schema in hw8jax/config.py and the README's key table agree."""

from __future__ import annotations

import json
import os
import re

import ml_collections
import pytest

from hw8jax import config as config_lib
from hw8jax import configs
from hw8jax.configs import default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every recipe with every arg, as configs/ gave them when the recipes moved out of the library
# (written by ConfigDict.to_dict); a recipe change is deliberate and updates this file.
RECIPES = os.path.join(os.path.dirname(__file__), "recipes.json")


def _recipe_args(name: str) -> list:
  if name == "fcn_crops":
    return ["0", "1", "2", "0,quick", "1,quick", "2,demo", "1,demo"]
  return [None, "quick", "demo"]


def test_every_recipe_with_every_arg_gives_the_values_it_gave():
  with open(RECIPES) as f:
    expected = json.load(f)
  got = {f"{name}:{arg}": configs.get_config(name, arg).to_dict()
         for name in configs.names() for arg in _recipe_args(name)}
  assert got.keys() == expected.keys()
  for key, values in expected.items():
    # Through JSON text, so an int where a float was (50 for 50.0) counts as a change.
    assert json.dumps(got[key], sort_keys=True) == json.dumps(values, sort_keys=True), key


def test_the_schema_holds_exactly_the_default_configs_keys_and_types():
  flat = config_lib.flatten(default.get_config())
  assert flat.keys() == config_lib.SCHEMA.keys()
  for key, kind in config_lib.SCHEMA.items():
    assert type(flat[key]) is kind, (key, flat[key], kind)
  config_lib.validate(default.get_config())


def test_a_value_of_the_wrong_type_is_named_against_the_schema():
  c = default.for_model("ta_fcn", "quick")
  c.batch_size, c.optimizer.learning_rate = 3, 2  # an int for a float key is allowed
  config_lib.validate(c)
  bad = c.to_dict()
  bad["batch_size"], bad["figures"], bad["optimizer"]["learning_rate"] = 16.0, 1, True
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(ml_collections.ConfigDict(bad))
  assert str(e.value).splitlines() == [
      "batch_size=16.0: must be an integer", "figures=1: must be true/false",
      "optimizer.learning_rate=True: must be a number"]


def _readme_table() -> dict:
  """{key: default cell} of the README's configuration table."""
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  table = text.split("| key | default | meaning |\n|---|---|---|\n", 1)[1].split("\n\n", 1)[0]
  rows = {}
  for line in table.splitlines():
    cells = [c.strip() for c in line.strip("|").split("|")]
    keys = re.findall(r"`([^`]+)`", cells[0])
    values = [v.strip() for v in cells[1].split(",")] if len(keys) > 1 else [cells[1]]
    assert len(values) == len(keys), line
    rows.update(zip(keys, values, strict=True))
  return rows


def _cell_value(cell: str):
  """A default as the table writes it: `text`, `""`, True/False, a number, or a product."""
  cell = cell.strip("`")
  if cell == '""':
    return ""
  if cell in ("True", "False"):
    return cell == "True"
  if "*" in cell:
    a, b = (float(p) for p in cell.split("*"))
    return a * b
  for kind in (int, float):
    try:
      return kind(cell)
    except ValueError:
      pass
  return cell


def test_the_readme_key_table_lists_every_key_of_the_schema_with_its_default():
  rows = _readme_table()
  assert list(rows) == list(config_lib.SCHEMA), "the table's keys, in the schema's order"
  flat = config_lib.flatten(default.get_config())
  for key, cell in rows.items():
    if key == "model":
      assert cell == "per file"
      continue
    value = _cell_value(cell)
    assert value == flat[key] and type(value) is type(flat[key]), (key, cell, flat[key])


def test_a_plan_resolves_the_run_facts_once_from_its_config():
  import jax
  import jax.numpy as jnp

  from hw8jax import data, models, runtime
  from hw8jax.plan import plan

  c = configs.get_config("fcn_boss", "quick")
  c.data.val_fraction, c.compute_dtype = 0.1, "bfloat16"
  run = plan(c)
  assert run.config is c and run.variant is models.REGISTRY["fcn_boss"]
  assert run.transform is data.crop_transform and run.compute_dtype == jnp.bfloat16
  assert run.best_by == "val_score"  # "auto" with a validation split
  want = runtime.run_keys(c.seed)
  assert run.keys.keys() == want.keys()
  for name, key in run.keys.items():
    assert (jax.random.key_data(key) == jax.random.key_data(want[name])).all()
  assert jax.default_backend() == "cpu" and run.fast_paths is True  # "auto" on CPU
  c.cpu_fast_paths = "off"
  assert plan(c).fast_paths is False and plan(c).best_by == "val_score"
