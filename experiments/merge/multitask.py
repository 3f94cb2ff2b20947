"""Multi-task merging study: fine-tune one base on several synthetic tasks, merge the fine-tunes with every method
over a small grid of its hyperparameters, score every task on held-out problems (configurable_fm/experiments/merge/grid.py).

    JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache python scripts/run.py --config experiments/merge/multitask.py \
        --workdir runs/merge_multitask                                                 # one H200, ~5-8 minutes
    python scripts/run.py --config experiments/merge/multitask.py:runlocal --workdir runs/merge_local   # CPU, minutes
    python scripts/run.py --config experiments/merge/multitask.py:test --workdir runs/merge_test        # CPU, ~40 s
    ... --config experiments/merge/multitask.py:low_lr --workdir runs/merge_multitask_low_lr     # fine-tunes at lr 3e-5
The compilation cache lets the fine-tune stages after the first reuse its compiled train step (same shapes).

Stages (WORKDIR/stages/<index>_<name>/, report in WORKDIR/report.md):
  finetune_<task> (train)   experiments/finetune.py:<task> from SmolLM2-135M-Instruct, every parameter, for each
                            of TASKS (sort, reverse, addition, kv_recall, count); 400 steps of 32 rows (seq 64, one
                            compiled shape for all), lr 1e-4, bf16 compute; no evaluation during training (the grid
                            stage scores every fine-tune on every task)
  merge_grid (merge_grid)   base + the fine-tunes loaded once; the base, each fine-tune and every grid point
                            scored by exact match on N_VAL validation and N_TEST test problems per task (greedy,
                            batched, one compiled shape); table, CSV/JSON and plots (study.py docstring)
Validation problems are train-split problems outside each fine-tune's 2000 training problems (seed 1), test
problems come from the test split (seed 0); each method's setting is chosen on mean normalized validation
accuracy and reported on test. Normalized = merged / individual fine-tune on its own task.

Grid (GRID; 'weight' 1 for every fine-tune; `lambda` scales the merged task vector):
  linear            model soup: the mean of the fine-tunes (base unused)
  task_arithmetic   base + lambda * sum_i delta_i,                    lambda in 0.2 0.35 0.5 0.7 1.0
  ties              trim to density, elect signs, disjoint mean,      density 0.2 0.5 x lambda 0.7 1.0 1.4
  dare_ties         random drop to density (L1 rescale), elect, disjoint mean, same grid as ties
  dare_linear       random drop to density, base + lambda * sum,      density 0.2 0.5 x lambda 0.3 0.5 0.8
  breadcrumbs_ties  drop the top 1% and the bottom to density, elect, disjoint mean, density 0.2 0.5 x lambda 1 1.4
  della             rank-based random drop (density +- 0.1), elect, disjoint mean, density 0.3 0.5 x lambda 1 1.4
  model_stock       geometric interpolation toward the fine-tunes' centre (no hyperparameter)
  fisher            Fisher merging (empirical diagonal Fisher on 64 training rows of each fine-tune's task)
  regmean           RegMean (Gram matrices of every linear layer's inputs on the same rows), alpha in 0.5 0.9
'test' (the test's variant) and 'runlocal': a width-128 llama (2 layers) pre-trained for a few steps on rows of the
first four tasks ('pretrain' stage, the base), fine-tuned a few steps per task, a one- or two-point grid per method,
a handful of problems; every code path of the default runs (SmolLM2's tokenizer, orbax checkpoints, every method;
the test swaps in a character tokenizer). CPU: add nothing (the local variants set mesh (1, 1, 1) and float32).
"""
import ml_collections

from experiments.merge.grid import merge_grid_config
from configurable_fm.stages import stage
from experiments import finetune, pretrain

TASKS = ("sort", "reverse", "addition", "kv_recall", "count")
LOCAL_TASKS = TASKS[:4]  # the CPU variants: four tasks, four fine-tune stages
BASE = "smollm2-135m-instruct"
SEQ_LEN = 64  # sort needs up to 51 tokens; one length for every task: one compiled train step

GRID = [
    dict(method="linear", parameters={"weight": 1.0}),
    dict(method="task_arithmetic", parameters={"weight": 1.0}, sweep={"lambda": [0.2, 0.35, 0.5, 0.7, 1.0]}),
    dict(method="ties", parameters={"weight": 1.0, "normalize": True},
         sweep={"density": [0.2, 0.5], "lambda": [0.7, 1.0, 1.4]}),
    dict(method="dare_ties", parameters={"weight": 1.0, "normalize": True},
         sweep={"density": [0.2, 0.5], "lambda": [0.7, 1.0, 1.4]}),
    dict(method="dare_linear", parameters={"weight": 1.0, "normalize": False},
         sweep={"density": [0.2, 0.5], "lambda": [0.3, 0.5, 0.8]}),
    dict(method="breadcrumbs_ties", parameters={"weight": 1.0, "normalize": True, "gamma": 0.01},
         sweep={"density": [0.2, 0.5], "lambda": [1.0, 1.4]}),
    dict(method="della", parameters={"weight": 1.0, "normalize": True, "epsilon": 0.1},
         sweep={"density": [0.3, 0.5], "lambda": [1.0, 1.4]}),
    dict(method="model_stock", parameters={}),
    dict(method="fisher", parameters={}),
    dict(method="regmean", parameters={}, sweep={"alpha": [0.5, 0.9]}),
]
SMALL_GRID = [  # the CPU variants: every method, one or two points
    dict(method="linear", parameters={"weight": 1.0}),
    dict(method="task_arithmetic", parameters={"weight": 1.0}, sweep={"lambda": [0.3, 1.0]}),
    dict(method="ties", parameters={"weight": 1.0, "normalize": True}, sweep={"density": [0.2], "lambda": [1.0, 1.4]}),
    dict(method="dare_ties", parameters={"weight": 1.0, "normalize": True, "density": 0.5}),
    dict(method="dare_linear", parameters={"weight": 1.0, "density": 0.5, "lambda": 0.5}),
    dict(method="breadcrumbs_ties", parameters={"weight": 1.0, "normalize": True, "density": 0.5, "gamma": 0.01}),
    dict(method="della", parameters={"weight": 1.0, "normalize": True, "density": 0.5, "epsilon": 0.1}),
    dict(method="model_stock", parameters={}),
    dict(method="fisher", parameters={}),
    dict(method="regmean", parameters={"alpha": 0.9}),
]
VARIANTS = ("default", "low_lr", "runlocal", "test")
LOW_LR = 3e-5  # the low_lr variant: smaller task vectors (default fine-tunes: finetune.py's 1e-4)


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown multitask variant {arg!r}; known: {list(VARIANTS)}")
    local = arg not in ("default", "low_lr")
    test = arg == "test"
    tasks = LOCAL_TASKS if local else TASKS
    stages = []
    base = BASE
    if local:  # a tiny base: pre-trained a few steps on rows of the study's tasks (nothing to download or build)
        pre = pretrain.get_config("tiny")
        pre.update(steps=4 if test else 40, batch_size=8, seq_len=SEQ_LEN, log_every=2 if test else 10,
                   eval_every=0, checkpoint_every=4 if test else 40, progress=False)
        # every kernel 128 x 128 (q, k, v, o, gate, up, down; the embedding too with a 128-token vocabulary, as in
        # the test): two distinct tensor shapes, so two compilations per merge kernel
        pre.model.update(hidden_size=128, intermediate_size=128, num_heads=2, num_kv_heads=2,
                         max_position_embeddings=128)
        pre.tokenizer = BASE
        pre.token_ids = ml_collections.ConfigDict(dict(eos=-1, pad=-1, bos=-1))
        pre.data = ml_collections.ConfigDict(dict(kind="tasks", tasks=tasks, train_examples=16 if test else 200,
                                                  eval_examples=4, task_seed=0, eval_batch_size=8))
        pre.optimizer.update(lr=3e-3, weight_decay=0.0)  # the fine-tunes' optimizer: in 'test', one train program
        pre.mesh.shape = (1, 1, 1)
        pre.checkpoint["async"] = False
        stages.append(stage("pretrain", "train", pre))
        base = "@pretrain"

    train_examples = 2000
    for task in tasks:
        ft = finetune.get_config(f"{task},runlocal" if local else task)
        ft.init_from = base
        ft.seq_len = SEQ_LEN
        ft.task_metrics = ()  # the grid stage scores every fine-tune on every task
        ft.eval_every = 0
        ft.progress = False
        if local:
            ft.update(steps=4 if test else 60, batch_size=8, log_every=2 if test else 20,
                      checkpoint_every=4 if test else 60)
            ft.optimizer.update(lr=3e-3)
            train_examples = 32 if test else 400
        else:
            ft.update(steps=400, log_every=50, checkpoint_every=400)
            if arg == "low_lr":
                ft.optimizer.update(lr=LOW_LR)
            ft.checkpoint["async"] = False
        ft.data.update(train_examples=train_examples, eval_examples=8, max_eval_batches=1)
        stages.append(stage(f"finetune_{task}", "train", ft))

    n_val, n_test = (4, 4) if test else (16, 32) if local else (64, 128)
    stages.append(merge_grid_config(
        base=base, tasks=tasks, models=[f"@finetune_{t}" for t in tasks], methods=SMALL_GRID if local else GRID,
        n_val=n_val, n_test=n_test, val_seed=1, test_seed=0, exclude_n=train_examples, exclude_seed=0,
        batch_size=20 if test else 64 if local else 320, seq_len=SEQ_LEN, data_examples=8 if test else 64,
        data_batch_size=8 if local else 32, fisher_chunk=1 if local else 8))

    c = ml_collections.ConfigDict()
    c.name = f"merge_multitask_{arg}"
    c.stage_modules = ("experiments.merge.grid",)
    c.stages = stages
    return c
