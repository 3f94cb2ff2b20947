"""Data: tokenizers (tokenizer.json and GGUF metadata), corpora builders, input pipelines, synthetic tasks."""
from configurable_fm.data.tokenizers import gguf_chat_template, gguf_special_tokens, load_tokenizer, tokenizer_from_gguf

__all__ = ["gguf_chat_template", "gguf_special_tokens", "load_tokenizer", "tokenizer_from_gguf"]
