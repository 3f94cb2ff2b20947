"""MoEfy a dense model (its FFNs regrouped into routed experts) and write it as an orbax checkpoint or a Mixtral HF
directory: the console command `cfm-moefy` (configurable_fm/cli/moefy.py; the keys are documented in
experiments/analysis/moefy.py).

    python scripts/moefy.py --config experiments/analysis/moefy.py --config.input=IN --config.output=OUT \\
        [--config.split=kmeans|coactivation|cmoe|random] [--config.router=oracle|centroid|mlp] [--config.format=orbax|hf]
    python scripts/moefy.py --config experiments/analysis/moefy.py:cmoe --config.input=smollm2-135m-instruct \\
        --config.output=moefied/smollm2-cmoe
"""
import sys

from configurable_fm.cli.moefy import main

if __name__ == "__main__":
    sys.exit(main())
