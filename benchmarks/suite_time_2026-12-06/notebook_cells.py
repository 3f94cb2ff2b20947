"""Each code cell's time of a notebook run as the suite runs it (CFM_NOTEBOOK_SMALL=1, a fresh kernel), from
nbclient's execution timestamps. From the repository root, with the suite's flags:
    XLA_FLAGS="--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0 \\
      --xla_force_host_platform_device_count=8" \\
      .venv/bin/python benchmarks/suite_time_2026-12-06/notebook_cells.py notebooks/01_bricks_and_merging.ipynb
2-core machine, 2026-12-06 06:55, one notebook at a time: 01 44.8 s, 02 28.4 s, 03 57.3 s in all (README.md)."""
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import nbclient
import nbformat

if len(sys.argv) != 2 or not Path(sys.argv[1]).is_file():
    sys.exit("usage: notebook_cells.py NOTEBOOK.ipynb")
work = tempfile.mkdtemp(prefix="cfm_nb_cells_")
os.environ.update(CFM_NOTEBOOK_SMALL="1", JAX_PLATFORMS="cpu", CFM_NOTEBOOK_WORKDIR=work,
                  PYTHONPATH=str(Path(__file__).resolve().parents[2]))
nb = nbformat.read(sys.argv[1], as_version=4)
start = time.time()
nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": work}}).execute()
print(f"{sys.argv[1]}: {time.time() - start:.1f} s in all")


def stamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


for i, cell in enumerate(nb.cells):
    run = cell.metadata.get("execution", {})
    if cell.cell_type == "code" and "iopub.execute_input" in run and "shell.execute_reply" in run:
        seconds = (stamp(run["shell.execute_reply"]) - stamp(run["iopub.execute_input"])).total_seconds()
        print(f"  cell {i:2d} {seconds:6.1f} s  {cell.source.splitlines()[0][:80] if cell.source else ''}")
