"""One projection of the 1B llama at 64 x 512 tokens (bf16): x W against x W + LoRA (rank 8) with the scale in
three places; median ms of 30 calls, and whether XLA folded the LoRA sum into the GEMM (beta = 1)."""
import json, re, statistics, sys, time
import jax, jax.numpy as jnp

def med(f, *a, n=30):
    jax.block_until_ready(f(*a)); ts = []
    for _ in range(n):
        t = time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)

k = jax.random.split(jax.random.key(0), 4)
rows = []
for (din, dout) in ((2048, 8192), (8192, 2048), (2048, 2048)):
    x = jax.random.normal(k[0], (64, int(sys.argv[1]) if len(sys.argv) > 1 else 512, din), jnp.bfloat16)
    W = jax.random.normal(k[1], (din, dout), jnp.bfloat16) * 0.02
    A = jax.random.normal(k[2], (din, 8), jnp.float32) * 0.02
    B = jax.random.normal(k[3], (8, dout), jnp.float32) * 0.02
    s = 2.0
    fns = {
        "base": lambda x, W, A, B: x @ W,
        "scale_after": lambda x, W, A, B: x @ W + ((x @ A.astype(x.dtype)) @ B.astype(x.dtype)) * s,
        "scale_on_xa": lambda x, W, A, B: x @ W + ((x @ A.astype(x.dtype)) * s) @ B.astype(x.dtype),
        "scale_on_b": lambda x, W, A, B: x @ W + (x @ A.astype(x.dtype)) @ (B * s).astype(x.dtype),
        "concat_a": lambda x, W, A, B: (lambda y: y[..., :dout] + (y[..., dout:] * s) @ B.astype(x.dtype))(
            x @ jnp.concatenate([W, A.astype(x.dtype)], axis=1)),
    }
    for name, f in fns.items():
        jf = jax.jit(f)
        hlo = jf.lower(x, W, A, B).compile().as_text()
        kernels = len(re.findall(r"^\s+\S+ = \S+ (?:fusion|custom-call)\(", hlo, re.M))
        beta = bool(re.search(r'"beta":1', hlo))
        row = {"in": din, "out": dout, "variant": name, "ms": med(jf, x, W, A, B), "kernels": kernels, "beta1": beta}
        rows.append(row); print(json.dumps(row), flush=True)
