"""Edit facts into a model (ROME, MEMIT, AlphaEdit, RLS, FT-L), evaluate it before and after, and write the edited
model, the delta and a report: the console command `cfm-edit` (configurable_fm/cli/edit.py; the keys are
documented in experiments/edit/*.py and configurable_fm/stages/edit.py).

    python scripts/edit.py --config experiments/edit/rome.py:smollm2 --config.input=smollm2-135m-instruct \\
        --config.requests=experiments/edit/data/smollm2_facts.jsonl --config.output=OUT \\
        [--config.mode=batch|sequential] [--config.format=hf|orbax]
"""
import sys

from configurable_fm.cli.edit import main

if __name__ == "__main__":
    sys.exit(main())
