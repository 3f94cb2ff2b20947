"""Run (or continue) a study: the ordered stages of an experiment config (configurable_fm/stages/study.py).

    python scripts/run.py --config experiments/study_tiny.py --workdir runs/study_tiny
    python scripts/run.py --config experiments/study_tiny.py:test --workdir runs/study_test
    python scripts/run.py --config experiments/study_tiny.py --workdir runs/study_tiny \\
        --config.stages[1].steps=80 --rerun_from=finetune

Re-running the same command skips completed stages and resumes an interrupted one. A stage whose config changed
since it completed is an error unless --rerun_from names it or an earlier stage (that stage and every later one
are deleted and run again). The report is WORKDIR/report.md.
"""
import sys

from absl import flags

from configurable_fm import cli


def define(fv):
    cli.config_flag(fv, "config", "study config file (path.py:variant)")
    flags.DEFINE_string("workdir", None, "study directory (created; continued when it holds stages)", flag_values=fv)
    flags.DEFINE_string("rerun_from", None, "delete and rerun this stage and all stages after it", flag_values=fv)


def main(fv) -> None:
    from configurable_fm.stages import run

    result = run(fv.config, fv.workdir, rerun_from=fv.rerun_from)
    for rec in result.stages:
        print(f"{rec.index} {rec.name} ({rec.kind}): {rec.status}, {rec.seconds:.1f}s")
    print(f"report: {result.report}")


if __name__ == "__main__":
    sys.exit(cli.run(main, define, required=("config", "workdir")))
