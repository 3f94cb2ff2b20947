"""Training: the trainer, optimizers and schedules, checkpoints, metric writers (metrics.py) and FLOPs/MFU
accounting (flops.py). Input pipelines live in `configurable_fm.data.pipeline`."""
