"""HF <-> bert family: BertModel, and the encoder of BertFor* checkpoints (their task heads are not loaded).

Keys of BertFor* checkpoints carry a `bert.` prefix, which is stripped; their heads (`cls.*`, `classifier.*`,
`qa_outputs.*`) and the buffers `embeddings.position_ids` / `embeddings.token_type_ids` are skipped.
Whether the model has a pooler follows transformers: BertModel, BertForPreTraining, BertForNextSentencePrediction,
BertForSequenceClassification and BertForMultipleChoice build one; BertForMaskedLM, BertForTokenClassification
and BertForQuestionAnswering do not (and skip a stored pooler, as transformers does). config.json carries no
such flag, so a pooler-less model is written as BertModel with our own key `cfm_add_pooling_layer: false`
(transformers keeps it as an inert attribute; load such a directory with
`BertModel.from_pretrained(path, add_pooling_layer=False)`), which is read back, so it round-trips.
A BertModel checkpoint saved by transformers with add_pooling_layer=False (no pooler tensors, no key) is
refused with the missing `pooler.dense.*` tensors named.
Writing produces a BertModel directory (torch Linear weights are (out, in): kernels are transposed).
"""
from __future__ import annotations

from configurable_fm.interop.hf import Family, UnsupportedModel, linear, register_family, reject_unknown_config, same
from configurable_fm.models.bert import Bert, BertConfig

# HF architecture -> whether transformers builds its BertModel with a pooler.
ARCHITECTURES = {
    "BertModel": True, "BertForPreTraining": True, "BertForNextSentencePrediction": True,
    "BertForSequenceClassification": True, "BertForMultipleChoice": True,
    "BertForMaskedLM": False, "BertForTokenClassification": False, "BertForQuestionAnswering": False,
}

HANDLED = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "position_embedding_type",
    "cfm_add_pooling_layer",  # ours: see the module docstring
    "tie_word_embeddings",  # ties the masked-LM head's decoder, which is not loaded
}


def config_from_hf(c: dict) -> BertConfig:
    reject_unknown_config(c, HANDLED, "bert")
    kind = c.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise UnsupportedModel(f"position_embedding_type={kind!r} is not implemented by the bert family "
                               "(only 'absolute')")
    for name in ("is_decoder", "add_cross_attention"):  # generically ignored, but they change BERT's forward
        if c.get(name):
            raise UnsupportedModel(f"{name}=True is not implemented by the bert family (encoder only)")
    arch = next((a for a in c.get("architectures") or [] if a in ARCHITECTURES), "BertModel")
    return BertConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"], intermediate_size=c["intermediate_size"],
        hidden_act=c.get("hidden_act", "gelu"), max_position_embeddings=c.get("max_position_embeddings", 512),
        type_vocab_size=c.get("type_vocab_size", 2), layer_norm_eps=c.get("layer_norm_eps", 1e-12),
        add_pooling_layer=bool(c.get("cfm_add_pooling_layer", ARCHITECTURES[arch])))


def config_to_hf(cfg: BertConfig) -> dict:
    c = {
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size, "hidden_act": cfg.hidden_act,
        "max_position_embeddings": cfg.max_position_embeddings, "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.layer_norm_eps, "position_embedding_type": "absolute", "is_decoder": False,
        "add_cross_attention": False,
    }
    if not cfg.add_pooling_layer:
        # Not `add_pooling_layer`: transformers would take that config attribute over the
        # from_pretrained(add_pooling_layer=False) argument and build (random) pooler weights anyway.
        c["cfm_add_pooling_layer"] = False
    return c


def _dense(path: str) -> list:
    return [linear(f"{path}.kernel", f"{path}.weight"), same(f"{path}.bias", f"{path}.bias")]


def _norm(path: str) -> list:
    return [same(f"{path}.weight", f"{path}.weight"), same(f"{path}.bias", f"{path}.bias")]


def tensor_map(cfg: BertConfig) -> list:
    maps = [same(f"embeddings.{n}.embedding", f"embeddings.{n}.weight")
            for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
    maps += _norm("embeddings.LayerNorm")
    for i in range(cfg.num_layers):
        p = f"encoder.layer.{i}"
        for n in ("query", "key", "value"):
            maps += _dense(f"{p}.attention.self.{n}")
        maps += _dense(f"{p}.attention.output.dense") + _norm(f"{p}.attention.output.LayerNorm")
        maps += _dense(f"{p}.intermediate.dense")
        maps += _dense(f"{p}.output.dense") + _norm(f"{p}.output.LayerNorm")
    if cfg.add_pooling_layer:
        maps += _dense("pooler.dense")
    return maps


def ignored_keys(cfg: BertConfig) -> list[str]:
    keys = [r"embeddings\.(position_ids|token_type_ids)",  # buffers
            r"(cls|classifier|qa_outputs)\..*"]  # BertFor* task heads
    if not cfg.add_pooling_layer:
        # e.g. bert-base-uncased: a BertForMaskedLM config over a checkpoint that kept its pre-training pooler,
        # which transformers' BertForMaskedLM does not load either.
        keys.append(r"pooler\..*")
    return keys


def build(cfg, *, rngs, param_dtype):
    return Bert(cfg, rngs=rngs, param_dtype=param_dtype)


BERT_FAMILY = register_family(Family(
    name="bert", architectures=tuple(ARCHITECTURES), module_type=Bert, config_from_hf=config_from_hf,
    config_to_hf=config_to_hf, build=build, tensor_map=tensor_map, ignored_keys=ignored_keys,
    key_prefixes=("bert.",)))
