"""Run the quickstart job, as `bash scripts/quickstart.sh` does: the console command `cfm-quickstart`
(configurable_fm/cli/quickstart.py).

    python scripts/quickstart.py [--workdir runs/quickstart] [--max_new_tokens 48] [--pretrain_steps 300]
"""
import sys

from configurable_fm.cli.quickstart import main

if __name__ == "__main__":
    sys.exit(main())
