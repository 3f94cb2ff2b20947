"""The optimized HLO of bench_generate's decode program (greedy, batch 1, 64-token prompt, 256 new tokens, the
Generator's defaults), written to OUT/decode_<shape>.hlo.txt, so that the per-step kernels outside the decoder
layers (the profile's ~26 small fusions per step at 135M) can be mapped to the operations they compute.
    python3 benchmarks/one_token_atomic_2026-12-06/step_hlo.py OUT [SHAPE]        (SHAPE: 135m, or tiny on a CPU)"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from bench_generate import SHAPES, build  # noqa: E402

from configurable_fm.models.generation import Generator, _generate  # noqa: E402

if len(sys.argv) not in (2, 3):
    sys.exit("usage: step_hlo.py OUT [SHAPE]")
out, shape = Path(sys.argv[1]), sys.argv[2] if len(sys.argv) == 3 else "135m"
if shape not in SHAPES:
    sys.exit(f"step_hlo.py: unknown shape {shape!r}; choose one of {sorted(SHAPES)}")
model = build(shape)
gen = Generator(model)
ids = np.random.default_rng(0).integers(3, model.cfg.vocab_size, (1, 64), dtype=np.int32)
ids, args, static = gen._arguments(ids, 256, None, 0.0, None, None, None, None, 0)
text = _generate.lower(gen.state, ids, *args, **static).compile().as_text()
out.mkdir(parents=True, exist_ok=True)
(out / f"decode_{shape}.hlo.txt").write_text(text)
print(f"decode_{shape}.hlo.txt: {len(text)} characters, {text.count(' fusion(')} fusions, "
      f"{text.count('custom_call_target')} custom calls")
