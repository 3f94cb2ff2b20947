"""Where DoRA's extra step time goes (ad-hoc ablation, H200): the trainer's step of bench_adapters for LoRA, DoRA,
DoRA with the weight norm replaced by ones (no norm cost), DoRA with the combination in the compute dtype."""
import json, sys, types
import jax, jax.numpy as jnp
sys.path.insert(0, "scripts")
import importlib.util
spec = importlib.util.spec_from_file_location("bench_adapters", "scripts/bench_adapters.py")
ba = importlib.util.module_from_spec(spec); spec.loader.exec_module(ba)
from configurable_fm.bricks.adapters import modules as M

args = types.SimpleNamespace(shape=sys.argv[2], seq=512 if sys.argv[2] != "tiny" else 16, train_batch=16 if sys.argv[2] != "tiny" else 2, rank=16, targets=ba.TARGETS, steps=10 if sys.argv[2] != "tiny" else 1, warmup=2,
                             dtype="bfloat16" if sys.argv[2] != "tiny" else "float32")
orig_norm, orig_call = M.DoRALinear.weight_norm, M.DoRALinear.__call__

def call_bf16(self, x):
    y, xw, xd, dtype = self._linear(x)
    a, b = self.lora_a[...], self.lora_b[...]
    lora = jnp.dot(jnp.dot(xd, a.astype(dtype)), b.astype(dtype)) * self.scale
    n = jax.lax.stop_gradient(self.weight_norm())
    f = (self.lora_magnitude[...] / n).astype(dtype)
    return f * (xw + lora) + (self.bias[...].astype(dtype) if self.bias is not None else 0)

def lora_bf16(self, x):
    y, xw, xd, dtype = self._linear(x)
    a, b = self.lora_a[...], self.lora_b[...]
    return y + jnp.dot(jnp.dot(xd, a.astype(dtype)), b.astype(dtype)) * self.scale

for name in sys.argv[1].split(","):
    M.DoRALinear.weight_norm, M.DoRALinear.__call__ = orig_norm, orig_call
    method = "lora" if name.startswith("lora") else "dora"
    if name == "dora_nonorm":
        M.DoRALinear.weight_norm = lambda self: jnp.ones((self.out_features,), jnp.float32)
    if name == "dora_bf16":
        M.DoRALinear.__call__ = call_bf16
    if name == "lora_bf16":
        orig_lora = M.LoRALinear.__call__
        M.LoRALinear.__call__ = lora_bf16
    row = ba.bench_train(args, method)
    if name == "lora_bf16":
        M.LoRALinear.__call__ = orig_lora
    print(json.dumps({"variant": name, "step_ms": 1e3 * row["step_s"], "tokens_per_s": row["tokens_per_s"],
                      "loss": row["loss"]}), flush=True)
