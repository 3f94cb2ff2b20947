"""Synthetic data: algorithmic tasks with exact-match scoring (tasks.py), training rows and evaluation for
(prompt, answer) examples (evaluate.py), and a facts corpus for knowledge-editing testbeds (facts.py)."""
from configurable_fm.data.synthetic.evaluate import (decode_ids, encode_examples, encode_text, evaluate_examples,
                                                     evaluate_task, prompt_ids, task_metric)
from configurable_fm.data.synthetic.facts import (RELATIONS, EditRequest, Fact, FactsCorpus, Query, Relation,
                                                  check_relations, entity_names)
from configurable_fm.data.synthetic.tasks import (SPLITS, TASK_TYPES, TASKS, Example, Task, exact_match, get_task,
                                                  make_task, normalize, split_unit)

__all__ = ["RELATIONS", "SPLITS", "TASKS", "TASK_TYPES", "EditRequest", "Example", "Fact", "FactsCorpus", "Query",
           "Relation", "Task", "check_relations", "decode_ids", "encode_examples", "encode_text", "entity_names",
           "evaluate_examples", "evaluate_task", "exact_match", "get_task", "make_task", "normalize", "prompt_ids",
           "split_unit", "task_metric"]
