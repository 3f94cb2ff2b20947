"""Runs the quickstart job (configurable_fm/cli/quickstart.py), as `bash scripts/quickstart.sh` does.

    python scripts/quickstart.py [--workdir runs/quickstart] [--max_new_tokens 24] [--pretrain_steps 300]
"""
import sys

from absl import flags

from configurable_fm import cli


def define(fv):
    flags.DEFINE_string("workdir", "runs/quickstart", "report directory (replaced on every run)", flag_values=fv)
    flags.DEFINE_integer("max_new_tokens", 24, "tokens generated per prompt", flag_values=fv)
    flags.DEFINE_integer("pretrain_steps", 300, "steps of the tiny pre-training (0 skips it)", flag_values=fv)


def main(fv) -> None:
    from configurable_fm.cli import quickstart

    quickstart.run(fv.workdir, max_new_tokens=fv.max_new_tokens, pretrain_steps=fv.pretrain_steps)


if __name__ == "__main__":
    sys.exit(cli.run(main, define))
