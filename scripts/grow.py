"""Grow a model (width, depth, mixture of experts) and write it as an HF directory or orbax checkpoint: the
console command `cfm-grow` (configurable_fm/cli/grow.py; the keys are documented in experiments/grow/*.py).

    python scripts/grow.py --config experiments/grow/width.py --config.input=IN --config.output=OUT \\
        --config.width.hidden_size=960 [--config.format=hf|orbax]
    python scripts/grow.py --config experiments/grow/to_shape.py:smollm2_360m --config.input=smollm2-135m \\
        --config.output=grown/smollm2-360m-shape
"""
import sys

from configurable_fm.cli.grow import main

if __name__ == "__main__":
    sys.exit(main())
