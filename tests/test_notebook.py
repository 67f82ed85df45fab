"""notebooks/quickstart.ipynb runs top to bottom (so it cannot rot), in a kernel of this interpreter."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
CELL_TIMEOUT_S = 900  # the first run converts the model and collects statistics


def _kernel(tmp_path: Path) -> str:
    """A kernelspec of ``sys.executable`` in a temp JUPYTER_PATH: no user-level install needed (fresh
    clone, CI), and the kernel sees this checkout and the same cache dir as the tests."""
    name = "kloc-test"
    spec_dir = tmp_path / "jupyter" / "kernels" / name
    spec_dir.mkdir(parents=True)
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "KLOC_CACHE_DIR": os.environ["KLOC_CACHE_DIR"],
           "MPLBACKEND": "Agg"}
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "knowledge-localization (tests)", "language": "python", "env": env}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return name


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells), "commit the notebook without outputs"
    client = nbclient.NotebookClient(notebook, kernel_name=_kernel(tmp_path), timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(tmp_path)}})  # runs in a foreign folder
    started = time.time()
    client.execute()
    print(f"quickstart.ipynb ran in {time.time() - started:.0f} s")
    text = "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []))
    assert "restored bit for bit: True" in text
