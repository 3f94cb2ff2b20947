"""MoEfication (configurable_fm/analysis/moefication): every FFN of a dense model split into experts of equal size,
each token using the top-k routed ones (and any shared ones) with unit weights.

    python scripts/moefy.py --config experiments/analysis/moefy.py --config.input=IN --config.output=OUT \\
        [--config.num_experts=16] [--config.num_experts_per_tok=4] [--config.split=kmeans] [--config.router=centroid]
    python scripts/moefy.py --config experiments/analysis/moefy.py:cmoe --config.input=smollm2-135m-instruct \\
        --config.output=moefied/smollm2-cmoe
    python scripts/moefy.py --config experiments/analysis/moefy.py:mixtral --config.input=IN --config.output=OUT

Keys (configurable_fm/cli/moefy.py `moefy_config` holds the defaults):
    input / output / overwrite : the source (any source interop.loader.load_model takes) and the directory written
    format      : 'orbax' (default: the MoEfied model itself; load it after `import configurable_fm.analysis.
                  moefication`) or 'hf' (MixtralForCausalLM: exact when num_experts_per_tok equals the routed experts;
                  with fewer, only router 'centroid' without shared experts and mixtral_router_scale > 0, an
                  approximation documented in analysis/moefication/export.py; refused otherwise)
    num_experts : E experts per FFN of F / E neurons each (E must divide F)
    num_experts_per_tok : routed experts chosen per token, 1..E - num_shared
    num_shared  : shared (always active) experts of split 'cmoe' (-1: its default 1; 0 for the other splits)
    split       : 'kmeans' (balanced k-means of the normalised gate rows; weights only), 'coactivation' (balanced
                  partition of the co-activation graph), 'cmoe' (shared experts by activation rate, the rest
                  clustered by activation pattern), 'random' (control); 'coactivation' and 'cmoe' need calibration data
    router      : 'oracle' (the experts of largest activation norm: an upper bound, no speed-up), 'centroid'
                  (similarity to the experts' mean gate row; no data), 'mlp' (trained on calibration data)
    active_fraction : the per-token top fraction of |activation| that counts a neuron as active (co-activation)
    mixtral_router_scale : format 'hf' with top-k < routed experts: the centroid router's scale in the Mixtral gate
                  (0: refuse; 2**-12 to 2**-16 suit float32)
    seed        : the PRNG seed of the splits and the router training
    calibration : corpus ('' = none; a token dataset name or directory of cfm-prepare-data shards tokenized with the
                  model's tokenizer, a .txt file or a directory of .txt files), tokenizer ('' = the source's own),
                  split, n_tokens, seq_len, batch_size
    router_training : the 'mlp' router's steps, batch_size, learning_rate (Adam), hidden (0 = one unit per routed
                  expert), max_tokens (calibration tokens kept per FFN)
Variants: '' (kmeans + centroid router, no data, orbax), 'mlp' (kmeans + mlp router trained on 16k tokens of the
stdlib dataset, built by cfm-prepare-data --config experiments/data.py:stdlib), 'cmoe' (cmoe split with 2 shared
experts + mlp router, same data), 'mixtral' (kmeans + centroid router written as an approximate MixtralForCausalLM,
router scale 2**-12), 'test' (a tiny model in seconds, for CI: set input and calibration.corpus).

Measured (one run each, CPU; SmolLM2-135M-Instruct dequantised from its Q4_1 GGUF, 16 experts of 96 neurons, seed 0,
8192 calibration tokens of the stdlib train split; per-layer relative FFN error and router recall on 4096 of them;
perplexity on 4096 tokens of the validation split, dense 10.0; no fine-tuning):
    active        split / router          rel. error  recall  perplexity
    4 of 16       random / oracle            0.63      1       63271
                  kmeans / oracle            0.57      1        4484
                  kmeans / centroid          0.68      0.55   111128
                  kmeans / mlp               0.59      0.79    37119
                  coactivation / mlp         0.49      0.85      337
                  cmoe (2 shared + 2) / mlp  0.48      0.78      211
    8 of 16       random / oracle            0.47      1         256
                  kmeans / oracle            0.41      1          70
                  kmeans / mlp               0.43      0.83       99
                  cmoe (2 shared + 6) / mlp  0.34      0.82       27
SwiGLU FFNs are far from ReLU-sparse: without fine-tuning, regrouping into experts costs much at 25-50% of the
neurons; the activation-based splits (coactivation, cmoe) lose least. Even an oracle router leaves cmoe at 16 experts 17x above the dense
perplexity at 25% active, while keeping the same 25% neuron by neuron (TEAL thresholds, experiments/analysis/
sparsify.py:quarter) costs +32%: results/moefication/README.md, "Why 16 experts lose so much". moefy took 2 s (random), 20-35 s (kmeans),
about 130 s (cmoe + mlp router) and 325 s (coactivation: spectral partition and swaps, 30 layers).
"""
from configurable_fm.cli.moefy import moefy_config

STDLIB = dict(corpus="stdlib", n_tokens=16384, seq_len=256, batch_size=8)
VARIANTS = {
    "": {},
    "mlp": dict(router="mlp", calibration=STDLIB),
    "cmoe": dict(split="cmoe", num_shared=2, router="mlp", calibration=STDLIB),
    "mixtral": dict(format="hf", mixtral_router_scale=2.0 ** -12),
    "test": dict(num_experts=4, num_experts_per_tok=2, calibration=dict(n_tokens=256, seq_len=16, batch_size=4),
                 router_training=dict(steps=50, batch_size=64, max_tokens=256)),
}


def get_config(arg: str = ""):
    if arg not in VARIANTS:
        raise ValueError(f"experiments/analysis/moefy.py: unknown variant {arg!r}; known: "
                         f"{[a for a in VARIANTS if a]} (or none); set keys with --config.KEY=VALUE")
    return moefy_config(**VARIANTS[arg])
