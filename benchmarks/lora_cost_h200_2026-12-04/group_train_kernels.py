"""The 1B train step's device kernels grouped by operation (BENCHMARKS.md, "The 1B step's kernels mapped to
operations"): each kernel of train_trace.json.gz (3 traced steps) looked up by its fusion name in
train_step_after_optimizations.txt.gz and grouped by the fusion's shape and op_name (a heuristic grouping).

    python benchmarks/lora_cost_h200_2026-12-04/group_train_kernels.py
"""
import gzip
import json
import re
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent
STEPS = 3
WEIGHT_SHAPES = r"f32\[(2048,8192|8192,2048|2048,2048|2048,512|512,2048|49152,2048|2048,49152|2048|2048,256)\]"


def device_kernel_times(trace: Path) -> dict[str, float]:
    events = json.load(gzip.open(trace))
    events = events.get("traceEvents", events)
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {p for p, n in names.items() if "/device:GPU" in n}
    total: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu:
            total[e["name"]] += e["dur"]
    return total


def fusion_line(hlo: str, kernel: str) -> str:
    m = re.match(r"(.*?)_(\d+)$", kernel)  # trace name loop_multiply_fusion_31 = HLO %loop_multiply_fusion.31
    key = f"%{m.group(1)}.{m.group(2)} = " if m else f"%{kernel} = "
    i = hlo.find(key)
    return hlo[i:hlo.find("\n", i)] if i >= 0 else ""


def group(kernel: str, hlo: str) -> str:
    if re.search(r"nvjet|gemm|cublas", kernel):
        return "matmuls (cuBLAS, XLA gemm fusions)"
    if re.search(r"cudnn|sdpa|flash|fmha", kernel):
        return "attention (cuDNN)"
    line = fusion_line(hlo, kernel)
    shape = (re.search(r"= (\(?[a-z0-9]+\[[0-9,]*\])", line) or [None, ""])[1]
    op = (re.search(r'op_name="([^"]+)"', line) or [None, ""])[1]
    if re.search(WEIGHT_SHAPES, shape) and ("/add" in op or op.endswith("add")) and "jvp" not in op:
        return "optimizer update (AdamW on float32 weight-shaped tensors)"
    if ",49152]" in shape:
        return "LM head and cross-entropy on (B, T, 49152)"
    if "convert_element_type" in op and "jvp" in op and re.search(r"bf16\[(2048|8192|49152)", shape):
        return "float32 -> bf16 casts of the weights"
    if "silu" in op or ",8192]" in shape:
        return "SwiGLU elementwise on (B, T, 8192)"
    if "reduce" in kernel:
        return "norms and other reductions"
    return "other elementwise"


def main() -> None:
    hlo = gzip.open(HERE / "train_step_after_optimizations.txt.gz", "rt").read()
    groups: dict[str, float] = defaultdict(float)
    for kernel, us in device_kernel_times(HERE / "train_trace.json.gz").items():
        groups[group(kernel, hlo)] += us
    total = sum(groups.values())
    for g, us in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {g} | {us / 1e3 / STEPS:.1f} | {100 * us / total:.1f}% |")
    print(f"device busy per step: {total / 1e3 / STEPS:.1f} ms")


if __name__ == "__main__":
    main()
