"""scripts/bench_adapters.py at its tiny CPU shape: every row it promises, with its keys (subprocess, as it is run);
the LoRA step trains exactly the adapter leaves; our target globs map to PEFT's module names."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import ROOT, load_script

FORWARD_KEYS = {"base_s", "single_s", "mixed_s", "mixed_one_s", "ratio", "goal", "adapters", "batch", "seq",
                "base_compile_s", "single_compile_s", "mixed_compile_s", "tokens_per_s_mixed", "device",
                "factor_dtype", "mixed_path"}
TRAIN_KEYS = {"method", "step_s", "tokens_per_s", "compile_s", "loss", "trainable_params", "train_batch", "seq"}
SUMMARY_KEYS = {"mixed_over_single", "mixed_over_single_decode", "mixed_goal", "mixed_ok", "lora_over_full",
                "dora_over_lora", "dora_goal", "dora_ok", "ours_over_peft_lora", "ours_over_peft_dora"}


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_adapters")


@pytest.mark.slow  # ~14 s on 2 shared cores: 6 forward and 3 train-step compilations
def test_tiny_run_prints_every_row(tmp_path):
    out = tmp_path / "rows.jsonl"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    argv = ["--shape", "tiny", "--batch", "4", "--seq", "16", "--steps", "1", "--warmup", "0", "--train_batch", "2",
            "--out", str(out)]
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_adapters.py"), *argv],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    by = {}
    for r in rows:
        by.setdefault(r["bench"], []).append(r)
    assert [r["seq"] for r in by["forward"]] == [16, 1]
    for r in by["forward"]:
        assert FORWARD_KEYS <= set(r) and r["adapters"] == 4 and r["dtype"] == "float32"
        assert r["mixed_path"] == "all_adapters" and r["factor_dtype"] == "float32"  # 4 x 16 and 4 x 1 rows
        assert r["ratio"] == pytest.approx(r["mixed_s"] / r["single_s"]) and r["mixed_s"] > 0
    assert [r["method"] for r in by["train"]] == ["full", "lora", "dora"]
    train = {r["method"]: r for r in by["train"]}
    for r in train.values():
        assert TRAIN_KEYS <= set(r) and np.isfinite(r["loss"]) and r["tokens_per_s"] > 0
    assert train["lora"]["trainable_params"] < train["dora"]["trainable_params"] < train["full"]["trainable_params"]
    assert [r["method"] for r in by["peft"]] == ["lora", "dora"]
    for r in by["peft"]:  # a CPU machine: skipped with the reason; a CUDA one: measured
        assert ("skipped" in r and r["skipped"]) or TRAIN_KEYS - {"compile_s"} <= set(r)
    (summary,) = by["summary"]
    assert SUMMARY_KEYS <= set(summary)
    assert summary["mixed_over_single"] == by["forward"][0]["ratio"]
    assert summary["dora_over_lora"] == pytest.approx(train["dora"]["tokens_per_s"] / train["lora"]["tokens_per_s"])


@pytest.mark.slow  # CI time: ~16 s (one 1-layer train step compiled)
def test_lora_step_trains_exactly_the_adapter_leaves(bench):
    class Args:
        shape, seq, train_batch, steps, warmup, rank, dtype = "tiny", 8, 2, 1, 0, 4, "float32"
        targets = bench.TARGETS

    row = bench.bench_train(Args, "lora")
    s = bench.SHAPES["tiny"]
    d, f, kv = s["hidden_size"], s["intermediate_size"], s["hidden_size"] // s["num_heads"] * s["num_kv_heads"]
    per_layer = 4 * ((d + d) + 2 * (d + kv) + (d + d) + 3 * (d + f))  # rank 4: r (in + out) per module
    assert row["trainable_params"] == s["num_layers"] * per_layer
    assert np.isfinite(row["loss"]) and row["tokens_per_s"] > 0 and row["method"] == "lora"


def test_peft_target_names(bench):
    assert bench.peft_targets(bench.TARGETS.split(",")) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]
    assert bench.peft_targets(["layers.*.mlp.down_proj"]) == ["down_proj"]


@pytest.mark.slow  # CI time: ~14 s (8 forward compilations)
def test_benches_selects_the_rows(bench, capsys):
    argv = ["--shape", "tiny", "--batch", "2", "--seq", "4", "--steps", "1", "--warmup", "0", "--benches", "forward"]
    assert bench.main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["bench"] for r in rows] == ["forward", "forward", "summary"]
    assert "mixed_over_single" in rows[-1] and "dora_over_lora" not in rows[-1]


def test_benches_refuses_an_unknown_bench(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--shape", "tiny", "--benches", "forward,decode"])
    assert "--benches: a comma-separated subset of forward,train,routing, got 'forward,decode'" in \
        capsys.readouterr().err


def test_interleaved_rounds_rotate_the_order(bench):
    """Each round calls every model `per_round` times, starting one model later than the round before."""
    order = []
    calls = {name: (lambda name=name: order.append(name) or np.zeros(1)) for name in ("a", "b", "c")}
    out = bench.interleaved_seconds(calls, rounds=4, per_round=2)
    assert {k: len(v) for k, v in out.items()} == {"a": 4, "b": 4, "c": 4}
    firsts = [order[i] for i in range(0, len(order), 6)]
    assert firsts == ["a", "b", "c", "a"] and order[:6] == ["a", "a", "b", "b", "c", "c"]


def test_routing_row(bench, capsys, monkeypatch, tmp_path):
    """bench=routing with a random BERT (MiniLM's tokenizer, a narrow 1-layer shape to keep the test fast) and
    adapters on one module (--targets: fewer programs to compile, the same row): the row's parts and ratios, the
    folded routing's; --profile's two traces (on the CPU they hold no device kernels, which the row says);
    --lora_matmul's extra one-adapter forward."""
    from configurable_fm.models import registry

    try:
        tokenizer = registry.model_path("all-minilm-l6-v2") / "tokenizer.json"
    except registry.ModelNotInstalled as e:
        pytest.skip(str(e))
    monkeypatch.setattr(bench, "MINILM_SHAPE", dict(bench.MINILM_SHAPE, hidden_size=32, num_layers=1, num_heads=2,
                                                    intermediate_size=64))
    argv = ["--shape", "tiny", "--batch", "3", "--seq", "4", "--rank", "2", "--library", "2", "--steps", "1",
            "--warmup", "0", "--benches", "routing", "--encoder", f"random:{tokenizer}", "--mixed_path", "gather",
            "--targets", "layers.*.self_attn.q_proj",
            "--profile", str(tmp_path / "prof"), "--lora_matmul", "joint"]
    assert bench.main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["bench"] for r in rows] == ["routing", "summary"]
    r = rows[0]
    assert (r["library"], r["batch"], r["encoder"]) == (2, 3, "random-minilm-shape")
    parts = r["routed_lm_s"] + r["embed_s"] + r["select_s"]
    assert min(r["base_s"], r["single_lora_s"], r["routed_lm_s"], r["embed_s"], r["select_s"]) > 0
    assert (r["mixed_path"], r["factor_dtype"]) == ("gather", "float32")
    assert r["cost_ratio"] == pytest.approx(parts / r["base_s"])
    assert r["overhead"] == pytest.approx((r["embed_s"] + r["select_s"]) / r["routed_lm_s"])
    assert rows[1]["routing_cost_ratio"] == r["cost_ratio"] and rows[1]["routing_ok"] == (r["cost_ratio"] <= 1.05)
    assert min(r["base_pipelined_s"], r["single_lora_pipelined_s"], r["routed_lm_pipelined_s"]) > 0
    assert r["pipelined_cost_ratio"] == pytest.approx((r["routed_lm_pipelined_s"] + r["embed_s"] + r["select_s"])
                                                      / r["base_pipelined_s"])
    assert min(r["base_interleaved_s"], r["single_lora_interleaved_s"], r["routed_lm_interleaved_s"]) > 0
    assert min(r["interleaved_single_ratio"], r["interleaved_routed_ratio"]) > 0
    assert r["interleaved_cost_ratio"] == pytest.approx(
        r["interleaved_routed_ratio"] + (r["embed_s"] + r["select_s"]) / r["base_interleaved_s"])
    assert min(r["folded_lm_s"], r["fold_s"]) > 0 and 1 <= r["folded_groups"] <= 2  # 3 rows, 2 adapters
    assert r["folded_cost_ratio"] == pytest.approx((r["folded_lm_s"] + r["embed_s"] + r["select_s"]) / r["base_s"])
    for name in ("single_lora_joint", "routed_lm_joint"):  # --lora_matmul joint
        assert r[f"{name}_s"] > 0 and r[f"interleaved_{name}_ratio"] > 0
    assert sorted(r["profile"]) == ["base", "single_lora"]
    for name, prof in r["profile"].items():
        assert prof["wall_ms"] > 0 and prof["logdir"] == str(tmp_path / "prof" / name)


@pytest.mark.parametrize("argv, message", [
    (["--library", "0"], "--library: at least 1 adapter, got 0"),
    (["--encoder", "random:/no/such/tokenizer.json"], "--encoder: no tokenizer file '/no/such/tokenizer.json'"),
    (["--lora_matmul", "joint,fused"], "unknown mode(s) ['fused']"),
])
def test_routing_refuses_bad_arguments(bench, capsys, argv, message):
    with pytest.raises(SystemExit):
        bench.main(["--shape", "tiny", "--benches", "routing", *argv])
    assert message in capsys.readouterr().err
