"""An adapter library of SmolLM2-135M-Instruct (issue 12): one LoRA per task for 10 tasks (6 built from real text),
3 tasks held out, and every way of using the library compared on both (experiments/adapters/library_study.py).

    python scripts/run.py --config experiments/adapters/library.py --workdir runs/adapter_library          # GPU
    python scripts/run.py --config experiments/adapters/library.py:cpu --workdir runs/adapter_library_cpu  # CPU
    python scripts/run.py --config experiments/adapters/library.py:test --workdir /tmp/library_test       # CI
    python scripts/run.py --config experiments/adapters/library.py:routing --workdir runs/adapter_library  # GPU
(`JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache` in front lets the adapter stages after the first reuse the compiled
train step of the same shapes.) Results: WORKDIR/stages/<ii>_evaluate/results.md, results.json, library.png and
WORKDIR/report.md.

Tasks (configurable_fm/data/text_tasks.py; every prompt carries 2 train-split demonstrations, answers end with a
newline; chosen where a check of the base was above zero: 1 shot before the first run, 2 shots since; README "Tasks"):
  library   pos, pertainym, lemma, nominal (WordNet 3.0; State of the Union word counts keep common words),
            keyword (standard-library code lines), cloze (State of the Union sentences), addition, kv_recall,
            sort_short (2-4 numbers up to 20), copy (data/synthetic)
  held out  plural (WordNet noun.exc: near 'lemma'), uppercase (near 'copy'), increment (near 'addition'): tasks
            the base does above chance (2 shots: 0.19, 0.23, 0.91), so a wrong adapter can visibly hurt
(the first full run, 2026-12-04, had antonym, which the base scores 0 on, where nominal is, and the held-out
set was plural, reverse_short, count, near chance for every method; README, "Results: the full run with task set 1")
Stages: adapter_<task> (kind 'library_adapter', one per library task: LoRA rank 8, alpha 16 on every attention
and MLP projection of the frozen base, trained through the trainer with `config.adapter`), then evaluate (kind
'library_eval': base, per-task oracle, uniform / task-arithmetic / TIES / DARE-TIES merges, PEFT 'cat', Arrow,
LoraHub, MiniLM embedding routing: top-1, with calibrated floors falling back to the base or to the uniform merge,
and soft top-3 (temperature 0.05); exact match with SE, chance level, cost relative to the base).

Variants:
  default  GPU (one H200): 300 steps of 32 rows per adapter (4000 training problems, fewer where a split is
           smaller), lr 1e-3, bf16 compute, 200 test problems per task (plural 31, pertainym 27, lemma 70,
           nominal 125: their whole test splits), LoraHub 20 examples x 40 evaluations, 32 router examples per task
  cpu      the reduced run for the shared 2-core CPU: 10 steps of 8 rows per adapter (80 problems), lr 3e-3,
           float32, 16 test problems per task, LoraHub 4 examples x 4 evaluations, 8 router examples per task
  routing  the default run with the evaluation limited to base, oracle, best_single (each adapter alone on each
           task: the top-1 routing bound), uniform and the four embedding-routing rows (ROUTING_METHODS): the
           same adapter stages and a shorter evaluation
  test     CI (seconds): a tiny random llama (2 layers, width 32, SmolLM2's tokenizer; the adapter stages build it
           from config.model and seed, the evaluation stage the same), library copy + keyword, held out
           reverse_short, 2 steps per adapter, 4 problems per task
Merge settings (not tuned; `--config.stages[N].merge.ta_lambda=...`): task arithmetic lambda 0.3; TIES density
0.2, lambda 1 (disjoint mean); DARE-TIES density 0.5, lambda 1. Arrow top-3, temperature 1 (PEFT's defaults).
Why stages, not a script: each adapter is a checkpointed, fingerprinted stage (an interrupted study resumes, a
changed task reruns only its adapter and the evaluation), and the evaluation names the adapters by '@stage'.
"""
import ml_collections

from configurable_fm.stages import stage
from configurable_fm.train.adapters import adapter_config
from experiments import finetune
from experiments.adapters.lora_synthetic import LLAMA_TARGETS

LIBRARY = ("pos", "pertainym", "lemma", "nominal", "keyword", "cloze", "addition", "kv_recall", "sort_short", "copy")
HELD_OUT = ("plural", "uppercase", "increment")
TEST_LIBRARY, TEST_HELD_OUT = ("copy", "keyword"), ("reverse_short",)
BASE = "smollm2-135m-instruct"
VARIANTS = ("default", "cpu", "test", "routing")
ROUTING_METHODS = ("base", "oracle", "best_single", "uniform", "embed_routing", "embed_floors", "embed_uniform",
                   "embed_soft")
# Rows are padded to a multiple of this (bucket()): on the GPU every task to seq_len (one shape, so one compilation
# per model structure: the evaluation of the first full run spent most of its 430 s compiling per task length),
# on the CPU, where the padding costs compute, to the task's own length rounded up to 32.
LENGTH_STEP = {True: 192, False: 32}


def adapter_stage(task: str, variant: str, base: str) -> ml_collections.ConfigDict:
    gpu, test = variant == "default", variant == "test"
    c = finetune.get_config("copy,runlocal" if test else "copy")  # the trainer's keys
    c.name = f"library_{task}"
    c.init_from = base
    c.trainable = ("AdapterParam:**",)
    c.frozen_dtype = "bfloat16" if gpu else "float32"
    c.adapter = adapter_config("lora", targets=LLAMA_TARGETS["lora"], rank=4 if test else 8,
                               alpha=8.0 if test else 16.0, save=("brick",))
    c.task_metrics = ()
    c.seq_len = 192 if not test else 96
    c.data = ml_collections.ConfigDict(dict(kind="library_task", eval_batch_size=8 if not gpu else 32,
                                            max_eval_batches=1 if not gpu else 4))
    c.library_task = ml_collections.ConfigDict(dict(
        name=task, shots=2, demo_seed=12345, task_seed=0,
        train_examples=4000 if gpu else (16 if test else 80), eval_examples=64 if gpu else 8,
        length_step=LENGTH_STEP[gpu]))
    if gpu:
        c.steps, c.batch_size, c.compute_dtype = 300, 32, "bfloat16"
        c.log_every, c.eval_every, c.checkpoint_every = 20, 100, 300
        c.optimizer.update(lr=1e-3, weight_decay=0.0, min_lr_ratio=0.1)
    else:
        c.steps, c.batch_size, c.compute_dtype = (2, 4, "float32") if test else (10, 8, "float32")
        c.log_every = c.eval_every = c.checkpoint_every = c.steps
        c.optimizer.update(lr=1e-2 if test else 3e-3, weight_decay=0.0)
        c.mesh.shape = (1, 1, 1)
        c.checkpoint["async"] = False
    c.progress = False
    return stage(f"adapter_{task}", "library_adapter", c)


def eval_stage(variant: str, library, held_out, base: str, methods=()) -> ml_collections.ConfigDict:
    gpu, test = variant == "default", variant == "test"
    c = ml_collections.ConfigDict()
    c.base = base
    c.adapters = tuple(f"@adapter_{t}" for t in library)
    c.library, c.held_out = tuple(library), tuple(held_out)
    c.shots = 2
    c.demo_seed, c.task_seed, c.seed = 12345, 0, 0
    c.n_test = 200 if gpu else (4 if test else 16)
    c.batch_size = 50 if gpu else (4 if test else 16)
    c.seq_len = 192 if not test else 96
    c.length_step = LENGTH_STEP[gpu]
    c.compute_dtype = "bfloat16" if gpu else "float32"
    c.tokenizer = "smollm2-135m-instruct"
    c.token_ids = ml_collections.ConfigDict(dict(eos=-1, pad=-1, bos=-1))
    c.merge = ml_collections.ConfigDict(dict(ta_lambda=0.3, ties_density=0.2, ties_lambda=1.0, dare_density=0.5,
                                             dare_lambda=1.0))
    c.arrow = ml_collections.ConfigDict(dict(top_k=3, temperature=1.0))
    c.lorahub = ml_collections.ConfigDict(dict(examples=20 if gpu else 4, budget=40 if gpu else (3 if test else 4)))
    c.routing = ml_collections.ConfigDict(dict(examples=32 if gpu else (4 if test else 8), top_k=3, temperature=0.05))
    # the cost column's median of `repeats` forwards (~10 ms each on the GPU; 5 gave "merged" 1.03-1.24x the base)
    c.cost = ml_collections.ConfigDict(dict(repeats=25 if gpu else 2))
    c.methods = tuple(methods)  # () = every method
    if test:  # the tiny random llama of finetune's runlocal variant, as the adapter stages' trainer builds it
        tiny = finetune.get_config("copy,runlocal")
        c.base_model, c.base_seed = tiny.model, tiny.seed
    return stage("evaluate", "library_eval", c)


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
    variant = arg or "default"
    if variant not in VARIANTS:
        raise ValueError(f"unknown adapter-library variant {arg!r}; known: {list(VARIANTS)}")
    c = ml_collections.ConfigDict()
    c.name = f"adapter_library_{variant}"
    c.stage_modules = ("experiments.adapters.library_study",)
    stages = []
    library, held_out, base = LIBRARY, HELD_OUT, BASE
    if variant == "test":
        library, held_out, base = TEST_LIBRARY, TEST_HELD_OUT, ""
    built = "default" if variant == "routing" else variant
    stages += [adapter_stage(t, built, base) for t in library]
    stages.append(eval_stage(built, library, held_out, base, ROUTING_METHODS if variant == "routing" else ()))
    c.stages = stages
    return c
