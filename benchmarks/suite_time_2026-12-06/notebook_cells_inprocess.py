"""A notebook's code cells run in this process (CFM_NOTEBOOK_SMALL=1 as in the suite; `%` lines skipped), each
with its wall time and the XLA compilations it triggered (count, seconds, the costliest functions). Unlike
notebook_cells.py (a kernel, nbclient's timestamps) it sees the compilations. From the repository root:
    XLA_FLAGS="--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0" JAX_PLATFORMS=cpu \\
      .venv/bin/python benchmarks/suite_time_2026-12-06/notebook_cells_inprocess.py \
      notebooks/01_bricks_and_merging.ipynb
2-core machine, 2026-12-06: notebook 01's merge cell 11.7 s (11 merge-kernel compilations) -> 5.8 s (3) with the
merge shortcut (b5c1547); 01's cells 40.7 s in all with the suite's flags, 44.4 s without them; notebook 03's
tracing cell 10.5 -> 5.2 s with the MLP map alone."""
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if len(sys.argv) != 2 or not Path(sys.argv[1]).is_file():
    sys.exit("usage: notebook_cells_inprocess.py NOTEBOOK.ipynb")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CFM_NOTEBOOK_SMALL", "1")
os.environ.setdefault("CFM_NOTEBOOK_WORKDIR", tempfile.mkdtemp(prefix="cfm_nb_inprocess_"))
import matplotlib  # noqa: E402

matplotlib.use("Agg")
from jax._src import monitoring  # noqa: E402

counts: collections.Counter = collections.Counter()
seconds: collections.Counter = collections.Counter()


def listener(event, duration, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
        counts[kw.get("fun_name")] += 1
        seconds[kw.get("fun_name")] += duration


monitoring.register_event_duration_secs_listener(listener)
notebook = json.loads(Path(sys.argv[1]).read_text())
namespace = {"__name__": "__main__"}
os.chdir(Path(sys.argv[1]).resolve().parent)
total = time.time()
for i, cell in enumerate(notebook["cells"]):
    if cell["cell_type"] != "code":
        continue
    source = "".join(line for line in "".join(cell["source"]).splitlines(True) if not line.lstrip().startswith("%"))
    counts.clear()
    seconds.clear()
    start = time.time()
    exec(compile(source, f"cell {i}", "exec"), namespace)
    top = ", ".join(f"{name} x{counts[name]} {seconds[name]:.1f} s" for name, _ in seconds.most_common(4))
    print(f"cell {i:2d} {time.time() - start:6.1f} s, {sum(counts.values())} compilations "
          f"{sum(seconds.values()):.1f} s | {top}", flush=True)
print(f"{sys.argv[1]}: {time.time() - total:.1f} s in all")
