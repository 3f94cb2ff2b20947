"""Build a token dataset (train/validation shards + manifest.json): the console command `cfm-prepare-data`
(configurable_fm/cli/prepare_data.py, which documents the flags and where the data goes).

    python scripts/prepare_data.py --config experiments/data.py:stdlib [--out DIR] [--overwrite]
    cfm-prepare-data --config experiments/data.py:stdlib      # -> $CFM_DATA_DIR/stdlib (~/.cache/configurable_fm/data)
"""
import sys

from configurable_fm.cli.prepare_data import main

if __name__ == "__main__":
    sys.exit(main())
