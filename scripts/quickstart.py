"""Runs the quickstart job: `python scripts/quickstart.py [--workdir runs/quickstart]`."""
import argparse

from configurable_fm import quickstart

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default="runs/quickstart")
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--pretrain_steps", type=int, default=300, help="0 skips the tiny pre-training step")
    args = parser.parse_args()
    quickstart.run(args.workdir, max_new_tokens=args.max_new_tokens, pretrain_steps=args.pretrain_steps)
