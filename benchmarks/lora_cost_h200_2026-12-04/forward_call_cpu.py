"""Host cost of a timed forward call on the CPU (ops.route.forward_call's docstring): the model's state passed as
an nnx.State with the graphdef a static argument of one jit (forward_call before 7f18fb3) against the state's flat
list of arrays (forward_call now). SmolLM2-135M's shape in float32, random weights, one token, with and without a
rank-8 LoRA on every projection; mean ms of 20 calls after one warm-up.

    .venv/bin/python benchmarks/lora_cost_h200_2026-12-04/forward_call_cpu.py
"""
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from bench_adapters import model_spec  # noqa: E402

from configurable_fm.bricks import adapters  # noqa: E402
from configurable_fm.models.factory import build_model  # noqa: E402
from configurable_fm.ops.route import forward_call  # noqa: E402

STATIC = jax.jit(lambda graphdef, state, ids: nnx.merge(graphdef, state)(ids), static_argnums=0)


def mean_ms(fn, n: int = 20) -> float:
    jax.block_until_ready(fn())
    start = time.perf_counter()
    for _ in range(n):
        jax.block_until_ready(fn())
    return (time.perf_counter() - start) / n * 1e3


def main() -> None:
    base = build_model(model_spec("135m", 16), seed=0, param_dtype=jnp.float32, dtype=jnp.float32)
    lora = adapters.attach(base, "lora", ["layers.*.self_attn.*_proj", "layers.*.mlp.*_proj"], rank=8, alpha=16,
                           init="random", seed=1)
    ids = jnp.zeros((1, 1), jnp.int32)
    for name, model in (("base", base), ("one LoRA", lora)):
        graphdef, state = nnx.split(model)
        static = mean_ms(lambda: STATIC(graphdef, state, ids))
        flat = mean_ms(forward_call(model, ids))
        print(f"{name}: {len(jax.tree.leaves(state))} arrays, static graphdef + State {static:.1f} ms, "
              f"flat list (forward_call) {flat:.1f} ms")


if __name__ == "__main__":
    main()
