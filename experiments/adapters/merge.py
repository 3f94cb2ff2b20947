"""Merge one adapter, or a combination of several, into its base model and write an HF model (or orbax), and
optionally the combined adapter in PEFT's format (configurable_fm/cli/adapters.py; the combinations are
configurable_fm/bricks/adapters/combine.py's).

    python scripts/adapters.py --config experiments/adapters/merge.py --config.base=IN \\
        --config.adapters=DIR1,DIR2 --config.weights=0.7,0.4 --config.combination=cat [--config.density=0.5] \\
        --config.output=OUT [--config.format=hf|orbax] [--config.adapter_output=DIR]
    python scripts/adapters.py --config experiments/adapters/merge.py --config.base=smollm2-135m-instruct \\
        --config.adapters=runs/lora_a --config.output=merged/      # one adapter: merged as it is
(`cfm-adapters` is `.venv/bin/python scripts/adapters.py`.)

Keys:
  base           the base model: anything `interop.loader.load_model` reads (a packaged model name, an HF
                 directory, a .gguf file, an orbax model checkpoint, a training workdir)
  adapters       adapter directories, comma-separated: PEFT's (adapter_config.json + adapter_model.safetensors,
                 LoRA / rsLoRA / DoRA / IA3) or this library's brick sets (bricks.json + bricks.safetensors, from
                 bricks.adapters.save_adapter); the kind is detected per directory
  weights        one number per adapter, comma-separated (negative allowed); '' for one adapter (weight 1)
  combination    PEFT's add_weighted_adapter combination types: cat (default here: exactly Σ w_i ΔW_i at rank
                 Σ r_i), linear, svd, ties, ties_svd, dare_linear, dare_ties, dare_linear_svd, dare_ties_svd,
                 magnitude_prune, magnitude_prune_svd (the LoRA factors combined as PEFT does; IA3: linear only);
                 or exact[:METHOD]: every update ΔW_i = s_i A_i B_i (DoRA, IA3: merged − base) combined by METHOD
                 (task_arithmetic, the default: Σ w_i ΔW_i; linear: divided by Σ w_i; or any task-vector method of
                 ops.merge: ties, dare_linear, dare_ties, breadcrumbs, della, ...), then re-factorised by SVD (the
                 relative truncation error per module is printed). One adapter with weight 1 is merged as it is
                 (any kind), unless the combination is exact:...
  density        the kept fraction (ties / dare / magnitude_prune; exact:METHOD's density)
  majority_sign_method  total | frequency (the ties combinations)
  svd_rank       the rank of the *_svd combinations (default: the largest input rank) and of exact:... (default:
                 the sum of the input ranks, which loses nothing for task_arithmetic and linear)
  svd_clamp      the quantile at which the *_svd combinations clamp their factors
  seed           the PRNG seed of DARE's random drop (jax.random.key(seed)) and of exact:METHOD's random methods
  output         the merged model's directory ('' for none: then adapter_output is required)
  format         hf (a directory transformers loads, with the base's tokenizer files when it has some) | orbax
  adapter_output the combined adapter as a PEFT directory (PeftModel.from_pretrained loads it on the base)
  tokenizer      hf only: '' the base's own tokenizer (none if it has none), 'none', or a tokenizer source
  dtype          hf only: '' (float32, the merged parameters') | bfloat16 | float16 | float32
  overwrite      replace previous outputs of this library (a directory holding other files is refused)
  max_shard_size hf only: the safetensors shard size (e.g. 5GB, 500MB)
Everything is checked before the base model is loaded where it can be (keys, combination and options, weights,
adapter directories, outputs); outputs are written atomically, and nothing is left behind on an error.
"""
import ml_collections
from ml_collections import config_dict


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"experiments/adapters/merge.py takes no variant (got {arg!r}); set keys with "
                         "--config.KEY=VALUE")
    c = ml_collections.ConfigDict()
    c.base = ""
    c.adapters = ""  # DIR1,DIR2,...
    c.weights = ""  # 0.7,0.4 ('' for one adapter)
    c.combination = "cat"
    c.density = config_dict.placeholder(float)
    c.majority_sign_method = "total"
    c.svd_rank = config_dict.placeholder(int)
    c.svd_clamp = config_dict.placeholder(float)
    c.seed = 0
    c.output = ""
    c.format = "hf"
    c.adapter_output = ""
    c.tokenizer = ""
    c.dtype = ""
    c.overwrite = False
    c.max_shard_size = "5GB"
    return c
