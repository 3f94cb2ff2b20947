"""Merge the fine-tunes of the tiny study back onto its pre-trained model (configurable_fm/stages/merge.py).

    python scripts/run.py --config experiments/study_tiny.py --workdir runs/study_tiny        # the checkpoints
    python scripts/merge.py --config experiments/merge/task_arithmetic_tiny.py --output runs/merged_tiny --format hf
    python scripts/merge.py --config experiments/merge/task_arithmetic_tiny.py:ties --output runs/ties_tiny \
        --config.models="('runs/a/model', 'runs/b/model')" --config.model_parameters="({'weight': 1.0}, {'weight': 0.5})"

Variants: 'task_arithmetic' (default): base + 0.5 * sum_i (theta_i - base) over `models`; 'ties': TIES with
density 0.5 (keep the top half of each task vector by magnitude, elect signs by weighted sum, average the agreeing
entries), weight 1 per model. Inputs: `base` and `models` are any sources `load_model` takes (orbax model
checkpoints of study stages, HF directories, registry names); the defaults are the study_tiny outputs (one
fine-tune; list a second one with --config.models). Output: an HF directory (--format hf) or an orbax model
checkpoint (--format orbax).
"""
import ml_collections

from configurable_fm.stages.merge import merge_config

STUDY = "runs/study_tiny/stages"
VARIANTS = ("task_arithmetic", "ties")


def get_config(arg: str = "task_arithmetic") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown task_arithmetic_tiny variant {arg!r}; known: {list(VARIANTS)}")
    base, models = f"{STUDY}/00_pretrain/model", (f"{STUDY}/01_finetune/model",)
    if arg == "ties":
        return merge_config("ties", models, base, parameters={"density": 0.5, "weight": 1.0})
    return merge_config("task_arithmetic", models, base, parameters={"weight": 0.5})
