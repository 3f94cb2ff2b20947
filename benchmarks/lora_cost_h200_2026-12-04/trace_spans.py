"""Per-forward device spans and the idle time between forwards in the two stored routing-bench traces.

    python3 benchmarks/lora_cost_h200_2026-12-04/trace_spans.py

Reads lora_base.trace.json.gz and lora_single_lora.trace.json.gz (3 forwards each, `--profile`, 2026-12-04),
sorts the GPU stream's kernels by start time, cuts them into the 3 forwards (359 and 663 kernels each) and prints
each forward's span (first kernel start to last kernel end) and the device's idle time inside it and between
forwards. Output (2026-12-04, on the CPU machine):
    lora_base: spans 113.02 120.42 119.33 ms, idle inside 0.38 0.44 0.44 ms, between forwards 8.82 9.42 ms
    lora_single_lora: spans 124.89 126.45 126.22 ms, idle inside 0.31 0.35 0.35 ms, between forwards 20.88 21.42 ms
The traced calls block one by one (the bench's profile lambda), so the idle time between forwards is the host's
dispatch of the next call (in the trace the host's PjitFunction takes 6.8 ms per base call and 18.4 ms per
LoRA call, about half of it hashing and comparing the nnx GraphDef, a static argument of the forward_call of that
day, 7f18fb3 removed it), inflated by the profile's Python tracer.
"""
import gzip
import json
from pathlib import Path

HERE = Path(__file__).parent
for name in ("lora_base", "lora_single_lora"):
    trace = json.load(gzip.open(HERE / f"{name}.trace.json.gz"))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    pids = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = sorted((e for e in events if e.get("ph") == "X" and pids.get(e["pid"], "").startswith("/device:GPU")),
                 key=lambda e: e["ts"])
    n = len(gpu) // 3
    forwards = [gpu[i * n:(i + 1) * n] for i in range(3)]
    end = lambda k: k["ts"] + k["dur"]
    spans = [(end(f[-1]) - f[0]["ts"]) / 1e3 for f in forwards]
    idle = [sum(b["ts"] - end(a) for a, b in zip(f, f[1:])) / 1e3 for f in forwards]
    between = [(forwards[i + 1][0]["ts"] - end(forwards[i][-1])) / 1e3 for i in range(2)]
    print(f"{name}: spans {' '.join(f'{s:.2f}' for s in spans)} ms, idle inside "
          f"{' '.join(f'{s:.2f}' for s in idle)} ms, between forwards {' '.join(f'{s:.2f}' for s in between)} ms")
