"""Merge models from a mergekit YAML file (streamed) or an ml-collections merge config (in memory): the console
command `cfm-merge` (configurable_fm/cli/merge.py, which documents the flags).

    python scripts/merge.py --mergekit_yaml ties.yml --output merged/ [--overwrite]
    cfm-merge --config experiments/merge/task_arithmetic_tiny.py --output merged/ [--format hf|orbax]
"""
import sys

from configurable_fm.cli.merge import main

if __name__ == "__main__":
    sys.exit(main())
