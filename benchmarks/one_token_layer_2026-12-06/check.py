"""On the GPU: the one-token decoder layers (models/one_token_layer.py, `OneTokenMatmuls(layers=True)`) against the
modules' decode step, for the bench's shapes with random bf16 weights (scripts/bench_generate.py's `build`): the
largest |logit difference| of one step after a 64-token prefill relative to the largest |logit|, and the greedy
tokens of 64 new ones (how many of them agree, from the start). bf16 rounding makes exact agreement unlikely far
into a generation; the first step's logits are the check.
    python3 benchmarks/one_token_layer_2026-12-06/check.py [135m [OPTIONS]]
OPTIONS: bench_generate's --one_token form, FIELD=INTEGER[/FIELD=INTEGER] (e.g. split_cache=0 or
keys=128); the layers are on whatever it says."""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm.models.generation import Generator
from configurable_fm.models.one_token import OneTokenMatmuls, one_token_matmuls

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
# the bench's models, so the check runs what the bench times
from bench_generate import SHAPES, build, one_token_option  # noqa: E402

shapes = (sys.argv[1] if len(sys.argv) > 1 else "135m").split(",")
try:
    options = one_token_option(sys.argv[2]) if len(sys.argv) > 2 else True
except ValueError as e:
    sys.exit(f"check.py: {e}")
options = (options if isinstance(options, OneTokenMatmuls) else OneTokenMatmuls())._replace(layers=True)
unknown = [s for s in shapes if s not in SHAPES]
if unknown:
    sys.exit(f"check.py: unknown shape(s) {unknown}; choose from {sorted(SHAPES)}")
for shape in shapes:
    model = build(shape)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, model.cfg.vocab_size, (1, 64)), jnp.int32)
    logits, cache = model(ids, cache=model.init_cache(1, 80))
    tok = jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32)
    pos = jnp.full((1, 1), 64, jnp.int32)

    graphdef, state = nnx.split(model)

    def step(layers):
        def run(state, tok, cache):  # the weights as arguments, not constants of the program
            with one_token_matmuls(enabled=layers, options=options):
                return nnx.merge(graphdef, state)(tok, positions=pos, cache=cache)[0]
        return np.asarray(jax.jit(run)(state, tok, cache), np.float32)
    want, got = step(False), step(True)
    rel = np.abs(got - want).max() / np.abs(want).max()
    a = np.asarray(Generator(model, one_token=False)(np.asarray(ids), max_new_tokens=64))[0, 64:]
    layers = Generator(model, one_token=options)
    b = np.asarray(layers(np.asarray(ids), max_new_tokens=64))[0, 64:]
    same = int(np.argmin(a == b)) if (a != b).any() else len(a)
    print(f"{shape} {sys.argv[2:]}: step logits max |diff| / max |logit| = {rel:.2e}; greedy tokens equal for the "
          f"first {same} of {len(a)} ({int((a == b).sum())} in all)", flush=True)
