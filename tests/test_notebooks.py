"""Every notebook in notebooks/ runs top to bottom on CPU without a cell error (nbclient, a fresh kernel of this
interpreter). The suite sets CFM_NOTEBOOK_SMALL=1: notebooks then train smaller models where the real one is too
slow for the test budget, and say so in their text; and CFM_NOTEBOOK_WORKDIR, where they write their outputs
(else a new temporary directory of their own, left for the reader)."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no notebook"


@pytest.mark.real_model
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from configurable_fm.models import registry

    try:
        registry.model_path("smollm2-135m-instruct")
    except registry.ModelNotInstalled as e:
        pytest.skip(str(e))
    monkeypatch.setenv("CFM_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("CFM_NOTEBOOK_WORKDIR", str(tmp_path))  # the notebooks' outputs, removed with tmp_path
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the cell and its traceback
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
