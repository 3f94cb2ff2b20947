"""Why tests/cli/test_edit_cli.py no longer asserts that an edit lifts the target: on its world (a random 2-layer
llama, hidden 16, character vocabulary of 104, FACTS, the 'test' variants of experiments/edit) the next-token
distributions are near uniform, so an edit moves the efficacy magnitude p(new) - p(true) by ~1e-5 in either
direction. For each STEPS:LR, ROME and RLS ('test' configs with v_num_grad_steps = STEPS, v_lr = LR), on all three
requests and on the first two (the tests' subset '2'): the efficacy magnitude before -> after and the mean NLL of
target_new after its prompt, before -> after.
    .venv/bin/python benchmarks/edit_cli_lift_2026-12-07/lift_sweep.py [STEPS:LR ...]    (default 4:0.5 20:0.5)
2-core CPU, 2026-12-07, Python 3.12 / jax 0.12.1 (the 3.11 venv gives other signs): ROME and RLS at 4, 10, 20, 40
and 60 steps and LR 0.05-0.5 went up and down in no order; the target's NLL (4.64-4.68, log 104 = 4.64) moved by
less than 0.03 nats (output `lift_sweep_py312.txt` here)."""
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
settings = sys.argv[1:] or ["4:0.5", "20:0.5"]
try:
    parsed = [(int(a.split(":")[0]), float(a.split(":")[1])) for a in settings]
    if any(s < 1 or lr <= 0 for s, lr in parsed):
        raise ValueError
except (ValueError, IndexError):
    sys.exit(f"usage: lift_sweep.py [STEPS:LR ...] (STEPS an int >= 1, LR a number > 0), got {settings}")
os.environ.setdefault("XLA_FLAGS", "--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0")
import numpy as np  # noqa: E402

from configurable_fm.interop.orbax_io import save_model  # noqa: E402
from configurable_fm.models.scoring import token_nll  # noqa: E402
from configurable_fm.stages.edit import edit_from_config  # noqa: E402
from experiments.edit import rlsedit, rome  # noqa: E402
from tests.cli.test_edit_cli import CFG, FACTS, TEXT, request  # noqa: E402
from tests.helpers import char_tokenizer, random_llama  # noqa: E402

root = Path(tempfile.mkdtemp())
model = random_llama(CFG, 3)
tok = char_tokenizer(special=("<pad>", "<eos>", "<bos>"))
tok.save(str(root / "tokenizer.json"))
orbax = save_model(model, root / "orbax")
(root / "requests.jsonl").write_text("".join(json.dumps(request(*f, i)) + "\n" for i, f in enumerate(FACTS)))
(root / "corpus.txt").write_text(TEXT)


def target_nll(m, facts) -> float:
    """Mean over `facts` of the mean NLL of target_new's tokens after 'The capital of {subject} is'."""
    out = []
    for subject, _, new in facts:
        p, t = tok.encode(f"The capital of {subject} is").ids, tok.encode(new).ids
        out.append(float(np.nanmean(token_nll(m, np.array([p + t]))[0, len(p) - 1:])))
    return float(np.mean(out))


for steps, lr in parsed:
    for module in (rome, rlsedit):
        for subset, facts in (("", FACTS), ("2", FACTS[:2])):
            c = module.get_config("test")
            c.update(input=str(orbax), tokenizer=str(root / "tokenizer.json"), requests=str(root / "requests.jsonl"),
                     subset=subset)
            c.stats.update(corpus=str(root / "corpus.txt"), cache_dir=str(root / "stats"))
            c.hparams.v_num_grad_steps, c.hparams.v_lr = steps, lr
            r = edit_from_config(c)
            before = r.metrics["before"]["summary"]["efficacy_magnitude"]["mean"]
            after = r.metrics["after"]["summary"]["efficacy_magnitude"]["mean"]
            print(f"{module.__name__.split('.')[-1]:8s} steps {steps:3d} lr {lr:<5g} requests {len(facts)}: "
                  f"magnitude {before:+.3e} -> {after:+.3e} ({'up' if after > before else 'DOWN'}); "
                  f"target NLL {target_nll(model, facts):.4f} -> {target_nll(r.model, facts):.4f}", flush=True)
