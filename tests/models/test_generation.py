"""KV-cache generation: greedy equals a naive full-forward argmax loop and transformers' greedy generate;
left padding; sampling filters (top-k, top-p) and reproducibility; eos handling; argument errors.

Token sequences are compared exactly (float32 logits of tiny random models; no near-ties at these seeds).
"""
import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import char_tokenizer, random_llama
from configurable_fm.bricks.paths import flat_state, with_params
from configurable_fm.models.generation import generate, generate_text
from configurable_fm.models.llama import LlamaConfig

# The module itself (the package `configurable_fm.models` re-exports the function under the same name).
gen_mod = importlib.import_module("configurable_fm.models.generation")

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_position_embeddings=64)
NEW = 7  # new tokens in most tests; prompts (2, 5): shared shapes share compilations




@pytest.fixture(scope="module")
def model():
    return random_llama(CFG, 0)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids_BxT):
    return nnx.merge(graphdef, state)(ids_BxT)


def naive_greedy(model, prompt_BxT, n, buffer=16):
    """Reference without a cache: full causal forward over the whole sequence, argmax of the logits at the
    last filled position, n times. The buffer has a fixed length (one compilation per batch size); causal
    attention keeps the not-yet-filled slots from influencing earlier positions."""
    graphdef, state = nnx.split(model)
    b, t = prompt_BxT.shape
    x = np.zeros((b, max(buffer, t + n)), np.int32)
    x[:, :t] = prompt_BxT
    for i in range(t, t + n):
        x[:, i] = np.argmax(np.asarray(_forward(graphdef, state, jnp.asarray(x)))[:, i - 1], axis=-1)
    return x[:, :t + n]


def test_greedy_equals_naive_argmax_loop(model):
    ids = np.random.RandomState(0).randint(0, CFG.vocab_size, (2, 5))
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    out = generate(model, ids, max_new_tokens=NEW)
    assert out.shape == (2, 5 + NEW) and out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out), naive_greedy(model, ids, NEW))
    after = nnx.state(model, nnx.Param)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_left_padded_rows_equal_their_unpadded_generations(model):
    rs = np.random.RandomState(1)
    prompts = [rs.randint(0, CFG.vocab_size, n) for n in (2, 5, 1)]
    t = max(len(p) for p in prompts)
    ids = rs.randint(0, CFG.vocab_size, (3, t))  # junk in the padding slots: the mask must hide it
    mask = np.zeros((3, t), np.int32)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):], mask[i, t - len(p):] = p, 1
    out = np.asarray(generate(model, ids, attention_mask=mask, max_new_tokens=NEW))
    np.testing.assert_array_equal(out[:, :t], ids)
    single = np.asarray(generate(model, prompts[1][None], max_new_tokens=NEW))  # the unpadded row
    np.testing.assert_array_equal(out[1, t:], single[0, t:])
    for i, p in enumerate(prompts):
        np.testing.assert_array_equal(out[i, t:], naive_greedy(model, p[None], NEW)[0, len(p):], err_msg=f"row {i}")


def test_sampling_is_reproducible_and_top_k_1_is_greedy(model):
    ids = np.random.RandomState(2).randint(0, CFG.vocab_size, (2, 5))
    kw = dict(max_new_tokens=NEW, temperature=2.0)
    a = generate(model, ids, rng=jax.random.key(7), **kw)
    b = generate(model, ids, rng=jax.random.key(7), **kw)
    c = generate(model, ids, rng=jax.random.key(8), **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = generate(model, ids, max_new_tokens=NEW)
    np.testing.assert_array_equal(generate(model, ids, rng=jax.random.key(3), top_k=1, **kw), greedy)
    # top_p this small keeps only the most probable token.
    np.testing.assert_array_equal(generate(model, ids, rng=jax.random.key(4), top_p=1e-6, **kw), greedy)


def _samples(logits, n=4000, temperature=1.0, top_k=10**6, top_p=1.0):
    logits_NxV = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
    return np.asarray(_choose(logits_NxV, jax.random.key(0), jnp.float32(temperature), jnp.int32(top_k),
                              jnp.float32(top_p)))


_choose = jax.jit(functools.partial(gen_mod.choose_tokens, greedy=False))


def test_top_k_and_top_p_filters_on_known_distribution():
    probs = np.array([0.1, 0.4, 0.05, 0.3, 0.15])
    logits = np.log(probs)
    # top_k=2 keeps tokens 1 and 3, renormalised: 0.4/0.7 and 0.3/0.7.
    s = _samples(logits, top_k=2)
    assert set(np.unique(s)) == {1, 3}
    assert abs(np.mean(s == 1) - 4 / 7) < 0.03  # ~4 standard errors at n=4000
    # top_p=0.75: mass above tokens 1, 3, 4, 0 is 0, 0.4, 0.7, 0.85 -> keep {1, 3, 4}.
    s = _samples(logits, top_p=0.75)
    assert set(np.unique(s)) == {1, 3, 4}
    assert abs(np.mean(s == 4) - 0.15 / 0.85) < 0.03
    # Temperature 0.5 squares the probabilities: p ~ probs**2.
    s = _samples(logits, temperature=0.5)
    sq = probs ** 2 / np.sum(probs ** 2)
    np.testing.assert_allclose(np.bincount(s, minlength=5) / len(s), sq, atol=0.03)


def test_eos_stops_each_row_and_pads(model):
    ids = np.random.RandomState(3).randint(0, CFG.vocab_size, (2, 5))
    ref = np.asarray(generate(model, ids, max_new_tokens=NEW))[:, 5:]
    eos = int(ref[0, 2])  # row 0 emits it at step <= 2
    out = np.asarray(generate(model, ids, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=-1))[:, 5:]
    for row in range(2):
        hits = np.flatnonzero(ref[row] == eos)
        stop = hits[0] + 1 if len(hits) else NEW
        np.testing.assert_array_equal(out[row, :stop], ref[row, :stop])
        assert np.all(out[row, stop:] == -1), f"row {row}: {out[row]}"
    # Several eos ids; every row stops at its first token: the loop exits early, the shape stays full.
    firsts = [int(t) for t in ref[:, 0]]
    out = np.asarray(generate(model, ids, max_new_tokens=NEW, eos_token_id=firsts, pad_token_id=-1))
    assert out.shape == (2, 5 + NEW)
    np.testing.assert_array_equal(out[:, 5], ref[:, 0])
    assert np.all(out[:, 6:] == -1)


def test_generator_splits_once_and_keeps_its_weights(model):
    """Generator(model) equals generate(model, ...); it holds the weights of the model it was made from."""
    ids = np.random.RandomState(3).randint(0, CFG.vocab_size, (2, 5))
    gen = gen_mod.Generator(model)
    np.testing.assert_array_equal(gen(ids, max_new_tokens=NEW), generate(model, ids, max_new_tokens=NEW))
    kw = dict(max_new_tokens=NEW, temperature=1.5, rng=jax.random.key(2))
    np.testing.assert_array_equal(gen(ids, **kw), generate(model, ids, **kw))
    graphdef, state = nnx.split(model)
    other = nnx.merge(graphdef, jax.tree.map(lambda x: x * 1.5, state))
    assert not np.array_equal(gen_mod.Generator(other)(ids, max_new_tokens=NEW), gen(ids, max_new_tokens=NEW))


def test_compiled_once_per_structure_and_shape(model):
    ids = np.random.RandomState(5).randint(0, CFG.vocab_size, (2, 5))
    generate(model, ids, max_new_tokens=NEW)
    size = gen_mod._generate._cache_size()
    graphdef, state = nnx.split(model)
    other = nnx.merge(graphdef, jax.tree.map(lambda x: x * 1.5, state))  # other weights, same graph
    assert not np.array_equal(generate(other, ids, max_new_tokens=NEW), generate(model, ids, max_new_tokens=NEW))
    generate(other, ids, max_new_tokens=NEW, eos_token_id=[1, 2, 3])  # up to 8 eos ids: same program
    assert gen_mod._generate._cache_size() == size
    kw = dict(max_new_tokens=NEW, temperature=0.7, rng=jax.random.key(0))
    generate(model, ids, **kw)
    size = gen_mod._generate._cache_size()
    generate(model, ids, top_k=65, top_p=0.5, **kw)  # top_k 65..128 ranks 128 candidates: one more program
    assert gen_mod._generate._cache_size() == size + 1
    generate(model, ids, top_k=100, top_p=0.9, **kw)  # top_k and top_p are traced within the bucket
    generate(model, ids, top_k=128, **kw)
    assert gen_mod._generate._cache_size() == size + 1


@functools.cache
def _choose_among(candidates, group):
    """choose_tokens ranking `candidates` logits, jitted once per (candidates, group): the cases of one bucket share
    its programs (top_k and top_p are traced)."""
    return jax.jit(functools.partial(gen_mod.choose_tokens, greedy=False, candidates=candidates, group=group))


@pytest.mark.parametrize("top_k,top_p", [(1, 1.0), (5, 1.0), (50, 0.9), (64, 0.3), (100, 0.95), (None, 0.8),
                                         (None, 1.0), (3000, 0.99)])
def test_ranking_only_the_candidates_draws_the_full_sorts_tokens(top_k, top_p):
    """The static candidate count (top_k's bucket, or none) keeps the same set as ranking the whole row, so the
    same key draws the same token, ties with the k-th logit included (quantised logits make many ties)."""
    rng = np.random.RandomState(top_k or 0)
    logits = rng.randn(32, 1000).astype(np.float32) * 3
    logits[:16] = np.round(logits[:16] * 2) / 2  # rows with many ties
    key = jax.random.key(11)
    full = _choose(jnp.asarray(logits), key, jnp.float32(0.9), jnp.int32(top_k or 10**6), jnp.float32(top_p))
    c = gen_mod.sampling_candidates(top_k, top_p)
    assert c == (0 if (top_k, top_p) == (None, 1.0) else gen_mod.RANK_ALL if top_k is None
                 else 64 if top_k <= 64 else 128 if top_k == 100 else 4096)
    for group in (0, 8):  # one lax.top_k; through the maxima of groups of 8 logits (top_values)
        ours = _choose_among(c, group)(jnp.asarray(logits), key, jnp.float32(0.9), jnp.int32(top_k or 10**6),
                                       jnp.float32(top_p))
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(full))


@pytest.mark.parametrize("v,c,group", [(1000, 64, 8), (1001, 5, 7), (777, 16, 16), (300, 64, 2), (50, 5, 3),
                                       (5000, 64, 0)])
def test_top_values_equals_one_top_k(v, c, group):
    """Ranking through group maxima (the c groups of largest max, then their top c) gives lax.top_k's values
    exactly: ties across groups at the c-th max, -inf rows and halves, a last group padded with -inf, and the
    one-stage fallbacks (n <= c groups, c * group >= V, group 0)."""
    rng = np.random.RandomState(v + c)
    z = np.round(rng.randn(3, 2, v) * 4) / 4  # many ties
    z[0, 0, : v // 2] = -np.inf
    z[1, 1] = -np.inf
    z = jnp.asarray(z.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(gen_mod.top_values(z, c, group)),
                                  np.asarray(jax.lax.top_k(z, c)[0]))


def test_greedy_equals_transformers_generate(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from configurable_fm.models import from_hf

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      initializer_range=0.1)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = from_hf(tmp_path / "hf")
    rs = np.random.RandomState(4)
    ids = rs.randint(1, 96, (2, 7))  # no pad id 0 (transformers would infer a mask from it)
    padded, mask = ids.copy(), np.ones_like(ids)
    padded[1, :3], mask[1, :3] = 0, 0  # row 1 left-padded
    n = 8
    for x, m in ((ids, None), (padded, mask)):
        kw = {} if m is None else {"attention_mask": torch.tensor(m)}
        with torch.no_grad():
            ref = hf.generate(torch.tensor(x), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                              eos_token_id=None, pad_token_id=0, **kw).numpy()
        out = generate(ours, x, max_new_tokens=n, attention_mask=m)
        np.testing.assert_array_equal(np.asarray(out), ref, err_msg=f"mask={m}")


def test_gpt2_left_padded_greedy_equals_naive_loop():
    """Any causal LM with Llama's interface works; GPT-2's learned positions follow cumsum(mask) - 1."""
    gpt2 = pytest.importorskip("configurable_fm.models.gpt2")
    cfg = gpt2.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    abstract = nnx.eval_shape(lambda: gpt2.GPT2(cfg, rngs=nnx.Rngs(0)))
    rs = np.random.RandomState(6)
    model = with_params(abstract, {k: jnp.asarray(rs.normal(1.0 if "ln" in k and "weight" in k else 0.0, 0.1, v.shape),
                                                  jnp.float32) for k, v in flat_state(abstract).items()})
    prompts = [rs.randint(0, 64, 5), rs.randint(0, 64, 2)]
    ids, mask = np.stack([prompts[0], np.r_[[7, 7, 7], prompts[1]]]), np.array([[1] * 5, [0, 0, 0, 1, 1]])
    out = np.asarray(generate(model, ids, attention_mask=mask, max_new_tokens=NEW))
    for i, p in enumerate(prompts):
        np.testing.assert_array_equal(out[i, 5:], naive_greedy(model, p[None], NEW)[0, len(p):], err_msg=f"row {i}")


class NoCache(nnx.Module):
    def __call__(self, ids):
        return ids


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=-1), "max_new_tokens must be an int >= 0"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an int >= 0"),
    (dict(max_new_tokens=2, temperature=-0.5), "temperature must be >= 0"),
    (dict(max_new_tokens=2, temperature=1.0), "needs an explicit rng key"),
    (dict(max_new_tokens=2, temperature=1.0, rng=0), "rng must be one jax.random key"),
    (dict(max_new_tokens=2, temperature=1.0, rng=jax.random.split(jax.random.key(0))), "rng must be one"),
    (dict(max_new_tokens=2, top_k=5), "only apply when sampling"),
    (dict(max_new_tokens=2, top_p=0.9), "only apply when sampling"),
    (dict(max_new_tokens=2, temperature=1.0, rng=jax.random.key(0), top_k=0), "top_k must be an int >= 1"),
    (dict(max_new_tokens=2, temperature=1.0, rng=jax.random.key(0), top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=2, temperature=1.0, rng=jax.random.key(0), top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=2, attention_mask=np.ones((2, 3))), r"attention_mask has shape \(2, 3\)"),
    (dict(max_new_tokens=2, attention_mask=np.array([[1, 1, 1, 0], [1, 1, 1, 1]])), r"rows \[0\] end in padding"),
    (dict(max_new_tokens=2, attention_mask=np.array([[1, 1, 1, 1], [0, 1, 0, 1]])), r"rows \[1\] have padding"),
    (dict(max_new_tokens=2, eos_token_id="2"), "eos_token_id must be an int"),
])
def test_bad_arguments_raise_clear_errors(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(model, np.zeros((2, 4), np.int32), **kwargs)


def test_bad_inputs_raise_clear_errors(model):
    with pytest.raises(ValueError, match=r"non-empty \(batch, time\) integer array"):
        generate(model, np.zeros((4,), np.int32), max_new_tokens=1)
    with pytest.raises(ValueError, match="integer array"):
        generate(model, np.zeros((1, 4), np.float32), max_new_tokens=1)
    with pytest.raises(TypeError, match="NoCache has none"):
        generate(NoCache(), np.zeros((1, 4), np.int32), max_new_tokens=1)


def test_zero_new_tokens_returns_the_prompt(model):
    ids = np.arange(6).reshape(2, 3)
    np.testing.assert_array_equal(generate(model, ids, max_new_tokens=0), ids)


def test_generating_past_the_trained_context_warns(model):
    """A rotary model generating past max_position_embeddings (64) warns, as transformers does; up to it, silence.
    Traced with eval_shape: the checks run, nothing compiles."""
    import warnings

    ids = np.zeros((2, 5), np.int32)
    with pytest.warns(UserWarning, match="5 prompt \\+ 60 new tokens run past the model's max_position_embeddings=64"):
        jax.eval_shape(lambda: generate(model, ids, max_new_tokens=60))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.eval_shape(lambda: generate(model, ids, max_new_tokens=59))


# =========================================================================== generate_text: text in, text out
def text_setup():
    """(model with a 100-token vocabulary, ChatTokenizer of single characters with a chat template)."""
    from configurable_fm.interop.tokenizers import ChatTokenizer

    tok = char_tokenizer()
    template = "{% for m in messages %}<bos>{{ m.role }}:{{ m.content }}<eos>{% endfor %}" \
               "{% if add_generation_prompt %}<bos>assistant:{% endif %}"
    chat = ChatTokenizer(tok, {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>"}, template)
    return random_llama(dataclasses.replace(CFG, vocab_size=100), 4), chat


@pytest.fixture(scope="module")
def text_model():
    return text_setup()


def continuation(model, ids, n=NEW):
    return np.asarray(generate(model, np.asarray([ids]), max_new_tokens=n))[0, len(ids):].tolist()


def test_generate_text_applies_the_chat_template_and_stops_at_eos(text_model):
    model, chat = text_model
    ids = chat.encode("<bos>user:Hi<eos><bos>assistant:", add_special_tokens=False).ids
    free = continuation(model, ids)
    assert generate_text(model, chat, "Hi", max_new_tokens=NEW) == chat.decode(free)  # chat=None: the template
    assert generate_text(model, chat, [{"role": "user", "content": "Hi"}], max_new_tokens=NEW) == chat.decode(free)
    # The tokenizer's stop ids end the text (the stop token excluded); an explicit eos_token_id overrides them.
    stop = free[-1]  # here first emitted at the last step
    first = free.index(stop)
    stopping = dataclasses.replace(chat, eos_token_ids=(stop,))
    assert generate_text(model, stopping, "Hi", max_new_tokens=NEW) == chat.decode(free[:first])
    assert generate_text(model, chat, "Hi", max_new_tokens=NEW, eos_token_id=stop) == chat.decode(free[:first])
    assert generate_text(model, stopping, "Hi", max_new_tokens=NEW, eos_token_id=()) == chat.decode(free)


def test_generate_text_plain_and_batched(text_model):
    model, chat = text_model
    prompts = ["The cat", "A much longer prompt"]
    singles = [generate_text(model, chat, p, max_new_tokens=NEW, chat=False) for p in prompts]
    assert singles[0] == chat.decode(continuation(model, chat.encode("The cat").ids))
    assert generate_text(model, chat, prompts, max_new_tokens=NEW, chat=False) == singles  # left-padded batch
    convs = [[{"role": "user", "content": p}] for p in prompts]  # a batch of conversations; strings: user turns
    assert generate_text(model, chat, convs, max_new_tokens=NEW) == generate_text(model, chat, prompts,
                                                                                    max_new_tokens=NEW)
    # A plain tokenizers.Tokenizer: text prompts only, no eos unless given.
    assert generate_text(model, chat.tokenizer, "The cat", max_new_tokens=NEW) == singles[0]


def test_generate_text_errors(text_model):
    model, chat = text_model
    with pytest.raises(ValueError, match="chat prompts need a tokenizer with a chat template"):
        generate_text(model, chat.tokenizer, "Hi", max_new_tokens=2, chat=True)
    with pytest.raises(ValueError, match="chat prompts need a tokenizer with a chat template"):
        generate_text(model, chat.tokenizer, [{"role": "user", "content": "Hi"}], max_new_tokens=2)
    with pytest.raises(ValueError, match="a conversation prompt needs chat=True"):
        generate_text(model, chat, [{"role": "user", "content": "Hi"}], max_new_tokens=2, chat=False)
    with pytest.raises(ValueError, match="a prompt is a string or a list of"):
        generate_text(model, chat, [3], max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one prompt"):
        generate_text(model, chat, [], max_new_tokens=2)


# ======================================================================= streaming: tokens and text as made
@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_stream_yields_the_calls_tokens_in_chunks(model, chunk):
    ids = np.random.RandomState(3).randint(0, CFG.vocab_size, (2, 5))
    gen = gen_mod.Generator(model)
    for kw in (dict(), dict(temperature=1.3, top_k=20, rng=jax.random.key(4))):  # greedy; sampling, same draws
        want = np.asarray(gen(ids, max_new_tokens=NEW, **kw))[:, 5:]
        pieces = list(gen.stream(ids, max_new_tokens=NEW, chunk=chunk, **kw))
        ends = sorted({1, NEW} | set(range(chunk, NEW, chunk)))  # pieces end at 1, multiples of chunk, NEW
        assert [p.shape[1] for p in pieces] == np.diff([0] + ends).tolist()
        np.testing.assert_array_equal(np.concatenate(pieces, axis=1), want)
    # every row at its eos: the stream ends there (the call's rest is padding)
    firsts = [int(t) for t in np.asarray(gen(ids, max_new_tokens=NEW))[:, 5]]  # greedy first tokens (its program)
    pieces = list(gen.stream(ids, max_new_tokens=NEW, chunk=chunk, eos_token_id=firsts, pad_token_id=-1))
    assert len(pieces) == 1 and pieces[0].tolist() == [[t] for t in firsts]
    assert list(gen.stream(ids, max_new_tokens=0)) == []
    it = gen.stream(ids, max_new_tokens=NEW, chunk=chunk)  # a reader that stops early: the stream is dropped
    assert next(it).shape == (2, 1)
    it.close()
    assert not gen_mod._STREAMS
    with pytest.raises(ValueError, match="chunk must be an int >= 1"):
        next(gen.stream(ids, max_new_tokens=NEW, chunk=0))


def test_stream_text_joins_to_generate_text(text_model):
    model, chat = text_model
    free = generate_text(model, chat, "Hi", max_new_tokens=NEW)
    pieces = list(gen_mod.stream_text(model, chat, "Hi", max_new_tokens=NEW, chunk=2))
    assert "".join(pieces) == free and len(pieces) > 1
    ids = chat.encode("<bos>user:Hi<eos><bos>assistant:", add_special_tokens=False).ids
    stop = continuation(model, ids)[2]
    stopped = generate_text(model, chat, "Hi", max_new_tokens=NEW, eos_token_id=stop)
    assert "".join(gen_mod.stream_text(model, chat, "Hi", max_new_tokens=NEW, eos_token_id=stop, chunk=3)) == stopped
    with pytest.raises(ValueError, match="stream_text takes one prompt"):
        next(gen_mod.stream_text(model, chat, ["a", "b"], max_new_tokens=2))


def test_stop_strings_end_the_text_before_them(text_model):
    model, chat = text_model
    free = generate_text(model, chat, "Hi", max_new_tokens=NEW)
    stop = free[-2:]  # with this model '@Y@Y@Y&': the text ends before 'Y&'
    want = free[:free.find(stop)]
    assert want and want != free, free
    assert generate_text(model, chat, "Hi", max_new_tokens=NEW, stop=stop) == want
    other = free[1:3]  # found before `stop`: the earliest occurrence of any of them wins
    assert generate_text(model, chat, "Hi", max_new_tokens=NEW, stop=[stop, other]) == free[:free.find(other)]
    assert generate_text(model, chat, "Hi", max_new_tokens=NEW, stop="\u2603") == free  # never occurs
    batch = generate_text(model, chat, ["Hi", "Hi"], max_new_tokens=NEW, stop=(stop,))
    assert batch == [want, want]
    for chunk in (1, 2, 5):
        pieces = list(gen_mod.stream_text(model, chat, "Hi", max_new_tokens=NEW, chunk=chunk, stop=stop))
        assert "".join(pieces) == want, chunk
        # An end that begins a stop string is held back until it is known not to complete it, then released.
        tail = free[-1] + "\u2603"
        pieces = list(gen_mod.stream_text(model, chat, "Hi", max_new_tokens=NEW, chunk=chunk, stop=tail))
        assert "".join(pieces) == free, chunk
    assert not gen_mod._STREAMS  # the stream that a stop string left early is dropped
    for bad in ("", [""], 3, ["a", None]):
        with pytest.raises(ValueError, match="stop must be a non-empty string"):
            generate_text(model, chat, "Hi", max_new_tokens=2, stop=bad)
        with pytest.raises(ValueError, match="stop must be a non-empty string"):
            next(gen_mod.stream_text(model, chat, "Hi", max_new_tokens=2, stop=bad))


# ======================================================= cache windows: the decode loop reads the filled part
def test_cache_windows_give_the_whole_caches_tokens(model, window=2):
    """Generator(cache_window=w): loops over the windows T + w, T + 2w, ... of the cache (each step attends over
    the slots below its window's end) give the tokens of one loop over the whole cache: greedy, sampling, left
    padding and eos, streamed too."""
    ids = np.random.RandomState(3).randint(0, CFG.vocab_size, (2, 5))
    mask = np.ones((2, 5), np.int32)
    mask[1, :2] = 0
    whole, windowed = gen_mod.Generator(model, cache_window=0), gen_mod.Generator(model, cache_window=window)
    ref = np.asarray(whole(ids, max_new_tokens=NEW))
    for kw in (dict(), dict(attention_mask=mask), dict(temperature=1.2, rng=jax.random.key(1)),
               dict(eos_token_id=int(ref[0, 7]), pad_token_id=-1)):
        want = np.asarray(whole(ids, max_new_tokens=NEW, **kw))
        np.testing.assert_array_equal(np.asarray(windowed(ids, max_new_tokens=NEW, **kw)), want)
        if "rng" in kw:  # streamed: the greedy program (sampling: test_stream_yields_the_calls_tokens_in_chunks)
            continue
        streamed = np.concatenate(list(windowed.stream(ids, max_new_tokens=NEW, chunk=3, **kw)), axis=1)
        np.testing.assert_array_equal(streamed, want[:, 5:5 + streamed.shape[1]])
    # a model that puts virtual tokens before the prompt (prompt tuning: 3 more slots ahead of the prompt's)
    from configurable_fm.bricks import adapters
    tuned = adapters.attach_virtual_tokens(model, "prompt", 3, seed=1)
    np.testing.assert_array_equal(np.asarray(gen_mod.Generator(tuned, cache_window=window)(ids, max_new_tokens=NEW)),
                                  np.asarray(gen_mod.Generator(tuned, cache_window=0)(ids, max_new_tokens=NEW)))
    run = gen_mod._Decoding.__new__(gen_mod._Decoding)
    for run.window, ends in ((window, [7, 9, 12]), (1, [6, 7, 9, 12]), (5, [10, 12]), (7, [12]), (0, [12])):
        assert run.windows(5, 5 + NEW) == ends
    with pytest.raises(ValueError, match="cache_window must be an int >= 0"):
        gen_mod.Generator(model, cache_window=-1)


# ============================================================ ids outside the vocabulary; the cache's last slot
def test_padding_ids_outside_the_vocabulary_are_ignored(model):
    """Padding slots are masked whatever they hold: ids past the embedding table (a tokenizer's pad id beyond the
    model's vocabulary) give the tokens of in-range padding (an out-of-range lookup reads NaN, and masked attention
    weights of 0 times NaN values would poison the row)."""
    ids = np.random.RandomState(7).randint(0, CFG.vocab_size, (2, 5))
    mask = np.ones((2, 5), np.int32)
    mask[1, :2] = 0
    want = np.asarray(generate(model, ids, attention_mask=mask, max_new_tokens=NEW))
    for junk in (CFG.vocab_size, -1000):
        padded = ids.copy()
        padded[1, :2] = junk
        out = np.asarray(generate(model, padded, attention_mask=mask, max_new_tokens=NEW))
        np.testing.assert_array_equal(out[:, 5:], want[:, 5:], err_msg=f"padding id {junk}")


def test_prompt_ids_outside_the_vocabulary_raise(model):
    ids = np.zeros((2, 4), np.int32)
    for bad in (CFG.vocab_size, -1):
        ids[1, 2] = bad
        with pytest.raises(ValueError, match=rf"ids_BxT holds token ids outside the vocabulary \[0, 64\): \[{bad}\]"):
            generate(model, ids, max_new_tokens=2)


def test_pad_token_id_must_be_an_int(model):
    with pytest.raises(ValueError, match="pad_token_id must be an int"):
        generate(model, np.zeros((2, 4), np.int32), max_new_tokens=2, eos_token_id=1, pad_token_id=None)
