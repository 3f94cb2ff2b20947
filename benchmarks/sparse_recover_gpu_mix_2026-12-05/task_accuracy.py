"""Task accuracy of the sparse SmolLM2-135M-Instruct models beside their perplexities (issue 13's study asks for
both): exact match of greedy answers on the adapter-library study's tasks (data/text_tasks.py and the synthetic
ones; 2 fixed train-split demonstrations, as experiments/adapters/library.py prompts them), N test examples each
(default 64; pertainym and plural have 27 and 31), the mean over tasks with its SE (the pooled binomial SE of the
per-task means), and each model's mean paired with the dense model's on the same examples (SE over the tasks).
    python benchmarks/sparse_recover_gpu_mix_2026-12-05/task_accuracy.py [--n N] NAME=CHECKPOINT ...
A checkpoint is an orbax directory (a sparse or recovered model) or 'teal50' (the dense model with 50% of every
down_proj input zeroed by thresholds calibrated on 16,384 English tokens of the activation-sparsity study's
calibration pool)."""
import argparse
import sys

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, ".")
import experiments.analysis.activation_sparsity as S  # noqa: E402
from configurable_fm.analysis.sparsity import calibrate, sparsify_activations  # noqa: E402
from configurable_fm.data.synthetic.evaluate import evaluate_task  # noqa: E402
from configurable_fm.data.text_tasks import few_shot, get_library_task  # noqa: E402
from configurable_fm.errors import UserError  # noqa: E402
from configurable_fm.interop.loader import load_model, load_pretrained  # noqa: E402

TASKS = ("pos", "lemma", "pertainym", "keyword", "cloze", "plural", "addition", "kv_recall", "copy", "increment")
SMALL = {"pertainym": 27, "plural": 31}  # test splits smaller than the default N: all of their items

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--n", type=int, default=64)
parser.add_argument("models", nargs="+", help="NAME=CHECKPOINT (orbax dir or 'teal50')")
args = parser.parse_args()
if not all("=" in m for m in args.models):
    sys.exit("task_accuracy.py: each model is NAME=CHECKPOINT")
dense, tok = load_pretrained("smollm2-135m-instruct", dtype=jnp.float32)


def teal50():
    down = [f"layers.{i}.mlp.down_proj" for i in range(dense.cfg.num_layers)]
    split = S.pools(S.domain_documents("english"), 0)
    cal = calibrate(dense, S.batches_of(S.token_stream(split["calibration"], tok, 16384, 1024)[0], 512, 4), down)
    return sparsify_activations(dense, cal.thresholds({d: 0.5 for d in down}))


tasks = {t: few_shot(get_library_task(t), shots=2) for t in TASKS}
ns = np.array([min(args.n, SMALL.get(t, args.n)) for t in TASKS])
scores = {}
try:  # every checkpoint loaded before the first evaluation: a wrong path fails at once, in one line
    models = [("dense", dense)] + [(name, teal50() if src == "teal50" else load_model(src))
                                   for name, src in (m.split("=", 1) for m in args.models)]
except UserError as e:
    sys.exit(f"task_accuracy.py: {e}")
print(f"{'model':>8} " + " ".join(f"{t[:9]:>9}" for t in TASKS) + "      mean ± SE   vs dense ± SE", flush=True)
for name, model in models:
    per = {}
    for t, task in tasks.items():
        r = evaluate_task(model, tok, task, n=int(ns[TASKS.index(t)]), seed=0, max_new_tokens=12, n_show=0,
                          unique=True)
        per[t] = r["exact_match"]
    scores[name] = per
    acc = np.array([per[t] for t in TASKS])
    mean, se = acc.mean(), np.sqrt(np.sum(acc * (1 - acc) / ns)) / len(acc)
    line = f"{name:>8} " + " ".join(f"{per[t]:9.3f}" for t in TASKS) + f"   {mean:.3f} ± {se:.3f}"
    if name != "dense":
        d = acc - np.array([scores["dense"][t] for t in TASKS])
        line += f"   {d.mean():+.3f} ± {d.std(ddof=1) / np.sqrt(len(d)):.3f}"
    print(line, flush=True)
