"""GGUF loading: dequantization vs scalar reference decoders, HF parity through a llama.cpp-style export,
tokenizers rebuilt from GGUF metadata, and the errors on bad files.

Everything is written here with `gguf.GGUFWriter` into tmp_path (no downloads).
"""
import struct
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gguf import GGMLQuantizationType as Q  # noqa: E402

from configurable_fm.interop.tokenizers import (  # noqa: E402
    gguf_chat_template, gguf_special_tokens, load_tokenizer, tokenizer_from_gguf)
from configurable_fm.interop.gguf import dequantize, from_gguf, read_gguf  # noqa: E402
from configurable_fm.interop.hf import from_hf  # noqa: E402
from configurable_fm.interop.safetensors_io import CheckpointError  # noqa: E402


# =========================================================================== scalar reference decoders
# Written from ggml's block layouts (ggml-common.h / dequantize_row_* in ggml-quants.c), one value at a time.
def f16(b, o):
    return struct.unpack_from("<e", b, o)[0]


def ref_f16(b):
    return [f16(b, 2 * i) for i in range(len(b) // 2)]


def ref_bf16(b):
    return [struct.unpack("<f", struct.pack("<I", struct.unpack_from("<H", b, 2 * i)[0] << 16))[0]
            for i in range(len(b) // 2)]


def ref_q8_0(b):  # block: d (f16), qs[32] int8; y = d * q
    out = []
    for o in range(0, len(b), 34):
        d = f16(b, o)
        out += [d * struct.unpack_from("<b", b, o + 2 + j)[0] for j in range(32)]
    return out


def ref_q4_0(b):  # d, qs[16]: y[j] = d * (lo nibble - 8), y[j + 16] = d * (hi nibble - 8)
    out = []
    for o in range(0, len(b), 18):
        d, qs = f16(b, o), b[o + 2:o + 18]
        out += [d * ((q & 0xF) - 8) for q in qs] + [d * ((q >> 4) - 8) for q in qs]
    return out


def ref_q4_1(b):  # d, m, qs[16]: y = d * nibble + m
    out = []
    for o in range(0, len(b), 20):
        d, m, qs = f16(b, o), f16(b, o + 2), b[o + 4:o + 20]
        out += [d * (q & 0xF) + m for q in qs] + [d * (q >> 4) + m for q in qs]
    return out


def ref_q5_0(b):  # d, qh (u32), qs[16]: 5th bit of y[j] is qh bit j, of y[j + 16] bit j + 16; y = d * (x - 16)
    out = []
    for o in range(0, len(b), 22):
        d, qh, qs = f16(b, o), struct.unpack_from("<I", b, o + 2)[0], b[o + 6:o + 22]
        out += [d * (((q & 0xF) | (((qh >> j) & 1) << 4)) - 16) for j, q in enumerate(qs)]
        out += [d * (((q >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16) for j, q in enumerate(qs)]
    return out


def ref_q5_1(b):  # d, m, qh, qs[16]: y = d * x + m
    out = []
    for o in range(0, len(b), 24):
        d, m, qh, qs = f16(b, o), f16(b, o + 2), struct.unpack_from("<I", b, o + 4)[0], b[o + 8:o + 24]
        out += [d * ((q & 0xF) | (((qh >> j) & 1) << 4)) + m for j, q in enumerate(qs)]
        out += [d * ((q >> 4) | (((qh >> (j + 16)) & 1) << 4)) + m for j, q in enumerate(qs)]
    return out


def scale_min_k4(j, s):  # 8 (scale, min) pairs of 6 bits packed in 12 bytes
    if j < 4:
        return s[j] & 63, s[j + 4] & 63
    return (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)


def ref_q4_k(b):  # super-block of 256: d, dmin, scales[12], qs[128]; 8 sub-blocks of 32: y = d*sc*q - dmin*m
    out = []
    for o in range(0, len(b), 144):
        d, dmin, sc, qs = f16(b, o), f16(b, o + 2), b[o + 4:o + 16], b[o + 16:o + 144]
        for g in range(4):  # 64 values per group: low nibbles (sub-block 2g), then high nibbles (2g + 1)
            q = qs[32 * g:32 * g + 32]
            s1, m1 = scale_min_k4(2 * g, sc)
            s2, m2 = scale_min_k4(2 * g + 1, sc)
            out += [d * s1 * (x & 0xF) - dmin * m1 for x in q] + [d * s2 * (x >> 4) - dmin * m2 for x in q]
    return out


def ref_q5_k(b):  # d, dmin, scales[12], qh[32], qs[128]; 5th bit of group g from qh bits 2g (low), 2g+1 (high)
    out = []
    for o in range(0, len(b), 176):
        d, dmin, sc = f16(b, o), f16(b, o + 2), b[o + 4:o + 16]
        qh, qs = b[o + 16:o + 48], b[o + 48:o + 176]
        for g in range(4):
            q = qs[32 * g:32 * g + 32]
            s1, m1 = scale_min_k4(2 * g, sc)
            s2, m2 = scale_min_k4(2 * g + 1, sc)
            out += [d * s1 * ((x & 0xF) + 16 * ((qh[l] >> (2 * g)) & 1)) - dmin * m1 for l, x in enumerate(q)]
            out += [d * s2 * ((x >> 4) + 16 * ((qh[l] >> (2 * g + 1)) & 1)) - dmin * m2 for l, x in enumerate(q)]
    return out


def ref_q6_k(b):  # ql[128], qh[64], scales[16] int8, d; two halves of 128 values
    out = []
    for o in range(0, len(b), 210):
        ql, qh = b[o:o + 128], b[o + 128:o + 192]
        sc = struct.unpack_from("<16b", b, o + 192)
        d = f16(b, o + 208)
        for n in range(2):
            y = [0.0] * 128
            L, H, S = ql[64 * n:64 * n + 64], qh[32 * n:32 * n + 32], sc[8 * n:8 * n + 8]
            for l in range(32):
                i = l // 16
                y[l] = d * S[i] * (((L[l] & 0xF) | (((H[l] >> 0) & 3) << 4)) - 32)
                y[l + 32] = d * S[i + 2] * (((L[l + 32] & 0xF) | (((H[l] >> 2) & 3) << 4)) - 32)
                y[l + 64] = d * S[i + 4] * (((L[l] >> 4) | (((H[l] >> 4) & 3) << 4)) - 32)
                y[l + 96] = d * S[i + 6] * (((L[l + 32] >> 4) | (((H[l] >> 6) & 3) << 4)) - 32)
            out += y
    return out


# type: (reference, block bytes, values per block, byte offsets of the f16 scale fields in a block)
BLOCKS = {
    Q.F16: (ref_f16, 2, 1, ()), Q.BF16: (ref_bf16, 2, 1, ()),
    Q.Q8_0: (ref_q8_0, 34, 32, (0,)), Q.Q4_0: (ref_q4_0, 18, 32, (0,)), Q.Q4_1: (ref_q4_1, 20, 32, (0, 2)),
    Q.Q5_0: (ref_q5_0, 22, 32, (0,)), Q.Q5_1: (ref_q5_1, 24, 32, (0, 2)),
    Q.Q4_K: (ref_q4_k, 144, 256, (0, 2)), Q.Q5_K: (ref_q5_k, 176, 256, (0, 2)), Q.Q6_K: (ref_q6_k, 210, 256, (208,)),
}


def random_blocks(qtype, rows, cols, rng):
    """Random bytes for a (rows, cols) tensor, with every f16 scale field set to a sane value in [-2, 2]."""
    _, nbytes, per_block, scale_offsets = BLOCKS[qtype]
    n_blocks = rows * cols // per_block
    if qtype == Q.F16:
        return rng.standard_normal((rows, cols)).astype(np.float16).view(np.uint8)
    if qtype == Q.BF16:
        bits = rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint32) >> 16
        return bits.astype(np.uint16).view(np.uint8).reshape(rows, 2 * cols)
    raw = rng.integers(0, 256, (n_blocks, nbytes), dtype=np.uint8)
    for off in scale_offsets:
        raw[:, off:off + 2] = rng.uniform(-2, 2, (n_blocks, 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", list(BLOCKS), ids=lambda t: t.name)
def test_dequantize_matches_scalar_reference(qtype, tmp_path):
    rng = np.random.default_rng(int(qtype))
    rows, cols = 3, 512  # two 256-superblocks or sixteen 32-blocks per row; rows != cols catches transposes
    raw = random_blocks(qtype, rows, cols, rng)
    w = gguf.GGUFWriter(tmp_path / "q.gguf", "llama")
    w.add_tensor("t", raw, raw_dtype=qtype)
    write(w, tmp_path / "q.gguf")
    (t,) = read_gguf(tmp_path / "q.gguf").tensors
    got = dequantize(t)
    ref = np.array(BLOCKS[qtype][0](raw.tobytes()), dtype=np.float64).reshape(rows, cols)
    assert got.dtype == np.float32 and got.shape == (rows, cols)
    # float32 products in ggml vs float64 here: <= 2 ulp-ish of the largest value.
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def test_dequantize_rejects_unsupported_type(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "q.gguf", "llama")
    w.add_tensor("blk.0.int_thing.weight", np.arange(8, dtype=np.int32))
    write(w, tmp_path / "q.gguf")
    (t,) = read_gguf(tmp_path / "q.gguf").tensors
    with pytest.raises(NotImplementedError, match=r"blk\.0\.int_thing\.weight has type I32"):
        dequantize(t)


# =========================================================================== a llama.cpp-style exporter
def write(writer, path):
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (rotate-half -> interleaved rotary layout)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = [  # (HF name, GGUF name) for layer-free tensors, then per layer
    ("model.embed_tokens.weight", "token_embd.weight"), ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight")]
LAYER_NAMES = [
    ("input_layernorm.weight", "attn_norm.weight"), ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"), ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"), ("self_attn.o_proj.weight", "attn_output.weight"),
    ("self_attn.q_proj.bias", "attn_q.bias"), ("self_attn.k_proj.bias", "attn_k.bias"),
    ("self_attn.v_proj.bias", "attn_v.bias"), ("self_attn.o_proj.bias", "attn_output.bias"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"), ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"), ("mlp.gate_proj.bias", "ffn_gate.bias"),
    ("mlp.up_proj.bias", "ffn_up.bias"), ("mlp.down_proj.bias", "ffn_down.bias")]


def export_gguf(hf_model, path, *, qtype=Q.F32, arch="llama", extra=None, drop=(), meta=None, types=None,
                permute_qk=True):
    """Writes an HF LlamaForCausalLM as GGUF the way llama.cpp's converter does (q/k rows permuted)."""
    c = hf_model.config
    n_head, n_kv = c.num_attention_heads, c.num_key_value_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_head
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf_model.state_dict().items()}
    if c.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    names = dict(GGUF_NAMES)
    for i in range(c.num_hidden_layers):
        names.update({f"model.layers.{i}.{h}": f"blk.{i}.{g}" for h, g in LAYER_NAMES})
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(c.vocab_size)
    if head_dim != c.hidden_size // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if c.rope_parameters.get("rope_type", "default") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(c.rope_parameters["factor"])
    for key, value in (meta or {}).items():
        w.add_key_value(key, *value)
    for hf_name, value in sd.items():
        name = names[hf_name]
        if name in drop:
            continue
        if ".attn_q." in name and permute_qk:
            value = permute(value, n_head)
        elif ".attn_k." in name and permute_qk:
            value = permute(value, n_kv)
        kind = (types or {}).get(name, qtype if value.ndim == 2 else Q.F32)
        if kind == Q.F32:
            w.add_tensor(name, value)
        elif kind == Q.F16:
            w.add_tensor(name, value.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(value, kind), raw_dtype=kind)
    for name, value in (extra or {}).items():
        w.add_tensor(name, value)
    write(w, path)
    return path


BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=64,
            rms_norm_eps=1e-5)
CASES = {
    "gqa-untied": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0),
    "mqa-tied-bias-headdim-linear-rope": dict(
        num_attention_heads=4, num_key_value_heads=1, head_dim=24, tie_word_embeddings=True, attention_bias=True,
        mlp_bias=True, rope_theta=500000.0, rope_scaling=dict(rope_type="linear", factor=2.0)),
}


def make_hf(kw, seed=0):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**BASE, **kw)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so every tensor matters
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


IDS = np.random.RandomState(1).randint(0, BASE["vocab_size"], (2, 13))


@pytest.mark.parametrize("case", sorted(CASES))
def test_f32_gguf_matches_hf_checkpoint(case, tmp_path):
    hf = make_hf(CASES[case])
    hf.save_pretrained(tmp_path / "hf")
    export_gguf(hf, tmp_path / "m.gguf")
    ours = from_gguf(tmp_path / "m.gguf")
    ref = from_hf(tmp_path / "hf")
    assert ours.cfg == ref.cfg
    a, b = np.asarray(ours(jnp.asarray(IDS))), np.asarray(ref(jnp.asarray(IDS)))
    assert np.abs(a - b).max() <= 1e-5, f"{case}: max |from_gguf - from_hf| {np.abs(a - b).max()}"
    assert np.abs(a - torch_logits(hf, IDS)).max() <= 1e-4


def test_without_unpermuting_the_logits_differ(tmp_path):
    """The q/k permutation matters: without it the logits move by far more than the 1e-5 parity tolerance."""
    hf = make_hf(CASES["gqa-untied"])
    export_gguf(hf, tmp_path / "m.gguf")
    good = np.asarray(from_gguf(tmp_path / "m.gguf")(jnp.asarray(IDS)))
    export_gguf(hf, tmp_path / "raw.gguf", permute_qk=False)
    bad = np.asarray(from_gguf(tmp_path / "raw.gguf")(jnp.asarray(IDS)))
    assert np.abs(good - bad).max() > 1e-3


def test_quantized_and_half_gguf_load_close_to_hf(tmp_path):
    hf = make_hf(CASES["gqa-untied"])
    ref = torch_logits(hf, IDS)
    types = {"token_embd.weight": Q.Q8_0, "output.weight": Q.F16, "blk.0.attn_q.weight": Q.Q4_0,
             "blk.0.attn_k.weight": Q.Q4_1, "blk.0.attn_v.weight": Q.Q5_0, "blk.0.attn_output.weight": Q.Q5_1,
             "blk.1.attn_q.weight": Q.BF16, "blk.1.attn_k.weight": Q.F16}
    export_gguf(hf, tmp_path / "m.gguf", types=types)
    ours = from_gguf(tmp_path / "m.gguf")
    assert ours.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.float32
    diff = np.abs(np.asarray(ours(jnp.asarray(IDS))) - ref).max()
    assert diff <= 0.05 * np.abs(ref).max(), diff  # 4-bit weights: close, not exact
    half = from_gguf(tmp_path / "m.gguf", dtype=jnp.bfloat16)
    assert half.embed_tokens.embedding[...].dtype == jnp.bfloat16


# =========================================================================== bad input
@pytest.fixture(scope="module")
def tiny_hf():
    return make_hf(CASES["gqa-untied"])


def test_truncated_file(tiny_hf, tmp_path):
    data = export_gguf(tiny_hf, tmp_path / "m.gguf").read_bytes()
    for cut in (len(data) - 100, 200, 20):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"cut\.gguf.*truncated"):
            from_gguf(tmp_path / "cut.gguf")


def test_truncated_tensor_data_names_the_tensor(tiny_hf, tmp_path):
    path = export_gguf(tiny_hf, tmp_path / "m.gguf")
    reader = read_gguf(path)
    last = max(reader.tensors, key=lambda t: t.data_offset)
    data = path.read_bytes()
    del reader
    (tmp_path / "cut.gguf").write_bytes(data[:last.data_offset + 8])
    with pytest.raises(CheckpointError, match=rf"cut\.gguf: truncated or corrupt GGUF file \(tensor {last.name} "
                                              rf"needs bytes \[\d+, \d+\) but the file has \d+ bytes"):
        read_gguf(tmp_path / "cut.gguf")


def test_wrong_magic_and_version(tiny_hf, tmp_path):
    data = export_gguf(tiny_hf, tmp_path / "m.gguf").read_bytes()
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + data[4:])
    with pytest.raises(CheckpointError, match=r"magic\.gguf: not a GGUF file \(magic b'GGML'"):
        from_gguf(tmp_path / "magic.gguf")
    (tmp_path / "v9.gguf").write_bytes(data[:4] + struct.pack("<I", 9) + data[8:])
    with pytest.raises(CheckpointError, match=r"v9\.gguf: GGUF version 9 is not supported"):
        from_gguf(tmp_path / "v9.gguf")
    (tmp_path / "counts.gguf").write_bytes(data[:8] + struct.pack("<Q", 10**12) + data[16:])
    with pytest.raises(CheckpointError, match=r"counts\.gguf: corrupt or truncated GGUF header"):
        from_gguf(tmp_path / "counts.gguf")
    with pytest.raises(CheckpointError, match="no such file"):
        from_gguf(tmp_path / "absent.gguf")


def test_unsupported_architecture(tiny_hf, tmp_path):
    export_gguf(tiny_hf, tmp_path / "m.gguf", arch="gpt2")
    with pytest.raises(NotImplementedError, match=r"architecture 'gpt2' is not supported \(supported: \['llama'\]"):
        from_gguf(tmp_path / "m.gguf")


def test_unsupported_tensor_type(tiny_hf, tmp_path):
    export_gguf(tiny_hf, tmp_path / "m.gguf", drop={"blk.0.attn_norm.weight"},
                extra={"blk.0.attn_norm.weight": np.ones(64, np.int32)})
    with pytest.raises(CheckpointError, match=r"unsupported tensor type\(s\): \['blk\.0\.attn_norm\.weight \(I32\)'\]"):
        from_gguf(tmp_path / "m.gguf")


def test_unknown_tensor_name(tiny_hf, tmp_path):
    export_gguf(tiny_hf, tmp_path / "m.gguf", extra={"blk.0.attn_mystery.weight": np.ones(4, np.float32)})
    with pytest.raises(CheckpointError, match=r"unknown GGUF tensor name\(s\).*\['blk\.0\.attn_mystery\.weight'\]"):
        from_gguf(tmp_path / "m.gguf")


def test_missing_and_misshaped_tensors(tiny_hf, tmp_path):
    export_gguf(tiny_hf, tmp_path / "m.gguf",
                drop={"blk.1.ffn_up.weight", "blk.0.ffn_norm.weight", "blk.1.attn_q.weight"},
                extra={"blk.0.ffn_norm.weight": np.ones(7, np.float32),
                       "blk.1.attn_q.weight": np.ones((60, 64), np.float32)})
    with pytest.raises(CheckpointError) as e:
        from_gguf(tmp_path / "m.gguf")
    msg = str(e.value)
    assert "m.gguf does not match the llama config" in msg
    assert "missing tensors (1): ['model.layers.1.mlp.up_proj.weight']" in msg
    assert "model.layers.0.post_attention_layernorm.weight has shape (7,)" in msg
    assert "model.layers.1.self_attn.q_proj.weight has shape (60, 64)" in msg


def test_unsupported_features(tiny_hf, tmp_path):
    export_gguf(tiny_hf, tmp_path / "a.gguf", extra={"rope_freqs.weight": np.ones(8, np.float32)})
    with pytest.raises(NotImplementedError, match=r"rope_freqs\.weight"):
        from_gguf(tmp_path / "a.gguf")
    export_gguf(tiny_hf, tmp_path / "b.gguf", meta={"llama.rope.scaling.type": ("yarn", gguf.GGUFValueType.STRING)})
    with pytest.raises(NotImplementedError, match="rope scaling type 'yarn'"):
        from_gguf(tmp_path / "b.gguf")
    export_gguf(tiny_hf, tmp_path / "c.gguf", meta={"llama.attention.sliding_window": (4, gguf.GGUFValueType.UINT32)})
    with pytest.raises(NotImplementedError, match=r"\['llama\.attention\.sliding_window'\] is not implemented"):
        from_gguf(tmp_path / "c.gguf")


def test_a_token_list_that_does_not_fit_the_embedding_is_refused(tiny_hf, tmp_path):
    rows = tiny_hf.config.vocab_size
    for n in (rows - 1, rows + 1):
        export_gguf(tiny_hf, tmp_path / f"v{n}.gguf",
                    meta={"tokenizer.ggml.tokens": ([f"t{i}" for i in range(n)], gguf.GGUFValueType.ARRAY)})
        with pytest.raises(CheckpointError, match=rf"tokenizer\.ggml\.tokens holds {n} tokens but token_embd\.weight "
                                                  rf"has {rows} rows"):
            from_gguf(tmp_path / f"v{n}.gguf")
    export_gguf(tiny_hf, tmp_path / "ok.gguf",
                meta={"tokenizer.ggml.tokens": ([f"t{i}" for i in range(rows)], gguf.GGUFValueType.ARRAY)})
    assert from_gguf(tmp_path / "ok.gguf").cfg.vocab_size == rows


# =========================================================================== tokenizer from GGUF metadata
def bytes_to_unicode():
    """GPT-2's byte -> printable character table used by byte-level BPE."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_vocab(path, *, model="gpt2", pre="smollm", add_bos=False):
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "Ġthe n", "1 2", "c a", "ca t"]
    byte_tokens = sorted(set(bytes_to_unicode().values()), key=lambda ch: ord(ch))
    tokens = specials + byte_tokens + ["Ġt", "he", "Ġthe", "Ġthen", "12", "ca", "cat"]
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    if add_bos is not None:  # None: no tokenizer.ggml.add_bos_token key
        w.add_add_bos_token(add_bos)
    w.add_chat_template("{{ messages }}")
    write(w, path)
    return tokens


def test_tokenizer_from_gguf(tmp_path):
    tokens = write_vocab(tmp_path / "v.gguf")
    tok = tokenizer_from_gguf(tmp_path / "v.gguf")
    enc = tok.encode("<|im_start|>cat then 123<|im_end|>")
    assert enc.tokens == ["<|im_start|>", "cat", "Ġthen", "Ġ", "1", "2", "3", "<|im_end|>"]  # digits one by one
    assert enc.ids[0] == 1 and enc.ids[-1] == 2 and enc.ids[1] == tokens.index("cat")
    for s in ["the cat then", "héllo wörld ✓ 2024\n\ttabs", "<|im_start|>user\nhi<|im_end|>"]:
        assert tok.decode(tok.encode(s).ids, skip_special_tokens=False) == s
    assert tok.decode(enc.ids, skip_special_tokens=True) == "cat then 123"
    assert gguf_special_tokens(tmp_path / "v.gguf") == {"bos": 1, "eos": 2, "unk": 0}
    assert gguf_chat_template(tmp_path / "v.gguf") == "{{ messages }}"
    # gpt2 pre-tokenizer keeps digit runs together (then merges "1 2"); add_bos prepends the BOS id.
    write_vocab(tmp_path / "g.gguf", pre="gpt2", add_bos=True)
    enc = tokenizer_from_gguf(tmp_path / "g.gguf").encode("then 123")
    assert enc.tokens == ["<|im_start|>", "t", "he", "n", "Ġ", "12", "3"] and enc.ids[0] == 1
    # Round trip through tokenizer.json (file and directory).
    tok.save(str(tmp_path / "tokenizer.json"))
    for p in (tmp_path / "tokenizer.json", tmp_path):
        assert load_tokenizer(p).encode("cat then 12").ids == tok.encode("cat then 12").ids


def test_tokenizer_errors(tmp_path):
    write_vocab(tmp_path / "spm.gguf", model="llama")
    with pytest.raises(NotImplementedError, match=r"spm\.gguf: GGUF tokenizer model 'llama' is not supported"):
        tokenizer_from_gguf(tmp_path / "spm.gguf")
    write_vocab(tmp_path / "l3.gguf", pre="llama-bpe")
    with pytest.warns(UserWarning, match="tokenizer.ggml.pre='llama-bpe' has no dedicated pre-tokenizer"):
        tokenizer_from_gguf(tmp_path / "l3.gguf")
    # without tokenizer.ggml.add_bos_token, BOS where llama.cpp adds it by default (llama-bpe), not elsewhere
    for pre, bos in (("llama-bpe", True), ("gpt2", False)):
        write_vocab(tmp_path / f"{pre}.gguf", pre=pre, add_bos=None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert (tokenizer_from_gguf(tmp_path / f"{pre}.gguf").encode("cat").ids[0] == 1) is bos, pre
    w = gguf.GGUFWriter(tmp_path / "none.gguf", "llama")
    write(w, tmp_path / "none.gguf")
    with pytest.raises(CheckpointError, match="no tokenizer in the GGUF metadata"):
        tokenizer_from_gguf(tmp_path / "none.gguf")
    assert gguf_chat_template(tmp_path / "none.gguf") is None
    with pytest.raises(CheckpointError, match="no such tokenizer file"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"bad\.json: cannot read tokenizer"):
        load_tokenizer(tmp_path / "bad.json")


def test_rope_scaling_keys_read_as_llama_cpp(tmp_path):
    """llama.cpp (llm_load_hparams / llama_context): rope.scaling.type defaults to 'linear' when absent; the factor
    is rope.scaling.factor, else the older rope.scale_linear, and 0 means unscaled; type 'none' never scales."""
    plain = make_hf(CASES["gqa-untied"])
    scaled = make_hf({**CASES["gqa-untied"], "rope_scaling": dict(rope_type="linear", factor=2.0)})
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), scaled.state_dict().values()))
    ref = {"plain": torch_logits(plain, IDS), "scaled": torch_logits(scaled, IDS)}
    assert np.abs(ref["plain"] - ref["scaled"]).max() > 1e-3  # the scaling is visible in the logits
    f32, string = gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.STRING
    cases = {
        "factor-without-type": ({"llama.rope.scaling.factor": (2.0, f32)}, "scaled"),
        "scale-linear-without-type": ({"llama.rope.scale_linear": (2.0, f32)}, "scaled"),
        "none-with-factor": ({"llama.rope.scaling.type": ("none", string),
                              "llama.rope.scaling.factor": (2.0, f32)}, "plain"),
        "none-with-scale-linear": ({"llama.rope.scaling.type": ("none", string),
                                    "llama.rope.scale_linear": (2.0, f32)}, "plain"),
        "linear-factor-0": ({"llama.rope.scaling.type": ("linear", string),
                             "llama.rope.scaling.factor": (0.0, f32)}, "plain"),
    }
    for name, (meta, want) in cases.items():
        export_gguf(plain, tmp_path / f"{name}.gguf", meta=meta)
        got = np.asarray(from_gguf(tmp_path / f"{name}.gguf")(jnp.asarray(IDS)))
        assert np.abs(got - ref[want]).max() <= 1e-4, f"{name}: logits differ from the {want} HF model"


def test_tokenizer_pre_types_as_llama_cpp(tmp_path):
    """llama.cpp's pre-tokenizer names: 'gpt-2' is GPT-2's regex; 'default' (also when tokenizer.ggml.pre is
    absent) applies its default regexes in turn, [\\p{P}$+<=>^~|]+, GPT-2's, \\p{N}+, [0-9][0-9][0-9], each
    splitting the pieces of the previous one (matches and the text between them both kept)."""
    text = "ab 12345 ,c it's"
    write_vocab(tmp_path / "g2.gguf", pre="gpt-2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok = tokenizer_from_gguf(tmp_path / "g2.gguf")
    assert [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(text)] == ["ab", "Ġ12345", "Ġ,", "c", "Ġit", "'s"]
    default = ["ab", "Ġ", "123", "45", "Ġ", ",", "c", "Ġit", "'", "s"]
    for pre in ("default", None):
        write_vocab(tmp_path / "d.gguf", pre=pre)
        tok = tokenizer_from_gguf(tmp_path / "d.gguf")
        assert [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(text)] == default, pre
        assert tok.decode(tok.encode(text).ids) == text
