"""Mixed-adapter batches (bricks/adapters/mixed.py): N adapters stacked per module, one adapter id per batch row.

Exactness: in a batch whose rows use different adapters (LoRA r=4; rsLoRA r=2 on a subset of the modules; DoRA r=3;
IA3 output side and feedforward; LoRA r=8), each row's float32 logits equal those of its adapter attached alone
(max |diff| <= 1e-5; measured <= 1.2e-7), and id -1 rows equal the base (bit for bit). Greedy generation through
models.generation.generate (KV cache) gives each row the tokens of its adapter alone; new ids reuse the compiled
program; a single unmerged adapter generates what its merged model does. PEFT 0.21.2's own mixed batch
(`model(..., adapter_names=[...])`) on a tiny random LlamaForCausalLM built here: max |diff| <= 1e-5 (measured
~1e-6; the bases alone agree to ~8e-7). Every documented error is triggered and its message checked.
"""
import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configurable_fm.sharding as shd
from configurable_fm.bricks import adapters, deltas
from configurable_fm.bricks.adapters import mixed as mx
from configurable_fm.models import check_consistent, extension_specs
from configurable_fm.models import generation
from configurable_fm.models.factory import with_compute_dtype
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.models.scoring import logits
from tests.helpers import assert_params_equal, random_llama, tiny_hf_llama

TOL = 1e-5
CFG = LlamaConfig(vocab_size=61, hidden_size=24, intermediate_size=40, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_position_embeddings=32)
ROW_IDS = [0, 1, 2, 3, 4, -1, 2, 0]
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 61, (len(ROW_IDS), 7)))
# (kind, targets, options): adapter n of the mix is CASES[n]
CASES = [
    ("lora", ["layers.*.self_attn.[qv]_proj", "layers.*.mlp.down_proj"], dict(rank=4, alpha=8)),
    ("lora", ["layers.*.self_attn.[qv]_proj"], dict(rank=2, alpha=6, rslora=True)),  # a subset, another rank
    ("dora", ["layers.*.self_attn.[qvo]_proj", "layers.*.mlp.up_proj"], dict(rank=3, alpha=8)),
    ("ia3", ["layers.*.self_attn.[kv]_proj", "layers.*.mlp.down_proj"], {}),  # down_proj: feedforward
    ("lora", ["layers.*.self_attn.o_proj", "layers.*.mlp.gate_proj"], dict(rank=8, alpha=4)),
]


def adapted(base, n):
    kind, targets, options = CASES[n]
    model = adapters.attach(base, kind, targets, init="random", seed=n + 1, **options)
    if kind == "dora":  # a fresh DoRA magnitude is ||W + sAB||: scale it so that the magnitude matters
        state = adapters.adapter_state(model)
        model = deltas.apply(model, deltas.Delta({k: 0.3 * v for k, v in state.items() if k.endswith("magnitude")}))
    return model


@pytest.fixture(scope="module")
def base():
    return random_llama(CFG, 0)


@pytest.fixture(scope="module")
def singles(base):
    return [adapted(base, n) for n in range(len(CASES))]


@pytest.fixture(scope="module")
def mixed(base, singles):
    return mx.mix(base, singles)


@pytest.fixture(scope="module")
def with_rows(mixed):
    return mx.with_adapter_ids(mixed, ROW_IDS)


def alone(base, singles, i):
    return base if i == mx.BASE_ID else singles[i]


@pytest.fixture(scope="module")
def alone_logits(base, singles):
    """{id: the logits of TOKENS under adapter id attached alone (BASE_ID: the base)}, float32. Each model runs on
    the whole batch once (its rows are independent): row b is what row b gives alone, and the batch shape is the
    mixed model's, so the eager ops compiled for it serve every model (no second set for batch 1)."""
    return {i: np.asarray(alone(base, singles, i)(TOKENS)) for i in [mx.BASE_ID, *range(len(CASES))]}


# ------------------------------------------------------------------------------------------ the stacked leaves
def test_stacked_leaves(base, singles, mixed):
    v = mixed.layers[0].self_attn.v_proj
    assert isinstance(v, mx.MixedLinear) and v.kernel.get_value() is base.layers[0].self_attn.v_proj.kernel.get_value()
    assert v.options() == {"kinds": ["lora", "lora", "dora", "ia3", None], "rank": 4, "dora": True, "ia3_in": False,
                           "ia3_out": True, "batch": 0}
    d, kv = CFG.hidden_size, CFG.num_kv_heads * CFG.dim_per_head
    assert v.lora_a.shape == (5, d, 4) and v.lora_b.shape == (5, 4, kv) and v.ia3_out.shape == (5, kv)
    rs = singles[1].layers[0].self_attn.v_proj
    np.testing.assert_array_equal(v.lora_a[1, :, :2], rs.lora_a[...])
    np.testing.assert_array_equal(v.lora_a[1, :, 2:], 0)  # rank 2 zero-padded to 4
    np.testing.assert_array_equal(v.lora_b[1, 2:], 0)
    np.testing.assert_array_equal(v.lora_a[3], 0)  # IA3 and the absent adapter: no LoRA
    np.testing.assert_allclose(v.lora_scale[...], [2.0, 6 / np.sqrt(2), 8 / 3, 0.0, 0.0], rtol=1e-6)
    dora = singles[2].layers[0].self_attn.v_proj
    np.testing.assert_array_equal(v.lora_magnitude[2], dora.lora_magnitude[...])
    np.testing.assert_array_equal(v.lora_weight_norm[2], dora.weight_norm())
    np.testing.assert_array_equal(v.lora_magnitude[0], 1)
    np.testing.assert_array_equal(v.ia3_out[3], singles[3].layers[0].self_attn.v_proj.ia3_scale[...])
    np.testing.assert_array_equal(v.ia3_out[0], 1)
    down = mixed.layers[1].mlp.down_proj  # feedforward IA3: per input
    assert down.ia3_in.shape == (5, CFG.intermediate_size) and down.ia3_out is None and down.lora_magnitude is None
    gate = mixed.layers[0].mlp.gate_proj  # one adapter only
    assert gate.options()["kinds"] == [None, None, None, None, "lora"] and gate.rank == 8
    np.testing.assert_array_equal(gate.lora_scale[...], [0, 0, 0, 0, 0.5])
    assert gate.lora_a.get_metadata()["out_sharding"] == (None, "embed", None)
    assert isinstance(gate.lora_a, adapters.LoRAParam) and isinstance(down.ia3_in, adapters.IA3Param)
    assert "layers.0.mlp.gate_proj.lora_a" in adapters.adapter_state(mixed)
    assert [s["path"] for s in extension_specs(mixed)] == [
        f"layers.{i}.{m}" for i in range(2) for m in ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj",
                                                      "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj",
                                                      "self_attn.v_proj")]
    check_consistent(mixed, "test")
    assert_params_equal(mx.unmix(mixed), base)  # the same arrays


# ------------------------------------------------------------------------------------------ exactness
def test_each_row_equals_its_adapter_alone(alone_logits, with_rows):
    check_consistent(with_rows, "test")
    out = np.asarray(with_rows(TOKENS))
    base_out = alone_logits[mx.BASE_ID]
    for b, i in enumerate(ROW_IDS):
        if i == mx.BASE_ID:  # the same batch: bit for bit (s = 0, f = 1, l = 1 add and multiply exactly)
            np.testing.assert_array_equal(out[b], base_out[b])
        else:
            ref = alone_logits[i][b]  # row b of adapter i alone
            assert np.abs(ref - base_out[b]).max() > 1e-2, i  # the adapter matters
            np.testing.assert_allclose(out[b], ref, atol=TOL, rtol=0, err_msg=f"row {b}, adapter {i}")


def test_brick_sets_mix_like_models(base, singles, mixed):
    from_bricks = mx.mix(base, [adapters.adapter_bricks(m) for m in singles[:3]] + singles[3:], ids=ROW_IDS)
    np.testing.assert_array_equal(np.asarray(from_bricks(TOKENS)),
                                  np.asarray(mx.with_adapter_ids(mixed, ROW_IDS)(TOKENS)))


def test_ids_are_traced_under_jit(alone_logits, mixed):
    graphdef, state = nnx.split(mixed)
    traces = []

    @jax.jit
    def run(state, ids_B, tokens):
        traces.append(1)
        return mx.with_adapter_ids(nnx.merge(graphdef, state), ids_B)(tokens)

    rows = np.asarray(run(state, jnp.asarray(ROW_IDS), TOKENS))
    np.testing.assert_allclose(rows, np.asarray(mx.with_adapter_ids(mixed, ROW_IDS)(TOKENS)), atol=TOL, rtol=0)
    other = [4, 3, 2, 1, 0, 0, -1, 1]
    again = np.asarray(run(state, jnp.asarray(other), TOKENS))
    assert len(traces) == 1  # new ids: the same program
    for b, i in enumerate(other):
        np.testing.assert_allclose(again[b], alone_logits[i][b], atol=TOL)
    bad = np.asarray(run(state, jnp.asarray([0, 5, -2, 1, 2, 3, 4, -1]), TOKENS))  # not checkable inside jit
    assert np.isnan(bad[1]).all() and np.isnan(bad[2]).all()  # never another adapter's output
    assert np.isfinite(bad[[0, 3, 4, 5, 6, 7]]).all()
    np.testing.assert_array_equal(bad[0], rows[0])


def test_bfloat16_compute_rows_equal_their_adapter_alone(base, singles, with_rows):
    """Serving precision (bf16 compute, float32 adapters): the same operations per row, so the same logits (measured
    bit for bit; allowed: one bf16 rounding of logits ~0.1)."""
    def bf16(model, tokens):  # one compiled forward per model (eager bf16 ops would compile one by one: ~1 s more)
        return logits(with_compute_dtype(model, jnp.bfloat16), tokens)

    out = bf16(with_rows, TOKENS)
    assert with_rows.layers[0].self_attn.v_proj.lora_a.get_value().dtype == jnp.float32
    for b in (1, 2, 3):  # rsLoRA, DoRA, IA3; row b of the adapter alone on the same batch (one batch shape)
        i = ROW_IDS[b]
        np.testing.assert_allclose(out[b], bf16(singles[i], TOKENS)[b], atol=1e-3, rtol=0)


@pytest.mark.slow  # CI time
def test_sharded_forward_equals_unsharded(with_rows):
    mesh = shd.make_mesh((2, 2, 2))
    apply = jax.jit(lambda graphdef, state, tokens: nnx.merge(graphdef, state)(tokens), static_argnums=0)
    ref = np.asarray(apply(*nnx.split(with_rows), TOKENS))
    sharded = shd.shard_model(with_rows, mesh)
    assert sharded.layers[0].self_attn.v_proj.lora_a.get_value().sharding.spec == jax.P(None, "fsdp", None)
    out = apply(*nnx.split(sharded), shd.shard_batch(np.asarray(TOKENS), mesh))
    assert out.sharding.mesh.shape == mesh.shape
    np.testing.assert_allclose(np.asarray(out), ref, atol=TOL, rtol=0)


@pytest.mark.slow  # CI time
def test_orbax_round_trip_of_a_mixed_model(with_rows, tmp_path):
    from configurable_fm.interop.orbax_io import load_model, save_model

    restored = load_model(save_model(with_rows, tmp_path / "ckpt"))
    assert mx.mixed_modules(restored)["layers.1.self_attn.v_proj"].options() == \
        mx.mixed_modules(with_rows)["layers.1.self_attn.v_proj"].options()
    np.testing.assert_array_equal(np.asarray(restored(TOKENS)), np.asarray(with_rows(TOKENS)))


# ------------------------------------------------------------------------------------------ generation
@pytest.mark.slow  # CI time: ~19 s of generate compilations; rows' logits are checked fast above
def test_generate_gives_each_row_its_adapters_tokens(base, singles, mixed):
    mask = np.ones(TOKENS.shape, np.int32)
    mask[1, :3] = mask[2, :2] = 0  # left padding
    out = np.asarray(generation.generate(mx.with_adapter_ids(mixed, ROW_IDS), TOKENS, attention_mask=mask,
                                         max_new_tokens=6))
    def one_row(model, b):
        row = slice(b, b + 1)
        return np.asarray(generation.generate(model, TOKENS[row], attention_mask=mask[row], max_new_tokens=6))[0]

    differs = 0
    for b, i in enumerate(ROW_IDS):
        ref = one_row(alone(base, singles, i), b)
        np.testing.assert_array_equal(out[b], ref, err_msg=f"row {b}, adapter {i}")
        differs += not np.array_equal(ref, one_row(base, b))
    assert differs >= 3  # the adapters change what is generated
    other = list(reversed(ROW_IDS))
    compiled = generation._generate._cache_size()
    again = np.asarray(generation.generate(mx.with_adapter_ids(mixed, other), TOKENS, attention_mask=mask,
                                           max_new_tokens=6))
    assert generation._generate._cache_size() == compiled  # new ids: no recompilation
    for b, i in enumerate(other):
        if i == ROW_IDS[b]:
            np.testing.assert_array_equal(again[b], out[b])


@pytest.mark.parametrize("n", [0, pytest.param(2, marks=pytest.mark.slow)])  # LoRA; DoRA slow (CI time): its
# unmerged logits equal the merged ones in test_adapters.py::test_merge_unmerge_detach[dora], and the cache is the same
def test_generate_with_an_unmerged_adapter_equals_the_merged_model(singles, n):
    model = singles[n]
    out = np.asarray(generation.generate(model, TOKENS, max_new_tokens=6))
    np.testing.assert_array_equal(out, np.asarray(generation.generate(adapters.merge(model), TOKENS,
                                                                      max_new_tokens=6)))


# ------------------------------------------------------------------------------------------ PEFT's mixed batch
def test_parity_with_peft_mixed_batch(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from configurable_fm.interop.hf import from_hf

    hf = tiny_hf_llama(tmp_path / "hf")
    configs = {"a": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                    init_lora_weights=False),
               "b": peft.LoraConfig(r=2, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "o_proj"],
                                    init_lora_weights=False)}
    for seed, (name, config) in enumerate(configs.items()):
        torch.manual_seed(seed + 1)
        peft.get_peft_model(copy.deepcopy(hf), config).save_pretrained(tmp_path / name)
    served = peft.PeftModel.from_pretrained(hf, tmp_path / "a", adapter_name="a")
    served.load_adapter(tmp_path / "b", adapter_name="b")
    served.eval()
    tokens = np.random.RandomState(0).randint(0, 97, (5, 9))
    names = ["a", "b", "__base__", "b", "a"]
    with torch.no_grad():
        want = served(torch.tensor(tokens), adapter_names=names).logits.numpy()
    ours_base = from_hf(tmp_path / "hf")
    mixed = mx.mix(ours_base, [adapters.from_peft(ours_base, tmp_path / n) for n in configs],
                   ids=[{"a": 0, "b": 1, "__base__": -1}[n] for n in names])
    got = logits(mixed, tokens)  # one compiled forward: this model's shapes are its own (eager: ~130 compilations)
    assert np.abs(want[0] - want[2]).max() > 1e-2 and np.abs(want[1] - want[2]).max() > 1e-2
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


# ------------------------------------------------------------------------------------------ errors
def test_mix_errors(base, singles):
    other = random_llama(LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=40, num_layers=2,
                                     num_heads=4, num_kv_heads=2, max_position_embeddings=32), 0)
    with pytest.raises(adapters.AdapterError, match=r"adapter 1 is not an adapter of this base: "
                                                    r"embed_tokens.embedding is \(61, 24\) in the base but "
                                                    r"\(61, 16\) in adapter 1"):
        mx.mix(base, [singles[0], adapters.attach(other, "lora", "layers.0.self_attn.q_proj")])
    wider_heads = random_llama(dataclasses.replace(CFG, head_dim=8), 0)  # the same embeddings and MLPs
    with pytest.raises(adapters.AdapterError, match=r"adapter 2 is not an adapter of this base: "
                                                    r"layers.0.self_attn.k_proj.kernel is \(24, 12\) in the base "
                                                    r"but \(24, 16\) in adapter 2"):
        mx.mix(base, singles[:2] + [adapters.attach(wider_heads, "lora", "layers.*.self_attn.k_proj")])
    same_shapes = random_llama(CFG, 1)
    with pytest.raises(adapters.AdapterError, match=r"adapter 0 is not an adapter of this base: "
                                                    r"embed_tokens.embedding differs between the base and adapter 0"):
        mx.mix(base, [adapters.attach(same_shapes, "lora", "layers.0.self_attn.q_proj")])
    with pytest.raises(adapters.AdapterError, match=r"(?s)adapter 0 \(a brick set\) does not fit the base: .*"
                                                    r"layers.0.self_attn.q_proj/lora_a is \(16, 8\) but the module "
                                                    r"needs \(24, 8\)"):
        mx.mix(base, [adapters.adapter_bricks(adapters.attach(other, "lora", "layers.0.self_attn.q_proj"))])
    with pytest.raises(adapters.AdapterError, match=r"adapter 1 has no adapters attached"):
        mx.mix(base, [singles[0], base])
    with pytest.raises(adapters.AdapterError, match=r"adapter 0 has merged adapters at layers.0.mlp.down_proj, "
                                                    r"layers.0.self_attn.q_proj, "
                                                    r".* \(bricks.adapters.unmerge first\)"):
        mx.mix(base, [adapters.merge(singles[0], keep=True)])
    with pytest.raises(adapters.AdapterError, match=r"the base has adapters at layers.0.self_attn.q_proj, "
                                                    r"layers.0.self_attn.v_proj, layers.1"):
        mx.mix(singles[1], [singles[0]])
    with pytest.raises(adapters.AdapterError, match=r"adapter 0 is a mixed model"):
        mx.mix(base, [mx.mix(base, singles[:1])])
    with pytest.raises(adapters.AdapterError, match=r"adapter 0 is a str"):
        mx.mix(base, ["adapter_dir"])
    for bad in ([], singles[0]):
        with pytest.raises(adapters.AdapterError, match=r"give a non-empty list"):
            mx.mix(base, bad)


def test_id_errors(base, mixed):
    with pytest.raises(adapters.AdapterError, match=r"rows \[1, 3\] have ids \[5, -2\]; the model mixes 5 "
                                                    r"adapter\(s\): ids are 0..4 .* or -1 \(the base alone\)"):
        mx.with_adapter_ids(mixed, [0, 5, 1, -2])
    for bad in ([[0, 1]], [0.0, 1.0], []):
        with pytest.raises(adapters.AdapterError, match=r"ids must be a non-empty 1-D integer array"):
            mx.with_adapter_ids(mixed, bad)
    with pytest.raises(adapters.AdapterError, match=r"with_adapter_ids: the model has no mixed-adapter modules"):
        mx.with_adapter_ids(base, [0])
    with pytest.raises(adapters.AdapterError, match=r"unmix: the model has no mixed-adapter modules"):
        mx.unmix(base)
    with pytest.raises(adapters.AdapterError, match=r"needs one adapter id per batch row: "
                                                    r"bricks.adapters.with_adapter_ids"):
        mixed(TOKENS)
    with pytest.raises(adapters.AdapterError, match=r"got an input of shape \(8, 7, 24\) but holds 3 adapter ids"):
        mx.with_adapter_ids(mixed, [0, 1, 2])(TOKENS)
    with pytest.raises(adapters.AdapterError, match=r"wraps a plain Linear module, got LoRALinear"):
        mx.MixedLinear(adapted(base, 0).layers[0].self_attn.q_proj, kinds=["lora"], rank=4)
    with pytest.raises(adapters.AdapterError, match=r"kinds must be a non-empty list"):
        mx.MixedLinear(base.layers[0].self_attn.q_proj, kinds=["prefix"])


@pytest.mark.parametrize("small", [False, True])
def test_joint_lora_matmul_rows_equal_the_separate_path(with_rows, small):
    """with_lora_matmul on a mixed model: 'joint' ([x | z] @ [W ; B_flat ; 0], z = e s (x A[i]) per row) and 'auto'
    give the separate path's logits on every row (BASE_ID included), on the gather and the all-adapters
    down-projection; modules holding a DoRA adapter keep the separate path (here q, v, o, up; joint: gate, and
    down with its IA3 input scale)."""
    model = mx.with_small_batch_path(with_rows, small)
    want = np.asarray(model(TOKENS))
    for mode in ("joint", "auto"):
        got = np.asarray(adapters.with_lora_matmul(model, mode)(TOKENS))
        np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL, err_msg=mode)
    joint = adapters.with_lora_matmul(model, "joint")
    assert {p: m.matmul for p, m in mx.mixed_modules(joint).items()}["layers.0.mlp.gate_proj"] == "joint"
