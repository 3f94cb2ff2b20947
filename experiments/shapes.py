"""Llama shapes that the benchmark scripts share with the PyTorch anchors (../shared/anchors/*.py): SmolLM2-135M's
shape and experiments/pretrain.py:1b, as keyword arguments of a llama model spec (models.factory.build_model)."""

SHAPES = {
    "135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                 num_kv_heads=3, rope_theta=1e5),
    "1b": dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
               num_kv_heads=8, rope_theta=1e4),
}
