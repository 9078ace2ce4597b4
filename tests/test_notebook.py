"""notebooks/hw8jax_kaggle.ipynb run top to bottom in its small mode (the demo set, a few steps,
CPU), as a Kaggle user runs it on the competition's data: no cell may fail, and the figures show
inline."""

from __future__ import annotations

import os

import nbclient
import nbformat

from conftest import REPO


def test_the_kaggle_notebook_runs_top_to_bottom(tmp_path):
  path = os.path.join(REPO, "notebooks", "hw8jax_kaggle.ipynb")
  notebook = nbformat.read(path, as_version=4)
  os.environ["HW8JAX_NOTEBOOK_SMALL"] = "1"  # the kernel inherits this process's environment
  try:
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
  finally:
    del os.environ["HW8JAX_NOTEBOOK_SMALL"]
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  # The training curves, the reconstructions, anomaly_maps.png and maps drawn inline.
  assert len(images) == 4
  text = "".join(o.get("text", "") for o in outputs)
  assert "flagged as anomalies" in text and "ID,score" in text and "smallest p-values" in text
  assert os.path.exists(tmp_path / "hw8jax_small" / "submission.csv")
