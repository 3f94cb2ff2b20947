"""LoRA on Mixtral experts both ways with PEFT (interop/peft_experts.py), checked against PEFT itself.

A tiny random MixtralForCausalLM (transformers, float32) and our model read from it. PEFT adapters with
target_parameters (gate_up_proj and down_proj: nested wrappers; gate_up_proj alone; with rsLoRA; with a q_proj LoRA)
and random weights (init_lora_weights=False): from_peft gives PEFT's logits. Ours (expert LoRAs of different ranks
and alphas on gate, up and down, a q_proj LoRA, and a layer without any) written by to_peft: PeftModel.from_pretrained
gives our logits, and from_peft reads the same model back. Tolerance 1e-5 on the logits (each adapter moves them by
far more).
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
from configurable_fm.interop.hf import UnsupportedModel, from_hf  # noqa: E402
from configurable_fm.interop.peft import from_peft, to_peft  # noqa: E402
from configurable_fm.interop.safetensors_io import CheckpointError  # noqa: E402

TOL = 1e-5
VOCAB = 53
IDS = np.random.RandomState(0).randint(0, VOCAB, (2, 9))
BOTH = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    cfg = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=12, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.MixtralForCausalLM(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, 0.2)
    hf.eval()
    path = tmp_path_factory.mktemp("mixtral") / "hf"
    hf.save_pretrained(path)
    return hf, from_hf(path)


def hf_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def ours(model):
    return np.asarray(model(jnp.asarray(IDS)))


def peft_adapter(hf, path, seed=1, **kw):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(init_lora_weights=False, **kw)).eval()
        model.save_pretrained(path)
    return model


def test_the_bases_agree(base):
    hf, model = base
    assert np.abs(hf_logits(hf) - ours(model)).max() < TOL


@pytest.mark.parametrize("kw", [
    dict(r=3, lora_alpha=6, target_parameters=BOTH, target_modules=["q_proj"]),
    dict(r=2, lora_alpha=5, target_parameters=["mlp.experts.gate_up_proj"], target_modules=None),
    dict(r=4, lora_alpha=3, use_rslora=True, target_parameters=["mlp.experts.down_proj"], target_modules=None),
], ids=["both+q_proj", "gate_up", "down-rslora"])
def test_from_peft_matches_peft(base, tmp_path, kw):
    hf, model = base
    pm = peft_adapter(hf, tmp_path / "a", **kw)
    want = hf_logits(pm)
    assert np.abs(want - hf_logits(hf)).max() > 100 * TOL  # the adapter changes the function
    got = from_peft(model, tmp_path / "a")
    assert np.abs(ours(got) - want).max() < TOL
    listed = adapters.adapters(got)
    assert listed["layers.1.mlp.experts.down_proj" if "down" in str(kw) else "layers.1.mlp.experts.up_proj"][
        "rank"] == kw["r"]
    assert np.abs(ours(adapters.merge(got)) - want).max() < TOL


def test_to_peft_loads_in_peft_and_back(base, tmp_path):
    hf, model = base
    m = adapters.attach_experts(model, "layers.*.mlp.experts.gate_proj", rank=2, alpha=4, init="random", seed=3)
    m = adapters.attach_experts(m, "layers.0.mlp.experts.up_proj", rank=3, alpha=2, init="random", seed=4)
    m = adapters.attach_experts(m, "layers.1.mlp.experts.down_proj", rank=1, alpha=5, rslora=False, init="random")
    m = adapters.attach(m, "lora", "layers.*.self_attn.q_proj", rank=4, alpha=8, init="random")
    y = ours(m)
    q_only = adapters.attach(model, "lora", "layers.*.self_attn.q_proj", rank=4, alpha=8, init="random")
    assert np.abs(y - ours(q_only)).max() > 100 * TOL  # the experts' part matters: PEFT must read it
    out = to_peft(m, tmp_path / "ours")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_parameters"] == BOTH and config["r"] == 5  # layer 0's gate_up: ranks 2 + 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), out).eval()
    assert np.abs(hf_logits(pm) - y).max() < TOL
    back = from_peft(model, out)
    assert np.abs(ours(back) - y).max() < TOL
    kept = adapters.merge(m, keep=True)  # a merged adapter is written as its factors, for the unmerged base
    assert np.abs(ours(from_peft(model, to_peft(kept, tmp_path / "kept"))) - y).max() < TOL


def test_refusals(base, tmp_path):
    hf, model = base
    peft_adapter(hf, tmp_path / "a", r=2, lora_alpha=2, target_parameters=BOTH, target_modules=None)
    dense = from_hf(_dense_dir(tmp_path))
    with pytest.raises(UnsupportedModel, match="Mixtral experts only"):
        from_peft(dense, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["target_parameters"] = ["mlp.experts.down_proj"]
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="nesting depth 1"):
        from_peft(model, tmp_path / "a")
    dora = adapters.attach(adapters.attach_experts(model, "layers.0.mlp.experts.up_proj"), "dora",
                           "layers.0.self_attn.q_proj")
    with pytest.raises(UnsupportedModel, match="one PEFT adapter has one type"):
        to_peft(dora, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _dense_dir(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=12, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "dense")
    return tmp_path / "dense"
