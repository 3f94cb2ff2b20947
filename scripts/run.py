"""Run (or continue) a study, the ordered stages of an experiment config: the console command `cfm-run`
(configurable_fm/cli/study.py, which documents the flags).

    python scripts/run.py --config experiments/study_tiny.py --workdir runs/study_tiny
    cfm-run --config experiments/study_tiny.py --workdir runs/study_tiny [--rerun_from=finetune]
"""
import sys

from configurable_fm.cli.study import main

if __name__ == "__main__":
    sys.exit(main())
