"""scripts/adapters.py (cfm-adapters) end to end, in-process, on a tiny random LlamaForCausalLM saved as an HF directory
with LoRA adapters made by PEFT itself: transformers loads the merged output and its logits equal PEFT's merged
model (add_weighted_adapter + merge_and_unload; max |diff| <= 1e-5, float32, measured <= 7e-7); the PEFT adapter
output loads in PEFT with PEFT's logits (measured: identical); one adapter is merged as it is (orbax output); a brick-set adapter mixes with a PEFT one;
the exact combination; bad input is one line with no traceback, and nothing is written."""
import copy
import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from configurable_fm.bricks import adapters  # noqa: E402
from configurable_fm.interop.loader import load_model  # noqa: E402
from configurable_fm.interop.peft import from_peft  # noqa: E402
from tests.helpers import ROOT, char_tokenizer, run_script  # noqa: E402
from tests.interop.test_peft import _base, hf_logits, ours  # noqa: E402

TOL = 1e-5
CONFIG = str(ROOT / "experiments" / "adapters" / "merge.py")
LLAMA = dict(target_modules=["q_proj", "v_proj", "down_proj"])
ADAPTERS = {"a": dict(r=4, lora_alpha=8, **LLAMA), "b": dict(r=4, lora_alpha=4, **LLAMA),
            "d": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"])}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """{root, hf (the base's HF directory), hf_model (transformers), pm (PEFT model with adapters a, b, d),
    a, b, d (their PEFT directories), brick_b (adapter b as a brick set)}."""
    root = tmp_path_factory.mktemp("adapters_cli")
    hf, base = _base("llama", root)
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(init_lora_weights=False, **ADAPTERS["a"]),
                                 adapter_name="a")
        for name in "bd":
            pm.add_adapter(name, peft.LoraConfig(init_lora_weights=False, **ADAPTERS[name]))
    pm.eval().save_pretrained(root / "peft")
    dirs = {n: root / "peft" / n for n in ADAPTERS}
    brick_b = adapters.save_adapter(from_peft(base, dirs["b"]), root / "brick_b")
    return dict(root=root, hf=root / "hf", hf_model=hf, pm=pm, brick_b=brick_b, **dirs)


def cli(argv, capsys):
    return run_script("adapters", ["--config", CONFIG, *argv], capsys)


def peft_merged_logits(world, inputs, weights, name, combination, **kw):
    """Logits of PEFT's add_weighted_adapter(inputs, weights) merged into the base (merge_and_unload), and of the
    combined adapter unmerged."""
    pm = world["pm"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if len(inputs) > 1:
            pm.add_weighted_adapter(list(inputs), list(weights), name, combination_type=combination, **kw)
        pm.set_adapter(name if len(inputs) > 1 else inputs[0])
        merged = copy.deepcopy(pm).merge_and_unload()
    return hf_logits(merged), hf_logits(pm)


def transformers_logits(out):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    return hf_logits(model)


def test_cat_of_two_peft_adapters(world, tmp_path, capsys):
    out, adapter_out = tmp_path / "merged", tmp_path / "combined"
    code, io = cli([f"--config.base={world['hf']}", f"--config.adapters={world['a']},{world['b']}",
                    "--config.weights=0.7,0.4", "--config.combination=cat", f"--config.output={out}",
                    f"--config.adapter_output={adapter_out}"], capsys)
    assert code == 0, io.err
    assert f"merged 2 adapter(s) (cat) into {world['hf']} -> {out} (hf), {adapter_out} (PEFT adapter)" in io.out
    want_merged, want = peft_merged_logits(world, "ab", (0.7, 0.4), "cli-cat", "cat")
    assert np.abs(want - hf_logits(world["hf_model"])).max() > 100 * TOL  # the adapters matter
    assert np.abs(transformers_logits(out) - want_merged).max() <= TOL
    config = json.loads((adapter_out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 8 and config["base_model_name_or_path"] == str(world["hf"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(world["hf_model"]), adapter_out).eval()
    assert np.abs(hf_logits(loaded) - want).max() <= TOL


def test_one_adapter_is_merged_as_it_is_into_orbax(world, tmp_path, capsys):
    out, adapter_out = tmp_path / "merged", tmp_path / "same"
    code, io = cli([f"--config.base={world['hf']}", f"--config.adapters={world['a']}", f"--config.output={out}",
                    "--config.format=orbax", f"--config.adapter_output={adapter_out}"], capsys)
    assert code == 0, io.err
    assert "merged 1 adapter(s) (as it is)" in io.out
    want_merged, _ = peft_merged_logits(world, "a", None, None, None)
    assert np.abs(ours(load_model(out)) - want_merged).max() <= TOL
    config = json.loads((adapter_out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8  # the adapter itself, not recombined


def test_ties_of_a_peft_and_a_brick_adapter(world, tmp_path, capsys):
    out = tmp_path / "merged"
    code, io = cli([f"--config.base={world['hf']}", f"--config.adapters={world['a']},{world['brick_b']}",
                    "--config.weights=1.0,-0.5", "--config.combination=ties", "--config.density=0.5",
                    f"--config.output={out}"], capsys)
    assert code == 0, io.err
    want_merged, _ = peft_merged_logits(world, "ab", (1.0, -0.5), "cli-ties", "ties", density=0.5)
    assert np.abs(transformers_logits(out) - want_merged).max() <= TOL


def test_exact_combinations(world, tmp_path, capsys):
    """exact (task_arithmetic) at the default rank (Σ r_i) is cat's weighted sum; at rank 2 the printed error is
    the SVD tail's."""
    out = tmp_path / "merged"
    args = [f"--config.base={world['hf']}", f"--config.adapters={world['a']},{world['b']}", "--config.weights=0.7,0.4"]
    code, io = cli(args + ["--config.combination=exact", f"--config.output={out}"], capsys)
    assert code == 0, io.err
    assert "exact:task_arithmetic: 6 module(s) re-factorised at rank 8, relative truncation error max" in io.out
    want_merged, _ = peft_merged_logits(world, "ab", (0.7, 0.4), "cli-exact", "cat")
    assert np.abs(transformers_logits(out) - want_merged).max() <= TOL
    code, io = cli(args + ["--config.combination=exact:linear", "--config.svd_rank=2",
                           f"--config.adapter_output={tmp_path / 'low'}"], capsys)
    assert code == 0, io.err
    line = next(x for x in io.out.splitlines() if x.startswith("exact:linear"))
    assert "at rank 2" in line and float(line.split("error max ")[1].split()[0]) > 0.01
    config = json.loads((tmp_path / "low" / "adapter_config.json").read_text())
    assert config["r"] == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["low", "merged"]


def _corrupt(world, tmp_path):
    bad = tmp_path / "in" / "corrupt"
    bad.mkdir(parents=True)
    (bad / "adapter_config.json").write_text((world["a"] / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    return bad


@pytest.mark.parametrize("case, overrides, message, status", [
    ("missing", ["--config.adapters={a},{root}/nowhere"], "nowhere: no such directory", 1),
    ("not an adapter", ["--config.adapters={a},{root}"], "neither a PEFT adapter (adapter_config.json", 1),
    ("corrupt", ["--config.adapters={corrupt}", "--config.weights="],
     "adapter_model.safetensors: cannot read safetensors file", 1),
    ("targets", ["--config.adapters={a},{d}", "--config.weights=1,1"],
     "the adapters target different modules: input 1 adapts layers.0.self_attn.k_proj", 1),
    ("weights", ["--config.adapters={a},{b}", "--config.weights=0.7"],
     "1 weight(s) (0.7) for 2 adapter(s)", 1),
    ("no weights", ["--config.adapters={a},{b}", "--config.weights="], "2 adapters need `weights`", 1),
    ("bad weights", ["--config.adapters={a},{b}", "--config.weights=0.7,x"], "must be numbers separated by commas", 1),
    ("combination", ["--config.combination=concat"], "unknown combination 'concat'", 1),
    ("density", ["--config.density=0.5"], "density applies to ['ties'", 1),
    ("dare density", ["--config.combination=dare_linear", "--config.density=0.0"],
     "density must be a number in (0.0, 1.0], got 0.0", 1),
    ("exact method", ["--config.combination=exact:magic"], "unknown merge method 'magic'", 1),
    ("exact density", ["--config.combination=exact:ties", "--config.density=nan"],  # was accepted
     "`density` must be a finite number, got nan", 1),
    ("format", ["--config.format=gguf"], "`format` must be one of ['hf', 'orbax']", 1),
    ("no output", ["--config.output=", "--config.adapter_output="],
     "set `output` (the merged model) and/or `adapter_output`", 1),
    ("key", ["--config.wieghts=1"], "config has no key 'wieghts' (did you mean 'weights'?)", 2),
])
def test_bad_input_is_one_line_and_writes_nothing(world, tmp_path, capsys, case, overrides, message, status):
    corrupt = _corrupt(world, tmp_path)
    names = {k: world[k] for k in "abd"} | {"root": world["root"], "corrupt": corrupt}
    args = [f"--config.base={world['hf']}", f"--config.adapters={world['a']},{world['b']}",
            "--config.weights=0.7,0.4", f"--config.output={tmp_path / 'out'}",
            f"--config.adapter_output={tmp_path / 'adapter'}"]
    code, io = cli(args + [o.format(**names) for o in overrides], capsys)
    assert code == status, io.err
    assert io.err.startswith("cfm-adapters: error:") and message in io.err, io.err
    assert "Traceback" not in io.err and len(io.err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_existing_output_and_late_errors_write_nothing(world, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("x")
    args = [f"--config.base={world['hf']}", f"--config.adapters={world['a']}"]
    code, io = cli(args + [f"--config.output={tmp_path / 'out'}"], capsys)
    assert code == 1 and "already exists" in io.err and "adapters: loading" not in io.out
    # a tokenizer larger than the vocabulary fails in to_hf, after the adapter was written: it is removed again
    tok = tmp_path / "tokenizer.json"
    char_tokenizer().save(str(tok))
    code, io = cli(args + [f"--config.output={tmp_path / 'm'}", f"--config.adapter_output={tmp_path / 'ad'}",
                           f"--config.tokenizer={tok}"], capsys)
    assert code == 1 and "tokens but the model's vocabulary has 97 rows" in io.err, io.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tokenizer.json"]
