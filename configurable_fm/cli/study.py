"""`cfm-run` (scripts/run.py): run (or continue) a study, the ordered stages of an experiment config
(configurable_fm/stages/study.py). (Not `cli/run.py`: that name would shadow the function `cli.run`.)

    cfm-run --config experiments/study_tiny.py --workdir runs/study_tiny
    cfm-run --config experiments/study_tiny.py:test --workdir runs/study_test
    cfm-run --config experiments/study_tiny.py --workdir runs/study_tiny \\
        --config.stages[1].steps=80 --rerun_from=finetune

Re-running the same command skips completed stages and resumes an interrupted one. A stage whose config changed
since it completed is an error unless --rerun_from names it or an earlier stage (that stage and every later one
are deleted and run again). The report is WORKDIR/report.md.
"""
from __future__ import annotations

from typing import Sequence

from absl import flags

from configurable_fm import cli


def define(fv: flags.FlagValues) -> None:
    cli.config_flag(fv, "config", "study config file (path.py:variant)")
    flags.DEFINE_string("workdir", None, "study directory (created; continued when it holds stages)", flag_values=fv)
    flags.DEFINE_string("rerun_from", None, "delete and rerun this stage and all stages after it", flag_values=fv)


def run(fv: flags.FlagValues) -> None:
    from configurable_fm.stages import run as run_study

    result = run_study(fv.config, fv.workdir, rerun_from=fv.rerun_from)
    for rec in result.stages:
        print(f"{rec.index} {rec.name} ({rec.kind}): {rec.status}, {rec.seconds:.1f}s")
    print(f"report: {result.report}")


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(run, define, argv, prog="cfm-run", required=("config", "workdir"))
