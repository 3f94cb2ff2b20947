"""configurable_fm: build LLMs from bricks, and merge, grow, update and route them with pure JAX functions."""

__version__ = "0.1.0"
