"""Helpers shared by several test modules (import as `from tests.helpers import ...`)."""
import importlib.util
import json
import logging
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configurable_fm.bricks.paths import flat_state, with_params
from configurable_fm.models.llama import Llama


def random_llama(cfg, seed):
    """Llama with N(0, 0.02) weights and N(1, 0.1) norms, drawn with numpy (no per-shape XLA compilations)."""
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    rs = np.random.RandomState(seed)
    return with_params(abstract, {k: jnp.asarray(rs.normal(1.0, 0.1, v.shape) if "norm" in k else
                                                 rs.normal(0.0, 0.02, v.shape), jnp.float32)
                                  for k, v in flat_state(abstract).items()})


def hf_dir_with_config_change(src, dst, key, value):
    """A copy of the HF directory `src` at `dst` (weights linked, not copied) with config[key] = value."""
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    config[key] = value
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "model.safetensors").symlink_to(src / "model.safetensors")
    return dst


def assert_params_equal(model_a, model_b):
    """Same parameter paths in the same order, and bit-identical arrays."""
    from configurable_fm.bricks.paths import flat_params

    a, b = flat_params(model_a), flat_params(model_b)
    assert list(a) == list(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def char_tokenizer(specials=("<pad>", "<eos>", "<bos>", "<unk>"), *, special=None):
    """A `tokenizers.Tokenizer` of single characters: the four `specials` get ids 0-3 (pad, eos, bos, unk roles),
    printable ASCII 4-98, '\\n' 99. `special`: the names registered as special tokens (default: all four)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {name: i for i, name in enumerate(specials)} | {chr(i): i - 28 for i in range(32, 127)}
    vocab["\n"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[3]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(specials if special is None else special))
    return tok



ROOT = Path(__file__).resolve().parents[1]


def marked_slow(cases, slow):
    """parametrize values: `cases` in order, those in `slow` marked slow (skipped unless --runslow). A tuple case
    holds the values of several argnames, as in pytest.mark.parametrize."""
    def slow_param(c):
        return pytest.param(*(c if isinstance(c, tuple) else (c,)), marks=pytest.mark.slow)

    return [slow_param(c) if c in slow else c for c in cases]


def load_script(name: str):
    """scripts/<name>.py imported as a module (the shims are not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_script(name: str, argv, capsys):
    """(exit status, captured output) of scripts/<name>.py's main(argv), SystemExit included."""
    try:
        code = load_script(name).main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr()


def golden_hf_inputs(tensors, config: dict, names, root: Path) -> dict:
    """{name: root/name}: HF directories (config.json + model.safetensors) of the golden inputs stored as
    "inputs/<name>/<hf tensor name>" in `tensors` (the mergekit goldens' layout), all with `config`."""
    from safetensors.numpy import save_file

    out = {}
    for name in names:
        d = Path(root) / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(config))
        prefix = f"inputs/{name}/"
        save_file({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                  str(d / "model.safetensors"), metadata={"format": "pt"})
        out[name] = d
    return out


def golden_yaml(text: str, dirs: dict, path: Path) -> Path:
    """A golden's YAML with its {A}, {B}, ... placeholders replaced by the input directories, written to `path`."""
    for name, d in dirs.items():
        text = text.replace("{" + name + "}", str(d))
    Path(path).write_text(text)
    return Path(path)


def read_tensors(out_dir) -> dict:
    """{name: numpy array} of every tensor of a (sharded) safetensors output directory."""
    from configurable_fm.interop.safetensors_io import TensorStore

    store = TensorStore(out_dir)
    return {k: np.asarray(store[k]) for k in store}


def tiny_hf_llama(directory: Path):
    """A tiny random transformers LlamaForCausalLM (GQA: 4 heads, 2 kv heads, vocab 97, 2 layers), torch seed 0,
    weights ~ N(0, 0.1) (norms ~ N(1, 0.1)), saved to `directory`, in eval mode; returns it (for PEFT parity tests,
    which convert it with interop.hf.from_hf)."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, 0.1)
    hf.eval().save_pretrained(directory)
    return hf


def cuda_lowering(jitted, *args, **static) -> str:
    """The StableHLO text of `jitted(*args, **static)` lowered for CUDA on this GPU-less host: traced on abstract
    copies of the arguments inside an abstract mesh of one H100, since jax 0.12 (Python 3.12's wheels) lowers a
    Pallas Triton kernel only for a GPU it knows (jax 0.10 lowers it for any)."""
    spec = lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype if hasattr(a, "dtype") else jnp.result_type(a))
    gpu = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,), abstract_device=gpu)
    with jax.sharding.use_abstract_mesh(mesh):
        traced = jitted.trace(*jax.tree.map(spec, args), **static)
        return traced.lower(lowering_platforms=("cuda",)).as_text()


class compiles:
    """Counts the XLA compilations of the jitted function named `name` inside the `with` block (jax's compile log)."""

    def __init__(self, name: str = "train_step"):
        self.pattern = re.compile(rf"Compiling (jit\()?{re.escape(name)}\b")

    def __enter__(self):
        self.count = 0
        outer = self

        class Handler(logging.Handler):
            def emit(self, record):
                if outer.pattern.search(record.getMessage()):
                    outer.count += 1

        self.handler, self.logger = Handler(), logging.getLogger("jax")
        self.logger.addHandler(self.handler)
        self.ctx = jax.log_compiles(True)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)
        self.logger.removeHandler(self.handler)
