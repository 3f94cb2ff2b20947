"""Data: corpora builders (corpora.py), token shards (shards.py), input pipelines (pipeline.py), synthetic tasks
(synthetic/), packaged texts (texts.py). Tokenizer files (tokenizer.json, GGUF metadata) are a format:
configurable_fm.interop.tokenizers."""
