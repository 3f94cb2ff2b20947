"""A tiny world for the editing tests: a synthetic facts corpus, a word-level tokenizer (a word keeps its leading
space, as BPE tokenizers do), and tiny llama / gpt2 models trained on the facts in a few hundred steps."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from configurable_fm.bricks.paths import flat_state, with_params
from configurable_fm.data.synthetic import FactsCorpus
from configurable_fm.data.synthetic.facts import SUBJECT_FINAL_RELATIONS
from configurable_fm.models.factory import build_model

PAD, EOS, UNK = 0, 1, 2
WORD = r" ?[A-Za-z]+|[^A-Za-z ]| "
EXTRA_TEXT = "The Therefore Because I You is a . the"
LLAMA = dict(family="llama", hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4, num_kv_heads=2,
             max_position_embeddings=64)
GPT2 = dict(family="gpt2", n_embd=64, n_inner=128, n_layer=3, n_head=4, n_positions=64)


# Subject-final queries (the object follows the subject's last token): the first two relations of
# data.synthetic.facts.SUBJECT_FINAL_RELATIONS.
RELATIONS = SUBJECT_FINAL_RELATIONS[:2]


def corpus(n_entities=16):
    return FactsCorpus.generate(seed=0, n_entities=n_entities, relations=RELATIONS)


def word_tokenizer(texts, whole=()):
    """Word-level: ' word' (with its space), punctuation, ' '; the strings `whole` are single tokens."""
    pattern = "|".join([f" ?{re.escape(w)}" for w in sorted(whole, key=len, reverse=True)] + [WORD])
    words = sorted({w for t in texts for w in re.findall(pattern, t)})
    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": UNK} | {w: i + 3 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<pad>", "<eos>", "<unk>"])
    return tok


def all_texts(c):
    texts = c.training_texts()
    texts += [q.prompt for q in c.queries("paraphrase")]
    texts += [" " + o for r in c.relations for o in r.objects]
    texts += [EXTRA_TEXT, " " + EXTRA_TEXT] + EXTRA_TEXT.split()  # each word also at the start of a text
    texts += [" " + e for e in c.entities] + [f"{e} is a" for e in c.entities]
    return texts


def rows(tok, texts, seq_len):
    ids = np.full((len(texts), seq_len + 1), PAD, np.int32)
    mask = np.zeros((len(texts), seq_len), np.float32)
    for i, t in enumerate(texts):
        x = (tok.encode(t, add_special_tokens=False).ids + [EOS])[:seq_len + 1]
        ids[i, :len(x)] = x
        mask[i, :len(x) - 1] = 1
    return ids, mask


def random_model(spec, vocab, seed):
    spec = dict(spec, vocab_size=vocab)
    abstract = nnx.eval_shape(lambda: build_model(spec, seed=0))
    rs = np.random.RandomState(seed)
    return with_params(abstract, {k: jnp.asarray(rs.normal(1.0, 0.0, v.shape) if k.endswith("norm.weight")
                                                 or ".ln_" in k and k.endswith("weight") else
                                                 (np.zeros(v.shape) if k.endswith("bias") else
                                                  rs.normal(0.0, 0.05, v.shape)), jnp.float32)
                                  for k, v in flat_state(abstract).items()})


def train(model, tok, texts, *, steps=300, batch=64, seq_len=16, lr=1e-2, seed=0):
    """Next-token training on the texts (one sentence per row), Adam with cosine decay; returns the model."""
    ids, mask = rows(tok, texts, seq_len)
    graphdef, state = nnx.split(model)
    opt = optax.adamw(optax.cosine_decay_schedule(lr, steps, 0.05), weight_decay=0.0)

    def loss_fn(state, x, m):
        logits = nnx.merge(graphdef, state)(x[:, :-1])
        lp = jax.nn.log_softmax(logits.astype(jnp.float32))
        nll = -jnp.take_along_axis(lp, x[:, 1:, None], axis=-1)[..., 0]
        return (nll * m).sum() / m.sum()

    @jax.jit
    def step(state, opt_state, x, m):
        loss, g = jax.value_and_grad(loss_fn)(state, x, m)
        updates, opt_state = opt.update(g, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    opt_state = opt.init(state)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(texts), batch)
        state, opt_state, loss = step(state, opt_state, jnp.asarray(ids[idx]), jnp.asarray(mask[idx]))
    return nnx.merge(graphdef, state), float(loss)


@functools.lru_cache(maxsize=None)
def trained_world(n_entities: int = 16):
    """(corpus, tokenizer, model): a 2-layer llama trained 200 steps (batch 32) on the facts of corpus(n_entities).
    Cached per process: the test modules that share it train it once (models are not modified by edits)."""
    c = corpus(n_entities)
    tok = word_tokenizer(all_texts(c))
    model, _ = train(random_model(dict(LLAMA, num_layers=2), tok.get_vocab_size(), 0), tok, c.training_texts(),
                     steps=200, batch=32)
    return c, tok, model


@functools.partial(jax.jit, static_argnames="graphdef")
def _probs(state, ids, last, *, graphdef):
    logits = nnx.merge(graphdef, state)(ids)
    return jax.nn.softmax(logits[jnp.arange(ids.shape[0]), last].astype(jnp.float32), -1)


def next_token_probs(model, tok, prompts):
    """(N, V) next-token probabilities after each prompt (right-padded batch, read at each prompt's end; jitted,
    shapes padded to 16 tokens and a multiple of 64 rows so that calls share one compilation)."""
    enc = [tok.encode(p, add_special_tokens=False).ids for p in prompts]
    t = max(16, max(len(e) for e in enc))
    n = -(-len(enc) // 64) * 64
    ids = np.zeros((n, t), np.int32)
    last = np.zeros((n,), np.int32)
    for i, e in enumerate(enc):
        ids[i, :len(e)] = e
        last[i] = len(e) - 1
    graphdef, state = nnx.split(model)
    return np.asarray(_probs(state, jnp.asarray(ids), jnp.asarray(last), graphdef=graphdef))[:len(enc)]


def token_id(tok, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(ids) == 1, (text, ids)
    return ids[0]


def corpus_batches(tok, texts, batch=32, seq_len=16):
    ids, mask = rows(tok, texts, seq_len)
    return [{"inputs": ids[i:i + batch, :-1], "attention_mask": mask[i:i + batch]}
            for i in range(0, len(texts), batch)]
