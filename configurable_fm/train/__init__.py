"""Training: the trainer (trainer.py: set-up, restore, the step loop), what it minimises (task.py: the Task
protocol, NextTokenTask, AnchoredTask; ramp.py: MaskRampTask, fading in masked growth; moe.py: MoETask, router
losses and statistics; distill.py: DistillTask, distillation from a frozen teacher), the model's partitions and
train state (state.py), the compiled steps (step.py), optimizers and schedules, checkpoints, metric writers
(metrics.py) and FLOPs/MFU accounting (flops.py).
Input pipelines live in `configurable_fm.data.pipeline`.

    from configurable_fm.train import train, AnchoredTask
    result = train(config, workdir, model=model, task=AnchoredTask(strength=1e-3))

The names below are imported on first use (importing `configurable_fm.train.data` stays light).
"""
import importlib

_EXPORTS = {
    "train": "trainer", "TrainResult": "trainer", "NonFiniteLoss": "trainer", "ConfigError": "trainer",
    "check_config": "trainer",
    "Task": "task", "NextTokenTask": "task", "AnchoredTask": "task", "loss_sums": "task",
    "ModelParts": "state", "TrainState": "state",
    "MaskRampTask": "ramp", "task_from_config": "ramp",
    "MoETask": "moe",
    "DistillTask": "distill",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
