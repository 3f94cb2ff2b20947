"""Does the English the 25% recovery learned from State of the Union speeches carry over to English of another
kind? The recovered models (the thresholds re-calibrated to 75%, as cpu_heldout.sh leaves them) against the dense
SmolLM2-135M-Instruct on 16,384 tokens of the CPython documentation (reST prose, directives stripped; data.corpora
'python_docs'), which no recovery trained on: documents shuffled with seed 0, at most 1,024 tokens of each, windows of
512; each change paired with the dense model window by window (analysis.sparsity.perplexity_change).
    python benchmarks/sparse_recover_gpu_mix_2026-12-05/other_english.py NAME=CHECKPOINT ..."""
import sys

import jax.numpy as jnp

sys.path.insert(0, ".")
import experiments.analysis.activation_sparsity as S  # noqa: E402
from configurable_fm.analysis import sparsity as sp  # noqa: E402
from configurable_fm.data.corpora import collect_documents, make_sources  # noqa: E402
from configurable_fm.errors import UserError  # noqa: E402
from configurable_fm.interop.loader import load_model, load_pretrained  # noqa: E402

if len(sys.argv) < 2 or not all("=" in a for a in sys.argv[1:]):
    sys.exit("usage: other_english.py NAME=CHECKPOINT ... (orbax checkpoints of the recovered models)")
dense, tok = load_pretrained("smollm2-135m-instruct", dtype=jnp.float32)
try:
    models = [("dense", dense)] + [(a.split("=", 1)[0], load_model(a.split("=", 1)[1])) for a in sys.argv[1:]]
except UserError as e:
    sys.exit(f"other_english.py: {e}")
docs, _ = collect_documents(make_sources(["python_docs"]), min_chars=256)
tokens, used = S.token_stream(S.pools(docs, 0)["evaluation"], tok, 16384, 1024)
batches = S.batches_of(tokens, 512, 4)
print(f"python_docs: {len(docs)} documents, {len(used)} used for {len(tokens) - 1} tokens", flush=True)
reference = None
for name, model in models:
    ev = sp.evaluate(model, batches)
    reference = reference or ev
    change, se = sp.perplexity_change(ev, reference)
    s = ev.sparsity()
    level = f"{sum(s.values()) / len(s):.4f}" if s else "-"
    print(f"{name:>8} python_docs {ev.scored_tokens():>6} tokens  ppl {ev.perplexity():8.4f}  "
          f"{change:+7.2%} ± {se:.2%}  down_proj sparsity {level}", flush=True)
