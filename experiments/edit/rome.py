"""ROME (Meng et al., 2022): one rank-one edit of one layer's MLP output projection per request
(ops/update/rome.py); several requests are applied one after another (sequential ROME).

    python scripts/edit.py --config experiments/edit/rome.py:smollm2 --config.output=runs/edit/rome \\
        [--config.subset=::24] [--config.mode=batch|sequential] [--config.format=hf|orbax]
    python scripts/edit.py --config experiments/edit/rome.py --config.input=IN --config.requests=FILE.jsonl \\
        --config.output=OUT --config.layers=(17,) --config.stats.corpus=DATASET     # GPT-2 XL: layer 17

'' : the released GPT-J JSON (layer 5; 20 steps, lr 0.5, weight decay 0.5, clamp 4, kl 0.0625; context '{}' +
     10 prefixes of 5 tokens + 10 of 10; C from the stdlib shards: set stats.corpus for another tokenizer).
'smollm2': SmolLM2-135M-Instruct (30 layers, width 576, key width 1536) on experiments/edit/data/
     smollm2_facts.jsonl, prompted after <|endoftext|> (bos_id 0, experiments/edit/__init__.py), the same
     hparams but for the key's context weights: MEMIT's two groups, ('{}',) and the 20 generated prefixes,
     so the bare prompt weighs 1/2 instead of ROME's 1/21 (SMOLLM2_CONTEXT below); layer 5 chosen by a small
     sweep (below; run before both changes, without BOS and with a lighter context).
'test' : a tiny model for CI (layer 1, the bare prompt as the only template, 4 steps, clamp 100).

Layer sweep for SmolLM2 (small: 6 facts, one run per layer, no repeats; CPU, 2 shared cores), for L in 3 5 8 12:
    python scripts/edit.py --config experiments/edit/rome.py:smollm2 --config.subset=::48 --config.layers="($L,)" \\
        --config.hparams.context="(('{}', 'gen:10:1'),)" --config.format=orbax --config.output=runs/edit/rome_L$L
(requests 0, 48, ..., 240: one per relation group, applied one after another in one step; a lighter context
than ROME's 21 templates, '{}' + 5 generated prefixes of 10 tokens, for CPU time). Unedited: ES 0, PS 0, NS 100.
After, in % (mean ± standard error over the 6 requests; Loc = EasyEdit locality, NM = neighbourhood magnitude):
    layer  3: ES 100 ± 0   PS  83 ± 17  NS 92 ± 7   S 91  Loc 61 ± 12  NM 39 ± 11
    layer  5: ES 100 ± 0   PS 100 ± 0   NS 88 ± 7   S 96  Loc 71 ± 10  NM 38 ± 9
    layer  8: ES 100 ± 0   PS 100 ± 0   NS 57 ± 10  S 80  Loc 37 ± 13  NM 12 ± 10
    layer 12: ES  83 ± 17  PS  83 ± 17  NS 58 ± 12  S 73  Loc 35 ± 11  NM  1 ± 15
Layer 5 has the best efficacy + neighbourhood (3 is close on NS but generalises less); with 6 facts the
differences between 3 and 5 are within the noise, those to 8 and 12 are not. MEMIT / AlphaEdit / RLS use 3-7.
Common keys: experiments/edit/__init__.py and configurable_fm/stages/edit.py.
"""
from experiments.edit import common

LAYER_SMOLLM2 = 5
# The bare prompt's key and the prefixed prompts' keys of one subject can differ (for a subject that opens the
# prompt: "{} is a country in"); with ROME's flat mean over 21 templates the rank-one update then delivers only
# part of the change at the bare prompt (u^T k_bare / u^T k* was 0.16-0.33 for two failing facts, 1.19-1.34
# with these groups; experiments/edit/README.md, "Subjects at position 0").
SMOLLM2_CONTEXT = (("{}",), ("gen:5:2", "gen:10:2"))


def get_config(arg: str = ""):
    return common(arg, "rome", "rome", layers=(5,), smollm2_layers=(LAYER_SMOLLM2,),
                  smollm2_hparams=dict(context=SMOLLM2_CONTEXT))
