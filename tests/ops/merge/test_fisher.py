"""Fisher merging (ops/merge/fisher.py): the diagonal Fisher of a tiny llama against a per-example jax.grad loop
written here, the sampled Fisher against its documented key derivation, fisher_merge against hand-computed
values, its errors, and the config route (merge_from_config) against the direct calls."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configurable_fm.bricks.paths import flat_params
from configurable_fm.interop.orbax_io import save_model
from configurable_fm.interop.loader import load_model
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.ops.merge.fisher import diagonal_fisher, fisher_merge
from configurable_fm.stages.merge import merge_config, merge_from_config
from configurable_fm.ops.merge.tree import MergeInputError
from configurable_fm.train.data import make_data
from experiments import finetune
from tests.helpers import random_llama
from tests.train.test_finetune import use_char_tokenizer, write_char_tokenizer

CFG = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2, num_kv_heads=1,
                  max_position_embeddings=32)  # one layer: the per-example-gradient compilations dominate the runtime


def batches():
    """Two batches of 3 rows, L = 5: random loss masks, a row without scored tokens, a padding row (mask 0)."""
    rs = np.random.RandomState(0)
    out = []
    for _ in range(2):
        out.append({"inputs": rs.randint(0, 32, (3, 5)).astype(np.int32),
                    "targets": rs.randint(0, 32, (3, 5)).astype(np.int32),
                    "loss_mask": (rs.rand(3, 5) > 0.3).astype(np.float32)})
    out[0]["loss_mask"][1] = 0.0  # no scored token: not an example
    out[1]["mask"] = np.array([1.0, 1.0, 0.0], np.float32)  # padding row
    return out


@functools.partial(jax.jit, static_argnums=0)
def _reference_grad(graphdef, params, ids, ys, w):
    """grad_params sum_t w_t log softmax(model(ids))[t, ys_t] for one example (L,)."""

    def loglik(p):
        logits = nnx.merge(graphdef, p)(ids[None])[0]
        logp = jax.nn.log_softmax(logits, axis=-1)
        return jnp.sum(w * logp[jnp.arange(len(ys)), ys])

    return jax.grad(loglik)(params)


def reference_fisher(model, batches, targets_of=None):
    """mean over examples of (grad sum_t w_t log p(y_t))^2, one example and one jax.grad at a time."""
    graphdef, params = nnx.split(model, nnx.Param)
    grad = functools.partial(_reference_grad, graphdef)
    total, n = None, 0
    for bi, b in enumerate(batches):
        for r in range(len(b["inputs"])):
            w = b["loss_mask"][r] * (b["mask"][r] if "mask" in b else 1.0)
            if not w.any():
                continue
            ys = b["targets"][r] if targets_of is None else targets_of(bi, r)
            g = flat_params(grad(params, jnp.asarray(b["inputs"][r]), jnp.asarray(ys), jnp.asarray(w)))
            sq = {k: np.asarray(v, np.float64) ** 2 for k, v in g.items()}
            total = sq if total is None else {k: total[k] + sq[k] for k in total}
            n += 1
    return {k: v / n for k, v in total.items()}, n


def assert_close(got, expected, rtol=1e-4):
    assert list(got) == list(expected)
    for k in expected:
        scale = float(np.max(np.abs(expected[k])))
        np.testing.assert_allclose(np.asarray(got[k]), expected[k], rtol=rtol, atol=rtol * scale + 1e-12,
                                   err_msg=k)


@pytest.fixture(scope="module")
def model():
    return random_llama(CFG, 0)


def test_empirical_fisher_matches_per_example_gradients(model):
    expected, n = reference_fisher(model, batches())
    assert n == 4  # 6 rows minus the unscored row and the padding row
    got = diagonal_fisher(model, batches(), chunk=2, progress=False)  # chunk 2 of 3 rows: a zero-weight pad row
    assert list(got) == list(flat_params(model))
    assert all(v.dtype == jnp.float32 and v.shape == flat_params(model)[k].shape for k, v in got.items())
    assert_close(got, expected)  # float32 per-example gradients vs the loop: rtol 1e-4 of each tensor's max
    one = diagonal_fisher(model, batches(), max_batches=1, chunk=2, progress=False)
    assert_close(one, reference_fisher(model, batches()[:1])[0])


def test_sampled_fisher_draws_the_documented_targets(model):
    key = jax.random.key(3)
    bs = batches()

    forward = nnx.jit(lambda m, ids: m(ids))

    def sampled_targets(bi, r):  # module docstring: fold_in(fold_in(key, batch), row), categorical over (L, V)
        logits = forward(model, jnp.asarray(bs[bi]["inputs"][r:r + 1]))[0]
        return jax.random.categorical(jax.random.fold_in(jax.random.fold_in(key, bi), r), logits, axis=-1)

    expected, _ = reference_fisher(model, bs, targets_of=sampled_targets)
    got = diagonal_fisher(model, bs, kind="sampled", key=key, progress=False)
    assert_close(got, expected)
    empirical = diagonal_fisher(model, bs, chunk=2, progress=False)
    assert not np.allclose(np.asarray(got["lm_head.kernel"]), np.asarray(empirical["lm_head.kernel"]))


def test_fisher_errors(model):
    with pytest.raises(ValueError, match="needs a PRNG key"):
        diagonal_fisher(model, batches(), kind="sampled", progress=False)
    with pytest.raises(ValueError, match="kind must be 'empirical' or 'sampled'"):
        diagonal_fisher(model, batches(), kind="exact", progress=False)
    empty = [{**b, "loss_mask": np.zeros_like(b["loss_mask"])} for b in batches()]
    with pytest.raises(ValueError, match="no example with a scored token"):
        diagonal_fisher(model, empty, progress=False)
    with pytest.raises(KeyError, match=r"batch 0 lacks \['targets'\]"):
        diagonal_fisher(model, [{"inputs": np.zeros((1, 3), np.int32)}], progress=False)


# ------------------------------------------------------------------------------------------ fisher_merge
def flat(seed, shapes=(("a.kernel", (3, 4)), ("a.bias", (4,)))):
    rs = np.random.RandomState(seed)
    return {k: jnp.asarray(rs.normal(size=s), jnp.float32) for k, s in shapes}


def test_equal_fishers_give_the_weighted_average():
    a, b = flat(0), flat(1)
    f = {k: jnp.asarray(np.random.RandomState(2).rand(*v.shape) + 0.1, jnp.float32) for k, v in a.items()}
    got = fisher_merge([a, b], [f, f], weights=[1.0, 3.0])
    for k in a:
        np.testing.assert_allclose(got[k], (np.asarray(a[k]) + 3 * np.asarray(b[k])) / 4, rtol=1e-6, atol=1e-6)


def test_a_dominating_fisher_selects_its_model(model):
    other = random_llama(CFG, 1)
    big = {k: jnp.full(v.shape, 1e6, jnp.float32) for k, v in flat_params(model).items()}
    small = {k: jnp.zeros(v.shape, jnp.float32) for k, v in flat_params(model).items()}  # floored to 1e-6
    got = fisher_merge([model, other], [big, small])
    for k, v in flat_params(model).items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
    got = fisher_merge({"x": model, "y": other}, [small, big])
    for k, v in flat_params(other).items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-7, err_msg=k)


def test_fisher_merge_by_hand_floor_and_normalize():
    a, b = {"t": jnp.array([0.0, 2.0, 1.0])}, {"t": jnp.array([4.0, 6.0, 3.0])}
    fa, fb = {"t": jnp.array([1.0, 0.0, 2.0])}, {"t": jnp.array([3.0, 0.0, 2.0])}
    # (1*0 + 3*4) / 4 = 3; both 0 -> floored, equal: (2 + 6) / 2 = 4; (2*1 + 2*3) / 4 = 2
    np.testing.assert_allclose(fisher_merge([a, b], [fa, fb])["t"], [3.0, 4.0, 2.0], rtol=1e-6)
    # normalize: the floored Fa / 3 = [1/3, 1e-6/3, 2/3], Fb / 5 = [3/5, 1e-6/5, 2/5] (the floor on the raw F)
    fa_n, fb_n = np.array([1 / 3, 1e-6 / 3, 2 / 3]), np.array([3 / 5, 1e-6 / 5, 2 / 5])
    expected = (fa_n * [0, 2, 1] + fb_n * [4, 6, 3]) / (fa_n + fb_n)
    np.testing.assert_allclose(fisher_merge([a, b], [fa, fb], normalize=True)["t"], expected, rtol=1e-6)
    # normalize makes a model's Fisher scale irrelevant wherever no entry is floored (the floor is on the raw F)
    np.testing.assert_allclose(fisher_merge([a, b], [{"t": 7 * fa["t"]}, fb], normalize=True)["t"][::2],
                               expected[::2], rtol=1e-6)
    # a weight 0 model does not count
    np.testing.assert_allclose(fisher_merge([a, b], [fa, fb], weights=[0.0, 1.0])["t"], b["t"], rtol=1e-6)
    # the floor is on the raw Fisher: with 1,000 entries a normalised entry is ~1e-3, under a floor of 1e-2, yet
    # each half still takes the model whose Fisher is 1 there (normalising first floored every entry: the average)
    half = np.arange(1000) < 500
    x, y = {"t": jnp.zeros(1000)}, {"t": jnp.ones(1000)}
    fx, fy = {"t": jnp.asarray(half, jnp.float32)}, {"t": jnp.asarray(~half, jnp.float32)}
    got = np.asarray(fisher_merge([x, y], [fx, fy], normalize=True, fisher_floor=1e-2)["t"])
    np.testing.assert_allclose(got, np.where(half, 1e-2 / 1.01, 1 / 1.01), rtol=1e-5)


def test_fisher_merge_errors_name_tensor_and_model():
    a, b = flat(0), flat(1)
    fa = {k: jnp.ones_like(v) for k, v in a.items()}
    with pytest.raises(MergeInputError, match="the Fisher of model_1 lacks a.bias"):
        fisher_merge([a, b], [fa, {"a.kernel": fa["a.kernel"]}])
    with pytest.raises(MergeInputError, match=r"Fisher a.bias of model_0 is \(3,\) but the parameter is \(4,\)"):
        fisher_merge([a, b], [{**fa, "a.bias": jnp.ones(3)}, fa])
    with pytest.raises(MergeInputError, match=r"shape mismatch: a.bias is \(4,\) in model_0, \(5,\) in model_1"):
        fisher_merge([a, {**b, "a.bias": jnp.ones(5)}], [fa, fa])
    with pytest.raises(MergeInputError, match="Fisher of model_1 has tensor.* the models lack: extra"):
        fisher_merge([a, b], [fa, {**fa, "extra": jnp.ones(2)}])
    with pytest.raises(ValueError, match="1 Fishers for 2 models"):
        fisher_merge([a, b], [fa])
    with pytest.raises(ValueError, match="fisher_floor must be a number > 0"):
        fisher_merge([a, b], [fa, fa], fisher_floor=0.0)
    with pytest.raises(ValueError, match="weights must be finite, >= 0 and not all 0"):
        fisher_merge([a, b], [fa, fa], weights=[0.0, 0.0])


# ------------------------------------------------------------------------------------------ config route
@pytest.fixture(scope="module")
def route(tmp_path_factory):
    root = tmp_path_factory.mktemp("fisher_route")
    tok = write_char_tokenizer(root / "tokenizer.json")
    data = use_char_tokenizer(finetune.get_config("parity,runlocal"), tok)
    data.seq_len = 24
    data.data.update(train_examples=8, eval_examples=4, eval_batch_size=4)
    cfg = LlamaConfig(vocab_size=128, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2,
                      num_kv_heads=1, max_position_embeddings=32)
    paths = [str(save_model(random_llama(cfg, s), root / f"m{s}")) for s in (1, 2)]
    return data, paths


def test_config_route_equals_direct_fisher_merge(route):
    data, paths = route
    cfg = merge_config("fisher", paths, parameters={"kind": "sampled", "split": "eval", "normalize": True},
                       model_parameters=[{"weight": 2.0}, {}], seed=5, data=data)
    got = flat_params(merge_from_config(cfg))
    models = [load_model(p) for p in paths]
    d = make_data(data)
    fishers = [diagonal_fisher(m, d.eval_batches(), kind="sampled", key=jax.random.fold_in(jax.random.key(5), i),
                               progress=False) for i, m in enumerate(models)]
    expected = fisher_merge(models, fishers, weights=[2.0, 1.0], normalize=True)
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-6, atol=1e-7, err_msg=k)
    a = flat_params(models[0])
    assert not all(np.allclose(v, a[k]) for k, v in got.items())


@pytest.mark.parametrize("method,change,message", [
    ("fisher", dict(), "needs `data`, a make_data config"),
    ("fisher", dict(parameters={"alpha": 0.5}), r"unknown parameter\(s\) \['alpha'\]"),
    ("fisher", dict(base="/nonexistent/base"), "`base` must be ''"),
    ("fisher", dict(parameters={"kind": "exact"}), "parameters.kind must be 'empirical' or 'sampled'"),
    ("regmean", dict(parameters={"alpha": 1.5}), r"parameters.alpha must be a number in \[0.0, 1.0\]"),
    ("regmean", dict(model_parameters=({"density": 1.0}, {})), r"model_parameters\[0\] .* unknown key"),
    ("ties", dict(), "`data` applies to the data-dependent methods"),
])
def test_bad_data_method_configs(route, method, change, message):
    data, _ = route
    kw = dict(base=change.pop("base", ""), parameters=change.pop("parameters", None),
              model_parameters=change.pop("model_parameters", None))
    with_data = not (method == "fisher" and message.startswith("needs"))
    cfg = merge_config(method, ["/nonexistent/a", "/nonexistent/b"], data=data if with_data else None, **kw)
    with pytest.raises(ValueError, match=message):
        merge_from_config(cfg)
