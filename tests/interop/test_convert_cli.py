"""`scripts/convert.py` / `cfm-convert` (configurable_fm/cli/convert.py, config experiments/convert.py): any source
to a complete HF directory that transformers loads; the tokenizer from the source (GGUF metadata, an HF
directory) or --config.tokenizer; bad input gives one line on stderr, no traceback, and writes nothing.
"""
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import pre_tokenizers

from configurable_fm.cli.convert import main
from configurable_fm.interop import orbax_io
from configurable_fm.interop.gguf import from_gguf
from configurable_fm.interop.hf import hf_tensors, to_hf
from configurable_fm.interop.tokenizers import load_chat_tokenizer
from configurable_fm.models.generation import generate
from configurable_fm.models.llama import LlamaConfig
from tests.helpers import random_llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "experiments" / "convert.py")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENS = SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet(), key=ord) + ["Ġt", "he", "Ġthe"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}" \
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
CFG = LlamaConfig(vocab_size=len(TOKENS), hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
BLOCK_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def convert(*args):
    return main(["--config", CONFIG, *args])


def permute(w, n_head):
    """llama.cpp's q/k row permutation (rotate-half -> interleaved rotary layout)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, path, *, arch="llama"):
    """The model as a float32 llama GGUF file (as llama.cpp's converter writes it) with a byte-level BPE
    tokenizer, special ids (bos <|im_start|>, eos <|im_end|>, unk <|endoftext|>) and a chat template."""
    c = model.cfg
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c.num_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(TOKENS)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))
    w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template(TEMPLATE)
    for name, value in hf_tensors(model).items():
        if name in GGUF_NAMES:
            gname = GGUF_NAMES[name]
        else:
            _, _, layer, *rest = name.split(".")
            gname = f"blk.{layer}.{BLOCK_NAMES['.'.join(rest[:-1])]}.{rest[-1]}"
        if ".attn_q." in gname:
            value = permute(value, c.num_heads)
        elif ".attn_k." in gname:
            value = permute(value, c.num_kv_heads)
        w.add_tensor(gname, np.ascontiguousarray(value, np.float32))
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    model = random_llama(CFG, 3)
    to_hf(model, root / "hf", tokenizer=write_llama_gguf(model, root / "tiny.gguf"))
    orbax_io.save_model(model, root / "orbax")
    return {"root": root, "model": model, "gguf": root / "tiny.gguf", "hf": root / "hf", "orbax": root / "orbax"}


def test_gguf_to_hf_with_its_tokenizer(sources, tmp_path, capsys):
    out = tmp_path / "out"
    assert convert(f"--config.input={sources['gguf']}", f"--config.output={out}") == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: config.json, generation_config.json, model.safetensors")
    assert json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (tok_cfg["chat_template"], tok_cfg["eos_token"], tok_cfg["model_max_length"]) == (TEMPLATE, "<|im_end|>", 64)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "the then"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    chat = load_chat_tokenizer(sources["gguf"])
    assert ids == chat.encode(chat.apply_chat_template(messages), add_special_tokens=False).ids and ids[0] == 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    ours = np.asarray(generate(from_gguf(sources["gguf"]), jnp.asarray([ids]), max_new_tokens=8,
                               eos_token_id=2))[0, len(ids):].tolist()
    assert theirs == ours[:len(theirs)] and (len(theirs) == 8 or theirs[-1] == 2)


def test_orbax_checkpoint_with_tokenizer_and_chat_template_flags(sources, tmp_path):
    (tmp_path / "chat.jinja").write_text("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}")
    out = tmp_path / "out"
    assert convert(f"--config.input={sources['orbax']}", f"--config.output={out}", "--config.dtype=bfloat16",
                   f"--config.tokenizer={sources['hf'] / 'tokenizer.json'}",
                   f"--config.chat_template={tmp_path / 'chat.jinja'}") == 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<|im_start|>hi"
    assert transformers.AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    # Without a tokenizer in the source and none given: no tokenizer files, no invented special ids.
    assert convert(f"--config.input={sources['orbax']}", f"--config.output={tmp_path / 'bare'}") == 0
    assert not (tmp_path / "bare" / "tokenizer.json").exists()
    assert json.loads((tmp_path / "bare" / "config.json").read_text())["eos_token_id"] is None


def test_overwrite_replaces_a_previous_output(sources, tmp_path, capsys):
    out = tmp_path / "out"
    assert convert(f"--config.input={sources['hf']}", f"--config.output={out}", "--config.tokenizer=none") == 0
    with pytest.raises(SystemExit) as exit_:
        convert(f"--config.input={sources['hf']}", f"--config.output={out}")
    assert exit_.value.code == 1 and "already exists" in capsys.readouterr().err
    assert not (out / "tokenizer.json").exists()  # untouched
    assert convert(f"--config.input={sources['hf']}", f"--config.output={out}", "--config.overwrite=True") == 0
    assert (out / "tokenizer.json").exists()
    with pytest.raises(SystemExit) as exit_:  # its own input: refused even with overwrite
        convert(f"--config.input={out}", f"--config.output={out}", "--config.overwrite=True")
    assert exit_.value.code == 1 and "would replace an input" in capsys.readouterr().err


def bad_inputs(root: Path) -> dict:
    """{case: (extra args, exit status, stderr pattern)}."""
    return {
        "missing source": ([f"--config.input={root / 'nowhere'}"], 1, r"cannot load a model from .*nowhere.*the path "
                                                                      r"does not exist"),
        "hub id": (["--config.input=HuggingFaceTB/SmolLM2-135M-Instruct"], 1, r"looks like a Hugging Face Hub id"),
        "bad dtype": (["--config.input=HF", "--config.dtype=int8"], 1, r"dtype 'int8' cannot be exported"),
        "unknown key": (["--config.input=HF", "--config.dtpye=float16"], 2, r"no key 'dtpye' \(did you mean 'dtype'"),
        "no input": ([], 1, r"--config.input is required"),
        "unsupported architecture": (["--config.input=FALCON"], 1, r"unsupported architecture \['FalconForCausalLM'\]"),
        "unsupported gguf": (["--config.input=GPT2GGUF"], 1, r"GGUF architecture 'gpt2' is not supported"),
        "tokenizer too large": (["--config.input=SMALL", "--config.tokenizer=HF"], 1,
                                r"the tokenizer has 262 tokens but the model's vocabulary has 64 rows"),
        "chat template": (["--config.input=HF", "--config.chat_template=nofile.jinja"], 1,
                          r"config.chat_template='nofile.jinja': no such file, and not a Jinja template"),
        # were accepted (one file per tensor) / an OverflowError traceback
        "negative shard size": (["--config.input=HF", "--config.max_shard_size=-5"], 1,
                                r"shard size '-5' is not a size: give a positive number"),
        "infinite shard size": (["--config.input=HF", "--config.max_shard_size=infGB"], 1,
                                r"shard size 'infGB' is not a size"),
    }


@pytest.mark.parametrize("case", sorted(bad_inputs(Path("."))))
def test_bad_input_one_line_no_traceback_nothing_written(case, sources, tmp_path, capsys):
    root = sources["root"]
    if not (root / "falcon").exists():
        (root / "falcon").mkdir()
        config = json.loads((sources["hf"] / "config.json").read_text())
        (root / "falcon" / "config.json").write_text(json.dumps({**config, "architectures": ["FalconForCausalLM"]}))
        w = gguf.GGUFWriter(root / "gpt2.gguf", "gpt2")
        w.write_header_to_file(root / "gpt2.gguf")
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        to_hf(random_llama(dataclasses.replace(CFG, vocab_size=64), 0), root / "small")
    names = {"HF": sources["hf"], "FALCON": root / "falcon", "GPT2GGUF": root / "gpt2.gguf", "SMALL": root / "small"}
    args, status, pattern = bad_inputs(root)[case]
    for key, path in names.items():
        args = [a.replace(f"={key}", f"={path}") for a in args]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        convert(*args, f"--config.output={out}")
    err = capsys.readouterr().err
    assert exit_.value.code == status, err
    assert err.startswith("cfm-convert: error: ") and "Traceback" not in err
    assert re.search(pattern, err), err
    assert list(tmp_path.iterdir()) == []


def test_script_shim(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert.py"), "--config", CONFIG,
                             f"--config.input={tmp_path / 'nowhere'}", f"--config.output={tmp_path / 'out'}"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 1 and result.stderr.startswith("cfm-convert: error: cannot load a model from")
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
