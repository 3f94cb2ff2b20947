"""Convert a model to a Hugging Face directory that transformers loads: the console command `cfm-convert`
(configurable_fm/cli/convert.py; the keys are documented in experiments/convert.py).

    python scripts/convert.py --config experiments/convert.py --config.input=smollm2-135m-instruct \\
        --config.output=exports/smollm2-hf [--config.dtype=bfloat16|float16|float32] [--config.overwrite=True]
    cfm-convert --config experiments/convert.py --config.input=model.gguf --config.output=exports/m   # installed
"""
import sys

from configurable_fm.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
