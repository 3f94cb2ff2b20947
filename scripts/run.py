"""Run (or continue) a study: the ordered stages of an experiment config (configurable_fm/pipeline.py).

    python scripts/run.py --config experiments/study_tiny.py --workdir runs/study_tiny
    python scripts/run.py --config experiments/study_tiny.py:test --workdir runs/study_test
    python scripts/run.py --config experiments/study_tiny.py --workdir runs/study_tiny \\
        --config.stages[1].steps=80 --rerun_from=finetune

Re-running the same command skips completed stages and resumes an interrupted one. A stage whose config changed
since it completed is an error unless --rerun_from names it or an earlier stage (that stage and every later one
are deleted and run again). The report is WORKDIR/report.md.
"""
from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "study config file (path.py:variant)", lock_config=True)
flags.DEFINE_string("workdir", None, "study directory (created; continued when it holds stages)")
flags.DEFINE_string("rerun_from", None, "delete and rerun this stage and all stages after it")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from configurable_fm.pipeline import run

    result = run(FLAGS.config, FLAGS.workdir, rerun_from=FLAGS.rerun_from)
    for rec in result.stages:
        print(f"{rec.index} {rec.name} ({rec.kind}): {rec.status}, {rec.seconds:.1f}s")
    print(f"report: {result.report}")


if __name__ == "__main__":
    app.run(main)
