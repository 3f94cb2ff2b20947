"""Checkpoint formats: Hugging Face safetensors, GGUF, and the lazy tensor store under them."""
