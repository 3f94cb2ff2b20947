"""Streaming merge of model checkpoints: one tensor at a time from the inputs to sharded safetensors output.

    plan = mergekit_yaml.load_mergekit_yaml("ties.yml")
    merge_checkpoints(plan, "out/", max_shard_size="2GB")

Steps: open every input (sources.open_source: lazy, nothing read yet); check names and shapes of all inputs at
once (tree's checks: one short MergeInputError naming how the architectures differ, then the first tensors that
differ, naming tensor and model);
resolve every tensor's parameters (one ParameterError listing every tensor that fails); then one
execute.TensorGroup per output tensor p, in the reference's order (the base, else the first input), run by
execute.merge_to_shards: a read-ahead thread (a pool of `read_workers` on an accelerator) reads p from each input
(`prefetch` groups ahead; HF inputs with positioned reads, no memory map), the cached jitted kernel of (method,
parameters, dtypes) casts them to `plan.dtype` if given (mergekit's load dtype) and to float32, merges (in float32,
or rounding as mergekit does in the compute dtype: `compute_dtype`, precision.py) and casts the result to out_dtype
(default plan.dtype, else the reference's dtype; float32 for arcee_fusion/ramplus_tl in a reduced compute dtype) --
execute.merge_tensor,
the same step as `tree.merge` on the single tensor {p: ...}: parameters resolved for the HF name p (layer index from `model.layers.N.`, depth over
num_layers = 1 + the largest layer index), PRNG key tensor_key(seed, p), integer tensors copied when identical
-- and a writer thread writes each result at its place in output shards planned up front (a new shard when
the next tensor would push it past `max_shard_size`). A tqdm bar counts tensors and bytes (progress=False: none).
Host memory: about (prefetch + 1) x (inputs) x the largest tensor + a few output tensors + the kernel's float32
temporaries; never a whole shard or model.
At the end: the index (when more than one shard), the reference's config.json with torch_dtype updated, and its
tokenizer files; all of it inside `atomic_directory` (an existing output is refused unless overwrite; a failure
leaves nothing). Inputs are only read.

A `slices:` plan (ops/merge/slices.py) runs the same way over the tensor plan of slices.plan_tensors: each
output tensor (renumbered `model.layers.N.`) is one TensorGroup made from its inputs' tensors (tree.merge_task's
semantics), in the order: tensors before the layers, the layers, the tensors after them. The config.json is
the donor's (the global base_model, else the first slice's first source) with the new `num_hidden_layers`
(n_layer / num_layers) and, where it has one, a `layer_types` list taken from each layer's first source.

`plan.tokenizer` (mergekit's `tokenizer_source` / `tokenizer:`): the vocab.VocabularyAlignment of every input is
built once (vocab.alignment_for_checkpoints: tokenizer.json and config vocab_size of each input directory; the
tokenizer base is the YAML's base_model, else the first model / the slices' config donor). Every vocabulary tensor
(a floating tensor whose name contains one of tree.VOCAB_TENSORS; HF layout, vocabulary axis 0) is read from
all its inputs, each aligned into the output vocabulary (padded_size rows) and then merged as usual; for a
`slices:` plan the row rules see only that tensor's inputs (the first / last slice's sources, as mergekit).
Written: tokenizer.json of the alignment, the tokenizer donor's (the source model, else the tokenizer base)
tokenizer_config.json (`added_tokens_decoder` rebuilt when it has one) and special_tokens_map.json, and
config.json's vocab_size = padded_size. `plan.chat_template` ('auto': the most common template among the
inputs' chat_template.jinja / tokenizer_config.json, ties to the first in plan order; a name; a Jinja string)
is written into tokenizer_config.json (and no chat_template.jinja, which transformers would prefer); without
it the donor's chat_template.jinja is copied.

Inputs are opened by sources.open_source: HF directories (execute.PreadStore: positioned reads), GGUF files
(dequantized tensor by tensor), orbax model checkpoints (restored parameter by parameter) and registry names, all lazy; the
tokenizer is the reference's (copied, or rebuilt from GGUF metadata).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import jax
import ml_dtypes
import numpy as np

from configurable_fm.interop.atomic import atomic_directory, check_overwritable
from configurable_fm.interop.tokenizers import added_tokens_decoder
from configurable_fm.interop.safetensors_io import parse_size
from configurable_fm.ops.merge import execute as X
from configurable_fm.ops.merge import params as P
from configurable_fm.ops.merge import precision
from configurable_fm.ops.merge import slices as S
from configurable_fm.ops.merge import tree
from configurable_fm.ops.merge import vocab as VOC
from configurable_fm.ops.merge.mergekit_yaml import MergePlan, ModelRef, chat_template_text, check_contract
from configurable_fm.ops.merge.keys import tensor_key
from configurable_fm.ops.merge.registry import MergeMethod, get_method
from configurable_fm.ops.merge.sources import TOKENIZER_FILES, TensorSource, open_source

NP_DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16),
             "float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}
LOG = logging.getLogger(__name__)
SLICE_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")  # transformers prefers them to the config's


@dataclasses.dataclass
class _Input:
    name: str
    tensors: TensorSource  # lazy: ops/merge/sources.py
    shape: Callable[[str], tuple]
    config: dict
    directory: Optional[Path]  # the directory of its tokenizer files (HF / orbax), None for GGUF


def _open(ref: ModelRef) -> _Input:
    src = open_source(ref.path if ref.path is not None else ref.registry)
    return _Input(ref.name, src, src.shape, src.config, src.tokenizer_dir)


def _check_inputs(inputs: list[_Input], has_base: bool, aligned: bool = False) -> None:
    """All names and shapes at once (tree's checks on shape-only stand-ins; nothing is read). aligned: the
    vocabulary tensors are aligned by token (their vocabulary sizes may differ). A mismatch is one short error:
    how the architectures differ (from each input's config.json, else its tensors), the first tensors that
    differ, and for a vocabulary-only difference the YAML key that aligns vocabularies (`tokenizer_source`)."""
    shapes = [{k: jax.ShapeDtypeStruct(inp.shape(k), np.float32) for k in inp.tensors} for inp in inputs]
    tree.check_inputs([inp.name for inp in inputs], shapes, vocab_tensors=tree.VOCAB_TENSORS,
                      embed_alignment="union" if aligned else None, has_base=has_base,
                      configs=[inp.config for inp in inputs],
                      alignment_hint=tree.YAML_ALIGNMENT_HINT if has_base else tree.YAML_ALIGNMENT_HINT_NO_BASE)


def _is_vocab(name: str, inp: _Input) -> bool:
    """A tensor with a vocabulary axis (HF layout: axis 0): a floating tensor named like tree.VOCAB_TENSORS
    (from the source's header / metadata: nothing is read)."""
    return (X.is_float(inp.tensors.dtype(name)) and len(inp.shape(name)) >= 1
            and any(s in name for s in tree.VOCAB_TENSORS))


def _alignment(plan: MergePlan, inputs: Mapping[str, _Input], *, first: str) -> Optional[VOC.VocabularyAlignment]:
    """The vocabulary alignment of `plan.tokenizer` over every input of the plan (None without one).

    The tokenizer base (and the merge base of the row rules) is the YAML's base_model; without one, `first`
    (the first model, or the config donor of a `slices:` plan) is the tokenizer base and no input is the merge
    base. Inputs in the plan's order (mergekit's order within a tensor: the models, then the base)."""
    tk = plan.tokenizer
    if tk is None:
        return None
    no_dir = [n for n, inp in inputs.items() if inp.directory is None]
    if no_dir:
        raise VOC.VocabularyError(f"{plan.source}: tokenizer settings need HF directories (tokenizer.json, "
                                  f"config.json) for every input; {no_dir} are registry models stored as GGUF")
    tok_base = tk.base if tk.base is not None else first
    dirs = {n: inp.directory for n, inp in inputs.items() if n != tok_base}
    if tk.base is None:
        dirs = {tok_base: inputs[tok_base].directory, **dirs}
    return VOC.alignment_for_checkpoints(tk.source, inputs[tok_base].directory if tk.base is not None else None,
                                         dirs, base_name=tok_base, tokens=tk.tokens,
                                         pad_to_multiple_of=tk.pad_to_multiple_of)


def _check_parameters(plan: MergePlan, names: list[str], num_layers: int) -> list[dict[str, Any]]:
    """Every tensor's resolved parameters (params.resolve_for_tensor), all resolved before anything is read, so
    that a setting missing for some tensors (e.g. a weight given only under a filter) fails at once, listing
    the tensors."""
    method = get_method(plan.method)
    problems, resolved = [], []
    for name in names:
        try:
            resolved.append(P.resolve_for_tensor(method, name, parameters=plan.parameters,
                                                 model_parameters=list(plan.model_parameters),
                                                 model_names=plan.model_names, num_layers=num_layers))
        except P.ParameterError as e:
            problems.append(str(e))
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise P.ParameterError(f"{plan.source}: {len(problems)} tensor(s) cannot be merged with these "
                               "parameters:\n  " + "\n  ".join(problems[:20]) + more)
    return resolved


def _dtype_name(dtype) -> str:
    for name, d in NP_DTYPES.items():
        if np.dtype(dtype) == d:
            return name
    return str(np.dtype(dtype))


def merge_checkpoints(plan: MergePlan, out_dir: str | os.PathLike, *, overwrite: bool = False,
                      max_shard_size: int | str = "5GB", progress: bool = True, seed: int = 0, prefetch: int = 1,
                      device: Optional[jax.Device] = None, timers: Optional[X.Timers] = None,
                      compute_dtype: Optional[str] = None, read_workers: Optional[int] = None) -> Path:
    """Runs `plan` (mergekit_yaml.MergePlan) over HF checkpoints, streaming; returns the output directory.

    compute_dtype: the merge arithmetic (precision.py): None or 'float32' (default here: float32, rounded once
    at the end), 'mergekit' (mergekit 0.1.5's: the plan's `dtype`, else the inputs' stored dtype; what
    `cfm-merge --mergekit_yaml` uses by default), 'float16' | 'bfloat16'. With a reduced compute dtype and no
    `out_dtype`, arcee_fusion and ramplus_tl write float32 as mergekit does (MergeMethod.result_dtype).

    progress: a tqdm bar (tensors; bytes read and written); prefetch: how many tensor groups the read-ahead
    thread reads ahead of the one being merged (host memory grows by one group per step); device: where the
    kernels run (default: jax's default device); timers: an execute.Timers collecting busy seconds per stage;
    read_workers: groups read (and copied to the device) at once (default: 1 on the CPU,
    execute.READ_WORKERS_ACCELERATOR on an accelerator).
    Raises tree.MergeInputError (names/shapes, all at once, before anything is written), FileExistsError
    (existing output without overwrite), params.ParameterError / ValueError (settings, contract).
    """
    check_contract(plan)
    out_dir = Path(out_dir)
    # before any work: an existing or foreign output is refused, and so is one of the inputs
    check_overwritable(out_dir, overwrite, inputs=[r.path for r in plan.refs.values()])
    limit = parse_size(max_shard_size)
    if limit <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size!r}")
    if int(prefetch) < 1:
        raise ValueError(f"prefetch must be at least 1, got {prefetch!r}")
    if read_workers is not None and int(read_workers) < 1:
        raise ValueError(f"read_workers must be at least 1, got {read_workers!r}")
    precision.resolve(compute_dtype, None, ())  # a bad value is refused before any work
    load_dtype = NP_DTYPES[plan.dtype] if plan.dtype else None
    out_dtype = NP_DTYPES[plan.out_dtype] if plan.out_dtype else None
    if "float64" in (plan.dtype, plan.out_dtype):  # mergekit computes in float64 there; we cannot
        LOG.warning("%s: float64 is computed and written as float32 here (jax without x64); mergekit computes "
                    "and writes float64, so the tensors differ by float32 rounding", plan.source)
    run = functools.partial(_execute, overwrite=overwrite, limit=limit, progress=progress, load_dtype=load_dtype,
                            prefetch=prefetch, device=device, timers=timers, read_workers=read_workers)
    dtypes = functools.partial(X.dtypes_for, load_dtype=load_dtype, out_dtype=out_dtype,
                               compute_dtype=compute_dtype)

    if plan.slices is not None:
        return _merge_slices(plan, out_dir, seed=seed, load_dtype=load_dtype, dtypes=dtypes, run=run)
    method = get_method(plan.method)
    base = _open(plan.base) if plan.base is not None else None
    models = [_open(r) for r in plan.models]
    inputs = ([base] if base is not None else []) + models
    _check_inputs(inputs, base is not None, aligned=plan.tokenizer is not None)
    ref = inputs[0]
    names = list(ref.tensors)
    num_layers = P.num_layers_of(names)
    resolved = _check_parameters(plan, names, num_layers)
    alignment = _alignment(plan, {inp.name: inp for inp in inputs}, first=plan.models[0].name)

    groups = []
    for name, params in zip(names, resolved):
        shape = tuple(ref.shape(name))
        vocab = alignment is not None and _is_vocab(name, ref)
        if vocab:
            shape = (alignment.padded_size, *shape[1:])
        odt, cdt = dtypes(method, [inp.tensors.dtype(name) for inp in inputs])
        groups.append(X.TensorGroup(
            name, shape, odt,
            functools.partial(_read_models, base, models, name, alignment if vocab else None, load_dtype),
            params, tensor_key(seed, name) if method.randomized else None, [inp.name for inp in inputs], cdt))
    config = dict(ref.config)
    return run(method, groups, out_dir, f"merge {plan.method}",
               lambda tmp, written: _write_config_and_tokenizer(tmp, plan, ref, config, written, alignment,
                                                                {inp.name: inp for inp in inputs}))


def _read_models(base: Optional[_Input], models: list[_Input], name: str,
                 alignment: Optional[VOC.VocabularyAlignment], load_dtype) -> tuple:
    """(base's tensor or None, [each model's tensor]) of a `models:` plan, in their stored dtypes (the load
    cast happens in the kernel); a vocabulary tensor under `alignment`: every input read, cast to the load
    dtype and aligned by token into the output vocabulary (as the alignment's row averages need them)."""
    if alignment is None:
        return (None if base is None else base.tensors[name]), [m.tensors[name] for m in models]
    inputs = ([base] if base is not None else []) + models
    aligned = alignment.align_all({inp.name: _read(inp, name, load_dtype) for inp in inputs}, axis=0, tensor=name)
    return (None if base is None else aligned[base.name]), [aligned[m.name] for m in models]


def _execute(method: MergeMethod, groups: list[X.TensorGroup], out_dir: Path, desc: str, finish: Callable, *,
             overwrite: bool, limit: int, progress: bool, load_dtype, prefetch: int, device, timers,
             read_workers: Optional[int]) -> Path:
    """Runs the groups through execute.merge_to_shards inside `atomic_directory(out_dir)`, then
    finish(tmp, {float dtype names written}) writes the config and tokenizer files there."""
    bar = None
    if progress:
        total = sum(int(np.prod(g.shape, dtype=np.int64)) * np.dtype(g.out_dtype).itemsize for g in groups)
        bar = X.Progress(len(groups), desc, total_bytes=total)
    try:
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            X.merge_to_shards(method, groups, tmp, limit=limit, load_dtype=load_dtype, prefetch=prefetch,
                              device=device, timers=timers, progress=None if bar is None else bar.update,
                              read_workers=read_workers)
            finish(tmp, {_dtype_name(g.out_dtype) for g in groups})
    finally:
        if bar is not None:
            bar.close()
    if timers is not None:
        LOG.info("%s: busy seconds per stage %s", desc, timers.summary())
    return out_dir


def _read(inp: _Input, name: str, load_dtype) -> np.ndarray:
    """Tensor `name` of `inp`, floating ones cast to `load_dtype` when given (mergekit's `dtype`)."""
    x = inp.tensors[name]
    if load_dtype is not None and X.is_float(x.dtype):
        x = x.astype(load_dtype)
    return x


def _write_config_and_tokenizer(tmp: Path, plan: MergePlan, ref: _Input, config: dict, dtypes_written: set,
                                alignment: Optional[VOC.VocabularyAlignment] = None,
                                inputs: Optional[Mapping[str, _Input]] = None) -> None:
    """config.json (torch_dtype set to the written float dtype; vocab_size = the aligned vocabulary's padded
    size) and the tokenizer files: without an alignment, the reference's (`ref`: the config donor) files; with
    one, the alignment's tokenizer.json and the tokenizer donor's (the source model, else the tokenizer base)
    tokenizer_config.json / special_tokens_map.json. `plan.chat_template` goes into tokenizer_config.json."""
    inputs = inputs or {ref.name: ref}
    floats = sorted(d for d in dtypes_written if d in NP_DTYPES)
    if floats:
        config["torch_dtype"] = floats[0] if len(floats) == 1 else "float32"
        if "dtype" in config:
            config["dtype"] = config["torch_dtype"]
    if alignment is not None:
        text = config.get("text_config")
        if "vocab_size" not in config and isinstance(text, dict) and "vocab_size" in text:
            config["text_config"] = dict(text, vocab_size=alignment.padded_size)  # a copy: the input's is kept
        else:
            config["vocab_size"] = alignment.padded_size
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    chat = _chat_template(plan, inputs)
    if alignment is None:
        tok_dir = ref.directory
        if tok_dir is None:  # e.g. a GGUF input: its tokenizer is rebuilt from the metadata
            if not ref.tensors.write_tokenizer(tmp):
                if chat is not None:
                    LOG.warning("%s: chat_template given but %s has no tokenizer; not written", plan.source,
                                ref.name)
                return
        else:
            for f in TOKENIZER_FILES + (CHAT_TEMPLATE_FILES if chat is None else ()):
                if (tok_dir / f).is_file():
                    shutil.copyfile(tok_dir / f, tmp / f)
        if chat is not None:
            cfg_path = tmp / "tokenizer_config.json"
            tok_cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
            tok_cfg["chat_template"] = chat
            cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
        return
    tk = plan.tokenizer
    tok_base = tk.base if tk.base is not None else ref.name
    donor = inputs[tk.source].directory if tk.source in inputs else inputs[tok_base].directory
    if not (donor / "tokenizer_config.json").is_file():
        donor = inputs[tok_base].directory
    alignment.tokenizer.save(str(tmp / "tokenizer.json"))
    cfg_path = donor / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {"tokenizer_class": "PreTrainedTokenizerFast"}
    if "added_tokens_decoder" in tok_cfg:  # the donor's ids are stale: the output's added tokens
        tok_cfg["added_tokens_decoder"] = added_tokens_decoder(alignment.tokenizer)
    missing = [f"{k}={v!r}" for k, v in tok_cfg.items()
               if k.endswith("_token") and isinstance(v, str) and v not in alignment.vocab]
    if missing:
        LOG.warning("%s: tokenizer_config.json of %s names special tokens missing from the merged vocabulary: %s",
                    plan.source, donor, ", ".join(missing))
    if chat is not None:
        tok_cfg["chat_template"] = chat
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    extra = ("special_tokens_map.json",) + (CHAT_TEMPLATE_FILES if chat is None else ())
    for f in extra:
        if (donor / f).is_file():
            shutil.copyfile(donor / f, tmp / f)
    if ref.directory is not None and (ref.directory / "generation_config.json").is_file():
        shutil.copyfile(ref.directory / "generation_config.json", tmp / "generation_config.json")


def _input_chat_template(directory: Optional[Path]) -> Optional[str]:
    """The chat template of an HF directory as transformers loads it: chat_template.jinja, else
    tokenizer_config.json's `chat_template` (a list of {name, template}: the 'default' one); stripped."""
    if directory is None:
        return None
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text().strip() or None
    for f, key in (("chat_template.json", "chat_template"), ("tokenizer_config.json", "chat_template")):
        if (directory / f).is_file():
            try:
                t = json.loads((directory / f).read_text()).get(key)
            except (ValueError, AttributeError):
                continue
            if isinstance(t, list):
                t = next((e.get("template") for e in t if isinstance(e, dict) and e.get("name") == "default"), None)
            if isinstance(t, str) and t.strip():
                return t.strip()
    return None


def _chat_template(plan: MergePlan, inputs: Mapping[str, _Input]) -> Optional[str]:
    """The chat template to write (None: keep the donor's). 'auto' (mergekit 0.1.5): the most common template
    among the inputs (ties: the first in the plan's order, base first; mergekit's order is a set's); none: None."""
    if plan.chat_template is None:
        return None
    text = chat_template_text(plan.chat_template)
    if text is not None:
        return text
    found = [t for t in (_input_chat_template(inp.directory) for inp in inputs.values()) if t is not None]
    if not found:
        LOG.warning("%s: chat_template: auto, but no input has a chat template", plan.source)
        return None
    return Counter(found).most_common(1)[0][0]


def _slices_config(plan: MergePlan, inputs: Mapping[str, _Input], donor: str, num_layers: int) -> dict:
    """The donor's config with the new layer count (and, where the config has one, a `layer_types` list taken
    from each output layer's first source)."""
    config = dict(inputs[donor].config)
    keys = [k for k in SLICE_LAYER_KEYS if isinstance(config.get(k), int)]
    if not keys:
        raise ValueError(f"{plan.source}: the config of {donor} has no layer count ({list(SLICE_LAYER_KEYS)}); "
                         "cannot write the merged model's config")
    config[keys[0]] = num_layers
    if isinstance(config.get("layer_types"), list):
        types = []
        for i, sl in enumerate(plan.slices):
            src = sl.sources[0]
            theirs = inputs[src.model].config.get("layer_types")
            if not isinstance(theirs, list) or len(theirs) < src.layer_range[1]:
                raise ValueError(f"{plan.source}: slices[{i}]: the config of {src.model} has no layer_types entry "
                                 f"for layers {list(src.layer_range)} (the donor {donor} has layer_types)")
            types += theirs[src.layer_range[0]:src.layer_range[1]]
        config["layer_types"] = types
    return config


def _merge_slices(plan: MergePlan, out_dir: Path, *, seed: int, load_dtype, dtypes: Callable, run: Callable) -> Path:
    """merge_checkpoints for a `slices:` plan: the tensor plan of slices.plan_tensors (renumbered layers; the
    tensors outside the layers from the first/last slice), one TensorGroup per output tensor (tree.merge_task's
    semantics: out_dtype default the base's stored dtype, else the first input's; integer tensors copied)."""
    method = get_method(plan.method)
    inputs = {name: _open(ref) for name, ref in plan.refs.items()}
    names = {name: list(inp.tensors) for name, inp in inputs.items()}
    base = None if plan.base is None else plan.base.name
    found = S.problems(method, plan.slices, base=base, num_layers={n: P.num_layers_of(v) for n, v in names.items()})
    if found:
        def line(loc):
            sl = plan.slices[loc[0]]
            return (sl.sources[loc[1]] if len(loc) > 1 else sl).line

        raise S.SliceError(f"{plan.source}: " + "\n  ".join(f"line {line(loc)}: {msg}" for loc, msg in found))
    donor = base if base is not None else plan.slices[0].sources[0].model
    tasks, num_layers = S.plan_tensors(method, plan.slices, names, base=base, parameters=plan.parameters,
                                       reference=donor)
    alignment = _alignment(plan, inputs, first=donor)

    def shape(m: str, n: str) -> tuple:  # aligned vocabulary tensors have padded_size rows
        s = tuple(inputs[m].shape(n))
        return (alignment.padded_size, *s[1:]) if alignment is not None and _is_vocab(n, inputs[m]) else s

    S.check_shapes(tasks, shape)
    resolved = S.resolve_all(method, tasks, source=plan.source)
    groups = []
    for task, kwargs in zip(tasks, resolved):
        m, n = task.base if task.base is not None else task.inputs[0]
        task_alignment = None
        if alignment is not None and _is_vocab(n, inputs[m]):  # checked for every task before writing
            task_alignment = _task_alignment(alignment, plan, task)
        pairs = ([task.base] if task.base is not None else []) + list(task.inputs)
        odt, cdt = dtypes(method, [inputs[m].tensors.dtype(n)] + [inputs[a].tensors.dtype(b) for a, b in pairs])
        groups.append(X.TensorGroup(
            task.name, shape(m, n), odt,
            functools.partial(_read_task, inputs, task, task_alignment, load_dtype), kwargs,
            tensor_key(seed, task.name) if method.randomized else None, [f"{n} of {m}" for m, n in pairs], cdt))
    config = _slices_config(plan, inputs, donor, num_layers)
    return run(method, groups, out_dir, f"merge {plan.method} ({num_layers} layers)",
               lambda tmp, written: _write_config_and_tokenizer(tmp, plan, inputs[donor], config, written,
                                                                alignment, inputs))


def _read_task(inputs: Mapping[str, _Input], task, alignment: Optional[VOC.VocabularyAlignment], load_dtype) -> tuple:
    """(base tensor or None, [input tensors]) of one slices.TensorTask, stored dtypes; a vocabulary tensor:
    read, cast to the load dtype and aligned over the task's inputs (`alignment`: _task_alignment)."""
    if alignment is None:
        read = lambda m, n: inputs[m].tensors[n]  # noqa: E731
    else:
        pairs = list(task.inputs) + ([task.base] if task.base is not None else [])
        aligned = alignment.align_all({m: _read(inputs[m], n, load_dtype) for m, n in pairs}, axis=0,
                                      tensor=task.name)
        read = lambda m, n: aligned[m]  # noqa: E731
    return (None if task.base is None else read(*task.base)), [read(m, n) for m, n in task.inputs]


def _task_alignment(alignment: VOC.VocabularyAlignment, plan: MergePlan, task) -> VOC.VocabularyAlignment:
    """The alignment of a vocabulary tensor task of a `slices:` plan: the row rules over this task's inputs
    (mergekit: the slice's sources), merge base: the task's base, else the YAML base_model if an input."""
    pairs = list(task.inputs) + ([task.base] if task.base is not None else [])
    names = tuple(dict.fromkeys(m for m, _ in pairs))
    rule_base = task.base[0] if task.base is not None else plan.tokenizer.base
    return alignment.restricted(names, rule_base if rule_base in names else None, plan.tokenizer.tokens,
                                tensor=task.name)


def merge_yaml(yaml_path: str | os.PathLike, out_dir: str | os.PathLike, **kwargs: Any) -> Path:
    """`merge_checkpoints(load_mergekit_yaml(yaml_path), out_dir, **kwargs)`."""
    from configurable_fm.ops.merge.mergekit_yaml import load_mergekit_yaml

    return merge_checkpoints(load_mergekit_yaml(yaml_path), out_dir, **kwargs)
