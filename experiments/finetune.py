"""Fine-tuning a model on synthetic tasks (loss on the answers only), fully or only on chosen bricks.

    python scripts/train.py --config experiments/finetune.py:sort --workdir runs/ft_sort             # GPU
    python scripts/train.py --config experiments/finetune.py:sort_mlp --workdir runs/ft_sort_mlp     # MLP bricks only
    python scripts/train.py --config experiments/finetune.py:multi --workdir runs/ft_multi           # 4 tasks at once
    python scripts/train.py --config experiments/finetune.py:sort_mlp,runlocal --workdir runs/ft_local   # CPU, seconds
Fine-tune another checkpoint: `--config.init_from=<registry name | .gguf file | HF dir | orbax checkpoint>`
(default 'smollm2-135m-instruct'); choose the trained bricks: `--config.trainable='("layers.*.self_attn.**",)'`
(or variables by type: `'("LoRAParam:**",)'`, see configurable_fm/train/state.py). Other losses (an L2 anchor to the
start, distillation, ...) are tasks passed to `train(config, workdir, task=...)` (configurable_fm/train/task.py).

Variants: '<task>' (every parameter) and '<task>_mlp' (only `layers.*.mlp` bricks; the rest frozen and kept out of
the optimizer state) for each task of configurable_fm.data.synthetic.TASKS (sort, reverse, copy, addition,
modular_arithmetic, kv_recall, parity, count), and 'multi' / 'multi_mlp' (sort, reverse, addition, kv_recall).
Append ',runlocal' for a tiny random llama (2 layers, width 32; `init_from` empty, so `model` is built from seed)
that runs in seconds on CPU; 'runlocal' alone is 'sort,runlocal'. Rows are tokenised with SmolLM2's tokenizer
(`tokenizer`, `token_ids`: eos/pad from its GGUF metadata), answers end with its eos <|im_end|>; the task metrics
('<task>/exact_match', greedy generation on the test split) are logged at every evaluation. On CPU add
`--config.compute_dtype=float32 --config.mesh.shape='(1,1,1)'`.
"""
import ml_collections

from configurable_fm.data.synthetic import TASKS
from experiments import pretrain

MULTI = ("sort", "reverse", "addition", "kv_recall")
MLP_BRICKS = ("layers.*.mlp.**",)


def parse(arg: str) -> tuple[tuple[str, ...], bool, bool]:
    """'sort_mlp,runlocal' -> (tasks ('sort',), mlp_only True, runlocal True)."""
    parts = [p for p in arg.split(",") if p]
    runlocal = "runlocal" in parts
    rest = [p for p in parts if p != "runlocal"]
    if len(rest) > 1:
        raise ValueError(f"finetune config {arg!r}: give one variant (and optionally ',runlocal'), got {rest}")
    variant = rest[0] if rest else "sort"
    mlp = variant.endswith("_mlp")
    base = variant[:-len("_mlp")] if mlp else variant
    if base == "multi":
        return MULTI, mlp, runlocal
    if base not in TASKS:
        raise ValueError(f"unknown finetune variant {variant!r}; known: <task> or <task>_mlp for tasks "
                         f"{sorted(TASKS)}, multi, multi_mlp (optionally ',runlocal')")
    return (base,), mlp, runlocal


def get_config(arg: str = "sort") -> ml_collections.ConfigDict:
    tasks, mlp, runlocal = parse(arg)
    c = pretrain.get_config("tiny")  # the trainer's keys (warmup: 5% of steps); `model` only when init_from is ''
    c.name = f"finetune_{arg.replace(',', '_')}"
    c.init_from = "" if runlocal else "smollm2-135m-instruct"
    c.trainable = MLP_BRICKS if mlp else ("**",)
    c.seq_len = 64 if "sort" in tasks else 32  # sort needs up to 51 tokens with SmolLM2's tokenizer
    c.tokenizer = "smollm2-135m-instruct"  # a registered model name, or a tokenizer.json / dir / .gguf path
    c.token_ids = ml_collections.ConfigDict(dict(eos=-1, pad=-1, bos=-1))  # -1: eos/pad from GGUF; bos: none
    c.task_metrics = tasks
    c.data = ml_collections.ConfigDict(dict(
        kind="tasks", tasks=tasks, train_examples=2000, eval_examples=64, task_seed=0, eval_batch_size=32,
        max_eval_batches=8))
    if runlocal:
        c.steps, c.batch_size, c.compute_dtype = 12, 8, "float32"
        c.log_every, c.eval_every, c.checkpoint_every = 4, 6, 6
        c.model.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                       max_position_embeddings=128)
        c.optimizer.update(lr=3e-3, weight_decay=0.0)
        c.data.update(train_examples=64, eval_examples=8, eval_batch_size=8)
        c.task_eval = ml_collections.ConfigDict(dict(n=8, seed=0, batch_size=8, max_new_tokens=0, split="test"))
        c.mesh.shape = (1, 1, 1)
        c.checkpoint["async"] = False
    else:
        c.steps, c.batch_size, c.compute_dtype = 500, 32, "bfloat16"
        c.log_every, c.eval_every, c.checkpoint_every = 10, 100, 250
        c.optimizer.update(lr=3e-4 if mlp else 1e-4, weight_decay=0.0, min_lr_ratio=0.1)
        c.task_eval = ml_collections.ConfigDict(dict(n=200, seed=0, batch_size=50, max_new_tokens=0, split="test"))
    return c
