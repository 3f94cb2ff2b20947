"""Generate text from any model source, streamed as it is made: the console command `cfm-generate`
(configurable_fm/cli/generate.py; the keys are documented in experiments/generate.py).

    python scripts/generate.py --config experiments/generate.py --config.input=smollm2-135m-instruct \\
        --config.prompt="What is the capital of France?"
    echo "Name a colour." | cfm-generate --config experiments/generate.py --config.input=exports/smollm2-hf
"""
import sys

from configurable_fm.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
