"""Train (or resume) a model from an ml-collections config: the console command `cfm-train`
(configurable_fm/cli/train.py, which documents the flags).

    python scripts/train.py --config experiments/pretrain.py:tiny --workdir runs/tiny [--config.steps=50]
    cfm-train --config experiments/pretrain.py:tiny --workdir runs/tiny          # the same, once installed
"""
import sys

from configurable_fm.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
