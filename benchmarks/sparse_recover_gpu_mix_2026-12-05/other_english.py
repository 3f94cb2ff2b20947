"""Does the English the 25% recovery learned from State of the Union speeches carry over to English of another
kind? The recovered models (the thresholds re-calibrated to 75%, as cpu_heldout.sh leaves them) against the dense
SmolLM2-135M-Instruct on 16,384 tokens of the CPython documentation (reST prose, directives stripped; data.corpora
'python_docs'), which no recovery trained on: documents shuffled with seed 0, at most 1,024 tokens of each, windows of
512; each change paired with the dense model window by window (analysis.sparsity.perplexity_change).
    python benchmarks/sparse_recover_gpu_mix_2026-12-05/other_english.py NAME=CHECKPOINT ..."""
import sys

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks/sparse_recover_cpu_2026-12-05")
import experiments.analysis.activation_sparsity as S  # noqa: E402
from configurable_fm.data.corpora import collect_documents, make_sources  # noqa: E402
from heldout_eval import load_models, paired_rows  # noqa: E402

tok, models = load_models(sys.argv[1:], "other_english.py")
docs, _ = collect_documents(make_sources(["python_docs"]), min_chars=256)
tokens, used = S.token_stream(S.pools(docs, 0)["evaluation"], tok, 16384, 1024)
batches = S.batches_of(tokens, 512, 4)
print(f"python_docs: {len(docs)} documents, {len(used)} used for {len(tokens) - 1} tokens", flush=True)
for name, domain, ev, change, se, level in paired_rows(models, {"python_docs": batches}):
    print(f"{name:>8} {domain} {ev.scored_tokens():>6} tokens  ppl {ev.perplexity():8.4f}  "
          f"{change:+7.2%} ± {se:.2%}  down_proj sparsity {level}", flush=True)
