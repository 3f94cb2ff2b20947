"""Runs the quickstart job: `python scripts/quickstart.py [--workdir runs/quickstart]`."""
import argparse

from configurable_fm import quickstart

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default="runs/quickstart")
    parser.add_argument("--max_new_tokens", type=int, default=24)
    args = parser.parse_args()
    quickstart.run(args.workdir, max_new_tokens=args.max_new_tokens)
