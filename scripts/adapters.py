"""Merge one adapter, or a combination of several (PEFT's add_weighted_adapter or the exact combination of their
updates), into a base model and write it as an HF model (or orbax), with the combined adapter in PEFT's format on
request: the console command `cfm-adapters` (configurable_fm/cli/adapters.py; the keys are documented in
experiments/adapters/merge.py).

    python scripts/adapters.py --config experiments/adapters/merge.py --config.base=IN \\
        --config.adapters=DIR1,DIR2 --config.weights=0.7,0.4 --config.combination=cat [--config.density=0.5] \\
        --config.output=OUT [--config.format=hf|orbax] [--config.adapter_output=DIR]
"""
import sys

from configurable_fm.cli.adapters import main

if __name__ == "__main__":
    sys.exit(main())
