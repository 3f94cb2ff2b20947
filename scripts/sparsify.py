"""Give a model training-free activation sparsity (TEAL-style thresholds calibrated on a corpus) and write it as an
orbax checkpoint: the console command `cfm-sparsify` (configurable_fm/cli/sparsify.py; the keys are documented in
experiments/analysis/sparsify.py).

    python scripts/sparsify.py --config experiments/analysis/sparsify.py:quarter --config.input=smollm2-135m-instruct \\
        --config.output=sparse/smollm2-ffn25
"""
import sys

from configurable_fm.cli.sparsify import main

if __name__ == "__main__":
    sys.exit(main())
