"""Token-level training rows and exact-match evaluation for (prompt, answer) examples.

    batch = encode_examples(tok, task.examples("train", 1024, seed=0), seq_len=64, eos_id=2, pad_id=2)
    result = evaluate_task(model, tok, "sort", n=200, seed=0, eos_id=2, pad_id=2)   # {'exact_match': 0.93, ...}
    metrics = {"sort": task_metric("sort", tokenizer=tok, eos_id=2, pad_id=2)}      # for the trainer

Prompt and answer are tokenised separately (without special tokens) and concatenated, both for training
and for evaluation, so the model is always asked to continue exactly the prompt tokens it was trained on
(joint tokenisation could merge across the boundary). Row of one example, with m = len(s):

    s = [bos]? + ids(prompt) + ids(answer) + [eos]
    inputs[t] = s[t], targets[t] = s[t + 1]             for t < m - 1, else pad_id
    loss_mask[t] = 1 iff targets[t] is an answer token or the eos, i.e. t in [n_prompt - 1, m - 1)

Evaluation: greedy `models.generation.generate` on left-padded prompts (padding masked out through the
attention mask), the new tokens cut at the first eos, decoded without special tokens, and scored by the
task's scorer (exact match after `tasks.normalize`).
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np

from configurable_fm.checks import is_int
from configurable_fm.data.synthetic.tasks import Example, Task, exact_match, get_task
from configurable_fm.models.generation import generate


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens; `tokenizer` is a `tokenizers.Tokenizer` or any object
    whose encode(text, add_special_tokens=False) returns ids or an encoding with `.ids`."""
    enc = tokenizer.encode(text, add_special_tokens=False)
    return [int(i) for i in getattr(enc, "ids", enc)]


def decode_ids(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def prompt_ids(tokenizer, prompt: str, bos_id: int | None = None) -> list[int]:
    """[bos]? + ids(prompt): what the model reads, in training and in evaluation."""
    return ([] if bos_id is None else [int(bos_id)]) + encode_text(tokenizer, prompt)


def _pairs(examples: Iterable) -> list[Example]:
    out = []
    for i, ex in enumerate(examples):
        try:
            prompt, answer = ex
        except (TypeError, ValueError):
            raise TypeError(f"example {i} must be an Example or a (prompt, answer) pair, got {ex!r}") from None
        if not isinstance(prompt, str) or not isinstance(answer, str):
            raise TypeError(f"example {i}: prompt and answer must be strings, got {ex!r}")
        out.append(Example(prompt, answer))
    return out


def _check_id(name: str, value, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not is_int(value) or value < 0:
        raise ValueError(f"{name} must be a token id (int >= 0){' or None' * optional}, got {value!r}")


def encode_examples(tokenizer, examples: Iterable, seq_len: int, *, eos_id: int, pad_id: int,
                    bos_id: int | None = None) -> dict[str, np.ndarray]:
    """Training rows, one example per row: {'inputs': (N, L) int32, 'targets': (N, L) int32,
    'loss_mask': (N, L) float32} with L = seq_len; the loss covers exactly the answer tokens and the eos
    (module docstring). An example that needs more than seq_len positions is an error naming it."""
    _check_id("eos_id", eos_id)
    _check_id("pad_id", pad_id)
    _check_id("bos_id", bos_id, optional=True)
    if not is_int(seq_len) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
    pairs = _pairs(examples)
    inputs = np.full((len(pairs), seq_len), pad_id, np.int32)
    targets = np.full((len(pairs), seq_len), pad_id, np.int32)
    loss_mask = np.zeros((len(pairs), seq_len), np.float32)
    for i, (prompt, answer) in enumerate(pairs):
        p = prompt_ids(tokenizer, prompt, bos_id)
        a = encode_text(tokenizer, answer)
        if not p:
            raise ValueError(f"example {i}: prompt {prompt!r} encodes to no tokens (pass bos_id to start rows "
                             f"with a BOS token)")
        if not a:
            raise ValueError(f"example {i}: answer {answer!r} (prompt {prompt!r}) encodes to no tokens")
        s = p + a + [int(eos_id)]
        if len(s) - 1 > seq_len:
            raise ValueError(f"example {i} ({prompt!r} -> {answer!r}) needs {len(s) - 1} positions "
                             f"({len(p)} prompt + {len(a)} answer tokens + eos, minus one for the shift) "
                             f"but seq_len={seq_len}; raise seq_len or shorten the example")
        m = len(s)
        inputs[i, :m - 1] = s[:-1]
        targets[i, :m - 1] = s[1:]
        loss_mask[i, len(p) - 1:m - 1] = 1.0
    return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask}


def _cut(ids: Sequence[int], eos_id: int | None) -> list[int]:
    ids = [int(i) for i in ids]
    if eos_id is not None and eos_id in ids:
        ids = ids[:ids.index(eos_id)]
    return ids


def evaluate_examples(model, tokenizer, examples: Iterable, *, batch_size: int = 32,
                      max_new_tokens: int | None = None, eos_id: int | None = None, pad_id: int = 0,
                      bos_id: int | None = None, scorer: Callable[[str, str], float] = exact_match,
                      n_show: int = 4) -> dict:
    """Greedy generation for every prompt and the mean score: {'exact_match': float in [0, 1], 'n': int,
    'examples': the first `n_show` as {'prompt', 'answer', 'prediction'}}.

    All batches share one padded shape (B = batch_size, T = longest prompt; the last batch is filled with
    copies of its first row, which are discarded), so generation compiles once. max_new_tokens defaults to
    the longest answer in tokens + 2 (its eos and one spare token). eos_id: rows stop there and the
    prediction ends before it (None: the scorer's normalisation alone decides, e.g. the first line).
    """
    _check_id("eos_id", eos_id, optional=True)
    _check_id("pad_id", pad_id)
    _check_id("bos_id", bos_id, optional=True)
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    pairs = _pairs(examples)
    if not pairs:
        raise ValueError("evaluate_examples needs at least one example")
    prompts = [prompt_ids(tokenizer, ex.prompt, bos_id) for ex in pairs]
    for i, (p, ex) in enumerate(zip(prompts, pairs)):
        if not p:
            raise ValueError(f"example {i}: prompt {ex.prompt!r} encodes to no tokens (pass bos_id)")
    if max_new_tokens is None:
        max_new_tokens = max(len(encode_text(tokenizer, ex.answer)) for ex in pairs) + 2
    t = max(len(p) for p in prompts)
    predictions: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        chunk = chunk + [chunk[0]] * (batch_size - len(chunk))
        ids = np.full((batch_size, t), pad_id, np.int32)
        mask = np.zeros((batch_size, t), np.int32)
        for r, p in enumerate(chunk):
            ids[r, t - len(p):], mask[r, t - len(p):] = p, 1
        out = np.asarray(generate(model, ids, attention_mask=mask, max_new_tokens=int(max_new_tokens),
                                  eos_token_id=eos_id, pad_token_id=pad_id))
        n_real = min(batch_size, len(prompts) - start)
        predictions += [decode_ids(tokenizer, _cut(row[t:], eos_id)) for row in out[:n_real]]
    scores = [float(scorer(pred, ex.answer)) for pred, ex in zip(predictions, pairs)]
    shown = [{"prompt": ex.prompt, "answer": ex.answer, "prediction": pred}
             for ex, pred in zip(pairs[:n_show], predictions[:n_show])]
    return {"exact_match": float(np.mean(scores)), "n": len(pairs), "examples": shown}


def evaluate_task(model, tokenizer, task: str | Task, *, n: int = 100, seed: int = 0, split: str = "test",
                  batch_size: int = 32, max_new_tokens: int | None = None, eos_id: int | None = None,
                  pad_id: int = 0, bos_id: int | None = None, unique: bool = False, n_show: int = 4) -> dict:
    """Exact match of greedy generations on `task.examples(split, n, seed)` scored by `task.score`:
    {'exact_match': float in [0, 1], 'n': n, 'examples': [{'prompt', 'answer', 'prediction'}, ...]}.
    The remaining keywords are those of `evaluate_examples`."""
    task = get_task(task)
    return evaluate_examples(model, tokenizer, task.examples(split, n, seed, unique=unique),
                             batch_size=batch_size, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                             bos_id=bos_id, scorer=task.score, n_show=n_show)


def task_metric(task: str | Task, tokenizer=None, **kw) -> Callable[..., dict[str, float]]:
    """fn(model, tokenizer=None) -> {'<task name>/exact_match': float}: evaluate_task with the keywords `kw`
    (n, seed, split, batch_size, max_new_tokens, eos_id, pad_id, bos_id, unique). A tokenizer bound here lets
    the trainer call fn(model) alone; one passed to fn takes precedence."""
    task = get_task(task)
    allowed = {"n", "seed", "split", "batch_size", "max_new_tokens", "eos_id", "pad_id", "bos_id", "unique"}
    unknown = sorted(set(kw) - allowed)
    if unknown:
        raise TypeError(f"task_metric({task.name!r}): unknown keyword(s) {unknown}; valid: {sorted(allowed)}")
    if "split" in kw and kw["split"] not in ("train", "test"):
        raise ValueError(f"task_metric({task.name!r}): split must be 'train' or 'test', got {kw['split']!r}")

    def metric(model, tokenizer_=None) -> dict[str, float]:
        tok = tokenizer_ if tokenizer_ is not None else tokenizer
        if tok is None:
            raise ValueError(f"task metric {task.name!r} needs a tokenizer: bind one with "
                             f"task_metric(..., tokenizer=tok) or call metric(model, tok)")
        result = evaluate_task(model, tok, task, n_show=0, **kw)
        return {f"{task.name}/exact_match": result["exact_match"]}

    metric.__name__ = f"{task.name}_exact_match"
    return metric
