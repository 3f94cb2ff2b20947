"""Write vocabulary-alignment goldens from mergekit 0.1.5 (`tokenizer_source` / `tokenizer:`), for tests/ops/merge.

Run ONLY by hand, in the throwaway virtualenv that has mergekit 0.1.5 + torch (never a project dependency):

    HF_HUB_OFFLINE=1 /tmp/mk/bin/python scripts/mergekit_vocab_goldens.py

It builds three tiny Llama checkpoints (1 layer, width 16, untied lm_head, float32) with tiny BPE tokenizers that
differ, runs mergekit's full merge (`mergekit.merge.run_merge`, the code behind `mergekit-yaml`) on several
configs, and writes under tests/golden/mergekit_0.1.5/:

    vocab_inputs/<model>/     config.json, tokenizer.json, tokenizer_config.json and vocab.safetensors
                              (model.embed_tokens.weight, lm_head.weight: the only tensors the tests need)
    vocab_<case>.safetensors  the merged model.embed_tokens.weight and lm_head.weight
    vocab_<case>.tokenizer.json   mergekit's output tokenizer.json
    vocab_cases.json          {case: {"config": the YAML as a dict, "tokenizer_base": model whose tokenizer
                               mergekit used as the base of the output vocabulary, "referenced_models": [...]}}

The models: `base` (100 tokens: <unk> <s> </s>, 66 characters, 31 BPE merges; <unk> <s> </s> are special added
tokens), `ft_b` (the base tokenizer + added <|im_start|> <|im_end|> (special) and <tool>: 103 tokens) and `ft_c`
(a different BPE: the same characters in another order, without the merges 'a s' -> 'as' and 'wh at' -> 'what',
with 'q u' -> 'qu' and 'qu e' -> 'que'; added <|im_end|> (special) and <tool>; 102 tokens, config vocab_size 104,
so 2 embedding rows are unused).

mergekit's order of non-base tokens in a union is not reproducible run to run: it iterates `tokenizer.get_vocab()`
(a Rust HashMap, random order per process) and, without a base model, takes the "base" tokenizer from
`list(set(models))[0]` (Python hash order). The script records which model served as the base; the tests compare
rows by token, not by id, where that order is arbitrary.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "golden", "mergekit_0.1.5")
HIDDEN = 16

CHARS = list("abcdefghijklmnopqrstuvwxyz") + list("ABCDEFGHIJKLMNOPQRSTUVWXYZ") + list("0123456789") + list(".,!?")
BASE_MERGES = ["t h", "h e", "i n", "e r", "a n", "r e", "o n", "a t", "e n", "n d", "o r", "e s", "t o", "i s",
               "i t", "a l", "a r", "s t", "o u", "l e", "th e", "in g", "an d", "e d", "o f", "h a", "c o", "m e",
               "w h", "wh at", "a s"]
SPECIAL = ["<unk>", "<s>", "</s>"]


def bpe_tokenizer(symbols, merges, added):
    """A BPE tokenizer (whitespace pre-tokenizer) with vocab = specials, symbols, merge results (in that order)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {}
    for t in SPECIAL + list(symbols) + ["".join(m.split(" ")) for m in merges]:
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    for content, special in added:
        if special:
            tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
        else:
            tok.add_tokens([AddedToken(content, special=False, normalized=True)])
    return tok


def write_model(path, tok, vocab_size, seed):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=None)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>",
                   "eos_token": "</s>", "model_max_length": 64}, f, indent=1)


def build_inputs(root):
    base = bpe_tokenizer(CHARS, BASE_MERGES, [])
    ft_b = bpe_tokenizer(CHARS, BASE_MERGES, [("<|im_start|>", True), ("<|im_end|>", True), ("<tool>", False)])
    chars_c = list(np.random.default_rng(3).permutation(CHARS))
    merges_c = [m for m in BASE_MERGES if m not in ("a s", "wh at")] + ["q u", "qu e"]
    ft_c = bpe_tokenizer(chars_c, merges_c, [("<|im_end|>", True), ("<tool>", False)])
    sizes = {"base": base.get_vocab_size(), "ft_b": ft_b.get_vocab_size(), "ft_c": ft_c.get_vocab_size() + 2}
    assert (sizes["base"], sizes["ft_b"], sizes["ft_c"]) == (100, 103, 104), sizes
    for seed, (name, tok) in enumerate((("base", base), ("ft_b", ft_b), ("ft_c", ft_c))):
        write_model(os.path.join(root, name), tok, sizes[name], seed)


LINEAR = {"merge_method": "linear", "dtype": "float32",
          "models": [{"model": "base", "parameters": {"weight": 1.0}},
                     {"model": "ft_b", "parameters": {"weight": 0.5}},
                     {"model": "ft_c", "parameters": {"weight": 0.25}}]}
TASK = {"merge_method": "task_arithmetic", "dtype": "float32", "base_model": "base",
        "models": [{"model": "ft_b", "parameters": {"weight": 0.7}},
                   {"model": "ft_c", "parameters": {"weight": 0.4}}]}
TOKENS = {"<tool>": {"source": "ft_b", "force": True},
          "<|im_start|>": {"source": {"kind": "zero"}},
          "<new>": {"source": {"kind": "model_token", "model": "base", "token": "<s>"}},
          "the": {"source": {"kind": "model_token", "model": "ft_c", "token_id": 5}, "force": True}}
CASES = {
    "linear_union": dict(LINEAR, tokenizer_source="union"),
    "linear_union_pad8": dict(LINEAR, tokenizer={"source": "union", "pad_to_multiple_of": 8}),
    "linear_base": dict(LINEAR, tokenizer_source="base"),
    "task_union": dict(TASK, tokenizer_source="union"),
    "task_union_pad8": dict(TASK, tokenizer={"source": "union", "pad_to_multiple_of": 8}),
    "task_base": dict(TASK, tokenizer_source="base"),
    "task_model_ft_c": dict(TASK, tokenizer_source="ft_c"),
    "task_union_tokens": dict(TASK, tokenizer={"source": "union", "pad_to_multiple_of": 8, "tokens": TOKENS}),
}


def run_case(root, name, config):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from safetensors.numpy import load_file, save_file

    cfg = MergeConfiguration.model_validate(config)
    referenced = [str(m.model.path) for m in cfg.referenced_models()]
    tokenizer_base = config.get("base_model") or referenced[0]
    out = os.path.join(root, "out_" + name)
    run_merge(cfg, out, options=MergeOptions(copy_tokenizer=True, lazy_unpickle=False, low_cpu_memory=False,
                                                        write_model_card=False))
    tensors = {}
    for f in sorted(os.listdir(out)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(out, f)))
    keep = {k: np.ascontiguousarray(tensors[k]) for k in ("model.embed_tokens.weight", "lm_head.weight")}
    save_file(keep, os.path.join(OUT_DIR, f"vocab_{name}.safetensors"))
    shutil.copy(os.path.join(out, "tokenizer.json"), os.path.join(OUT_DIR, f"vocab_{name}.tokenizer.json"))
    return {"config": config, "tokenizer_base": tokenizer_base, "referenced_models": referenced}


def main():
    import mergekit.tokenizer.build  # noqa: F401  (fail early outside the mergekit venv)
    import torch
    from importlib.metadata import version
    from safetensors.numpy import save_file

    os.makedirs(OUT_DIR, exist_ok=True)
    with tempfile.TemporaryDirectory() as root:
        build_inputs(root)
        inputs_dir = os.path.join(OUT_DIR, "vocab_inputs")
        shutil.rmtree(inputs_dir, ignore_errors=True)
        for name in ("base", "ft_b", "ft_c"):
            src, dst = os.path.join(root, name), os.path.join(inputs_dir, name)
            os.makedirs(dst)
            for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
                shutil.copy(os.path.join(src, f), os.path.join(dst, f))
            from safetensors.numpy import load_file
            t = load_file(os.path.join(src, "model.safetensors"))
            save_file({k: t[k] for k in ("model.embed_tokens.weight", "lm_head.weight")},
                      os.path.join(dst, "vocab.safetensors"))
        cwd = os.getcwd()
        os.chdir(root)  # model paths in the configs are relative: "base", "ft_b", "ft_c"
        try:
            cases = {name: run_case(root, name, config) for name, config in CASES.items()}
        finally:
            os.chdir(cwd)
    meta = {"mergekit": version("mergekit"), "torch": torch.__version__, "transformers": version("transformers"),
            "tokenizers": version("tokenizers"), "cases": cases}
    with open(os.path.join(OUT_DIR, "vocab_cases.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(json.dumps({k: v["tokenizer_base"] for k, v in cases.items()}))


if __name__ == "__main__":
    main()
