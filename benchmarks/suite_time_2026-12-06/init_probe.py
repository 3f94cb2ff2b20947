"""Time building a tiny llama in a fresh process: eager init (build_model: one compiled program per parameter shape)
against one jitted init of the same module (nnx.jit of the constructor), writing the parameters to DIR/p_MODE.npz
to compare. `XLA_FLAGS="--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0" python
benchmarks/suite_time_2026-12-06/init_probe.py eager|jit DIR`, each mode twice, alternating."""
import os
import sys
import time

import numpy as np
from flax import nnx

from configurable_fm.bricks.paths import flat_params
from configurable_fm.models.factory import FAMILIES, build_model, config_from_dict, family_name

SPEC = {"family": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 24, "num_layers": 2,
        "num_heads": 2, "num_kv_heads": 1}
if len(sys.argv) != 3 or sys.argv[1] not in ("eager", "jit"):
    sys.exit("usage: init_probe.py eager|jit DIR")
mode, out = sys.argv[1], sys.argv[2]
if not os.path.isdir(out):
    sys.exit(f"init_probe.py: {out}: not a directory")
cfg = config_from_dict(SPEC)
t = time.perf_counter()
if mode == "eager":
    m = build_model(cfg, seed=0)
else:
    cls = FAMILIES[family_name(cfg)][1]
    m = nnx.jit(lambda: cls(cfg, rngs=nnx.Rngs(0)))()
p = {k: np.asarray(v) for k, v in flat_params(m).items()}
print(mode, f"{time.perf_counter() - t:.2f} s")
np.savez(f"{out}/p_{mode}.npz", **p)
