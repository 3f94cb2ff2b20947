"""A depth-gradient merge of two random 16-layer llamas (hidden 128): wall time, XLA compilations and the output's
sha256, for the package at SRC (default: this checkout). Before/after a change, from the repository root:

    python benchmarks/merge_cpu_1b_slerp_gradient_2026-12-08/gradient_probe.py /tmp/gp slerp
    SRC=/path/to/old/checkout python benchmarks/merge_cpu_1b_slerp_gradient_2026-12-08/gradient_probe.py /tmp/gp_old slerp

METHOD: slerp (t: [0, 0.3, 0.5, 0.7, 1], float32), slerp_bf16 (the same in bfloat16), nearswap (t gradient),
ties (lambda gradient). The inputs are written to ROOT once (random, numpy seed 0 and 1)."""
import collections
import hashlib
import os
import pathlib
import sys
import time

sys.path.insert(0, os.environ.get("SRC", str(pathlib.Path(__file__).resolve().parents[2])))

from jax import monitoring  # noqa: E402

YAMLS = {
    "slerp": "merge_method: slerp\nbase_model: {r}/m0\nmodels:\n  - model: {r}/m0\n  - model: {r}/m1\n"
             "parameters:\n  t: [0.0, 0.3, 0.5, 0.7, 1.0]\ndtype: float32\n",
    "slerp_bf16": "merge_method: slerp\nbase_model: {r}/m0\nmodels:\n  - model: {r}/m0\n  - model: {r}/m1\n"
                  "parameters:\n  t: [0.0, 0.3, 0.5, 0.7, 1.0]\ndtype: bfloat16\n",
    "nearswap": "merge_method: nearswap\nbase_model: {r}/m0\nmodels:\n  - model: {r}/m0\n  - model: {r}/m1\n"
                "parameters:\n  t: [0.001, 0.02, 0.05]\ndtype: float32\n",
    "ties": "merge_method: ties\nbase_model: {r}/m0\nmodels:\n  - model: {r}/m1\n    parameters:\n      weight: 1.0\n"
            "      density: 0.5\nparameters:\n  lambda: [0.5, 1.0, 1.5]\ndtype: float32\n",
}
if len(sys.argv) != 3 or sys.argv[2] not in YAMLS:
    sys.exit(f"usage: gradient_probe.py ROOT {'|'.join(YAMLS)}")
root, method = pathlib.Path(sys.argv[1]), sys.argv[2]
compiles = collections.Counter()
monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **kw: compiles.update(["n"]) if event == "/jax/core/compile/backend_compile_duration"
    else None)

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configurable_fm.bricks.paths import flat_state, with_params  # noqa: E402
from configurable_fm.interop.hf import to_hf  # noqa: E402
from configurable_fm.models.factory import FAMILIES, config_from_dict, family_name  # noqa: E402
from configurable_fm.ops.merge.stream import merge_yaml  # noqa: E402

cfg = config_from_dict({"family": "llama", "vocab_size": 256, "hidden_size": 128, "intermediate_size": 256,
                        "num_layers": 16, "num_heads": 4, "num_kv_heads": 2})
for seed in (0, 1):
    if not (root / f"m{seed}").exists():
        abstract = nnx.eval_shape(lambda: FAMILIES[family_name(cfg)][1](cfg, rngs=nnx.Rngs(0)))
        rs = np.random.RandomState(seed)
        to_hf(with_params(abstract, {k: rs.normal(1.0 if "norm" in k else 0.0, 0.1 if "norm" in k else 0.02,
                                                  v.shape).astype(np.float32)
                                     for k, v in flat_state(abstract).items()}), root / f"m{seed}")
yaml = root / f"{method}.yml"
yaml.write_text(YAMLS[method].format(r=root))
compiles.clear()
t0 = time.perf_counter()
out = merge_yaml(yaml, root / f"out_{method}", overwrite=True)
seconds = time.perf_counter() - t0
digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(pathlib.Path(out).glob("*.safetensors"))))
print(f"{method}: {seconds:.2f} s, {compiles['n']} compilations, output sha256 {digest.hexdigest()[:16]}")
