"""A small study in three stages: pre-train a tiny llama -> fine-tune it on a synthetic task -> evaluate both.

    python scripts/run.py --config experiments/study_tiny.py --workdir runs/study_tiny        # CPU, ~2 minutes
    python scripts/run.py --config experiments/study_tiny.py:test --workdir runs/study_test   # CPU, seconds
Re-running the command skips the completed stages and resumes an interrupted one. After changing a stage's
config (e.g. `--config.stages[1].steps=120`), rerun it and the stages after it: add `--rerun_from=finetune`.

Stages (WORKDIR/stages/<index>_<name>/, report in WORKDIR/report.md):
  0 pretrain  (train)    experiments/pretrain.py:tiny (2 layers, width 64, SmolLM2's 49152-token vocabulary),
                         60 steps of 8 x 128 tokens of the Python standard library shards (data/stdlib, built on
                         first use, shared with the quickstart)
  1 finetune  (train)    experiments/finetune.py:parity,runlocal from '@pretrain' (all parameters), 80 steps of
                         16 rows, 'parity/exact_match' logged at steps 40 and 80
  2 evaluate  (evaluate) '@pretrain' and '@finetune': validation loss / perplexity on held-out parity rows and
                         exact match on 64 test problems
Measured on 2 shared CPU cores (load 2-3): 52 s + 51 s + 5 s (111 s with start-up); pretrain validation loss
6.92 on stdlib; parity exact match 0 -> 0.61 (answer loss 7.07 -> 0.26). Read that 0.61 with its uncertainty
(the evaluate stage's table gives n, SE, 95% Wilson interval, chance level and standard errors above chance):
0.61 = 39/64, 95% interval 0.49-0.72, 1.75 standard errors above a coin (0.5) -- and exactly the score of always
answering '1', the answer of 39 of the 64 test problems (the chance level the table reports: +0.0 SE). So the
run shows that fine-tuning teaches the answer format, not that the model learnt parity; a claim about parity
needs more problems (n=400 puts 2 SE at about 0.05) and more steps. The 'test' variant pre-trains a
width-32 model for 4 steps on rows of two other tasks (reverse, count) instead, fine-tunes 4 steps and evaluates
8 problems.
"""
import ml_collections

from configurable_fm.stages import evaluate_config, stage
from experiments import finetune, pretrain

TASK = "parity"  # its format is learnt in a few dozen steps (exact match 0 -> about 0.6, the majority-answer level)


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
    if arg not in ("default", "test"):
        raise ValueError(f"unknown study_tiny variant {arg!r}; known: ['default', 'test']")
    test = arg == "test"

    pre = pretrain.get_config("tiny")
    pre.update(steps=60, log_every=10, eval_every=30, checkpoint_every=30, progress=False)
    pre.data.max_eval_batches = 4
    pre.mesh.shape = (1, 1, 1)
    pre.checkpoint["async"] = False
    if test:  # pre-train on rows of two other tasks instead of the stdlib shards: no dataset to build
        pre.update(steps=4, batch_size=8, seq_len=32, log_every=2, eval_every=4, checkpoint_every=2)
        pre.model.update(hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
        pre.tokenizer = "smollm2-135m-instruct"
        pre.token_ids = ml_collections.ConfigDict(dict(eos=-1, pad=-1, bos=-1))
        pre.data = ml_collections.ConfigDict(dict(kind="tasks", tasks=("reverse", "count"), train_examples=32,
                                                  eval_examples=8, task_seed=0, eval_batch_size=8))

    ft = finetune.get_config(f"{TASK},runlocal")
    ft.init_from = "@pretrain"
    ft.update(steps=4 if test else 80, batch_size=8 if test else 16, log_every=2 if test else 10,
              eval_every=4 if test else 40, checkpoint_every=2 if test else 40, progress=False)
    ft.optimizer.update(lr=3e-3)
    ft.data.update(train_examples=32 if test else 2000, eval_examples=8 if test else 32,
                   eval_batch_size=8, max_eval_batches=None)
    ft.task_eval.update(n=8 if test else 64, batch_size=8 if test else 32)

    ev = evaluate_config(models=("@pretrain", "@finetune"), task_metrics=(TASK,), n=8 if test else 64,
                         batch_size=8 if test else 32, seq_len=ft.seq_len,
                         data=dict(kind="tasks", tasks=(TASK,), train_examples=0, eval_examples=8 if test else 64,
                                   task_seed=1, eval_batch_size=8))

    c = ml_collections.ConfigDict()
    c.name = f"study_tiny_{arg}"
    c.stage_modules = ()  # modules that register further stage kinds (merge, grow, edit) before the run
    c.stages = [stage("pretrain", "train", pre), stage("finetune", "train", ft), ev]
    return c
