"""The Colab notebook runs top to bottom on the CPU path (tiny random pipeline)."""
import os
import pathlib

import nbformat
from nbclient import NotebookClient

NB = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "pixart_sigma_colab.ipynb"


def test_notebook_cpu_path(tmp_path, monkeypatch):
  monkeypatch.setenv("PIXART_NOTEBOOK_CPU", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "")  # one device in the kernel
  nb = nbformat.read(NB, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
  assert len(images) == 4  # three aspect ratios + the contact sheet
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "traced 3 times" in text  # the repeated size did not recompile
