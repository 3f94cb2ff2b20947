"""Adapter configs (ml-collections): merge.py (for scripts/adapters.py) merges one LoRA adapter, or a combination of
several (PEFT's add_weighted_adapter, or the exact combination of their updates), into a base model;
lora_synthetic.py and lora_corpus.py (for scripts/train.py) train an adapter (LoRA, DoRA, IA3 or bottleneck) on a
frozen base, on synthetic tasks or on a code / English corpus (configurable_fm/train/adapters.py)."""
