"""Updating bricks: knowledge editing as pure functions that return deltas (bricks.deltas).

    reqs = load_requests("edits.jsonl")                                   # flat or CounterFact records
    stats = cached_second_moments(model, batches, layers=[5], corpus="wiki", n_tokens=100_000, cache_dir="stats")
    delta = rome(model, tok, reqs[0], layer=5, stats=stats, key=jax.random.key(0))     # one rank-one term
    delta = memit(model, tok, reqs, layers=[3, 4, 5], stats=stats, key=jax.random.key(0))  # one term per layer
    edited = bricks.deltas.apply(model, delta); model_again = bricks.deltas.rollback(edited, delta)

requests.py  Request, load_requests (JSONL, flat or CounterFact-nested; errors name the line)
sites.py     where keys are read and values written: the MLP output projection of a layer (llama, gpt2)
stats.py     C = E[k k^T] of a site's keys over a corpus (analysis.reduce_over), cached as safetensors
keys.py      tokenisation of prompts, context templates (fixed or generated), k* averaged over templates
values.py    v* by Adam on a vector added at one tap point (NLL + KL + weight decay, norm clamp), batched
rome.py      ROME's rank-one insertion (rome_update: the closed form; rome: the whole edit)
memit.py     MEMIT's least-squares batch insertion spread over layers (memit_update, memit; memit_spread: the
             targets and spreading that MEMIT, AlphaEdit and the RLS editor share)
alphaedit.py AlphaEdit: MEMIT projected onto the null space of the preserved keys, with a key history
rlsedit.py   the lifelong editor: recursive least squares (sequential = batch least squares over all edits)
finetune.py  FT-L: Adam on one MLP output projection with an L-infinity clamp on the change
session.py   sequential editing: EditSession (edit, rollback, on_edit every N) over a pure fold (edit_step)

Sequential editing:
    session = EditSession(model, tok, "alphaedit", layers=[3, 4, 5], stats=stats, key=jax.random.key(0))
    for batch in batches: session.edit(batch)
    session.model, session.total(), session.rollback(1)
"""
from configurable_fm.ops.update.keys import (MEMIT_CONTEXT, ROME_CONTEXT, Encoder, Generated, compute_keys,
                                             context_templates, generate_prefixes, values_at_subject)
from configurable_fm.ops.update.alphaedit import (AlphaEditHparams, AlphaEditState, alphaedit, alphaedit_init,
                                                  alphaedit_undo, alphaedit_update, null_space_projector,
                                                  nullspace_threshold_for_energy)
from configurable_fm.ops.update.finetune import FTHparams, ft
from configurable_fm.ops.update.memit import MEMITHparams, Spread, memit, memit_spread, memit_update
from configurable_fm.ops.update.requests import Request, RequestError, dump_requests, load_requests, parse_lines, parse_request
from configurable_fm.ops.update.rlsedit import RLSEditHparams, RLSState, rls_init, rls_undo, rls_update, rlsedit
from configurable_fm.ops.update.rome import ROMEHparams, rome, rome_update
from configurable_fm.ops.update.session import (EDITORS, EditSession, Editor, SessionConfig, SessionState, edit_step,
                                                editor, init_session, session_config, undo_step)
from configurable_fm.ops.update.sites import EditSite, SiteError, edit_site, upstream_fingerprint
from configurable_fm.ops.update.stats import (KeyStats, StatsError, cached_second_moments, load_stats, save_stats,
                                              second_moments)
from configurable_fm.ops.update.values import ValueHparams, Values, optimize_values

__all__ = ["Request", "RequestError", "load_requests", "parse_request", "parse_lines", "dump_requests",
           "EditSite", "SiteError", "edit_site", "upstream_fingerprint",
           "KeyStats", "StatsError", "second_moments", "cached_second_moments", "save_stats", "load_stats",
           "Encoder", "Generated", "ROME_CONTEXT", "MEMIT_CONTEXT", "context_templates", "generate_prefixes",
           "compute_keys", "values_at_subject",
           "ValueHparams", "Values", "optimize_values",
           "ROMEHparams", "rome", "rome_update", "MEMITHparams", "memit", "memit_update", "memit_spread", "Spread",
           "AlphaEditHparams", "AlphaEditState", "alphaedit", "alphaedit_init", "alphaedit_update", "alphaedit_undo",
           "null_space_projector", "nullspace_threshold_for_energy",
           "RLSEditHparams", "RLSState", "rlsedit", "rls_init", "rls_update", "rls_undo",
           "FTHparams", "ft",
           "EDITORS", "Editor", "EditSession", "SessionConfig", "SessionState", "editor", "session_config",
           "init_session", "edit_step", "undo_step"]

# evaluate.py  metrics of edits: CounterFact ES/PS/NS (+ magnitudes, first-token), EasyEdit accuracies, fluency
from configurable_fm.ops.update.evaluate import (EditMetrics, EvaluationError, Evaluator, Stat, evaluate_requests,
                                                 ngram_entropy, summarize, write_summary)

__all__ += ["EditMetrics", "EvaluationError", "Evaluator", "Stat", "evaluate_requests", "ngram_entropy", "summarize",
            "write_summary"]

# facts.py  request sets: real facts checked against a model (build_fact_set), the synthetic testbed
from configurable_fm.ops.update.facts import (FactSet, RelationSpec, Testbed, build_fact_set, known_targets,
                                              synthetic_testbed, write_fact_set)

__all__ += ["FactSet", "RelationSpec", "Testbed", "build_fact_set", "known_targets", "synthetic_testbed",
            "write_fact_set"]
