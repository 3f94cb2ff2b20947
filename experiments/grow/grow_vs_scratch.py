"""Grow vs scratch: pre-train a small model, grow it, continue training, and compare with training the large model
from scratch on the same data stream and schedule family, counting compute (experiments/grow/compare.py).

    python scripts/run.py --config experiments/grow/grow_vs_scratch.py --workdir runs/grow_vs_scratch    # H200, 5 min
    python scripts/run.py --config experiments/grow/grow_vs_scratch.py:wide_short --workdir runs/gvs_wide # H200, 5 min
    python scripts/run.py --config experiments/grow/grow_vs_scratch.py:long --workdir runs/gvs_long       # H200, 9 min
    python scripts/run.py --config experiments/grow/grow_vs_scratch.py:test --workdir runs/gvs_test      # CPU, ~1 min
    python scripts/run.py --config experiments/grow/grow_vs_scratch.py:default,control --workdir runs/gvs_ctl
        # ',control': scratch and the control's runs only (separate growth, copied / reset moments, alone)
    python scripts/run.py --config experiments/grow/grow_vs_scratch.py:long,msg --workdir runs/gvs_long
        # ',msg': scratch and the masked (MSG) run only, its seed as in the whole study (stage directories are
        # numbered by position: in the whole study's workdir scratch is reused and the masked run's stages rerun)
Results, reading and caveats: experiments/grow/README.md (raw tables and curves in benchmarks/grow_vs_scratch/).
Re-running skips finished stages; a killed stage resumes.

Variants (`family(width, kv, part_heads)` builds the shapes; head_dim 64, FFN 3 x width, 8 layers, tied
embeddings, vocabulary 8192, SwiGLU):
    default     large 8 x 256, heads 4/2 (8.4M parameters), scratch S = 1200 steps (39M tokens)
    wide_short  large 8 x 512, heads 8/4 (29.4M parameters), scratch S = 600 steps (20M tokens: the large model is
                far too big for its tokens, so smaller paths win by default; the control shows it)
    long        default's shapes, scratch S = 4000 steps (131M tokens, 15.6 tokens per parameter, ~4 epochs of code8k's
                33.4M training tokens): where the baseline is neither under-trained nor the grown runs' head start
                large next to the whole run; 8 min 47 s on one H200 (2026-12-03; a killed call resumes on rerun)
    test        tiny models on synthetic task rows, two runs and a control: the CI check of the pipeline
Data: `code8k` (experiments/data.py: the Python standard library and the installed packages' source, a byte-level
BPE of 8192 trained on the training split; validation = 1% of the files, held out as whole files), built on first
use in the data root. Batch 64 x 512 tokens, bf16 compute, AdamW (b2 0.95, weight decay 0.1, clip 1), peak lr 1e-3.

Runs (small model -> growth -> the large model), for the large width W (default 256):
    gstack_x4          2 x W                    depth 'stack' factor 4 (G_stack; not function-preserving)
    width_x2           8 x W/2, half the heads  exact width growth (zero extension; noise 0.1 in new units' inputs)
    width_x<f>         8 x 64 part_heads, MQA   exact width growth by a non-integer factor f (192 -> 256: 1.33)
    identity_x2        4 x W                    depth 'identity': a fresh block after each layer, outputs zeroed
    width_x2_stack_x2  4 x W/2                  exact width x2, then stack x2 (the combination)
    masked_x2_x2       4 x W/2                  MSG (stages/grow.py `masked`): the large shape at once, new heads,
                                                FFN units, width and layers behind masks at 0 (the small model's
                                                function), faded in linearly over MASK_RAMP_FRACTION = 0.25 of the
                                                post-growth steps (train task 'mask_ramp'); MSG grows in stages
                                                during one run, here in one step, as the other operators are
and a control, `alone_width_x2_stack_x2`: that run's small model trained alone (cosine) for the grown runs' whole
budget: growth helps only where it beats its control as well as scratch. The control's growth is also run as a
continued training run (stage kind 'grow_run': `run_<label>_copy` / `run_<label>_reset`): the small run's last
checkpoint grown with its Adam moments mapped like their parameters (copy) or freshly initialised (reset), its
step counter and data stream continued (the separate large run restarts the stream), the learning rate re-warmed
over the same steps as the separate large run and decayed by the same cosine over the same post-growth steps. The
two differ only in the moments.
Budget: the small run gets SMALL_FRACTION = 0.2 of the scratch compute (its steps follow from its FLOPs per token),
the large run after growth POST_FRACTION = 0.4: the grown run as a whole gets 0.6 of scratch's compute, the goal
of the issue (<= 0.6 counting the small model's training, <= 0.4 without). If a grown run's validation loss reaches
the scratch run's final one within that budget, both goals hold; the compare stage interpolates where it does.

Schedules. Scratch and each post-growth run: linear warmup over 5% of their steps, cosine to 0.1 x peak (the
post-growth warmup is the re-warm of G_stack / NVIDIA's upcycling: a fresh AdamW, LR back to peak). The small runs:
warmup then a constant LR (no decay: the model is grown from the middle of its schedule, as in G_stack, and a
decay's gain would be lost at the re-warm). Evaluations (8 batches = 262k held-out tokens) every 1/20 of each run.
"""
import ml_collections

from configurable_fm.models.factory import config_from_dict
from configurable_fm.stages import grow_run_config, stage
from configurable_fm.stages.grow import grow_config
from configurable_fm.stages.grow_run import OPTIMIZER_STATES
from configurable_fm.train.flops import flops_per_token
from experiments import pretrain
from experiments.grow.compare import compare_config
from experiments.grow import stage_config
from experiments.grow.depth import get_config as depth_config
from experiments.grow.to_shape import get_config as to_shape_config
from experiments.grow.width import get_config as width_config

SMALL_FRACTION, POST_FRACTION = 0.2, 0.4
MASK_RAMP_FRACTION = 0.25  # of the post-growth steps: the masked run's new structure fades in over them
EVALS_PER_RUN = 20


def family(width: int, kv: int, part_heads: int) -> tuple[dict, dict]:
    """The large shape (8 layers, `width`, head_dim 64, FFN 3 x width) and the runs that reach it:
    {label: (small shape, width section or None, depth section or None, masked section or None)}."""
    heads = width // 64
    large = dict(num_layers=8, hidden_size=width, num_heads=heads, num_kv_heads=kv, intermediate_size=3 * width)
    to_large = dict(hidden_size=width, num_heads=heads, num_kv_heads=kv, intermediate_size=3 * width, noise=0.1)
    half = dict(hidden_size=width // 2, num_heads=heads // 2, num_kv_heads=kv // 2, intermediate_size=3 * width // 2)
    # a non-integer factor: `part_heads` heads and a single kv head (MQA: its query heads fit any G' that has
    # ceil(part_heads / (heads / kv)) kv heads: exact growth keeps each group's query heads together)
    part = dict(hidden_size=64 * part_heads, num_heads=part_heads, num_kv_heads=1,
                intermediate_size=3 * 64 * part_heads)
    masked = dict(hidden_size=width, num_heads=heads, num_kv_heads=kv, intermediate_size=3 * width, num_layers=8,
                  ramp=0.0)
    runs = {
        "gstack_x4": (dict(large, num_layers=2), None, dict(method="stack", factor=4), None),
        "width_x2": (dict(large, **half), to_large, None, None),
        f"width_x{width / part['hidden_size']:.3g}".replace(".", "_"): (dict(large, **part), to_large, None, None),
        "identity_x2": (dict(large, num_layers=4), None, dict(method="identity", num_layers=8), None),
        "width_x2_stack_x2": (dict(large, num_layers=4, **half), to_large, dict(method="stack", factor=2), None),
        "masked_x2_x2": (dict(large, num_layers=4, **half), None, None, masked),
    }
    return large, runs


# variant: (large width, its kv heads, heads of the non-integer run's small model, scratch steps S)
VARIANTS = {"default": (256, 2, 3, 1200), "wide_short": (512, 4, 5, 600), "long": (256, 2, 3, 4000),
            "test": (None, None, None, 8)}
TEST_LARGE = dict(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64)
TEST_RUNS = {
    "gstack_x2": (dict(TEST_LARGE, num_layers=1), None, dict(method="stack", factor=2), None),
    "width_x2": (dict(TEST_LARGE, hidden_size=16, num_heads=2, num_kv_heads=1, intermediate_size=32),
                 dict(hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64, noise=0.1), None, None),
    "masked_x2_x2": (dict(TEST_LARGE, num_layers=1, hidden_size=16, num_heads=2, num_kv_heads=1, intermediate_size=32),
                     None, None, dict(hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64, num_layers=2,
                                      ramp=0.0)),
}
CONTROL = {"default": "width_x2_stack_x2", "wide_short": "width_x2_stack_x2", "long": "width_x2_stack_x2",
           "test": "width_x2"}  # its small model, ungrown


def train_config(shape: dict, steps: int, *, schedule: str, test: bool) -> ml_collections.ConfigDict:
    """A train stage config for a model of `shape` trained `steps` steps on the study's data."""
    c = pretrain.get_config("small")
    c.model.update(vocab_size=8192, tie_word_embeddings=True, **shape)
    c.update(steps=steps, log_every=max(steps // 100, 1), eval_every=max(steps // EVALS_PER_RUN, 1),
             checkpoint_every=max(steps // 2, 1), progress=False)
    c.optimizer.update(lr=1e-3, schedule=schedule, warmup_steps=max(steps // 20, 1), min_lr_ratio=0.1)
    c.data.update(dir="code8k", prepare="code8k", eval_batch_size=64, max_eval_batches=8)
    c.mesh.shape = (1, 1, 1)
    if test:  # rows of synthetic tasks with SmolLM2's tokenizer: nothing to build
        c.model.update(vocab_size=49152)
        c.update(batch_size=8, seq_len=32, compute_dtype="float32", log_every=1, eval_every=2, checkpoint_every=4)
        c.checkpoint["async"] = False
        c.tokenizer = "smollm2-135m-instruct"
        c.token_ids = ml_collections.ConfigDict(dict(eos=-1, pad=-1, bos=-1))
        c.data = ml_collections.ConfigDict(dict(kind="tasks", tasks=("reverse", "count"), train_examples=64,
                                                eval_examples=16, task_seed=0, eval_batch_size=8))
    return c


def train_flops(shape: dict, seq_len: int, vocab_size: int) -> float:
    cfg = config_from_dict(dict(family="llama", vocab_size=vocab_size, tie_word_embeddings=True, **shape))
    return flops_per_token(cfg, seq_len)


def grow_stage_config(name: str, source: str, width: dict | None, depth: dict | None, seed: int,
                      masked: dict | None = None):
    if masked:
        g = grow_config(input="", masked=masked, seed=seed)
    elif width and depth:
        g = to_shape_config()
        g.width.update(width)
        g.depth.update(depth)
    elif width:
        g = width_config()
        g.width.update(width)
    else:
        g = depth_config()
        g.depth.update(depth)
    g.seed = seed
    return stage_config(g, name, input=source)


def mask_ramp_steps(post_steps: int) -> int:
    """Steps over which a masked run's new structure fades in after growth: MASK_RAMP_FRACTION of its post-growth
    steps (at least 1)."""
    return max(round(MASK_RAMP_FRACTION * post_steps), 1)


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
    arg, _, option = arg.partition(",")
    if arg not in VARIANTS or option not in ("", "control", "msg"):
        raise ValueError(f"unknown grow_vs_scratch variant {arg!r}{f' option {option!r}' if option else ''}; "
                         f"known: {sorted(VARIANTS)}, each optionally with ',control' or ',msg'")
    test = arg == "test"
    width, kv, part_heads, scratch_steps = VARIANTS[arg]
    large, runs = (TEST_LARGE, TEST_RUNS) if test else family(width, kv, part_heads)
    probe = train_config(large, scratch_steps, schedule="cosine", test=test)
    seq, vocab = probe.seq_len, probe.model.vocab_size

    def steps_for(shape, fraction):  # steps of a model of `shape` that cost `fraction` of the scratch compute
        return max(round(fraction * scratch_steps * train_flops(large, seq, vocab) / train_flops(shape, seq, vocab)), 2)

    stages = [stage("scratch", "train", probe)]
    pairs, controls = {}, {}
    for i, (label, (small, width_grow, depth_grow, masked)) in enumerate(runs.items()):
        if option == "control" and label != CONTROL[arg]:  # ',control': only the control's growth (same seed)
            continue
        if option == "msg" and not masked:  # ',msg': only the masked run (same seed as in the whole study)
            continue
        stages.append(stage(f"small_{label}", "train", train_config(small, steps_for(small, SMALL_FRACTION),
                                                                     schedule="constant", test=test)))
        stages.append(grow_stage_config(f"grow_{label}", f"@small_{label}", width_grow, depth_grow, seed=i,
                                        masked=masked))
        large_cfg = train_config(large, max(round(POST_FRACTION * scratch_steps), 2), schedule="cosine", test=test)
        large_cfg.init_from = f"@grow_{label}"
        if masked:  # MSG: the new structure starts masked (the small model's function) and fades in
            large_cfg.task = dict(kind="mask_ramp", start=0, steps=mask_ramp_steps(large_cfg.steps))
        stages.append(stage(f"large_{label}", "train", large_cfg))
        pairs[label] = (f"@small_{label}", f"@large_{label}")
        if CONTROL[arg] == label:  # the same small model trained alone for the grown run's whole budget
            budget = SMALL_FRACTION + POST_FRACTION
            stages.append(stage(f"alone_{label}", "train", train_config(small, steps_for(small, budget),
                                                                         schedule="cosine", test=test)))
            controls[f"{label} small model alone"] = f"@alone_{label}"
            # the same growth as a continued run (stage 'grow_run'): Adam moments copied or reset
            small_steps = steps_for(small, SMALL_FRACTION)
            post = large_cfg.steps
            for mode in OPTIMIZER_STATES:
                cont = train_config(large, small_steps + post, schedule="cosine", test=test)
                cont.eval_every = max(post // EVALS_PER_RUN, 1) if not test else large_cfg.eval_every
                stages.append(grow_run_config(f"run_{label}_{mode}", source=f"@small_{label}", train=cont,
                                              width=width_grow, depth=depth_grow, seed=i, optimizer_state=mode,
                                              rewarm_steps=large_cfg.optimizer.warmup_steps))
                pairs[f"{label} (run, {mode} moments)"] = (f"@small_{label}", f"@run_{label}_{mode}")
    stages.append(compare_config("compare", scratch="@scratch", runs=pairs, controls=controls,
                                 goal_total=SMALL_FRACTION + POST_FRACTION, goal_post=POST_FRACTION))

    c = ml_collections.ConfigDict()
    c.name = f"grow_vs_scratch_{arg}" + (f"_{option}" if option else "")
    c.stage_modules = ("experiments.grow.compare",)
    c.stages = stages
    return c
