"""PEFT adapters both ways, checked against PEFT itself: from_peft gives PEFT's logits (unmerged and merged), to_peft
writes what PeftModel.from_pretrained loads with our logits; LoRA, rsLoRA (+ rank/alpha patterns), DoRA, IA3 on tiny
random LlamaForCausalLM and GPT2LMHeadModel models (GPT-2's Conv1D: fan_in_fan_out); bad input.

Reference: transformers + peft (torch, CPU, float32). The adapters are random (init_lora_weights=False: B != 0; DoRA
magnitudes and IA3 scales perturbed), so each changes the logits by far more than the tolerance: max |logit diff|
<= 1e-5 against PEFT (measured <= 1.7e-6; the base models alone agree to ~8e-7); our own round trips are bit-exact.
"""
import copy
import json
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from configurable_fm.bricks import adapters  # noqa: E402
from configurable_fm.errors import ConfigError, OutputExists  # noqa: E402
from configurable_fm.interop.hf import UnsupportedModel, from_hf, to_hf  # noqa: E402
from configurable_fm.interop.peft import from_peft, read_peft, to_peft  # noqa: E402
from configurable_fm.interop.safetensors_io import CheckpointError  # noqa: E402

TOL = 1e-5
VOCAB = 97
IDS = np.random.RandomState(0).randint(0, VOCAB, (2, 9))


def _randomize(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.startswith("transformer.ln_f"):
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
            else:
                p.normal_(0.0, 0.1)
    return model.eval()


def _base(kind, tmp):
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        hf = _randomize(transformers.LlamaForCausalLM(cfg), 0)
    else:
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=24, n_embd=32, n_layer=2, n_head=4,
                                      bos_token_id=0, eos_token_id=0)
        hf = _randomize(transformers.GPT2LMHeadModel(cfg), 0)
    hf.save_pretrained(tmp / "hf")
    return hf, from_hf(tmp / "hf")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return {k: _base(k, tmp_path_factory.mktemp(k)) for k in ("llama", "gpt2")}


def hf_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def ours(model):
    return np.asarray(model(jnp.asarray(IDS)))


CASES = {
    "llama-lora": ("llama", "lora", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "llama-rslora-patterns": ("llama", "lora", dict(r=4, lora_alpha=6, use_rslora=True, target_modules=[
        "q_proj", "k_proj", "o_proj", "up_proj"], rank_pattern={"k_proj": 2}, alpha_pattern={"up_proj": 3})),
    "llama-dora": ("llama", "dora", dict(r=4, lora_alpha=8, use_dora=True, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])),
    "llama-ia3": ("llama", "ia3", dict(target_modules=["k_proj", "v_proj", "down_proj"],
                                       feedforward_modules=["down_proj"])),
    "gpt2-lora": ("gpt2", "lora", dict(r=4, lora_alpha=16, target_modules=["c_attn", "attn.c_proj", "c_fc"],
                                       fan_in_fan_out=True)),
    "gpt2-dora": ("gpt2", "dora", dict(r=2, lora_alpha=4, use_dora=True, target_modules=["c_attn", "mlp.c_proj"],
                                       fan_in_fan_out=True)),
    "gpt2-ia3": ("gpt2", "ia3", dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                                     fan_in_fan_out=True)),
}


def peft_model(hf, kind, kw, seed=1):
    """A PEFT model over a copy of `hf` with random adapter weights."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = (peft.IA3Config(init_ia3_weights=False, **kw) if kind == "ia3"
                  else peft.LoraConfig(init_lora_weights=False, **kw))
        model = peft.get_peft_model(copy.deepcopy(hf), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.3 * torch.randn_like(p))
            if "ia3_l" in name:
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def saved(bases, tmp_path_factory):
    """{case: (PEFT model, its saved directory)}."""
    out = {}
    for case, (family, kind, kw) in CASES.items():
        model = peft_model(bases[family][0], kind, kw)
        path = tmp_path_factory.mktemp(case) / "adapter"
        model.save_pretrained(path)
        out[case] = (model, path)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_from_peft_matches_peft(case, bases, saved):
    family, kind, _ = CASES[case]
    hf, base = bases[family]
    pm, path = saved[case]
    model = from_peft(base, path)
    assert {a["kind"] for a in adapters.adapters(model).values()} == {kind}
    want = hf_logits(pm)
    assert np.abs(want - hf_logits(hf)).max() > 100 * TOL  # the adapter matters
    assert np.abs(ours(model) - want).max() <= TOL
    # merged: PEFT's merge_and_unload against our merge, both kinds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_hf = copy.deepcopy(pm).merge_and_unload()
    want_merged = hf_logits(merged_hf)
    assert np.abs(ours(adapters.merge(model)) - want_merged).max() <= TOL
    assert np.abs(ours(adapters.merge(model, keep=True)) - want_merged).max() <= TOL


def test_scales_and_patterns_are_peft_s(bases, saved):
    model = from_peft(bases["llama"][1], saved["llama-rslora-patterns"][1])
    specs = adapters.adapters(model)
    assert specs["layers.0.self_attn.k_proj"]["rank"] == 2 and specs["layers.0.self_attn.q_proj"]["rank"] == 4
    assert specs["layers.1.mlp.up_proj"]["alpha"] == 3.0 and specs["layers.1.self_attn.o_proj"]["alpha"] == 6.0
    modules = adapters.adapted_modules(model)
    assert modules["layers.0.self_attn.q_proj"].scale == pytest.approx(6 / 2)  # alpha / sqrt(r)
    ia3 = adapters.adapters(from_peft(bases["gpt2"][1], saved["gpt2-ia3"][1]))
    assert ia3["h.0.mlp.c_proj"]["feedforward"] and not ia3["h.0.attn.c_attn"]["feedforward"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_to_peft_loads_in_peft(case, bases, saved, tmp_path):
    family, kind, _ = CASES[case]
    hf, base = bases[family]
    model = from_peft(base, saved[case][1])
    out = to_peft(model, tmp_path / "out", base_model_name_or_path="tiny")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf), out).eval()
    assert np.abs(hf_logits(loaded) - ours(model)).max() <= TOL
    # and back: the same adapter, bit for bit
    again = from_peft(base, out)
    assert adapters.adapters(again) == adapters.adapters(model)
    for k, v in adapters.adapter_state(model).items():
        np.testing.assert_array_equal(np.asarray(adapters.adapter_state(again)[k]), np.asarray(v), err_msg=k)


def test_to_peft_of_attach_and_target_lists(bases, tmp_path):
    hf, base = bases["gpt2"]
    model = adapters.attach(base, "lora", ["h.*.attn.c_proj", "h.1.mlp.c_fc"], rank=3, alpha=5, init="random")
    out = to_peft(model, tmp_path / "p")
    config = json.loads((out / "adapter_config.json").read_text())
    # attn.c_proj in every layer is a suffix; c_fc only in layer 1 needs its full name
    assert config["target_modules"] == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj",
                                        "transformer.h.1.mlp.c_fc"]
    assert config["fan_in_fan_out"] is True and config["task_type"] == "CAUSAL_LM"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf), out).eval()
    assert np.abs(hf_logits(loaded) - ours(model)).max() <= TOL
    llama = adapters.attach(bases["llama"][1], "lora", "layers.*.self_attn.[qv]_proj", rank=2)
    config = json.loads((to_peft(llama, tmp_path / "q") / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["lora_alpha"] == 8 and config["r"] == 2


@pytest.mark.parametrize("dora", [False, True])
def test_a_fresh_peft_adapter_changes_nothing(bases, tmp_path, dora):
    """B = 0: LoRA adds exactly 0; DoRA's magnitude is torch's ||W||, ours divides by our ||W|| (last-bit apart)."""
    hf, base = bases["llama"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=dora))
    pm.save_pretrained(tmp_path / "a")
    diff = np.abs(ours(from_peft(base, tmp_path / "a")) - ours(base)).max()
    assert diff <= (1e-6 if dora else 0.0)


# ------------------------------------------------------------------------------------------ bad input
def _copy(saved_dir, tmp_path, config_changes=None, tensors=None):
    """A copy of a saved adapter with config keys changed and/or tensors replaced ({key: array or None})."""
    from safetensors.numpy import load_file, save_file

    dst = tmp_path / "bad"
    dst.mkdir()
    config = json.loads((saved_dir / "adapter_config.json").read_text())
    config.update(config_changes or {})
    (dst / "adapter_config.json").write_text(json.dumps(config))
    weights = load_file(str(saved_dir / "adapter_model.safetensors"))
    for k, v in (tensors or {}).items():
        if v is None:
            weights.pop(k)
        else:
            weights[k] = v
    save_file(weights, str(dst / "adapter_model.safetensors"))
    return dst


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize("changes, tensors, error, match", [
    ({"peft_type": "ADALORA"}, None, UnsupportedModel, r"peft_type 'ADALORA' is not supported"),
    ({"bias": "all"}, None, UnsupportedModel, r"bias='all'"),
    ({"init_lora_weights": "pissa"}, None, UnsupportedModel, r"init_lora_weights='pissa'.*changes the base"),
    ({"use_foo": 3}, None, UnsupportedModel, r"use_foo=3"),
    ({"layer_replication": [[0, 1]]}, None, UnsupportedModel, r"layer_replication"),
    ({"r": 8}, None, CheckpointError, r"q_proj.lora_A.weight is \(4, 32\) but .*needs \(8, 32\)"),
    ({"target_modules": ["v_proj", "down_proj"]}, None, CheckpointError,
     r"model.layers.0.self_attn.q_proj is not selected by adapter_config.json's target_modules"),
    (None, {"base_model.model.model.layers.0.self_attn.x_proj.lora_A.weight": np.zeros((4, 32), np.float32)},
     CheckpointError, r"self_attn.x_proj.lora_A.weight: the llama model has no Linear module"),
    (None, {Q_A: np.zeros((4, 31), np.float32)}, CheckpointError, r"lora_A.weight is \(4, 31\) but"),
    (None, {Q_A: None}, CheckpointError, r"q_proj: no lora_A tensor"),
    (None, {"base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((4, 97), np.float32)},
     CheckpointError, r"LoRA on an embedding is not supported"),
])
def test_bad_adapters_are_refused(bases, saved, tmp_path, changes, tensors, error, match):
    bad = _copy(saved["llama-lora"][1], tmp_path, changes, tensors)
    with pytest.raises(error, match=match):
        from_peft(bases["llama"][1], bad)


@pytest.mark.parametrize("changes", [
    {"rank_pattern": ["q_proj"]}, {"alpha_pattern": 3}, {"target_modules": 5}, {"target_modules": ["q_proj", 5]},
    {"exclude_modules": 3}, {"layers_to_transform": "0"}, {"layers_to_transform": [0], "layers_pattern": 3},
    {"use_dora": "false"}, {"use_rslora": "yes"},
])
def test_malformed_config_values_are_named(bases, saved, tmp_path, changes):
    """A corrupt adapter_config.json value is a CheckpointError naming the key (not a TypeError from deep inside
    the matching, nor a non-empty string taken as true)."""
    bad = _copy(saved["llama-lora"][1], tmp_path, changes)
    key = list(changes)[-1]
    with pytest.raises(CheckpointError, match=rf"adapter_config.json: {key}=.* is not a valid value"):
        from_peft(bases["llama"][1], bad)


def test_a_targeted_module_without_tensors_is_refused(bases, saved, tmp_path):
    """PEFT gives a module that target_modules selects but the file lacks a freshly initialised adapter (random with
    init_lora_weights=false, as here: its logits then differ from an adapter left out by ~0.1); refused by name."""
    prefix = "base_model.model.model.layers.1.self_attn.q_proj"
    bad = _copy(saved["llama-lora"][1], tmp_path, None, {f"{prefix}.lora_A.weight": None,
                                                         f"{prefix}.lora_B.weight": None})
    with pytest.raises(CheckpointError, match=r"model.layers.1.self_attn.q_proj: selected by adapter_config.json's "
                                              r"target_modules .* but the file has no tensors for it"):
        from_peft(bases["llama"][1], bad)


def test_bad_files_are_refused(bases, saved, tmp_path):
    base = bases["llama"][1]
    with pytest.raises(CheckpointError, match="no such directory"):
        from_peft(base, tmp_path / "nowhere")
    d = tmp_path / "d"
    d.mkdir()
    (d / "adapter_config.json").write_text("{not json")
    (d / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match=r"adapter_model.safetensors: no such file \(only adapter_model.bin"):
        from_peft(base, d)
    (d / "adapter_model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match=r"adapter_config.json: not valid JSON"):
        from_peft(base, d)
    (d / "adapter_config.json").write_text((saved["llama-lora"][1] / "adapter_config.json").read_text())
    with pytest.raises(CheckpointError, match=r"adapter_model.safetensors: cannot read safetensors file"):
        from_peft(base, d)
    # a gpt2 adapter does not fit a llama model
    with pytest.raises(CheckpointError, match=r"the llama model has no Linear module 'transformer.h.0.attn.c_attn'"):
        read_peft(base, saved["gpt2-lora"][1])


def test_to_peft_refusals_write_nothing(bases, tmp_path):
    base = bases["llama"][1]
    with pytest.raises(UnsupportedModel, match="no adapter attached"):
        to_peft(base, tmp_path / "a")
    mixed = adapters.attach(adapters.attach(base, "lora", "layers.0.self_attn.q_proj"), "ia3",
                            "layers.1.self_attn.k_proj")
    with pytest.raises(UnsupportedModel, match=r"mixes \['ia3', 'lora'\]: ia3 at layers.1.self_attn.k_proj"):
        to_peft(mixed, tmp_path / "a")
    rs = adapters.attach(adapters.attach(base, "lora", "layers.0.self_attn.q_proj", rslora=True), "lora",
                         "layers.1.self_attn.q_proj")
    with pytest.raises(UnsupportedModel, match=r"mix rsLoRA and LoRA scaling: rslora at layers.0.self_attn.q_proj"):
        to_peft(rs, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    ok = adapters.attach(base, "lora", "layers.0.self_attn.q_proj")
    to_peft(ok, tmp_path / "b")
    with pytest.raises(OutputExists):
        to_peft(ok, tmp_path / "b")
    to_peft(ok, tmp_path / "b", overwrite=True)


@pytest.mark.parametrize("rate", [2.0, 1.0, -0.5, float("nan"), "x", True])
def test_to_peft_refuses_a_bad_lora_dropout(bases, tmp_path, rate):
    """lora_dropout is written for PEFT's nn.Dropout, which refuses p > 1 when it loads the adapter (and NaN is
    not JSON): a rate outside [0, 1) is refused by name before anything is written."""
    ok = adapters.attach(bases["llama"][1], "lora", "layers.0.self_attn.q_proj")
    with pytest.raises(ConfigError, match=r"to_peft: lora_dropout must be a number in \[0, 1\)"):
        to_peft(ok, tmp_path / "a", lora_dropout=rate)
    assert not (tmp_path / "a").exists()


def test_to_hf_refuses_an_adapted_model(bases, tmp_path):
    model = adapters.attach(bases["llama"][1], "dora", "layers.*.self_attn.q_proj")
    with pytest.raises(UnsupportedModel, match=r"extension module\(s\) at layers.0.self_attn.q_proj \(dora\), "
                                               r"layers.1.self_attn.q_proj \(dora\); merge them"):
        to_hf(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    to_hf(adapters.merge(model), tmp_path / "hf")  # merged: plain Linears again
    np.testing.assert_allclose(ours(from_hf(tmp_path / "hf")), ours(model), atol=1e-6)


def test_ia3_default_feedforward_modules_are_peft_s_for_bert(tmp_path):
    """PEFT's default feedforward_modules for bert, ['output.dense'], match by suffix: the attention output
    projection is scaled on its input side too. attach(..., 'ia3') without `feedforward` picks the same ones."""
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=32)
    hf = transformers.BertModel(cfg).eval()
    hf.save_pretrained(tmp_path / "bert")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.IA3Config(target_modules=["key", "value", "output.dense"]))
    theirs = {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
              if isinstance(m, peft.tuners.ia3.IA3Layer) and m.is_feedforward}
    model = adapters.attach(from_hf(tmp_path / "bert"), "ia3", ["encoder.layer.*.attention.self.key",
                                                                "encoder.layer.*.attention.self.value",
                                                                "encoder.layer.*.output.dense",
                                                                "encoder.layer.*.attention.output.dense"])
    mine = {p for p, spec in adapters.adapters(model).items() if spec["feedforward"]}
    assert theirs == {"encoder.layer.0.attention.output.dense", "encoder.layer.0.output.dense"}
    assert mine == theirs
