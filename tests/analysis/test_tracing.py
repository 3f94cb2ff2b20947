"""Causal tracing (analysis/tracing.py) on tiny random llama and gpt2 models: no noise gives no effect, restoring
the last residual state restores p_clean, the grids, cells checked against forwards run by hand with the
interventions, batching, layer suggestions, text prompts and the plot."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configurable_fm.analysis import add, capture, intervene, patch_from
from configurable_fm.analysis.tracing import (
    Trace, causal_trace, plot_trace, subject_embedding_std, suggest_layers, trace_fact, window_layers)
from tests.analysis.tiny import BERT, GPT2, LLAMA, random_model
from tests.ops.update.world import word_tokenizer

IDS = [5, 9, 3, 17, 8, 11]  # subject: tokens 1 and 2
SUBJECT = (1, 3)
POINTS = {"llama": ("embed_tokens.output", "layers.{}.output", "layers.{}.mlp.output", "layers.{}.self_attn.output"),
          "gpt2": ("wte.output", "h.{}.output", "h.{}.mlp.output", "h.{}.attn.output")}


@pytest.fixture(scope="module")
def models():
    return {"llama": random_model(LLAMA, 1), "gpt2": random_model(GPT2, 1)}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def family(request, models):
    return request.param, models[request.param]


@pytest.fixture(scope="module")
def traced(family):
    name, model = family
    return name, model, causal_trace(model, IDS, SUBJECT, samples=3, noise=8.0, window=2, key=jax.random.key(1))


def last_probs(model, ids_BxT):
    return np.asarray(jax.nn.softmax(model(jnp.asarray(ids_BxT))[:, -1].astype(jnp.float32), -1), np.float64)


def test_grids_probabilities_and_labels(traced):
    name, model, r = traced
    n = len(model.layers if name == "llama" else model.h)
    assert r.kinds == ("residual", "mlp", "attn")
    assert all(g.shape == (len(IDS), n) for g in r.p_restored.values())
    assert all(e.shape == (len(IDS), n) for e in r.effects.values())
    assert r.tokens == tuple(str(i) for i in IDS) and r.subject == SUBJECT and r.last_subject == 2
    assert r.noise.shape == (3, 2, 16)
    probs = last_probs(model, [IDS])[0]
    assert r.target_id == int(np.argmax(probs))  # default target: the model's own prediction
    np.testing.assert_allclose(r.p_clean, probs[r.target_id], rtol=1e-5)
    assert abs(r.total_effect) > 1e-3  # the noise matters, so the checks below mean something
    for g in r.p_restored.values():  # before the subject nothing changes: restoring there does nothing
        assert np.all(g[:SUBJECT[0]] == r.p_corrupted)
    assert r.summary().count("at the last subject token '3'") == 3
    assert repr(r).startswith("Trace('59317811', subject=(1, 3)")


def test_no_noise_no_effect(family):
    _, model = family
    r = causal_trace(model, IDS, SUBJECT, samples=3, noise=0.0, window=2)  # the shapes of `traced`: no recompile
    np.testing.assert_allclose(r.p_corrupted, r.p_clean, atol=1e-6)
    for e in r.effects.values():
        np.testing.assert_allclose(e, 0.0, atol=1e-6)


def test_restoring_the_last_residual_state_restores_p_clean(traced):
    _, _, r = traced
    np.testing.assert_allclose(r.p_restored["residual"][-1, -1], r.p_clean, atol=1e-6)
    np.testing.assert_allclose(r.effects["residual"][-1, -1], r.total_effect, atol=1e-6)


def test_cells_by_hand(traced):
    """p_corrupted and three cells recomputed one noise draw at a time with intervene and patch_from."""
    name, model, r = traced
    embed, resid, mlp, attn = POINTS[name]
    ids = jnp.asarray([IDS])
    _, clean = capture(model, [embed, resid.format("*"), mlp.format("*"), attn.format("*")], ids)
    emb = np.asarray(clean[embed], np.float64)[0]
    np.testing.assert_allclose(r.noise_std, 8.0 * np.std(emb[1:3]), rtol=1e-5)
    n = r.num_layers

    def p(restore, t):
        out = []
        for z in r.noise:
            noise = np.zeros((1, len(IDS), 16), np.float32)
            noise[0, 1:3] = r.noise_std * z
            fns = {embed: add(noise)} | {point: patch_from(clean, positions=[t]) for point in restore}
            logits = intervene(model, fns, ids)
            out.append(float(jax.nn.softmax(logits[0, -1].astype(jnp.float32))[r.target_id]))
        return np.mean(out)

    np.testing.assert_allclose(r.p_corrupted, p([], 0), atol=1e-6)
    np.testing.assert_allclose(r.p_restored["residual"][2, 0], p([resid.format(0)], 2), atol=1e-6)
    # window 2 around layer 1: layers 0 and 1; around the last layer: [n-2, n)
    assert list(window_layers(1, 2, n)) == [0, 1] and list(window_layers(n - 1, 2, n)) == [n - 2, n - 1]
    assert list(window_layers(0, 10, 3)) == [0, 1, 2] and list(window_layers(2, 3, 30)) == [1, 2, 3]
    np.testing.assert_allclose(r.p_restored["mlp"][2, 1], p([mlp.format(0), mlp.format(1)], 2), atol=1e-6)
    np.testing.assert_allclose(r.p_restored["attn"][4, n - 1], p([attn.format(n - 2), attn.format(n - 1)], 4),
                               atol=1e-6)


def test_batching_does_not_change_results(traced):
    _, model, r = traced
    one = causal_trace(model, IDS, SUBJECT, samples=3, noise=8.0, window=2, key=jax.random.key(1), rows_per_call=3,
                       target=r.target_id)  # one cell per forward instead of all cells in one
    for k in r.kinds:
        np.testing.assert_allclose(one.p_restored[k], r.p_restored[k], atol=1e-6)


def fake_trace(effects_at_last_subject, p_corrupted=0.1):
    e = np.asarray(effects_at_last_subject, np.float64)
    grid = np.full((3, e.size), p_corrupted)
    grid[1] += e
    other = grid.copy()
    other[1] = p_corrupted + e[::-1]
    other[2] = 1.0  # not the last subject token: ignored
    return Trace(tokens=("a", "b", "c"), ids=np.arange(3), subject=(0, 2), target_id=0, target="x", p_clean=0.9,
                 p_corrupted=p_corrupted, p_restored={"mlp": grid, "attn": other}, noise_std=1.0,
                 noise=np.zeros((1, 2, 4)), samples=1, window=2)


def test_suggest_layers():
    r1, r2 = fake_trace([0.1, 0.5, 0.3, 0.0]), fake_trace([0.2, 0.0, 0.35, 0.4])
    assert r1.suggest_layers("mlp") == [1]
    assert r1.suggest_layers("mlp", k=3) == [1, 2, 0]
    assert r1.suggest_layers("attn", k=2) == [2, 1]  # row 1 (the last subject token) only
    assert suggest_layers([r1, r2], "mlp", k=2) == [2, 1]  # means 0.15, 0.25, 0.325, 0.2
    with pytest.raises(ValueError, match="not in this trace"):
        r1.suggest_layers("residual")
    with pytest.raises(ValueError, match="k must be"):
        r1.suggest_layers("mlp", k=0)
    with pytest.raises(ValueError, match="different numbers of layers"):
        suggest_layers([r1, fake_trace([0.1, 0.2])])


def test_trace_fact_locates_subject_and_target(models):
    model = models["llama"]
    tok = word_tokenizer(["The capital of New York is Albany .", " Paris"], whole=("New York",))
    assert tok.get_vocab_size() <= LLAMA["vocab_size"]
    kw = dict(samples=1, kinds=("mlp",), window=2)
    r = trace_fact(model, tok, "The capital of {} is", "New York", target=" Albany", **kw)
    assert r.kinds == ("mlp",)
    assert r.tokens == ("The", " capital", " of", " New York", " is") and r.subject == (3, 4)
    assert r.target_id == tok.token_to_id(" Albany") and r.target == " Albany"
    again = trace_fact(model, tok, "The capital of New York is", "New York", target=tok.token_to_id(" Albany"),
                       bos_id=0, **kw)
    assert again.subject == (4, 5) and again.tokens[0] == "<pad>"

    class ListTokenizer:  # a tokenizer whose encode gives plain ids (no character offsets)
        def encode(self, text, add_special_tokens=False):
            return tok.encode(text, add_special_tokens=False).ids

        def decode(self, ids, skip_special_tokens=False):
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    plain = trace_fact(model, ListTokenizer(), "The capital of {} is", "New York", **kw)
    assert plain.subject == (3, 4)
    emb = np.asarray(model.embed_tokens.embedding[...], np.float64)
    subjects = [" New York", "The", " New York"]
    rows = [i for s in subjects for i in tok.encode(s, add_special_tokens=False).ids]  # every occurrence counts
    assert len(rows) == 3
    std = subject_embedding_std(model, tok, subjects)
    np.testing.assert_allclose(std, np.std(emb[rows]), rtol=1e-5)
    with pytest.raises(ValueError, match="neither"):
        trace_fact(model, tok, "The capital of Paris is", "New York")


def test_bad_input(family):
    _, model = family
    with pytest.raises(ValueError, match="subject token range"):
        causal_trace(model, IDS, (3, 3))
    with pytest.raises(ValueError, match="kinds"):
        causal_trace(model, IDS, SUBJECT, kinds=("mlp", "heads"))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        causal_trace(model, IDS, SUBJECT, target=10_000)
    with pytest.raises(TypeError, match="llama or gpt2"):
        causal_trace(random_model(BERT, 0), IDS, SUBJECT)


def test_bad_ids_counts_and_noise_are_refused(family):
    # ids (2, T) were flattened into one 2T-token prompt, float ids truncated, a NaN noise gave NaN probabilities,
    # samples=2.5 failed inside jax.random
    _, model = family
    two_rows = np.asarray([IDS, IDS])
    for ids in (two_rows, np.asarray(IDS, np.float32) + 0.5, [], [[IDS]]):
        with pytest.raises(ValueError, match=r"token ids of one prompt, integers \(T,\) or \(1, T\)"):
            causal_trace(model, ids, SUBJECT)
    for kwargs in ({"noise": float("nan")}, {"embedding_std": float("inf")}, {"noise": -1.0}):
        with pytest.raises(ValueError, match=f"{next(iter(kwargs))} must be a finite number >= 0"):
            causal_trace(model, IDS, SUBJECT, **kwargs)
    for kwargs in ({"samples": 2.5}, {"window": True}, {"rows_per_call": 0}):
        with pytest.raises(ValueError, match="must be ints >= 1"):
            causal_trace(model, IDS, SUBJECT, **kwargs)


def test_plot_trace(traced):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, _, r = traced
    fig = plot_trace(r)
    axes = [a for a in fig.axes if a.get_title()]
    assert len(axes) == 3
    labels = [t.get_text() for t in axes[0].get_yticklabels()]
    assert labels == ["5", "9*", "3*", "17", "8", "11"]
    fig2, ax = plt.subplots()
    assert plot_trace(r, ax, kind="mlp", effect=True) is fig2
    plt.close("all")
