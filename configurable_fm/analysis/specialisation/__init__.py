"""Neuron specialisation (Xiao et al. 2024, arXiv 2409.02877, section 4) reproduced on the library's decoders.

    from configurable_fm.analysis.specialisation import build_functions, specialisation_study, markdown, figures
    data = build_functions(n_score=100, n_eval=24, facts="experiments/edit/data/smollm2_facts.jsonl")
    result = specialisation_study(model, tokenizer, data, options=StudyOptions())
    print(markdown(result)); figures(result, "out/figures")

functions.py builds single-label instruction data for the survey's seven functions from text available offline
(standard-library code, synthetic math, WordNet, a facts file, gettext catalogs, the State of the Union corpus and
the hand-written prompts.json); study.py runs the analyses on analysis/neurons.py (AP scores, dynamic masking, top
neurons, overlaps) and analysis/capture.py; report.py writes the tables and figures next to the survey's numbers.
The command is `cfm-analyze-neurons` (configurable_fm/cli/analyze_neurons.py).
"""
from configurable_fm.analysis.specialisation.functions import (FUNCTIONS, FunctionData, FunctionDataError, Instance,
                                                               build_functions, handwritten, read_mo)
from configurable_fm.analysis.specialisation.report import (SURVEY_OVERLAP, SURVEY_PRUNING, figures, markdown,
                                                            survey_matrix)
from configurable_fm.analysis.specialisation.study import (Encoded, StudyError, StudyOptions, encode, hidden_points,
                                                           indicator_histograms, neuron_interventions, output_scales,
                                                           ppl_change, prompt_activations, response_nll,
                                                           specialisation_study)

__all__ = ["FUNCTIONS", "FunctionData", "FunctionDataError", "Instance", "build_functions", "handwritten", "read_mo",
           "SURVEY_OVERLAP", "SURVEY_PRUNING", "figures", "markdown", "survey_matrix", "Encoded", "StudyError",
           "StudyOptions", "encode", "hidden_points", "indicator_histograms", "neuron_interventions", "output_scales",
           "ppl_change", "prompt_activations", "response_nll", "specialisation_study"]
