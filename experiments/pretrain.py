"""Pre-training llama-family models from scratch with SmolLM2's tokenizer (vocabulary 49152).

    python scripts/train.py --config experiments/pretrain.py:tiny --workdir runs/tiny          # CPU, ~3-5 minutes
    python scripts/train.py --config experiments/pretrain.py:small --workdir runs/small        # ~50M, GPU
    python scripts/train.py --config experiments/pretrain.py:125m --workdir runs/125m          # GPU
    python scripts/train.py --config experiments/pretrain.py:1b --workdir runs/1b              # one H200 or more
Override any key: `--config.steps=50 --config.optimizer.lr=1e-3 --config.mesh.shape='(1,8,1)'`; a ReLU-gated llama
(the MoEfication study's ReLU arm, issue 13): `--config.model.hidden_act=relu`.
Variants: tiny (2 layers, width 64: 3.3M parameters, 3.1M of them the tied embedding), small (8 x 512: 51M),
125m (12 x 768: 123M), 1b (16 x 2048, GQA 32/8: 1.1B), 3b (28 x 3072, GQA 24/8, Llama-3.2-3B's shape with this
vocabulary: 3.0B), 7b (Llama-2-7B's shape). One tiny step (8 x 128 tokens) takes ~0.5-0.9 s on
a 2-core CPU; the quickstart (cli/quickstart.py) runs tiny for 120 steps instead of 300.
"""
import ml_collections

VARIANTS = {
    #        hidden layers heads kv  ffn   seq   batch  steps   lr     compute
    "tiny": (64, 2, 4, 2, 256, 128, 8, 300, 3e-3, "float32"),
    "small": (512, 8, 8, 4, 1536, 512, 64, 20000, 1e-3, "bfloat16"),
    "125m": (768, 12, 12, 4, 2048, 2048, 64, 50000, 6e-4, "bfloat16"),
    "1b": (2048, 16, 32, 8, 8192, 2048, 32, 100000, 3e-4, "bfloat16"),
    "3b": (3072, 28, 24, 8, 8192, 2048, 32, 100000, 3e-4, "bfloat16"),  # Llama-3.2-3B's shape (one H200)
    "7b": (4096, 32, 32, 32, 11008, 4096, 64, 100000, 3e-4, "bfloat16"),  # Llama-2-7B's shape (several GPUs)
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown pretrain variant {arg!r}; known: {sorted(VARIANTS)}")
    hidden, layers, heads, kv, ffn, seq, batch, steps, lr, compute = VARIANTS[arg]
    c = ml_collections.ConfigDict()
    c.name = f"pretrain_{arg}"
    c.seed = 0
    c.steps = steps
    c.batch_size = batch  # global batch, in sequences
    c.seq_len = seq
    c.grad_accum_steps = 1
    c.log_every = 10 if arg == "tiny" else 50
    c.eval_every = 100 if arg == "tiny" else 1000
    c.checkpoint_every = 100 if arg == "tiny" else 1000
    c.compute_dtype = compute
    c.remat = "none"  # per-layer rematerialisation: none | dots | full (see models/llama.py REMAT_POLICIES)
    # True: the decoder layers run as one jax.lax.scan (same parameters, paths and results; faster compilation of
    # deep models, models/llama.py)
    c.scan_layers = False
    c.progress = True
    c.init_from = ""  # a registry name, .gguf file, HF dir or orbax checkpoint to fine-tune instead
    # What trains (train/state.py): globs over parameter paths, or 'TYPE:GLOB' for variables of a type, e.g.
    # ('layers.*.mlp.**',), ('LoRAParam:**',); other parameters are frozen (no optimizer state), other variables
    # carried.
    c.trainable = ("**",)

    c.model = ml_collections.ConfigDict(dict(
        family="llama", vocab_size=49152, hidden_size=hidden, intermediate_size=ffn, num_layers=layers,
        num_heads=heads, num_kv_heads=kv, tie_word_embeddings=True, max_position_embeddings=max(seq, 2048),
        rope_theta=10000.0, rms_norm_eps=1e-5, hidden_act="silu"))  # hidden_act: silu (SwiGLU) | relu | gelu ...

    c.optimizer = ml_collections.ConfigDict(dict(
        name="adamw", lr=lr, schedule="cosine", warmup_steps=0, min_lr_ratio=0.1,
        decay_fraction=0.2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0))

    c.optimizer.warmup_steps = c.get_ref("steps") // 20  # follows --config.steps overrides (5% warmup)

    c.data = ml_collections.ConfigDict(dict(
        kind="shards", dir="data/stdlib", prepare="stdlib", eval_batch_size=batch, max_eval_batches=8))

    c.mesh = ml_collections.ConfigDict(dict(shape=(1, -1, 1), axes=("data", "fsdp", "tensor")))
    c.checkpoint = ml_collections.ConfigDict(dict(keep=2, **{"async": True}))
    return c
