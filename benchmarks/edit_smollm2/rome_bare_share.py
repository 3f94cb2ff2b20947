"""ROME on a few real SmolLM2 facts, one at a time, printing how much of the change reaches the bare prompt
(experiments/edit/README.md, "Subjects at position 0"): for each fact the value loss, the key norms at the bare
prompt and averaged (k*), bare_prompt_share = u^T k_bare / u^T k* (ROME's delta metadata) and ES / efficacy
magnitude of the edited model. The `smollm2` variant's settings except the two under study:

    .venv/bin/python benchmarks/edit_smollm2/rome_bare_share.py --facts 175 --bos -1 --context flat
    .venv/bin/python benchmarks/edit_smollm2/rome_bare_share.py --facts 181,58 --bos 0 --context flat
    .venv/bin/python benchmarks/edit_smollm2/rome_bare_share.py --facts 181,58 --bos 0 --context groups

--facts: indices into experiments/edit/data/smollm2_facts.jsonl; --bos: the BOS id (-1: none); --context: ROME's
21 templates as one group ('flat', the authors') or as ('{}',) + the 20 prefixes ('groups', the variant's). Key
statistics: 100,000 tokens of the `english` dataset (cfm-prepare-data --config experiments/data.py:english), cached.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configurable_fm.bricks import deltas  # noqa: E402
from configurable_fm.data.shards import data_root  # noqa: E402
from configurable_fm.interop.loader import load_model  # noqa: E402
from configurable_fm.ops.update import Evaluator, cached_second_moments, compute_keys, edit_site, rome  # noqa: E402
from configurable_fm.stages.edit import check_config, load_tokenizer_for, stats_batches  # noqa: E402
from experiments.edit.rome import get_config  # noqa: E402

CONTEXTS = {"flat": (("{}", "gen:5:2", "gen:10:2"),), "groups": (("{}",), ("gen:5:2", "gen:10:2"))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--facts", required=True, help="comma-separated indices into the fact set")
    p.add_argument("--bos", type=int, default=0, help="BOS id, -1 for none")
    p.add_argument("--context", choices=sorted(CONTEXTS), default="groups")
    args = p.parse_args(argv)
    cfg = get_config("smollm2")
    cfg.stats.corpus, cfg.stats.n_tokens = "english", 100_000
    cfg.bos_id, cfg.hparams.context = args.bos, CONTEXTS[args.context]
    d = check_config(cfg)
    try:
        idx = [int(x) for x in args.facts.split(",")]
        requests = [d["requests"][i] for i in idx]
    except (ValueError, IndexError):
        p.error(f"--facts: comma-separated indices below {len(d['requests'])}, got {args.facts!r}")
    chat = load_tokenizer_for(d)
    tok = getattr(chat, "tokenizer", chat)
    model = load_model(d["input"])
    s = d["stats"]
    label, batches = stats_batches(s["corpus"], tok, split=s["split"], seq_len=s["seq_len"], batch_size=s["batch_size"])
    stats = cached_second_moments(model, batches, d["layers"], corpus=label, n_tokens=s["n_tokens"],
                                  cache_dir=data_root() / "key_stats")
    bos, (layer,) = d["bos_id"], d["layers"]
    site = edit_site(model, layer)
    for i, r in zip(idx, requests):
        delta = rome(model, tok, r, layer=layer, stats=stats, hparams=d["hparams"], key=jax.random.key(d["seed"]),
                     bos_id=bos)
        m = delta.metadata
        k_bare = compute_keys(model, tok, [r], site, (("{}",),), bos_id=bos)[0]
        ev = Evaluator(tok, [r], metrics=("probability",), bos_id=bos)
        before, after = (ev(x).to_json()["rows"][0] for x in (model, deltas.apply(model, delta)))
        print(f"fact {i} ({r.subject} -> {r.target_new.strip()}), bos {args.bos}, context {args.context}: value loss "
              f"{m['value_loss'][0]:.2f} -> {m['nll']:.3f}, |k_bare| {np.linalg.norm(k_bare):.2f}, |k*| "
              f"{m['key_norm']:.2f}, bare_prompt_share {m['bare_prompt_share']:.2f}; ES {before['efficacy_score']:.0f}"
              f" -> {after['efficacy_score']:.0f}, efficacy magnitude {before['efficacy_magnitude']:.3f} -> "
              f"{after['efficacy_magnitude']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
