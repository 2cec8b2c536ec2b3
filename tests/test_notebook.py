"""The quickstart notebook executes top to bottom (quick settings)."""
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NB = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(monkeypatch):
  monkeypatch.setenv("LOZA_NOTEBOOK_QUICK", "1")
  monkeypatch.setenv("PYTHONPATH", str(NB.parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  nb = nbformat.read(NB, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NB.parent)}}).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  assert "ZigZag layer_type" in outputs and "| full |" in outputs
  images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(images) == 2
