"""Adapter speed: a mixed-adapter batch against one adapter, and LoRA / DoRA fine-tuning steps against full
fine-tuning (and against PEFT + transformers on a CUDA GPU, in the same run).

    python scripts/bench_adapters.py --shape 1b --batch 64 --seq 512 --steps 10 --train_batch 16
    python scripts/bench_adapters.py --shape 135m --batch 64 --seq 512 --steps 10 --out results/adapters.jsonl
    python scripts/bench_adapters.py --shape tiny --batch 4 --seq 16 --steps 1 --warmup 1 --train_batch 2  # CPU
    python scripts/bench_adapters.py --shape 1b --batch 64 --seq 512 --factor_dtype bfloat16  # --mixed_path gather
    python scripts/bench_adapters.py --shape 1b --benches forward    # only the forward rows (train: only training)
    python scripts/bench_adapters.py --shape 135m --benches routing --batch 50 --seq 192 --rank 8   # the library study
    python scripts/bench_adapters.py --shape 1b --benches routing --batch 64 --seq 512 --rank 8 --profile /tmp/prof

A llama of the shape (random weights; 135m: SmolLM2-135M, 1b: experiments/pretrain.py:1b; tiny: CPU tests) with
LoRA rank --rank (alpha = 2 x rank) on every Linear of attention and MLP (--targets). One JSON line per
measurement, on stdout and appended to --out:

  bench=forward   (twice: T = --seq, and T = 1, the shape of a decode step): the forward (logits) of one batch of
                  --batch rows, as jitted `model(ids)`: `base_s` (no adapter), `single_s` (one LoRA adapter
                  attached: bricks.adapters.attach), `mixed_s` (bricks.adapters.mix of --adapters (default
                  --batch) LoRA adapters, row b using adapter b mod N), `mixed_one_s` (the same mixed model, every
                  row adapter 0: the same program, other ids); ratio = mixed_s / single_s (goal <= 1.3).
                  Serving precision: weights in the compute dtype, adapters float32 (as PEFT keeps them), or the
                  mixed model's stacked LoRA factors in --factor_dtype (mix(..., factor_dtype=...)).
                  `mixed_path`: the LoRA path of the mixed rows (bricks/adapters/mixed.py, "Cost"), by shape unless
                  --mixed_path forces it: 'all_adapters' when batch x T <= SMALL_BATCH_ROWS (128) and adapters <=
                  2 x batch (the T = 1 row at --batch 64: the decode step of issue 12; both tiny CPU rows), else
                  'gather' (the T = --seq row at --batch 64 --seq 512).
  bench=train     (method full | lora | dora): the trainer's own step (train.trainer.make_train_step, AdamW of
                  train/optim.py, donated state) on --train_batch x --seq random tokens: float32 master weights,
                  compute dtype --dtype; full trains every parameter, lora / dora only the adapter leaves
                  ('LoRAParam:**': only they carry optimizer state). tokens_per_s = train_batch x seq / step time.
  bench=peft      (method lora | dora): the same step with transformers' LlamaForCausalLM + PEFT (float32 weights,
                  torch.autocast to the compute dtype, fused torch AdamW over the trainable parameters), run in a
                  subprocess before JAX takes the GPU; `skipped` with the reason when torch has no CUDA device or
                  torch / transformers / peft are missing.
  bench=routing   what embedding routing adds to a forward (issue 12's "<= 5% extra inference cost"), in the
                  adapter-library study's setting: --library LoRA adapters of rank --rank mixed
                  (bricks.adapters.mix), a MiniLM router over them (ops.route.retrieval.build_router, 8 example
                  queries per adapter), a batch of --batch short queries and their rows of --seq tokens.
                  `base_s`: the base's forward; `single_lora_s`: the forward with one adapter attached (unmerged);
                  `routed_lm_s`, `embed_s`, `select_s`: ops.route.routing_cost (the
                  routed mixed model's forward, embedding the queries, choosing adapters); `cost_ratio` =
                  (routed_lm + embed + select) / base, `overhead` = (embed + select) / routed_lm. Every part is the
                  median of max(--steps, 1) calls after one warm-up (ops.route.median_seconds), each blocked on
                  before the next starts (a latency: the host's launch work, which grows with the number of
                  argument arrays, adds to the device's), every model split before timing. `*_pipelined_s`: the
                  same forwards as the mean of --steps calls issued back to back (one block at the end: the
                  host's work overlaps the device's, a throughput); `pipelined_cost_ratio` = (routed_lm_pipelined
                  + embed + select) / base_pipelined. `*_interleaved_s`: the three forwards timed in alternation,
                  max(--steps, 3) rounds of 3 back-to-back calls each, the order rotated every round, the median
                  per model; `interleaved_single_ratio` and `interleaved_routed_ratio` are the medians over rounds
                  of each round's own ratio to the base, so a drift of the device's speed during the run (the
                  profile saw one base forward take 113 ms and the next 120 ms) cancels; `interleaved_cost_ratio`
                  = interleaved_routed_ratio + (embed + select) / base_interleaved. The encoder is --encoder:
                  the packaged all-MiniLM-L6-v2, or 'random:TOKENIZER_JSON', a randomly initialised BERT of its
                  shape with that tokenizer (the same cost; routing choices meaningless). --mixed_path and
                  --factor_dtype apply as in bench=forward. With --profile DIR, `profile` holds a device-kernel summary
                  (configurable_fm.profiling.trace_kernels: categories, top kernels, per forward) of 3 forwards
                  each of the base and of the one-adapter model (traces in DIR/base, DIR/single_lora): where the
                  unmerged adapter's extra time goes. --lora_matmul MODES adds, per mode, the one-adapter and the
                  routed forwards with their LoRA terms evaluated that way (bricks.adapters.with_lora_matmul:
                  'joint' is [x | s x A] @ [W ; B], one product per projection): `single_lora_<mode>_s`,
                  `routed_lm_<mode>_s` and, timed in the same rotated rounds, `interleaved_<name>_ratio`.
                  The routing folded into the weights (ops.route.run_folded on a weighted_mix of the same
                  adapters): `folded_lm_s` the batch's rows grouped by their routing (`folded_groups` groups),
                  each group's forward on its folded model (the base's structure; the folds made before timing
                  and kept), `fold_s` a new routing folded (W + Σ_i w_i ΔW_i at every adapted module, one
                  compiled program; ops.route.FoldedModels),
                  `folded_cost_ratio` = (folded_lm + embed + select) / base. A batch whose rows share one
                  routing (one request, or requests grouped by adapter) runs the base's own program: its cost is
                  base_s, plus fold_s once per routing not yet folded.
  bench=summary   the ratios: mixed_over_single (goal <= 1.3), lora_over_full, dora_over_lora (goal >= 0.9),
                  ours_over_peft_lora / _dora (None when PEFT was skipped).

Times: the first call compiles (compile_s), --warmup calls more, then the mean of --steps calls
(block_until_ready after the last). The device is whatever JAX has (`device`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from experiments.shapes import SHAPES as BENCH_SHAPES

SHAPES = {  # the anchors' shapes (experiments/shapes.py: SmolLM2-135M, experiments/pretrain.py:1b) and a CPU one
    **BENCH_SHAPES,
    "tiny": dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                 num_kv_heads=2, rope_theta=1e4),
}
TARGETS = "layers.*.self_attn.[qkvo]_proj,layers.*.mlp.gate_proj,layers.*.mlp.up_proj,layers.*.mlp.down_proj"
HF_NAMES = {"self_attn.[qkvo]_proj": ["q_proj", "k_proj", "v_proj", "o_proj"]}  # our globs -> PEFT target names


def model_spec(shape: str, seq: int) -> dict:
    return dict(SHAPES[shape], family="llama", tie_word_embeddings=True, max_position_embeddings=max(2048, seq))


def peft_targets(targets: list[str]) -> list[str]:
    """PEFT target_modules (module-name suffixes) for our globs."""
    out = []
    for g in targets:
        tail = g.split("layers.*.", 1)[-1]
        out += HF_NAMES.get(tail, [tail.rsplit(".", 1)[-1]])
    return list(dict.fromkeys(out))


# ------------------------------------------------------------------------------------------ PEFT anchor
def peft_step(args, method: str) -> dict:
    """LoRA / DoRA training step with transformers + PEFT on CUDA (runs in the subprocess; never imports JAX's
    device)."""
    row = {"bench": "peft", "method": method, "shape": args.shape, "train_batch": args.train_batch,
           "seq": args.seq, "rank": args.rank}
    try:
        import peft
        import torch
        import transformers
    except ImportError as e:
        return {**row, "skipped": f"cannot import torch / transformers / peft ({e})"}
    if not torch.cuda.is_available():
        return {**row, "skipped": f"torch {torch.__version__} sees no CUDA device"}
    torch.backends.cuda.matmul.allow_tf32 = True
    s = SHAPES[args.shape]
    cfg = transformers.LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
                                   intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_layers"],
                                   num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"],
                                   rope_theta=s["rope_theta"], max_position_embeddings=max(2048, args.seq),
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg)  # float32 weights, as our master weights
    model.config._attn_implementation = "sdpa"
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, use_dora=method == "dora",
        target_modules=peft_targets(args.targets.split(",")), init_lora_weights=False))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (args.train_batch, args.seq), device="cuda")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]

    def step():
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    return {**row, "step_s": dt, "tokens_per_s": args.train_batch * args.seq / dt, "first_step_s": compile_s,
            "loss": float(loss.detach()), "trainable_params": sum(p.numel() for p in params),
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9, "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def run_peft(argv: list[str], method: str) -> dict:
    """peft_step in a subprocess (so that JAX, started afterwards, finds the GPU memory free)."""
    row = {"bench": "peft", "method": method}
    if not (shutil.which("nvidia-smi") or os.path.exists("/dev/nvidiactl")):
        return {**row, "skipped": "no NVIDIA GPU on this machine (no nvidia-smi, no /dev/nvidiactl)"}
    proc = subprocess.run([sys.executable, __file__, *argv, "--anchor", method], capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {**row, "skipped": f"the PEFT subprocess failed (exit {proc.returncode}): {proc.stderr[-600:]}"}


# ------------------------------------------------------------------------------------------ ours
def timed(fn, args_, steps: int, warmup: int) -> tuple[float, float]:
    """(mean seconds per call over `steps` calls, seconds of the first call (compilation)); fn returns arrays
    (and, for a train step, the state to feed back: then args_ is updated by `fn`)."""
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args_))
    first = time.perf_counter() - t0
    for _ in range(warmup):
        out = fn(*args_)
    jax.block_until_ready(out if warmup else None)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = fn(*args_)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / steps, first


def interleaved_seconds(calls: dict, rounds: int, per_round: int = 3) -> dict[str, list[float]]:
    """{name: seconds per call in each round}: every round times `per_round` back-to-back calls of each zero-argument
    call (one block at the end), the names in an order rotated by one each round, so that slow drifts of the
    device (clocks, temperature) reach every model alike. The calls must be compiled already."""
    import jax

    names = list(calls)
    out = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(per_round):
                result = calls[name]()
            jax.block_until_ready(result)
            out[name].append((time.perf_counter() - t0) / per_round)
    return out


def lora_matmul_modes(value: str) -> list[str]:
    """--lora_matmul: comma-separated modes of bricks.adapters.with_lora_matmul."""
    from configurable_fm.bricks.adapters import LORA_MATMULS

    modes = [m for m in value.split(",") if m]
    bad = [m for m in modes if m not in LORA_MATMULS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {bad}; choose from {list(LORA_MATMULS)}")
    return modes


MIXED_PATHS = {"auto": None, "all_adapters": True, "gather": False}  # --mixed_path -> with_small_batch_path's value


def with_mixed_path(mixed, mixed_path: str):
    """The mixed model with its LoRA path forced as --mixed_path says ('auto': by shape, unchanged)."""
    from configurable_fm.bricks.adapters.mixed import with_small_batch_path

    forced = MIXED_PATHS[mixed_path]
    return mixed if forced is None else with_small_batch_path(mixed, forced)


def bench_forward(args, seqs: list[int]) -> list[dict]:
    """One bench=forward row per sequence length in `seqs` (the adapters are built once)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from configurable_fm.bricks import adapters
    from configurable_fm.bricks.adapters.mixed import mix, uses_small_batch_path, with_adapter_ids
    from configurable_fm.models.factory import build_model
    from configurable_fm.ops import route

    dtype = jnp.dtype(args.dtype)
    base = build_model(model_spec(args.shape, max(seqs)), seed=0, param_dtype=dtype, dtype=dtype)
    targets = args.targets.split(",")
    n = args.adapters or args.batch
    t0 = time.perf_counter()
    singles = [adapters.attach(base, "lora", targets, rank=args.rank, alpha=2 * args.rank, init="random", seed=i)
               for i in range(n)]
    mixed = with_mixed_path(mix(base, singles, factor_dtype=args.factor_dtype), args.mixed_path)
    forced = MIXED_PATHS[args.mixed_path]
    build_s = time.perf_counter() - t0
    models = [("base", base), ("single", singles[0]), ("mixed", with_adapter_ids(mixed, np.arange(args.batch) % n)),
              ("mixed_one", with_adapter_ids(mixed, np.zeros(args.batch, np.int32)))]
    rows = []
    for seq in seqs:
        tokens = jnp.asarray(np.random.default_rng(seq).integers(0, SHAPES[args.shape]["vocab_size"],
                                                                 (args.batch, seq)), jnp.int32)
        times = {}
        for name, model in models:  # one program per structure: the two mixed models differ only in their ids
            call = route.forward_call(model, tokens)
            times[f"{name}_s"], times[f"{name}_compile_s"] = timed(call, (), args.steps, args.warmup)
        small = uses_small_batch_path(args.batch * seq, args.batch, n) if forced is None else forced
        rows.append({"bench": "forward", "shape": args.shape, "batch": args.batch, "seq": seq, "adapters": n,
                     "rank": args.rank, "dtype": args.dtype, "factor_dtype": args.factor_dtype or "float32",
                     "mixed_path": "all_adapters" if small else "gather", **times,
                     "ratio": times["mixed_s"] / times["single_s"],
                     "goal": 1.3, "tokens_per_s_mixed": args.batch * seq / times["mixed_s"],
                     "build_adapters_s": build_s, "device": jax.devices()[0].device_kind})
    return rows


ROUTING_GOAL = 1.05  # issue 12: routing adds <= 5% to the inference cost
MINILM_SHAPE = dict(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536)
QUERY_WORDS = ("antonym", "plural", "copy", "sort", "add", "recall", "keyword", "noun", "verb", "base", "form",
               "of", "the", "complete", "sentence", "python", "missing", "start", "count", "reverse")


def text_encoder(spec: str):
    """The encoder of --encoder: a registry name, or 'random:TOKENIZER_JSON' (a random BERT of MiniLM's shape)."""
    from flax import nnx
    from tokenizers import Tokenizer

    from configurable_fm.models.bert import Bert, BertConfig
    from configurable_fm.ops.route import embed

    if not spec.startswith("random:"):
        return embed.load_text_encoder(spec)
    tok = Tokenizer.from_file(spec.partition(":")[2])
    model = Bert(BertConfig(**MINILM_SHAPE, add_pooling_layer=False), rngs=nnx.Rngs(0))
    return embed.TextEncoder(model, tok, max_length=256, pad_id=0, name="random-minilm-shape")


def queries(n: int, seed: int) -> list[str]:
    """n short queries of 4-12 words (the library study's queries are one line of a few words)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(QUERY_WORDS, int(rng.integers(4, 13)))) + ":" for _ in range(n)]


def bench_routing(args) -> dict:
    """The bench=routing row (module docstring)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from configurable_fm.bricks import adapters
    from configurable_fm.bricks.adapters.mixed import mix
    from configurable_fm.models.factory import build_model
    from configurable_fm.ops import route

    dtype = jnp.dtype(args.dtype)
    base = build_model(model_spec(args.shape, args.seq), seed=0, param_dtype=dtype, dtype=dtype)
    n = args.library
    library = [adapters.attach(base, "lora", args.targets.split(","), rank=args.rank, alpha=2 * args.rank,
                               init="random", seed=i) for i in range(n)]
    mixed = with_mixed_path(mix(base, library, factor_dtype=args.factor_dtype), args.mixed_path)
    encoder = text_encoder(args.encoder)
    router = route.build_router(encoder, {f"task{i}": queries(8, 100 + i) for i in range(n)})
    texts = queries(args.batch, 0)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, SHAPES[args.shape]["vocab_size"], (args.batch, args.seq)),
                      jnp.int32)
    repeats = max(args.steps, 1)
    routing = route.route_texts(router, encoder, texts)  # the batch's routing, for the mixed and folded forwards
    routed = route.routed_model(mixed, routing)
    models = [("base", base), ("single_lora", library[0]), ("routed_lm", routed)]
    for mode in args.lora_matmul:  # the same forwards with the LoRA term evaluated another way
        models += [(f"single_lora_{mode}", adapters.with_lora_matmul(library[0], mode)),
                   (f"routed_lm_{mode}", adapters.with_lora_matmul(routed, mode))]
    calls = {name: route.forward_call(m, ids)  # each model split once, its calls reused by every timing below
             for name, m in models}
    base_s = route.median_seconds(calls["base"], repeats)  # as routing_cost times its forward
    single_s = route.median_seconds(calls["single_lora"], repeats)  # one unmerged LoRA
    variants = [name for name, _ in models[3:]]  # the --lora_matmul forwards
    matmul_s = {f"{name}_s": route.median_seconds(calls[name], repeats) for name in variants}
    rc = route.routing_cost(router, encoder, texts, mixed, ids, repeats=repeats)
    total = rc.lm + rc.embed + rc.select
    # the same routing folded into the weights (ops.route.run_folded): rows grouped by routing, each group on its
    # folded model (the base's structure), every fold made once and kept (`folds`); fold_s: a new routing folded
    weighted = route.weighted_mix(base, library)
    folds = route.FoldedModels(weighted)
    folded_s = route.median_seconds(lambda: route.run_folded(weighted, routing, ids, folds=folds), repeats)
    groups = len(folds)  # the batch's distinct routings
    fresh = iter(np.random.default_rng(2).dirichlet(np.ones(n), repeats + 1))  # a weight vector never folded
    fold_s = route.median_seconds(lambda: jax.tree.leaves(nnx.state(folds(next(fresh)))), repeats)
    # back to back (one block at the end): the host's launch work overlaps the device's, as in a serving loop
    pipelined = {name: timed(call, (), repeats, 1)[0] for name, call in calls.items()}
    interleaved = interleaved_seconds(calls, max(repeats, 3), per_round=3)
    base_rounds = interleaved["base"]
    ratio = {name: float(np.median([t / b for t, b in zip(interleaved[name], base_rounds)]))
             for name in calls if name != "base"}
    profiles = {}
    if args.profile:
        from configurable_fm.profiling import trace_kernels

        for name in ("base", "single_lora"):  # compiled above, before the trace
            call = calls[name]
            profiles[name] = trace_kernels(lambda: [jax.block_until_ready(call()) for _ in range(3)],
                                           os.path.join(args.profile, name), steps=3, top=15)
    return {"bench": "routing", "shape": args.shape, "batch": args.batch, "seq": args.seq, "library": n,
            "rank": args.rank, "dtype": args.dtype, "encoder": encoder.name, "base_s": base_s,
            "mixed_path": args.mixed_path, "factor_dtype": args.factor_dtype or "float32", "single_lora_s": single_s,
            "routed_lm_s": rc.lm, "embed_s": rc.embed, "select_s": rc.select, "cost_ratio": total / base_s,
            "overhead": rc.overhead, "goal": ROUTING_GOAL, "device": jax.devices()[0].device_kind,
            "folded_lm_s": folded_s, "folded_groups": groups, "fold_s": fold_s,
            "folded_cost_ratio": (folded_s + rc.embed + rc.select) / base_s,
            **{f"{k}_pipelined_s": v for k, v in pipelined.items()},
            "pipelined_cost_ratio": (pipelined["routed_lm"] + rc.embed + rc.select) / pipelined["base"],
            **{f"{k}_interleaved_s": float(np.median(v)) for k, v in interleaved.items()},
            "interleaved_single_ratio": ratio["single_lora"], "interleaved_routed_ratio": ratio["routed_lm"],
            "interleaved_cost_ratio": ratio["routed_lm"] + (rc.embed + rc.select) / float(np.median(base_rounds)),
            **matmul_s,
            **{f"interleaved_{name}_ratio": ratio[name] for name in variants},
            **({"profile": profiles} if profiles else {})}


def bench_train(args, method: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from configurable_fm.bricks import adapters
    from configurable_fm.models.factory import build_model
    from configurable_fm.train.optim import make_optimizer
    from configurable_fm.train.trainer import ModelParts, make_train_step
    from experiments.pretrain import get_config

    model = build_model(model_spec(args.shape, args.seq), seed=0, param_dtype=jnp.float32,
                        dtype=jnp.dtype(args.dtype))
    trainable = ("**",)
    if method != "full":
        model = adapters.attach(model, method, args.targets.split(","), rank=args.rank, alpha=2 * args.rank,
                                init="random", seed=0)
        trainable = ("LoRAParam:**",)
    parts = ModelParts.of(model, trainable)
    params, frozen, other = parts.split(model)
    assert not other, other
    del model
    cfg = get_config("tiny")
    cfg.steps = 100_000  # the schedule's length (its warmup is 5% of it): the rate does not depend on it
    tx, _ = make_optimizer(cfg.optimizer, cfg.steps)
    opt_state = jax.jit(tx.init)(params)
    step = jax.jit(make_train_step(parts, tx, 1), donate_argnums=(0, 1))
    toks = np.random.default_rng(0).integers(0, SHAPES[args.shape]["vocab_size"], (args.train_batch, args.seq + 1),
                                             dtype=np.int32)
    batch = {"inputs": jnp.asarray(toks[:, :-1]), "targets": jnp.asarray(toks[:, 1:])}
    state = [params, opt_state]

    def call():
        state[0], state[1], metrics = step(state[0], state[1], frozen, batch)
        return metrics

    dt, first = timed(call, (), args.steps, args.warmup)
    metrics = call()
    return {"bench": "train", "method": method, "shape": args.shape, "train_batch": args.train_batch,
            "seq": args.seq, "rank": None if method == "full" else args.rank, "dtype": args.dtype, "step_s": dt,
            "tokens_per_s": args.train_batch * args.seq / dt, "compile_s": first, "loss": float(metrics["loss"]),
            "trainable_params": sum(int(np.prod(v.shape)) for v in state[0].values()),
            "device": jax.devices()[0].device_kind, "jax": jax.__version__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="135m")
    p.add_argument("--batch", type=int, default=64, help="rows of the forward batch")
    p.add_argument("--adapters", type=int, default=0, help="adapters in the mixed batch (default: --batch)")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--train_batch", type=int, default=16)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default=TARGETS, help="comma-separated module globs")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="compute dtype (default: float32 for tiny, bfloat16 otherwise)")
    p.add_argument("--factor_dtype", choices=["bfloat16", "float32"], default=None,
                   help="dtype of the mixed model's stacked LoRA factors (default: the adapters' own, float32)")
    p.add_argument("--mixed_path", choices=list(MIXED_PATHS), default="auto",
                   help="the mixed rows' LoRA path (default: by shape, bricks.adapters.mixed.uses_small_batch_path)")
    p.add_argument("--library", type=int, default=10, help="adapters behind the router (bench=routing)")
    p.add_argument("--encoder", default="all-minilm-l6-v2",
                   help="bench=routing's sentence encoder: a registry name or random:TOKENIZER_JSON")
    p.add_argument("--no_peft", action="store_true", help="skip the PEFT + transformers anchor")
    p.add_argument("--benches", default="forward,train",
                   help="comma-separated: forward (mixed batches), train (full / LoRA / DoRA steps and PEFT), "
                        "routing (what embedding routing adds)")
    p.add_argument("--lora_matmul", type=lora_matmul_modes, default=[],
                   help="bench=routing: also time the one-adapter forward with its LoRA evaluated this way "
                        "(comma-separated 'separate', 'joint', 'auto': bricks.adapters.with_lora_matmul)")
    p.add_argument("--profile", default="", help="bench=routing: trace the base and one-adapter forwards here")
    p.add_argument("--out", default="")
    p.add_argument("--anchor", choices=["lora", "dora"], help=argparse.SUPPRESS)  # the PEFT subprocess
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    if args.dtype is None:
        args.dtype = "float32" if args.shape == "tiny" else "bfloat16"
        argv += ["--dtype", args.dtype]
    if args.anchor:
        print(json.dumps(peft_step(args, args.anchor)), flush=True)
        return 0

    def emit(row):
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    if args.library < 1:
        p.error(f"--library: at least 1 adapter, got {args.library}")
    if args.encoder.startswith("random:") and not os.path.isfile(args.encoder.partition(":")[2]):
        p.error(f"--encoder: no tokenizer file {args.encoder.partition(':')[2]!r} (give random:TOKENIZER_JSON)")
    benches = set(args.benches.split(","))
    if not benches or not benches <= {"forward", "train", "routing"}:
        p.error(f"--benches: a comma-separated subset of forward,train,routing, got {args.benches!r}")
    summary = {"bench": "summary", "shape": args.shape}
    if "train" in benches:  # the PEFT anchor's subprocess runs before JAX takes the GPU
        no_peft = {"bench": "peft", "skipped": "--no_peft"}
        peft_rows = {m: {**no_peft, "method": m} if args.no_peft else run_peft(argv, m) for m in ("lora", "dora")}
    if "forward" in benches:
        forward = bench_forward(args, [args.seq, 1])
        for row in forward:
            emit(row)
        summary.update(mixed_over_single=forward[0]["ratio"], mixed_over_single_decode=forward[1]["ratio"],
                       mixed_goal=1.3, mixed_ok=forward[0]["ratio"] <= 1.3)
    if "train" in benches:
        train = {m: bench_train(args, m) for m in ("full", "lora", "dora")}
        for row in train.values():
            emit(row)
        for row in peft_rows.values():
            emit(row)
        rate = {m: r["tokens_per_s"] for m, r in train.items()}
        peft_rate = {m: r.get("tokens_per_s") for m, r in peft_rows.items()}
        summary.update(lora_over_full=rate["lora"] / rate["full"], dora_over_lora=rate["dora"] / rate["lora"],
                       dora_goal=0.9, dora_ok=rate["dora"] / rate["lora"] >= 0.9,
                       **{f"ours_over_peft_{m}": rate[m] / peft_rate[m] if peft_rate[m] else None
                          for m in ("lora", "dora")})
    if "routing" in benches:
        row = bench_routing(args)
        emit(row)
        summary.update(routing_cost_ratio=row["cost_ratio"], routing_goal=ROUTING_GOAL,
                       routing_ok=row["cost_ratio"] <= ROUTING_GOAL)
    emit(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
