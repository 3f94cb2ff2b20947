"""Stages: config -> operation -> checkpoint, and studies that chain them (study.py).

    from configurable_fm.stages import run, register_stage, StageContext, StageOutput
    result = run(config, "runs/study")          # python scripts/run.py --config ... --workdir ...

Built-in kinds, registered on import: 'train' and 'evaluate' (train.py), 'merge' (merge.py), 'grow' (grow.py),
'grow_run' (grow_run.py: grow a training run and continue it), 'edit' (edit.py).
A new operation plugs in with one small module: `@register_stage(kind, keys=...)` on fn(cfg, ctx) -> StageOutput that loads its
inputs with `ctx.load_model`, calls the pure operation from configurable_fm.ops, and returns
`StageOutput(model=ctx.save_model(result), metrics=..., summary=...)`.
"""
from configurable_fm.stages import edit, grow, grow_run, merge, train  # noqa: F401  (register the built-in kinds)
from configurable_fm.stages.grow_run import grow_run_config
from configurable_fm.stages.train import evaluate_config, evaluate_models
from configurable_fm.stages.study import (STAGES, StageConfigChanged, StageContext, StageOutput, StageRecord,
                                          StudyResult, fingerprint, plan, register_stage, run, stage, to_plain,
                                          write_report)

__all__ = ["evaluate_config", "evaluate_models", "grow_run_config", "STAGES", "StageConfigChanged", "StageContext", "StageOutput", "StageRecord", "StudyResult",
           "fingerprint", "plan", "register_stage", "run", "stage", "to_plain", "write_report"]
