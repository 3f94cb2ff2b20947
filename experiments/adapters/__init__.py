"""Adapter configs (ml-collections) for scripts/adapters.py: merge.py merges one LoRA adapter, or a combination of
several (PEFT's add_weighted_adapter, or the exact combination of their updates), into a base model."""
