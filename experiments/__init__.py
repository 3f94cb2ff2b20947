"""Experiment configs (ml-collections): one file per study, `get_config(arg)`, the run command in the docstring."""
