"""One projection of the 1B llama at 64 x 512 tokens (bf16), its input made by the op that makes it in the model
(RMSNorm for d_in 2048, silu(g) * u for d_in 8192), without and with a rank-8 LoRA, three ways:
    add      y = x W + (x A)(s B)                        (the library's unmerged path: one more pass over y)
    kconcat  y = [x | x A] @ [W ; s B]                    (the LoRA inside the GEMM's contraction; [W ; s B] built
                                                           in the call, a copy of W)
    kcat_pre y = [x | x A] @ Wc, Wc = [W ; s B] built once outside the call
    kcat_p64 kcat_pre with the rank padded by zeros to 64 (a contraction of 2048 + 64: whole GEMM tiles)
Median ms of 50 calls; max |y - y_add| / max |y_add| as the check."""
import json, statistics, sys, time
import jax, jax.numpy as jnp

def med(f, *a, n=50):
    jax.block_until_ready(f(*a)); ts = []
    for _ in range(n):
        t = time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)

def rms(h):
    hf = h.astype(jnp.float32)
    return (hf * jax.lax.rsqrt(jnp.mean(hf * hf, -1, keepdims=True) + 1e-5)).astype(h.dtype)

def producer(din):
    if din == 8192:
        return lambda g, u: (jax.nn.silu(g.astype(jnp.float32)) * u.astype(jnp.float32)).astype(g.dtype)
    return lambda g, u: rms(g)

k = jax.random.split(jax.random.key(0), 6)
if len(sys.argv) > 2 or (len(sys.argv) == 2 and not sys.argv[1].isdigit()):
    sys.exit("usage: lora_kconcat.py [SEQ] (tokens per row, default 512)")
seq = int(sys.argv[1]) if len(sys.argv) > 1 else 512
s = 2.0
rows = []
for din, dout in ((2048, 8192), (8192, 2048), (2048, 2048), (2048, 512)):
    g = jax.random.normal(k[0], (64, seq, din), jnp.bfloat16)
    u = jax.random.normal(k[1], (64, seq, din), jnp.bfloat16)
    W = jax.random.normal(k[2], (din, dout), jnp.bfloat16) * 0.02
    A = (jax.random.normal(k[3], (din, 8), jnp.float32) * 0.02).astype(jnp.bfloat16)
    B = (jax.random.normal(k[4], (8, dout), jnp.float32) * 0.02).astype(jnp.bfloat16)
    Wc = jnp.concatenate([W, (B * s).astype(W.dtype)], 0)
    A64 = jnp.pad(A, ((0, 0), (0, 56)))
    Wc64 = jnp.concatenate([W, jnp.pad((B * s).astype(W.dtype), ((0, 56), (0, 0)))], 0)
    p = producer(din)
    fns = {
        "base": lambda g, u, W, A, B, Wc: p(g, u) @ W,
        "add": lambda g, u, W, A, B, Wc: (lambda x: x @ W + (x @ A) @ (B * s).astype(x.dtype))(p(g, u)),
        "kconcat": lambda g, u, W, A, B, Wc: (lambda x: jnp.concatenate([x, x @ A], -1)
                                             @ jnp.concatenate([W, (B * s).astype(W.dtype)], 0))(p(g, u)),
        "kcat_pre": lambda g, u, W, A, B, Wc: (lambda x: jnp.concatenate([x, x @ A], -1) @ Wc)(p(g, u)),
        "kcat_p64": lambda g, u, W, A, B, Wc: (lambda x: jnp.concatenate([x, x @ A64], -1) @ Wc64)(p(g, u)),
    }
    ref = None
    for name, f in fns.items():
        jf = jax.jit(f)
        y = jf(g, u, W, A, B, Wc)
        if name == "add":
            ref = y.astype(jnp.float32)
        err = None if ref is None else float(jnp.max(jnp.abs(y.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
        row = dict(din=din, dout=dout, seq=seq, variant=name, ms=med(jf, g, u, W, A, B, Wc), rel_err=err,
                   device=jax.devices()[0].device_kind)
        rows.append(row); print(json.dumps(row), flush=True)
