"""Prompt tuning and prefix tuning (models.virtual_tokens, bricks.adapters.prompts, interop.peft), checked against
PEFT 0.21.2 itself on tiny random LlamaForCausalLM (GQA) and GPT2LMHeadModel models built in the test:

* from_peft of what PEFT saved gives PEFT's logits for the real tokens (PEFT returns the P virtual positions too);
  to_peft writes what PeftModel.from_pretrained loads with our logits. Measured <= 1e-6 (tolerance 1e-5); the
  virtual tokens move the logits by more than 1.
* generation through the prefilled cache equals a greedy loop over the model's own full forward (which matches
  PEFT's forward); PEFT's own `generate` is not the reference: with transformers 5.17 it disagrees with its own
  forward for these adapters after the first new token (seen while writing this test).
* gradients reach the virtual tokens (a few Adam steps lower the loss), bricks round trip, detach, errors.
"""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from configurable_fm.bricks import adapters  # noqa: E402
from configurable_fm.interop.hf import UnsupportedModel, from_hf  # noqa: E402
from configurable_fm.interop.safetensors_io import CheckpointError  # noqa: E402
from configurable_fm.models.generation import generate  # noqa: E402

TOL = 1e-5
VOCAB = 97
P = 3
IDS = np.random.RandomState(0).randint(0, VOCAB, (2, 9))


def _randomize(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = "norm" in name or ".ln_" in name or name.startswith("transformer.ln_f")
            p.normal_(1.0 if norm and name.endswith("weight") else 0.0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    out = {}
    for kind in ("llama", "gpt2"):
        tmp = tmp_path_factory.mktemp(kind)
        if kind == "llama":
            hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
                vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64))
        else:
            hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
                vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0))
        hf = _randomize(hf)
        hf.save_pretrained(tmp / "hf")
        out[kind] = (hf, from_hf(tmp / "hf"))
    return out


def _peft_model(hf, kind):
    config = (peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P) if kind == "prompt" else
              peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    pm = peft.get_peft_model(copy.deepcopy(hf), config).eval()
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return pm


def _peft_logits(pm):
    with torch.no_grad():
        out = pm(input_ids=torch.tensor(IDS), attention_mask=torch.ones(IDS.shape, dtype=torch.long)).logits.numpy()
    return out[:, -IDS.shape[1]:]  # prompt tuning returns the P virtual positions first


CASES = [(f, k) for f in ("llama", "gpt2") for k in ("prompt", "prefix")]


@pytest.mark.parametrize("family, kind", CASES)
def test_from_peft_and_to_peft_match_peft(bases, family, kind, tmp_path):
    hf, ours = bases[family]
    pm = _peft_model(hf, kind)
    want = _peft_logits(pm)
    pm.save_pretrained(tmp_path / "peft")
    m = adapters.from_peft(ours, tmp_path / "peft")
    assert isinstance(m, adapters.VirtualTokens) and m.kind == kind and m.num_virtual_tokens == P
    got = np.asarray(m(jnp.asarray(IDS)))
    assert np.abs(got - want).max() <= TOL
    assert np.abs(np.asarray(ours(jnp.asarray(IDS))) - want).max() > 0.5  # the virtual tokens matter
    adapters.to_peft(m, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ours").eval()
    assert np.abs(_peft_logits(back) - got).max() <= TOL
    np.testing.assert_array_equal(np.asarray(adapters.from_peft(ours, tmp_path / "ours").values),
                                  np.asarray(m.values))


def _naive_greedy(model, prompt, n):
    x = np.asarray(prompt)
    for _ in range(n):
        nxt = np.argmax(np.asarray(model(jnp.asarray(x)))[:, -1], axis=-1)
        x = np.concatenate([x, nxt[:, None]], axis=1)
    return x


@pytest.mark.slow  # CI time (~10 s of compilations); the forward parity with PEFT is checked fast above
@pytest.mark.parametrize("family, kind", [("llama", "prompt"), ("gpt2", "prefix")])
def test_generate_through_the_prefilled_cache(bases, family, kind):
    m = adapters.attach_virtual_tokens(bases[family][1], kind, P, seed=3)
    out = np.asarray(generate(m, IDS, max_new_tokens=3))
    np.testing.assert_array_equal(out, _naive_greedy(m, IDS, 3))
    # A left-padded shorter row generates what it generates alone.
    ids, mask = IDS.copy(), np.ones(IDS.shape, np.int32)
    mask[1, :4] = 0
    padded = np.asarray(generate(m, ids, attention_mask=mask, max_new_tokens=5))
    alone = np.asarray(generate(m, IDS[1:, 4:], max_new_tokens=5))
    np.testing.assert_array_equal(padded[1, -5:], alone[0, -5:])


def test_prompt_training_lowers_the_loss_and_leaves_the_base_alone(bases):
    from flax import nnx

    base = bases["llama"][1]
    m = adapters.attach_virtual_tokens(base, "prompt", P, seed=0)
    graphdef, prompt, rest = nnx.split(m, adapters.VirtualTokenParam, ...)
    ids = jnp.asarray(IDS)

    def loss(prompt):
        logits = nnx.merge(graphdef, prompt, rest)(ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    tx = optax.adam(0.1)
    state = tx.init(prompt)

    @jax.jit
    def step(prompt, state):  # loss, gradients and the Adam update as one program (not op by op)
        value, g = jax.value_and_grad(loss)(prompt)
        updates, state = tx.update(g, state)
        return value, g, optax.apply_updates(prompt, updates), state

    first, g, _, _ = step(prompt, state)
    assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g))
    for _ in range(20):
        _, g, prompt, state = step(prompt, state)
    final, _, _, _ = step(prompt, state)  # the loss of the trained prompt, by the same compiled program
    assert float(final) < float(first) - 0.1
    assert adapters.detach(m) is base
    assert list(adapters.adapter_state(m)) == ["prompt"]


def test_inits(bases):
    base = bases["llama"][1]
    table = np.asarray(base.embed_tokens.embedding[...])
    text = adapters.attach_virtual_tokens(base, "prompt", 5, init="text", init_ids=[7, 3])
    np.testing.assert_array_equal(np.asarray(text.values), table[[7, 3, 7, 3, 7]])
    vocab = np.asarray(adapters.attach_virtual_tokens(base, "prompt", 4, init="vocab", seed=2).values)
    assert all(any(np.array_equal(row, t) for t in table) for row in vocab)
    a = adapters.attach_virtual_tokens(base, "prefix", 2, seed=5)
    b = adapters.attach_virtual_tokens(base, "prefix", 2, seed=5)
    assert a.values.shape == (2, 2, 2, 2, 8)  # P, layers, keys/values, kv heads, head dim
    np.testing.assert_array_equal(np.asarray(a.values), np.asarray(b.values))
    assert abs(float(jnp.std(a.values)) - 1.0) < 0.2
    assert not np.any(np.asarray(adapters.attach_virtual_tokens(base, "prefix", 2, init="zeros").values))


def test_bricks_round_trip_with_lora_on_the_base(bases, tmp_path):
    base = bases["llama"][1]
    lora = adapters.attach(base, "lora", "layers.*.self_attn.q_proj", rank=2, init="gaussian", seed=1)
    m = adapters.attach_virtual_tokens(lora, "prefix", P, seed=4)
    adapters.save_adapter(m, tmp_path / "bricks")
    back = adapters.load_adapter(base, tmp_path / "bricks")
    np.testing.assert_array_equal(np.asarray(back(jnp.asarray(IDS))), np.asarray(m(jnp.asarray(IDS))))
    plain = adapters.detach(m)
    assert not adapters.adapters(plain) and not isinstance(plain, adapters.VirtualTokens)
    with pytest.raises(UnsupportedModel, match="other adapters or extensions"):
        adapters.to_peft(m, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_errors(bases, tmp_path):
    base = bases["llama"][1]
    with pytest.raises(adapters.AdapterError, match="kind must be one of"):
        adapters.attach_virtual_tokens(base, "suffix", 2)
    with pytest.raises(adapters.AdapterError, match="num_virtual_tokens must be an int >= 1"):
        adapters.attach_virtual_tokens(base, "prompt", 0)
    with pytest.raises(adapters.AdapterError, match="init must be one of"):
        adapters.attach_virtual_tokens(base, "prefix", 2, init="text")
    with pytest.raises(adapters.AdapterError, match="needs init_ids"):
        adapters.attach_virtual_tokens(base, "prompt", 2, init="text")
    with pytest.raises(adapters.AdapterError, match=r"init_ids must lie in \[0, 97\)"):
        adapters.attach_virtual_tokens(base, "prompt", 2, init="text", init_ids=[100])
    m = adapters.attach_virtual_tokens(base, "prompt", 2)
    with pytest.raises(adapters.AdapterError, match="virtual tokens already"):
        adapters.attach_virtual_tokens(m, "prompt", 2)
    gpt2 = adapters.attach_virtual_tokens(bases["gpt2"][1], "prefix", 30)
    with pytest.raises(ValueError, match="exceed n_positions=32"):
        gpt2(jnp.asarray(IDS))
    # PEFT files that do not fit.
    pm = _peft_model(bases["llama"][0], "prefix")
    pm.save_pretrained(tmp_path / "p")
    with pytest.raises(CheckpointError, match="num_attention_heads=2 but the model has 4"):
        adapters.from_peft(bases["gpt2"][1], tmp_path / "p")  # gpt2: 4 kv heads x 8, not 2 x 8
    config = (tmp_path / "p" / "adapter_config.json")
    config.write_text(config.read_text().replace('"CAUSAL_LM"', '"SEQ_CLS"'))
    with pytest.raises(UnsupportedModel, match="task_type='SEQ_CLS'"):
        adapters.from_peft(base, tmp_path / "p")
