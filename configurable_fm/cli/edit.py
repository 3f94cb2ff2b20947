"""`cfm-edit` (scripts/edit.py): edit facts into a model (ROME, MEMIT, AlphaEdit, the RLS lifelong editor, FT-L)
from an edit config, evaluate it before and after, and write the edited model, the delta and a report.

    cfm-edit --config experiments/edit/rome.py:smollm2 --config.input=smollm2-135m-instruct \\
        --config.requests=experiments/edit/data/smollm2_facts.jsonl --config.output=OUT \\
        [--config.mode=batch|sequential|independent] [--config.format=hf|orbax] [--config.subset=::24] \
        [--config.overwrite=True]
    cfm-edit --config experiments/edit/alphaedit.py:smollm2 --config.input=IN --config.requests=FILE.jsonl \\
        --config.output=OUT --config.mode=sequential --config.eval_every=10

Mode 'independent' (CounterFact's protocol: each request edits the unedited model and is scored alone) writes
only metrics.json and report.md. Otherwise OUT/ holds model/ (an HF directory with the source's tokenizer files, or an orbax model checkpoint with
format='orbax'), delta/ (the total change as a brick set: bricks.deltas.load_delta; apply(source, delta) gives
the edited model), metrics.json (settings, before/after summaries with standard errors, per-request rows, the
sequential curve, times) and report.md (a readable before/after table). The configs are experiments/edit/*.py
(their docstrings, and configurable_fm/stages/edit.py, explain every key: input, tokenizer, requests, subset,
method, layers, hparams, mode, batch_size, eval_every, seed, stats, eval); the work is
`stages.edit.edit_from_config`. `input` may be a registry name, a GGUF file, an HF directory, an orbax checkpoint
or a training workdir (the last two need `tokenizer`).
Bad input (an unknown key or value, a request file with a malformed line, a missing key, a prompt without '{}',
an empty target, a missing source, an existing output) prints one line naming the key or the file and line and
exits with status 1 (an override naming no key of the config: status 2); everything is checked before the model
is loaded, and the output appears atomically, so nothing is written on error.
"""
from __future__ import annotations

from typing import Sequence

from configurable_fm import cli

def define(fv) -> None:
    cli.config_flag(fv, "config", "edit config file: experiments/edit/{rome,memit,alphaedit,rlsedit,ft_l}.py"
                                  "[:smollm2|:test] (set --config.input, --config.requests and --config.output)")


def run(fv) -> None:
    from configurable_fm.bricks.deltas import save_delta
    from configurable_fm.interop.atomic import atomic_directory
    from configurable_fm.stages.edit import check_config, edit_from_config, load_tokenizer_for, write_outputs

    c = fv.config
    fmt, overwrite = cli.model_output(c, "edit config", required=("input", "requests", "output"),
                                      see="experiments/edit/__init__.py", inputs=("input", "requests"))
    d = check_config(c)
    chat = load_tokenizer_for(d)
    result = edit_from_config(c, log=print, tokenizer=chat)
    independent = d["mode"] == "independent"  # an evaluation protocol: no edited model to write
    with atomic_directory(c.output, overwrite=overwrite) as tmp:
        if independent:
            pass
        elif fmt == "hf":
            from configurable_fm.interop.hf import to_hf

            to_hf(result.model, tmp / "model", tokenizer=chat)
        else:
            from configurable_fm.interop.orbax_io import save_model

            save_model(result.model, tmp / "model")
        if not independent:
            save_delta(result.delta, tmp / "delta")
        write_outputs(tmp, result)
    after = result.metrics["after"]["summary"]
    score = lambda k: "–" if after.get(k, {}).get("mean") is None else f"{100 * after[k]['mean']:.0f}"
    print(result.report)
    print(f"edited {d['input']} with {d['method']} at layers {d['layers']} ({len(d['requests'])} requests, "
          f"{d['mode']}): ES {score('efficacy_score')} PS {score('paraphrase_score')} NS "
          f"{score('neighborhood_score')} -> {c.output} "
          f"({'metrics.json, report.md' if independent else f'model/ {fmt}, delta/, metrics.json, report.md'})")


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(run, define, argv, prog="cfm-edit", required=("config",))
