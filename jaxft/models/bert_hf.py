"""The BERT-family HF key table: every rename and transpose between HF tensors and jaxft parameters.

Reading or writing files is load.py's and export's job; this module only names and reshapes.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from jaxft.models.bert import BertSpec

# (jaxft path regex, HF key template, kind, in_body). in_body keys carry the family prefix ("bert.")
# in task checkpoints; head keys never do. kind says how the tensor is laid out:
#   copy      same shape
#   flat      HF keeps it flat ([N*H]); jaxft splits heads ([N, H])
#   linear1   torch Linear weight [out, in] -> kernel [in..., out...] with one input dim
#   linear2   the same with two input dims (attention output: [N, H] -> E)
#   conv1     GPT-2's Conv1D weight, already [in, out]: a plain reshape to kernel [in..., out...], one input dim
#   conv2     the same with two input dims
TABLE: tuple[tuple[str, str, str, bool], ...] = (
    (r"embeddings/word/embedding", "embeddings.word_embeddings.weight", "copy", True),
    (r"embeddings/position/embedding", "embeddings.position_embeddings.weight", "copy", True),
    (r"embeddings/token_type/embedding", "embeddings.token_type_embeddings.weight", "copy", True),
    (r"embeddings/norm/scale", "embeddings.LayerNorm.weight", "copy", True),
    (r"embeddings/norm/bias", "embeddings.LayerNorm.bias", "copy", True),
    (
        r"encoder/layers/(\d+)/attention/(query|key|value)/kernel",
        "encoder.layer.{0}.attention.self.{1}.weight",
        "linear1",
        True,
    ),
    (
        r"encoder/layers/(\d+)/attention/(query|key|value)/bias",
        "encoder.layer.{0}.attention.self.{1}.bias",
        "flat",
        True,
    ),
    (
        r"encoder/layers/(\d+)/attention/output/kernel",
        "encoder.layer.{0}.attention.output.dense.weight",
        "linear2",
        True,
    ),
    (r"encoder/layers/(\d+)/attention/output/bias", "encoder.layer.{0}.attention.output.dense.bias", "copy", True),
    (r"encoder/layers/(\d+)/attention_norm/scale", "encoder.layer.{0}.attention.output.LayerNorm.weight", "copy", True),
    (r"encoder/layers/(\d+)/attention_norm/bias", "encoder.layer.{0}.attention.output.LayerNorm.bias", "copy", True),
    (r"encoder/layers/(\d+)/up/kernel", "encoder.layer.{0}.intermediate.dense.weight", "linear1", True),
    (r"encoder/layers/(\d+)/up/bias", "encoder.layer.{0}.intermediate.dense.bias", "copy", True),
    (r"encoder/layers/(\d+)/down/kernel", "encoder.layer.{0}.output.dense.weight", "linear1", True),
    (r"encoder/layers/(\d+)/down/bias", "encoder.layer.{0}.output.dense.bias", "copy", True),
    (r"encoder/layers/(\d+)/mlp_norm/scale", "encoder.layer.{0}.output.LayerNorm.weight", "copy", True),
    (r"encoder/layers/(\d+)/mlp_norm/bias", "encoder.layer.{0}.output.LayerNorm.bias", "copy", True),
    (r"pooler/dense/kernel", "pooler.dense.weight", "linear1", True),
    (r"pooler/dense/bias", "pooler.dense.bias", "copy", True),
    (r"classifier/(dense|out_proj)/kernel", "classifier.{0}.weight", "linear1", False),
    (r"classifier/(dense|out_proj)/bias", "classifier.{0}.bias", "copy", False),
    (r"classifier/kernel", "classifier.weight", "linear1", False),
    (r"classifier/bias", "classifier.bias", "copy", False),
)

# Old TF-converted checkpoints name LayerNorm parameters gamma/beta.
_LEGACY_SUFFIXES = {".gamma": ".weight", ".beta": ".bias"}
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert")


class ArchitectureError(ValueError):
    """A checkpoint of a family this table does not describe."""


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


def body_prefix(spec: BertSpec, model_type: str) -> str:
    return ("bert" if spec.family == "bert" else model_type.replace("-", "_")) + "."


def hf_key_for(path: str, prefix: str) -> tuple[str, str] | None:
    """(HF key, kind) for a jaxft parameter path, or None if the table has no entry."""
    for pattern, template, kind, in_body in TABLE:
        m = re.fullmatch(pattern, path)
        if m:
            return (prefix if in_body else "") + template.format(*m.groups()), kind
    return None


def normalize_key(key: str) -> str:
    for old, new in _LEGACY_SUFFIXES.items():
        if key.endswith(old):
            return key[: -len(old)] + new
    return key


_INPUT_DIMS = {"linear1": 1, "linear2": 2, "conv1": 1, "conv2": 2}


def hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape that holds a jaxft parameter of `shape`."""
    if kind == "copy":
        return shape
    if kind == "flat":
        return (int(np.prod(shape)),)
    n_in = _INPUT_DIMS[kind]
    fan_in, fan_out = int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:]))
    return (fan_in, fan_out) if kind.startswith("conv") else (fan_out, fan_in)


def to_jaxft(kind: str, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if kind in ("copy", "flat", "conv1", "conv2"):
        return tensor.reshape(shape)
    return np.ascontiguousarray(tensor.T).reshape(shape)


def to_hf(kind: str, array: np.ndarray) -> np.ndarray:
    if kind == "copy":
        return array
    if kind == "flat":
        return array.reshape(-1)
    k = array.reshape(int(np.prod(array.shape[: _INPUT_DIMS[kind]])), -1)
    return k if kind.startswith("conv") else np.ascontiguousarray(k.T)
