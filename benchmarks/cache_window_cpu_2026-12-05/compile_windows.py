# Compile time of the 135M generate program for 2048 new tokens, batch 1, by cache window (CPU):
#   .venv/bin/python benchmarks/cache_window_cpu_2026-12-05/compile_windows.py
import time, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, "scripts")
sys.path.insert(0, ".")
from bench_generate import build
from configurable_fm.models.generation import Generator, _generate
model = build("135m")
ids = np.zeros((1, 64), np.int32)
for window in (0, 512, 128):
    gen = Generator(model, cache_window=window)
    ids_, args, static = gen._arguments(ids, 2048, None, 0.0, None, None, None, None, 0)
    t = time.perf_counter()
    _generate.trace(gen.state, ids_, *args, **static).lower().compile()
    print("window", window, "compile_s %.1f" % (time.perf_counter() - t), flush=True)
