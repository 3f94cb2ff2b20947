"""Adapter training through the trainer (config.adapter, train/adapters.py) and scripts/train.py
(experiments/adapters/lora_synthetic.py).

In process: only the adapter's parameters are trainable and they alone have optimizer state; a bf16 base stays
bf16 and bit-identical while the float32 LoRA adapter lowers the loss on a learnable token stream; the adapter is
written as a brick set and in PEFT's format, and both load back bit for bit. Bad adapter sections are ConfigErrors
naming the key. Through the CLI: the `:test` variant from the config's docstring runs end to end in a subprocess.
"""
import json
import shlex
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configurable_fm.bricks import adapters, flat_params, with_params
from configurable_fm.errors import ConfigError
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.train.data import TokenData
from configurable_fm.train.trainer import check_config, set_up, train
from experiments.adapters import lora_synthetic
from tests.helpers import assert_params_equal, char_tokenizer, random_llama
from tests.train.test_train_cli import checked, child_env, docstring_commands, metric_records, run_train

CONFIG = Path(lora_synthetic.__file__)
CFG = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_position_embeddings=64)


def stream_data(seq_len=16, batch=8) -> TokenData:
    """A periodic token stream (period 7): next-token prediction that a LoRA adapter can learn in a few steps."""
    tokens = np.tile(np.asarray([3, 9, 4, 17, 4, 25, 11], np.int32), 400)
    return TokenData(tokens, tokens[:200], seq_len, batch, 0, batch, max_eval_batches=1,
                     manifest={"kind": "periodic stream"})


def lora_config(**adapter):
    cfg = lora_synthetic.get_config("test")
    cfg.seq_len, cfg.steps, cfg.log_every, cfg.eval_every, cfg.checkpoint_every = 16, 12, 12, 0, 12  # no eval: fast
    cfg.optimizer.update(lr=3e-2, schedule="constant")
    cfg.adapter.update(**adapter)
    return cfg


def llama_base(seed, dtype=jnp.float32):
    """A random llama with N(0, 0.2) weights (N(1, 0.1) norms): sublayer outputs large enough to carry the token
    information that an adapter after them (bottleneck) needs; in `dtype`."""
    base = random_llama(CFG, seed)
    return with_params(base, {k: (v if "norm" in k else 10 * v).astype(dtype) for k, v in flat_params(base).items()})


@pytest.fixture(scope="module")
def bf16_base():
    return llama_base(0, jnp.bfloat16)


def saved_leaves(item_dir: Path) -> dict[str, tuple]:
    """{key path: shape} of a pytree item of an orbax training checkpoint (its metadata; nothing restored)."""
    import orbax.checkpoint as ocp

    meta = ocp.StandardCheckpointer().metadata(item_dir)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    return {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def assert_only_adapter_state(checkpoint: Path, adapter_shapes: dict[str, tuple]) -> None:
    """The checkpoint's trainable params are exactly the adapter's leaves, and every per-parameter leaf of its
    optimizer state (Adam's mu and nu) is an adapter leaf of the same shape; the rest are scalar step counts."""
    params = saved_leaves(checkpoint / "params")
    assert params == {f"['{k}']": s for k, s in adapter_shapes.items()}
    opt = saved_leaves(checkpoint / "opt_state")
    per_param = {k: s for k, s in opt.items() if s != ()}
    assert len(per_param) == 2 * len(adapter_shapes), sorted(opt)
    for k, shape in per_param.items():
        leaf = k.rsplit("['", 1)[1][:-2]
        assert adapter_shapes[leaf] == shape, k


def test_bf16_base_lora_training_lowers_the_loss_and_keeps_the_base(bf16_base, tmp_path):
    cfg = lora_config(targets=("layers.*.self_attn.[qv]_proj", "layers.*.mlp.down_proj"))
    cfg.frozen_dtype = "keep"
    result = train(cfg, tmp_path / "run", model=bf16_base, data=stream_data(), log=lambda s: None)
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert losses[-1] < 0.6 * losses[0], losses
    # The base: still bf16 and bit-identical; the adapter float32 and trained.
    assert_params_equal(adapters.detach(result.model), bf16_base)
    assert {v.dtype for v in flat_params(adapters.detach(result.model)).values()} == {jnp.dtype(jnp.bfloat16)}
    state = adapters.adapter_state(result.model)
    assert {v.dtype for v in state.values()} == {jnp.dtype(jnp.float32)}
    assert np.any(np.asarray(state["layers.1.mlp.down_proj.lora_b"]))
    # Written at the end: a brick set and a PEFT directory, both loading back the trained adapter bit for bit.
    brick = adapters.load_adapter(bf16_base, tmp_path / "run" / "adapter")
    peft = adapters.from_peft(bf16_base, tmp_path / "run" / "adapter_peft")
    for loaded in (brick, peft):
        assert adapters.adapters(loaded) == adapters.adapters(result.model)
        for k, v in adapters.adapter_state(loaded).items():
            np.testing.assert_array_equal(np.asarray(v), np.asarray(state[k]), err_msg=k)
    config = json.loads((tmp_path / "run" / "adapter_peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["initial_model"] == "model argument + lora adapter" and info["trainable"] == list(state)
    assert_only_adapter_state(tmp_path / "run" / "checkpoints" / "12", {k: v.shape for k, v in state.items()})


def test_lora_dropout_in_training_steps_only(tmp_path):
    """adapter.lora.dropout = 0.5: the training losses differ from a run without dropout after the first update
    (same data, same initial adapter; the first step's loss is the same: B = 0 makes the LoRA branch zero), while
    evaluation has no dropout: the trained model's loss on the eval batch equals the trainer's own val_loss. The
    PEFT output records lora_dropout."""
    from flax import nnx

    from configurable_fm.train.task import next_token_loss

    base = llama_base(2)
    runs = {}
    for rate in (0.0, 0.5):
        cfg = lora_config(targets=("layers.*.self_attn.[qv]_proj",))
        cfg.adapter.lora.dropout = rate
        # only the dropout run's val_loss is checked: the other run skips evaluation (one compilation fewer)
        cfg.steps, cfg.log_every, cfg.eval_every, cfg.checkpoint_every = 4, 1, 4 if rate else 0, 4
        runs[rate] = train(cfg, tmp_path / f"run{rate}", model=base, data=stream_data(), log=lambda s: None)
    plain, dropped = ([r.losses[s] for s in sorted(r.losses)] for r in (runs[0.0], runs[0.5]))
    assert plain[0] == pytest.approx(dropped[0], abs=1e-6) and plain[2:] != pytest.approx(dropped[2:], abs=1e-4)
    batch = next(iter(stream_data().eval_batches()))
    # one compiled program instead of the forward's eager ops (~3 s); no lora_dropout block here either
    val = float(nnx.jit(next_token_loss)(runs[0.5].model, {k: jnp.asarray(v) for k, v in batch.items()})[0])
    logged = [r for r in metric_records(tmp_path / "run0.5") if "val_loss" in r][-1]["val_loss"]
    assert val == pytest.approx(logged, rel=1e-5)
    peft_config = json.loads((tmp_path / "run0.5" / "adapter_peft" / "adapter_config.json").read_text())
    assert peft_config["lora_dropout"] == 0.5  # PEFT's setting for a run continued there


@pytest.mark.slow
def test_bottleneck_variant_trains_and_is_saved_as_a_brick(tmp_path):
    cfg = lora_synthetic.get_config("sort,bottleneck,test")
    assert cfg.adapter.kind == "bottleneck" and cfg.adapter.save == ("brick",)
    cfg.seq_len, cfg.steps, cfg.log_every, cfg.eval_every, cfg.checkpoint_every = 16, 12, 12, 12, 12
    cfg.optimizer.update(lr=3e-2, schedule="constant")
    base = llama_base(1)
    result = train(cfg, tmp_path / "run", model=base, data=stream_data(), log=lambda s: None)
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert losses[-1] < 0.6 * losses[0], losses
    assert set(adapters.adapters(result.model)) == {f"layers.{i}.{m}" for i in range(2)
                                                   for m in ("mlp.down_proj", "self_attn.o_proj")}
    np.testing.assert_array_equal(np.asarray(flat_params(adapters.detach(result.model))["layers.0.mlp.up_proj.kernel"]
                                             ).view(np.uint16),
                                  np.asarray(flat_params(base)["layers.0.mlp.up_proj.kernel"].astype(jnp.bfloat16)
                                             ).view(np.uint16))  # frozen_dtype bfloat16: the base cast, then constant
    loaded = adapters.load_adapter(base, tmp_path / "run" / "adapter")
    assert adapters.adapters(loaded) == adapters.adapters(result.model)
    assert not (tmp_path / "run" / "adapter_peft").exists()


@pytest.mark.parametrize("change, match", [
    ({"adapter.kind": "prefix"}, r"adapter.kind='prefix' is not one of \['lora', 'dora', 'ia3', 'bottleneck'\]"),
    ({"adapter.lora.dropout": 1.0}, r"adapter.lora.dropout=1.0 must lie in \[0, 1\)"),
    ({"adapter.kind": "dora", "adapter.lora.dropout": 0.1}, r"dropout with DoRA is not implemented"),
    ({"adapter.kind": "ia3", "adapter.lora.dropout": 0.1}, r"kind 'ia3' has no dropout here"),
    ({"adapter.kind": "bottleneck"}, r"adapter.save includes 'peft', but PEFT has no bottleneck adapter"),
    ({"adapter.save": ("brick", "gguf")}, r"\['gguf'\] are not formats \['brick', 'peft'\]"),
    ({"frozen_dtype": "int8"}, r"frozen_dtype='int8' is not one of"),
    ({"adapter.targets": ("",)}, r"adapter.targets=.* must name module path globs"),
    ({"adapter.targets": ()}, r"adapter.targets=\(\) must name module path globs \(or adapter.target_parameters"),
    ({"adapter.target_parameters": ("x",), "adapter.save": ("brick",), "adapter.lora.dropout": 0.1},
     r"no dropout with target_parameters"),
    ({"adapter.target_parameters": ("x",), "adapter.kind": "ia3"}, r"stacked expert weights is kind 'lora'"),
])
def test_bad_adapter_sections_are_config_errors(change, match):
    cfg = lora_synthetic.get_config("test")
    for key, value in change.items():
        *sections, name = key.split(".")
        node = cfg
        for section in sections:
            node = node[section]
        node[name] = value
    with pytest.raises(ConfigError, match=match):
        check_config(cfg)


def test_targets_that_do_not_fit_name_the_glob(bf16_base):
    cfg = lora_config(targets=("layers.*.self_attn.x_proj",))
    with pytest.raises(adapters.AdapterError, match=r"\['layers.\*.self_attn.x_proj'\] match no module"):
        set_up(cfg, model=bf16_base, data=stream_data())


@pytest.mark.slow
def test_cli_runs_the_test_variant_from_the_docstring(tmp_path):
    """`python scripts/train.py --config experiments/adapters/lora_synthetic.py:test --workdir ...` (the docstring's
    command) with a character tokenizer: trains, writes the adapter in both formats, keeps the bf16 base."""
    (command,) = [c for c in docstring_commands(CONFIG) if ":test " in c + " "]
    args = shlex.split(command)
    args[0] = sys.executable
    args[args.index("--workdir") + 1] = str(tmp_path / "run")
    args[args.index("--config") + 1] = str(CONFIG) + ":test"
    char_tokenizer(special=("<pad>", "<eos>", "<bos>")).save(str(tmp_path / "tok.json"))
    args += [f"--config.tokenizer={tmp_path / 'tok.json'}", "--config.token_ids.eos=1", "--config.token_ids.pad=0",
             "--config.model.vocab_size=128"]
    proc = checked(run_train(args, child_env(), timeout=120))
    run = tmp_path / "run"
    assert "adapter (lora, peft) written to" in proc.stdout and "done: step 8" in proc.stdout, proc.stdout
    records = metric_records(run)
    assert [r["step"] for r in records] == [4, 8] and "val_loss" in records[-1]
    config = json.loads((run / "adapter_peft" / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj",
                                                                     "q_proj", "up_proj", "v_proj"]
    from configurable_fm.bricks import load_bricks

    bricks = load_bricks(run / "adapter")
    assert len(bricks) == 2 * 7 and {b.kind for b in bricks.values()} == {"lora"}
    shapes = {f"{name}.{leaf}": tuple(t.shape) for name, b in bricks.items() for leaf, t in b.params.items()}
    assert_only_adapter_state(run / "checkpoints" / "8", shapes)  # what the run trained and kept optimizer state of
