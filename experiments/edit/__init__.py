"""Edit configs (ml-collections), one per method: rome.py, memit.py, alphaedit.py, rlsedit.py, ft_l.py; request
sets in data/ (data/smollm2_facts.jsonl: 241 facts SmolLM2-135M-Instruct knows).

    python scripts/edit.py --config experiments/edit/rome.py:smollm2 --config.input=smollm2-135m-instruct \\
        --config.requests=experiments/edit/data/smollm2_facts.jsonl --config.output=OUT \\
        [--config.mode=batch|sequential] [--config.format=hf|orbax] [--config.subset=::24]

Variants: '' (the authors' settings for GPT-2 XL / GPT-J-sized models: set input, requests, layers and stats for
your model), 'smollm2' (SmolLM2-135M-Instruct with its fact set; layers from a small sweep, rome.py's docstring)
and 'test' (a tiny model in seconds, for CI: set input, tokenizer, requests and stats.corpus).
Every config has the keys of configurable_fm/stages/edit.py (input, tokenizer, bos_id, requests, subset, method,
layers, hparams, mode, batch_size, eval_every, seed, stats, eval) plus output, format ('hf' | 'orbax') and
overwrite. As a study stage (kind 'edit'): `stage_config(config, name)` (no output/format/overwrite).
"""
from pathlib import Path

import ml_collections

from configurable_fm.stages.edit import edit_config

VARIANTS = ("", "smollm2", "test")
SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_FACTS = str(Path(__file__).resolve().parent / "data" / "smollm2_facts.jsonl")  # found from any directory
# SmolLM2 is prompted after its document separator <|endoftext|> (id 0), as its pre-training documents begin
# (and as the synthetic testbed is): without it a subject that opens the prompt ("{} is a city in the country
# of") sits at position 0, the attention sink, where its key is small and unlike the same subject's key after
# any prefix, so a key averaged over context templates misses the bare prompt (ROME on the 241 facts, H200:
# ES 88.0 without, 95.9 with; experiments/edit/README.md, "Subjects at position 0"). --config.bos_id=-1 for none.
SMOLLM2_BOS = 0
# Key statistics of SmolLM2: 40k tokens (26 x the key width 1536) of the standard-library shards (the dataset
# built on first use by cfm-train / cfm-prepare-data, tokenized with SmolLM2's tokenizer), cached in the data root.
SMOLLM2_STATS = dict(corpus="stdlib", split="train", n_tokens=40_000, seq_len=256, batch_size=8)
# The 'test' variant: a tiny model, the bare prompt as the only context template, a few optimisation steps,
# a loose clamp (the MLP outputs of a tiny random model are small next to its residual stream).
TEST_STATS = dict(n_tokens=400, seq_len=16, batch_size=8)
TEST_HPARAMS = dict(v_num_grad_steps=4, clamp_norm_factor=100.0, context=(("{}",),))


def common(arg: str, method: str, where: str, *, layers, hparams=None, smollm2_layers=None, smollm2_hparams=None,
           test_layers=(1,), test_hparams=None) -> ml_collections.ConfigDict:
    """The config of `method` for variant `arg` (module docstring)."""
    if arg not in VARIANTS:
        raise ValueError(f"experiments/edit/{where}.py: unknown variant {arg!r}; known: {[a for a in VARIANTS if a]} "
                         "(or none); set keys with --config.KEY=VALUE")
    if arg == "smollm2":
        return edit_config(method=method, layers=smollm2_layers, input=SMOLLM2, requests=SMOLLM2_FACTS,
                           bos_id=SMOLLM2_BOS, hparams=smollm2_hparams, stats=SMOLLM2_STATS if method != "ft" else None,
                           output="")
    if arg == "test":
        hp = dict(test_hparams if test_hparams is not None else TEST_HPARAMS)
        return edit_config(method=method, layers=test_layers, hparams=hp, stats=TEST_STATS,
                           eval=dict(batch_size=8), output="")
    return edit_config(method=method, layers=layers, hparams=hparams, stats=dict(corpus="stdlib"), output="")


def stage_config(config: ml_collections.ConfigDict, name: str, **overrides) -> ml_collections.ConfigDict:
    """A study stage of kind 'edit' from an edit config: without output/format/overwrite, with name and kind."""
    from configurable_fm.stages import stage

    plain = {k: v for k, v in config.to_dict().items() if k not in ("output", "format", "overwrite")}
    return stage(name, "edit", plain, **overrides)
