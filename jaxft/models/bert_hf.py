"""The BERT-family HF key table: every rename and transpose between HF tensors and jaxft parameters, the BertSpec read
from an HF config, and the transformers classes and state-dict keys an export writes.

It names and reshapes only; reading or writing files is load.py's and export's job.
"""

from __future__ import annotations

from typing import Any

from jaxft.models.bert import BertSpec
from jaxft.models.hf_layout import (
    HF_FLAX_LEAVES,
    TASK_CLASS_SUFFIXES,
    ArchitectureError,
    HFEntry,
    KeyRenames,
    Kind,
    lookup,
)

COPY, FLAT, LINEAR1, LINEAR2 = Kind.COPY, Kind.FLAT, Kind.LINEAR1, Kind.LINEAR2

# Rows inside the body, whose keys carry the body prefix ("bert.", "roberta.") in task checkpoints.
BODY_TABLE = (
    (r"embeddings/word/embedding", "embeddings.word_embeddings.weight", COPY),
    (r"embeddings/position/embedding", "embeddings.position_embeddings.weight", COPY),
    (r"embeddings/token_type/embedding", "embeddings.token_type_embeddings.weight", COPY),
    (r"embeddings/norm/scale", "embeddings.LayerNorm.weight", COPY),
    (r"embeddings/norm/bias", "embeddings.LayerNorm.bias", COPY),
    (
        r"encoder/layers/(\d+)/attention/(query|key|value)/kernel",
        "encoder.layer.{0}.attention.self.{1}.weight",
        LINEAR1,
    ),
    (r"encoder/layers/(\d+)/attention/(query|key|value)/bias", "encoder.layer.{0}.attention.self.{1}.bias", FLAT),
    (r"encoder/layers/(\d+)/attention/output/kernel", "encoder.layer.{0}.attention.output.dense.weight", LINEAR2),
    (r"encoder/layers/(\d+)/attention/output/bias", "encoder.layer.{0}.attention.output.dense.bias", COPY),
    (r"encoder/layers/(\d+)/attention_norm/scale", "encoder.layer.{0}.attention.output.LayerNorm.weight", COPY),
    (r"encoder/layers/(\d+)/attention_norm/bias", "encoder.layer.{0}.attention.output.LayerNorm.bias", COPY),
    (r"encoder/layers/(\d+)/up/kernel", "encoder.layer.{0}.intermediate.dense.weight", LINEAR1),
    (r"encoder/layers/(\d+)/up/bias", "encoder.layer.{0}.intermediate.dense.bias", COPY),
    (r"encoder/layers/(\d+)/down/kernel", "encoder.layer.{0}.output.dense.weight", LINEAR1),
    (r"encoder/layers/(\d+)/down/bias", "encoder.layer.{0}.output.dense.bias", COPY),
    (r"encoder/layers/(\d+)/mlp_norm/scale", "encoder.layer.{0}.output.LayerNorm.weight", COPY),
    (r"encoder/layers/(\d+)/mlp_norm/bias", "encoder.layer.{0}.output.LayerNorm.bias", COPY),
    (r"pooler/dense/kernel", "pooler.dense.weight", LINEAR1),
    (r"pooler/dense/bias", "pooler.dense.bias", COPY),
)
# The task heads' rows: their keys never carry the prefix.
HEAD_TABLE = (
    (r"classifier/(dense|out_proj)/kernel", "classifier.{0}.weight", LINEAR1),
    (r"classifier/(dense|out_proj)/bias", "classifier.{0}.bias", COPY),
    (r"classifier/kernel", "classifier.weight", LINEAR1),
    (r"classifier/bias", "classifier.bias", COPY),
)

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert")
# model_type -> the stem of its transformers classes (BertForSequenceClassification, ...).
CLASS_STEMS = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta", "camembert": "Camembert"}
# Old TF-converted checkpoints name LayerNorm parameters gamma/beta; legacy Flax msgpack files use Flax's names.
RENAMES = KeyRenames(suffixes=((".gamma", ".weight"), (".beta", ".bias")), flax_leaves=HF_FLAX_LEAVES)


def spec_from_hf_config(hf: dict[str, Any], task: str, num_labels: int, dropout_rate: float = -1.0) -> BertSpec:
    model_type = hf.get("model_type", "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ArchitectureError(
            f"model_type {model_type!r} is not a BERT-family encoder (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ArchitectureError(f"position_embedding_type {hf['position_embedding_type']!r} is not supported")
    family = "bert" if model_type == "bert" else "roberta"
    return BertSpec(
        family=family,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        max_positions=hf["max_position_embeddings"],
        type_vocab_size=hf.get("type_vocab_size", 2),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        dropout_rate=hf.get("hidden_dropout_prob", 0.1) if dropout_rate < 0 else dropout_rate,
        hidden_act=hf.get("hidden_act", "gelu"),
        pad_token_id=hf.get("pad_token_id", 0) if hf.get("pad_token_id") is not None else 0,
        task=task,
        num_labels=num_labels,
    )


def body_prefix(model_type: str) -> str:
    """The prefix of the body's keys in a task class: every RoBERTa variant keeps its encoder in `self.roberta`
    (base_model_prefix "roberta"), whatever its model_type."""
    return "bert." if model_type == "bert" else "roberta."


def detect_prefix(spec: BertSpec, hf: dict[str, Any], keys: set[str]) -> str:
    """The body prefix of a checkpoint's keys: task checkpoints have it, bare encoders (BertModel, MiniLM) not."""
    prefix = body_prefix(hf.get("model_type", "bert"))
    return prefix if any(k.startswith(prefix) for k in keys) else ""


def hf_entry(path: str, spec: BertSpec, prefix: str) -> HFEntry | None:
    """The HF key and kind of a '/'-joined jaxft parameter path, or None if the table has no row for it."""
    return lookup(path, BODY_TABLE, prefix) or lookup(path, HEAD_TABLE)


def hf_class_name(spec: BertSpec, model_type: str) -> str:
    return CLASS_STEMS[model_type] + TASK_CLASS_SUFFIXES[spec.task]


def hf_state_keys(spec: BertSpec, prefix: str) -> set[str]:
    """The state-dict keys of the transformers task class, written out from its modeling code rather than derived
    from the table, so a parameter the table (or the model) lacks is caught instead of left at random init by
    `from_pretrained`. Bert*/Roberta* token classes and Roberta* sequence classes have no pooler; Roberta*
    sequence classes have a two-layer head."""
    w_b = ("weight", "bias")
    embeddings = ["word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight"]
    keys = {f"{prefix}embeddings.{n}" for n in embeddings} | {f"{prefix}embeddings.LayerNorm.{w}" for w in w_b}
    modules = [f"attention.self.{m}" for m in ("query", "key", "value")] + [
        "attention.output.dense",
        "attention.output.LayerNorm",
        "intermediate.dense",
        "output.dense",
        "output.LayerNorm",
    ]
    keys |= {f"{prefix}encoder.layer.{i}.{m}.{w}" for i in range(spec.num_layers) for m in modules for w in w_b}
    sequence = spec.task == "sequence-classification"
    if sequence and spec.family == "bert":
        keys |= {f"{prefix}pooler.dense.{w}" for w in w_b}
    heads = ("classifier.dense", "classifier.out_proj") if sequence and spec.family == "roberta" else ("classifier",)
    return keys | {f"{h}.{w}" for h in heads for w in w_b}
