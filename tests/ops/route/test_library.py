"""AdapterLibrary (ops/route/library.py): built from adapted models, saved and loaded (brick sets bit for bit,
names, examples, metadata, order), used by model(name) and mix with the same results as the original models, and
by arrow; select; every documented error."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from configurable_fm.bricks import adapters
from configurable_fm.errors import OutputExists
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.ops.route import AdapterLibrary, RouteError, arrow, arrow_modules
from tests.helpers import random_llama

CFG = LlamaConfig(vocab_size=61, hidden_size=24, intermediate_size=40, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_position_embeddings=32)
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 61, (2, 5)))


@pytest.fixture(scope="module")
def setup():
    base = random_llama(CFG, 0)
    models = {name: adapters.attach(base, "lora", "layers.*.self_attn.[qv]_proj", rank=r, alpha=8, init="random",
                                    seed=i + 1) for i, (name, r) in enumerate([("code", 4), ("prose-en", 2)])}
    lib = AdapterLibrary.from_models(models, examples={"code": ["def f(x):", "x = 1"]},
                                     metadata={"prose-en": {"task": "prose", "lang": "en"}}, source="tiny")
    return base, models, lib


@pytest.mark.slow  # CI time
def test_save_load_round_trip(setup, tmp_path):
    base, models, lib = setup
    loaded = AdapterLibrary.load(lib.save(tmp_path / "lib"))
    assert loaded.names == ("code", "prose-en") and loaded.source == "tiny"
    assert loaded.examples == (("def f(x):", "x = 1"), ())
    assert loaded.metadata == ({}, {"task": "prose", "lang": "en"})
    assert loaded.examples_by_name() == {"code": ("def f(x):", "x = 1")}
    for a, b in zip(lib.adapters, loaded.adapters):
        assert list(a) == list(b)
        for name in a:
            for k, v in a[name].params.items():
                np.testing.assert_array_equal(np.asarray(b[name].params[k]), np.asarray(v))
    index = json.loads((tmp_path / "lib" / "library.json").read_text())
    assert [e["dir"] for e in index["adapters"]] == ["adapters/code", "adapters/prose-en"]
    assert (tmp_path / "lib" / "adapters" / "code" / "bricks.safetensors").is_file()
    np.testing.assert_array_equal(np.asarray(loaded.model(base, "prose-en")(TOKENS)),
                                  np.asarray(models["prose-en"](TOKENS)))
    np.testing.assert_array_equal(np.asarray(loaded.mix(base, ids=[1, 0])(TOKENS)),
                                  np.asarray(adapters.mix(base, list(models.values()), ids=[1, 0])(TOKENS)))
    assert list(arrow_modules(arrow(base, loaded.adapters, top_k=1))) == [
        f"layers.{i}.self_attn.{m}_proj" for i in range(2) for m in "qv"]
    picked = loaded.select(["prose-en"])
    assert picked.names == ("prose-en",) and picked.index("prose-en") == 0
    with pytest.raises(OutputExists):
        lib.save(tmp_path / "lib")
    lib.save(tmp_path / "lib", overwrite=True)


def test_errors(setup, tmp_path):
    base, models, lib = setup
    with pytest.raises(RouteError, match=r"no adapter 'nope'; the library has \['code', 'prose-en'\]"):
        lib.model(base, "nope")
    with pytest.raises(RouteError, match=r"names \['a/b'\] are not \[A-Za-z0-9\]"):
        AdapterLibrary(("a/b",), lib.adapters[:1], ((),))
    with pytest.raises(RouteError, match=r"names repeat"):
        AdapterLibrary(("a", "a"), lib.adapters, ((), ()))
    with pytest.raises(RouteError, match=r"2 names, 1 adapters, 2 example lists"):
        AdapterLibrary(("a", "b"), lib.adapters[:1], ((), ()))
    with pytest.raises(RouteError, match=r"adapters \['a'\] are not brick sets"):
        AdapterLibrary(("a",), (models["code"],), ((),))
    with pytest.raises(RouteError, match=r"examples / metadata for unknown adapters nope"):
        AdapterLibrary.from_models(models, examples={"nope": ["x"]})
    with pytest.raises(RouteError, match=r"metadata is not JSON data"):
        AdapterLibrary(("a",), lib.adapters[:1], ((),), ({"f": object()},))
    with pytest.raises(RouteError, match=r"library\.json: no such file"):
        AdapterLibrary.load(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "library.json").write_text(json.dumps({"format": "configurable_fm.adapter_library",
                                                               "version": 1, "adapters": [
                                                                   {"name": "x", "dir": "../elsewhere"}]}))
    with pytest.raises(RouteError, match=r"adapters\[0\] dir '\.\./elsewhere' is outside the library"):
        AdapterLibrary.load(tmp_path / "bad")
    (tmp_path / "bad" / "library.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(RouteError, match=r"not an adapter library"):
        AdapterLibrary.load(tmp_path / "bad")


def test_examples_given_as_one_string_are_refused(setup):
    """A string is a sequence of characters: taken as is, each character became an example."""
    _, models, lib = setup
    with pytest.raises(RouteError, match=r"the examples of \['code'\] are one string; give a list of strings"):
        AdapterLibrary.from_models(models, examples={"code": "def f(x):"})
    with pytest.raises(RouteError, match=r"the examples of \['a'\] are one string"):
        AdapterLibrary(("a",), lib.adapters[:1], ("x = 1",))
