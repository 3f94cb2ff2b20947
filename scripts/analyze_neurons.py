"""The survey's neuron-specialisation analysis of any decoder (functionality scores, masking, pruning, overlaps),
written to a work directory: the console command `cfm-analyze-neurons` (configurable_fm/cli/analyze_neurons.py; the
keys are documented in experiments/analysis/specialisation.py).

    python scripts/analyze_neurons.py --config experiments/analysis/specialisation.py \\
        --config.input=smollm2-135m-instruct --workdir runs/neurons
"""
import sys

from configurable_fm.cli.analyze_neurons import main

if __name__ == "__main__":
    sys.exit(main())
