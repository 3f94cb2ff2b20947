"""How well the adapter library's base does a task before any adapter: few-shot exact match of SmolLM2-135M-Instruct
on test problems, scored as the study's evaluation scores them (library_study: teacher-forced, answer + newline),
with the commonest-answer chance level. This is the check the library's tasks were chosen by (README "Tasks").

    .venv/bin/python -m experiments.adapters.base_check nominal plural uppercase increment     # CPU, float32
    .venv/bin/python -m experiments.adapters.base_check antonym --n 32 --shots 1

Prints one line per task: `task hits/n chance c (answer 'a')`.
"""
from __future__ import annotations

import argparse
import sys

import ml_collections

from experiments.adapters.library import BASE
from experiments.adapters.library_study import bucket, encode_rows, newline_id, score_rows, task_problems


def check(names, n: int, shots: int, base: str = BASE, seq_len: int = 192, batch_size: int = 16) -> list[dict]:
    """[{'task', 'hits', 'n', 'chance', 'answer'}] for each task name (the test split's first n problems, seed 0,
    the study's demonstration seed)."""
    from configurable_fm.interop.loader import load_model
    from configurable_fm.stages.report import chance_level
    from configurable_fm.train.data import task_tokenizer

    cfg = ml_collections.ConfigDict(dict(tokenizer=base, token_ids=dict(eos=-1, pad=-1, bos=-1)))
    tok = task_tokenizer(cfg)
    nl = newline_id(tok.tokenizer)
    model = load_model(base)
    out = []
    for name in names:
        _, exs = task_problems(name, "test", n, 0, shots, 12345)
        length = bucket(tok.tokenizer, exs, seq_len, bos=tok.bos_id is not None, step=32) + 1
        rows = encode_rows(tok.tokenizer, exs, min(length, seq_len), terminator=nl, pad_id=tok.pad_id,
                           bos_id=tok.bos_id)
        hits, _ = score_rows(rows, batch_size, lambda idx: model)
        chance = chance_level(e.answer.strip() for e in exs)
        out.append({"task": name, "hits": int(hits.sum()), "n": len(hits), "chance": chance["chance"],
                    "answer": chance["answer"]})
    return out


def main(argv=None) -> int:
    from configurable_fm.data.text_tasks import get_library_task

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tasks", nargs="+", help="task names (data/text_tasks.py and data/synthetic)")
    ap.add_argument("--n", type=int, default=64, help="test problems per task (fewer when a split is smaller)")
    ap.add_argument("--shots", type=int, default=2, help="demonstrations in each prompt")
    a = ap.parse_args(argv)
    if a.n < 1 or a.shots < 0:
        ap.error(f"--n must be >= 1 and --shots >= 0, got {a.n} and {a.shots}")
    for name in a.tasks:
        try:
            get_library_task(name)
        except KeyError as e:
            ap.error(str(e.args[0]))
    for r in check(a.tasks, a.n, a.shots):
        print(f"{r['task']} {r['hits']}/{r['n']} chance {r['chance']:.3f} (answer {r['answer']!r})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
