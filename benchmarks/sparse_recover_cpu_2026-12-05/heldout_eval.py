"""The recovered 25%-active models against the dense SmolLM2-135M-Instruct on more held-out tokens than the
trainer's 8,192: the whole stdlib validation split (windows of 512) and 16,384 tokens of held-out English (the
activation-sparsity study's evaluation pool), one pass each, achieved down_proj sparsity included; each change
against the dense model with its paired standard error over the 512-token windows (analysis.sparsity.perplexity_change).
    python benchmarks/sparse_recover_cpu_2026-12-05/heldout_eval.py NAME=CHECKPOINT ...
`load_models` and `paired_rows` are shared with benchmarks/sparse_recover_gpu_mix_2026-12-05/other_english.py."""
import sys
import jax.numpy as jnp
sys.path.insert(0, ".")
import experiments.analysis.activation_sparsity as S
from configurable_fm.analysis import sparsity as sp
from configurable_fm.analysis.moefication import corpus_batches
from configurable_fm.errors import UserError
from configurable_fm.interop.loader import load_model, load_pretrained


def load_models(args, script):
    """(tokenizer, [(name, model)]): the dense SmolLM2-135M-Instruct first, then each NAME=CHECKPOINT (orbax) of
    `args`, every one loaded before any evaluation; a usage line or a wrong checkpoint exits with one line."""
    if not args or not all("=" in a for a in args):
        sys.exit(f"usage: {script} NAME=CHECKPOINT ... (orbax checkpoints of the recovered models)")
    dense, tok = load_pretrained("smollm2-135m-instruct", dtype=jnp.float32)
    try:
        return tok, [("dense", dense)] + [(a.split("=", 1)[0], load_model(a.split("=", 1)[1])) for a in args]
    except UserError as e:
        sys.exit(f"{script}: {e}")


def paired_rows(models, domains):
    """(name, domain, evaluation, change, SE, mean down_proj sparsity or '-') per model and domain ({domain:
    batches}): each change paired with the first model's (the dense one) window by window."""
    base = {}
    for name, model in models:
        for domain, batches in domains.items():
            ev = sp.evaluate(model, batches)
            base.setdefault(domain, ev)
            change, se = sp.perplexity_change(ev, base[domain])
            s = ev.sparsity()
            yield name, domain, ev, change, se, f"{sum(s.values()) / len(s):.4f}" if s else "-"


if __name__ == "__main__":
    tok, models = load_models(sys.argv[1:], "heldout_eval.py")
    code = corpus_batches("stdlib", tok, split="validation", seq_len=512, batch_size=4, n_tokens=10 ** 6)
    english_tokens, _ = S.token_stream(S.pools(S.domain_documents("english"), 0)["evaluation"], tok, 16384, 1024)
    english = S.batches_of(english_tokens, 512, 4)
    for name, domain, ev, change, se, level in paired_rows(models, {"code": code, "english": english}):
        print(f"{name:>16} {domain:>8} {ev.scored_tokens():>7} tokens  ppl {ev.perplexity():8.4f}  {change:+7.2%}"
              f" ± {se:.2%}  down_proj sparsity {level}", flush=True)
