"""LoRA adapters trained on synthetic tasks (loss on the answers only) through scripts/train.py: the base is frozen
(stored in bf16), only the adapter trains and has optimizer state, and the adapter is written at the end.

    python scripts/train.py --config experiments/adapters/lora_synthetic.py:sort --workdir runs/lora_sort      # GPU
    python scripts/train.py --config experiments/adapters/lora_synthetic.py:multi --workdir runs/lora_multi    # 4 tasks
    python scripts/train.py --config experiments/adapters/lora_synthetic.py:sort,bottleneck --workdir runs/bn_sort
    python scripts/train.py --config experiments/adapters/lora_synthetic.py:test --workdir /tmp/lora_test      # CPU
The `:test` variant (CI) is 'sort' on a tiny random llama (2 layers, width 32, built from config.seed; SmolLM2's
tokenizer, or any: `--config.tokenizer=tok.json --config.token_ids.eos=1 --config.token_ids.pad=0
--config.model.vocab_size=128`) for 8 steps on the CPU; append ',test' to any variant for the same ('multi,test').

Outputs in the workdir, besides the trainer's (metrics.jsonl, checkpoints/, best/): adapter/ (the adapter as a
brick set: `bricks.adapters.load_adapter(base, "runs/lora_sort/adapter")`) and adapter_peft/ (PEFT's
adapter_config.json + adapter_model.safetensors: `PeftModel.from_pretrained(<HuggingFaceTB/SmolLM2-135M-Instruct
in transformers>, "runs/lora_sort/adapter_peft")`, base_model_name_or_path = config.init_from).

Variants: '<task>' for each task of configurable_fm.data.synthetic.TASKS (sort, reverse, copy, addition,
modular_arithmetic, kv_recall, parity, count) or 'multi' (sort, reverse, addition, kv_recall), optionally with the
adapter kind ',lora' (default), ',dora', ',ia3' or ',bottleneck' (Houlsby adapters, written as a brick only: PEFT
has none) and ',test'. Everything else is experiments/finetune.py's (data, task metrics, tokenizer, optimizer keys).

The adapter (`config.adapter`, configurable_fm/train/adapters.py): LoRA rank 16, alpha 32 (scale 2; rsLoRA off:
`--config.adapter.lora.rslora=True`) on every attention and MLP projection (`adapter.targets`), trained with
`trainable=('AdapterParam:**',)`. `--config.adapter.lora.dropout=0.05` drops the LoRA branches' inputs in
training steps (PEFT's lora_dropout; kind lora only: DoRA, IA3 and bottleneck refuse it). The frozen base: `frozen_dtype='bfloat16'` (no float32 master copy; adapters are
float32); set `--config.frozen_dtype=` for float32 masters.
"""
import ml_collections

from configurable_fm.train.adapters import ADAPTER_KINDS, adapter_config
from experiments import finetune

LLAMA_TARGETS = {"lora": ("layers.*.self_attn.[qkvo]_proj", "layers.*.mlp.*_proj"),
                 "dora": ("layers.*.self_attn.[qkvo]_proj", "layers.*.mlp.*_proj"),
                 "ia3": ("layers.*.self_attn.[kv]_proj", "layers.*.mlp.down_proj"),  # PEFT's IA3 default for llama
                 "bottleneck": ("houlsby",)}


def parse(arg: str) -> tuple[str, str, bool]:
    """'sort,bottleneck,test' -> (task variant 'sort', kind 'bottleneck', test True); 'test' -> ('sort', 'lora',
    True)."""
    parts = [p for p in arg.split(",") if p]
    test = "test" in parts
    kinds = [p for p in parts if p in ADAPTER_KINDS]
    rest = [p for p in parts if p != "test" and p not in ADAPTER_KINDS]
    if len(kinds) > 1 or len(rest) > 1:
        raise ValueError(f"lora_synthetic config {arg!r}: give one task variant, at most one adapter kind "
                         f"{list(ADAPTER_KINDS)} and optionally 'test'")
    return (rest[0] if rest else "sort"), (kinds[0] if kinds else "lora"), test


def get_config(arg: str = "sort") -> ml_collections.ConfigDict:
    task, kind, test = parse(arg)
    if task.endswith("_mlp"):
        raise ValueError(f"lora_synthetic: {task!r}: the adapter decides what trains; give the task name")
    c = finetune.get_config(f"{task},runlocal" if test else task)  # unknown tasks are refused there
    c.name = f"{kind}_{task}" + ("_test" if test else "")
    c.trainable = ("AdapterParam:**",)  # the adapter only: the base is frozen and has no optimizer state
    c.frozen_dtype = "bfloat16"
    rank, alpha = (4, 8.0) if test else (16, 32.0)
    c.adapter = adapter_config(kind, targets=LLAMA_TARGETS[kind], rank=rank, alpha=alpha,
                               reduction_factor=8 if test else 16,
                               save=("brick",) if kind == "bottleneck" else ("brick", "peft"))
    if test:
        c.steps, c.batch_size = 8, 8
        c.log_every, c.eval_every, c.checkpoint_every = 4, 8, 8
        c.optimizer.update(lr=1e-2, weight_decay=0.0)
        c.task_metrics = ()  # no greedy generations: seconds matter in CI (the loss is evaluated)
        c.data.update(max_eval_batches=1)
        c.progress = False
    else:
        c.optimizer.update(lr=1e-3, weight_decay=0.0, min_lr_ratio=0.1)
    return c
