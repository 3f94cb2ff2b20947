"""Training-free activation sparsity written into a checkpoint (configurable_fm/analysis/sparsity; the study of the
levels is experiments/analysis/activation_sparsity.py, results/sparsity/README.md).

    python scripts/sparsify.py --config experiments/analysis/sparsify.py --config.input=IN --config.output=OUT
    python scripts/sparsify.py --config experiments/analysis/sparsify.py:quarter \\
        --config.input=smollm2-135m-instruct --config.output=sparse/smollm2-ffn25     # 25% of the FFN neurons
    python scripts/sparsify.py --config experiments/analysis/sparsify.py:quarter,code \\
        --config.input=RUN/best --config.output=sparse/recovered            # re-calibrate a recovery run's model

Keys (configurable_fm/cli/sparsify.py `sparsify_config` holds the defaults):
    input / output / overwrite : the source (any source interop.loader.load_model takes: a registry name, HF
                  directory, GGUF, orbax checkpoint, sparse or not) and the orbax directory written
    format      : 'orbax' only (an HF checkpoint cannot express the thresholds)
    targets     : 'ffn' (the FFN output projections' inputs, i.e. the neurons: llama layers.*.mlp.down_proj, gpt2
                  h.*.mlp.c_proj; a fraction p zeroed leaves 1 - p of the neurons active per token), 'all' (TEAL's
                  seven projections of every block) or comma-separated Linear paths / globs
    sparsity    : p in [0, 1), the fraction of each target's input entries zeroed on the calibration tokens (TEAL's
                  uniform allocation: every target its own p-quantile threshold)
    score       : 'magnitude' (|x_i|, TEAL), 'weighted' (|x_i| ||W_i||, WINA-style) or 'fisher' (|x_i| s_i, s_i the
                  root mean square gradient of the loss at x_i on the calibration tokens: at 50% of SmolLM2's FFN
                  neurons, code +2.95% against +3.37% for 'magnitude', results/sparsity/README.md)
    calibration : corpus (required: a token dataset name or directory of cfm-prepare-data shards tokenized with the
                  model's tokenizer, a .txt file or a directory of .txt files), tokenizer ('' = the source's own),
                  split, n_tokens, seq_len, batch_size
    evaluation  : corpus ('' = the calibration token dataset; a text calibration corpus needs one), split ('' =
                  no evaluation; ignored for text) and n_tokens: perplexity with the targets dense and sparse, and the
                  achieved sparsity, printed
Variants: '' (the FFN at 50%, calibrated on the stdlib dataset: `cfm-prepare-data --config experiments/data.py:stdlib`),
'quarter' (the FFN at 75%: 25% of the neurons active, issue 13's second level), 'teal' (all seven projections at
50%); add ',code' or ',english' to calibrate on those token datasets instead; 'test' (seconds: 64 tokens; set the
corpus and input).

Measured (CPU, SmolLM2-135M-Instruct dequantised from its Q4_1 GGUF, float32; 16,384 calibration tokens of the stdlib
train split, 8,192 held-out of its validation split; benchmarks/moefy_granularity_cpu_2026-12-05/): the FFN at 50%
+3.6% perplexity (10.92 -> 11.31), at 75% +32.1% (14.42), against +1,652% for the best MoEfication at 25% with an
oracle router (cmoe, 16 experts; experiments/analysis/moefy.py).
"""
from configurable_fm.cli.sparsify import sparsify_config

DATASETS = ("stdlib", "code", "english")
LEVELS = {"": dict(sparsity=0.5), "quarter": dict(sparsity=0.75), "teal": dict(sparsity=0.5, targets="all"),
          "test": dict(sparsity=0.5)}


def get_config(arg: str = ""):
    parts = [p for p in arg.split(",") if p]
    levels = [p for p in parts if p in LEVELS]
    data = [p for p in parts if p in DATASETS]
    unknown = [p for p in parts if p not in LEVELS and p not in DATASETS]
    if unknown or len(levels) > 1 or len(data) > 1:
        raise ValueError(f"experiments/analysis/sparsify.py: variant {arg!r}: give at most one of "
                         f"{[v for v in LEVELS if v]} and one dataset {list(DATASETS)} (unknown: {unknown})")
    level = levels[0] if levels else ""
    calibration = dict(corpus=data[0] if data else "stdlib")
    evaluation = {}
    if level == "test":
        calibration.update(n_tokens=64, seq_len=16, batch_size=4)
        evaluation = dict(n_tokens=64)
    return sparsify_config(**LEVELS[level], calibration=calibration, evaluation=evaluation)
