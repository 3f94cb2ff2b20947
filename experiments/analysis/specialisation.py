"""The survey's neuron-specialisation analysis (Xiao et al. 2024, arXiv 2409.02877, section 4;
configurable_fm/analysis/specialisation) of any decoder: functionality scores of every FFN neuron for seven functions,
normalized-indicator CDFs, dynamic masking, pruning each function's top neurons, overlaps of the top sets.

    python scripts/analyze_neurons.py --config experiments/analysis/specialisation.py \\
        --config.input=smollm2-135m-instruct --workdir results/neurons/smollm2     # SmolLM2-135M-Instruct (default)
    python scripts/analyze_neurons.py --config experiments/analysis/specialisation.py --config.input=IN --workdir W
    python scripts/analyze_neurons.py --config experiments/analysis/specialisation.py:test --config.input=HF_DIR \\
        --workdir W                                                  # a tiny model in seconds (CI)

IN: a registry name, a .gguf file, an HF directory or an orbax checkpoint (interop.loader.load_model).

Keys (configurable_fm/cli/analyze_neurons.py `specialisation_config` holds the defaults):
    input / tokenizer  the model source; the tokenizer ('' = the source's own; its chat template renders the chats,
                   without one 'User: ...\\nAssistant: ...')
    overwrite      replace a previous output in the work directory
    save_scores    also write scores.npz ((K, L, F) scores and their permuted-label null, float32)
    figures        write figures/*.png
    data           n_score / n_eval instances per function (scoring split: AP scores; evaluation split: other
                   groups, perplexities), seed, facts (a CounterFact-style .jsonl for 'knowledge'; '' = WordNet only),
                   functions (two or more of coding, math, linguistic, knowledge, translation, ethics, writing)
    study          max_len tokens per chat, min_response, batch_size, pad_to; fraction (top set per function, 0.05
                   as the survey); mask_levels and n_mask (dynamic masking on n_mask evaluation instances per
                   function); magnitude (also mask by output magnitude); random_rows (control pruning rows);
                   bootstrap (resamples for the 95% intervals); bins (indicator histograms); seed
Variants: '' (SmolLM2-135M-Instruct: 100 + 24 instances per function, chats <= 128 tokens; 18 min on a shared
2-core CPU, 731 s of CPU; results/neurons/README.md), 'test' (tiny: 6 + 4 per function, 48 tokens, one masking
level; for CI with a tiny random model).
"""
from configurable_fm.cli.analyze_neurons import specialisation_config

FACTS = "experiments/edit/data/smollm2_facts.jsonl"
VARIANTS = {
    "": dict(input="smollm2-135m-instruct", data=dict(facts=FACTS)),
    "test": dict(data=dict(n_score=6, n_eval=4),
                 study=dict(max_len=48, min_response=8, pad_to=48, mask_levels=(0.7,), n_mask=2, random_rows=1,
                            bootstrap=50, bins=10), save_scores=False),
}


def get_config(arg: str = ""):
    if arg not in VARIANTS:
        raise ValueError(f"experiments/analysis/specialisation.py: unknown variant {arg!r}; known: "
                         f"{[a for a in VARIANTS if a]} (or none); set keys with --config.KEY=VALUE")
    return specialisation_config(**VARIANTS[arg])
