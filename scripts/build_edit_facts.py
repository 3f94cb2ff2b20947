"""Build the real edit set of SmolLM2-135M-Instruct: the hand-written candidate facts of
experiments/edit/candidates.py that the model completes correctly, as flat-form edit requests (JSONL), with a
README of counts per relation (configurable_fm/ops/update/facts.py::build_fact_set documents the rules).

    python scripts/build_edit_facts.py [--out experiments/edit/data/smollm2_facts.jsonl] [--seed 0]

Prompts are plain text completions (CounterFact style, no chat template, no BOS): on a sample of 24 facts per
relation, greedy completion of 'The capital of X is' was right 20 times, while the same text sent as a chat
message gave the capital in the reply 6 times (language: 15 vs 19 replies that contain the language anywhere,
author: 3 vs 4), and editors read keys from plain prompts.
"""
import argparse
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configurable_fm.interop.loader import load_pretrained  # noqa: E402
from configurable_fm.ops.update.facts import build_fact_set  # noqa: E402
from experiments.edit.candidates import RELATIONS  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--out", default="experiments/edit/data/smollm2_facts.jsonl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    start = time.perf_counter()
    model, tok = load_pretrained(args.model)
    loaded = time.perf_counter()
    facts = build_fact_set(model, tok, RELATIONS, seed=args.seed, batch_size=args.batch_size)
    built = time.perf_counter()
    out = facts.write(args.out)
    command = "python scripts/build_edit_facts.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    readme = out.with_name(out.stem + ".md")
    readme.write_text(
        f"# {out.name}\n\nEdit requests (flat JSONL, `configurable_fm.ops.update.load_requests`; extra key "
        f"`relation`) for facts that {args.model} completes correctly by greedy plain-text completion: every "
        "request's prompt and paraphrases (1-2 per request) and neighbourhood prompts (up to 10: other kept facts "
        "of the relation, same true object first) are known to the model; target_new is another object of the "
        "relation whose first token differs from the true one's.\n\n"
        f"Built by `{command.strip()}` (seed {args.seed}) in {built - loaded:.0f} s on CPU "
        f"(model loading {loaded - start:.0f} s); candidates: experiments/edit/candidates.py; rules: "
        "configurable_fm/ops/update/facts.py.\n\n" + facts.report.markdown() + "\n", encoding="utf-8")
    print(facts.report.markdown())
    print(f"{len(facts.requests)} requests -> {out} ({built - loaded:.0f} s to check candidates)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
