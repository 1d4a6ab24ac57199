"""The ViT-family HF key table (ViT, DeiT): every rename and transpose between HF tensors and jaxft parameters, the
ViTSpec read from an HF config, and the transformers classes and state-dict keys an export writes.

It names and reshapes only; reading or writing files is load.py's and export's job.
"""

from __future__ import annotations

from typing import Any

from jaxft.models.hf_layout import (
    HF_FLAX_LEAVES,
    TASK_CLASS_SUFFIXES,
    ArchitectureError,
    HFEntry,
    KeyRenames,
    Kind,
    lookup,
    match_entry,
)
from jaxft.models.layers import ACTIVATIONS
from jaxft.models.vit import ViTSpec

COPY, FLAT, LINEAR1, LINEAR2, PATCH, GRID = Kind.COPY, Kind.FLAT, Kind.LINEAR1, Kind.LINEAR2, Kind.PATCH, Kind.GRID
# Rows of the body, whose keys carry the body prefix ("vit.", "deit.") in task checkpoints.
GLOBAL_TABLE = (
    (r"embeddings/cls_token", "embeddings.cls_token", COPY),
    (r"embeddings/distillation_token", "embeddings.distillation_token", COPY),
    (r"embeddings/position_embeddings", "embeddings.position_embeddings", GRID),  # resampled to data.image_size
    (r"embeddings/patch/kernel", "embeddings.patch_embeddings.projection.weight", PATCH),
    (r"embeddings/patch/bias", "embeddings.patch_embeddings.projection.bias", COPY),
    (r"norm/scale", "layernorm.weight", COPY),
    (r"norm/bias", "layernorm.bias", COPY),
)
# (jaxft path regex inside one layer, HF key template after "encoder.layer.{i}.", kind)
LAYER_TABLE = (
    (r"attention/(query|key|value)/kernel", "attention.attention.{0}.weight", LINEAR1),
    (r"attention/(query|key|value)/bias", "attention.attention.{0}.bias", FLAT),
    (r"attention/output/kernel", "attention.output.dense.weight", LINEAR2),
    (r"attention/output/bias", "attention.output.dense.bias", COPY),
    (r"attention_norm/scale", "layernorm_before.weight", COPY),
    (r"attention_norm/bias", "layernorm_before.bias", COPY),
    (r"mlp_norm/scale", "layernorm_after.weight", COPY),
    (r"mlp_norm/bias", "layernorm_after.bias", COPY),
    (r"up/kernel", "intermediate.dense.weight", LINEAR1),
    (r"up/bias", "intermediate.dense.bias", COPY),
    (r"down/kernel", "output.dense.weight", LINEAR1),
    (r"down/bias", "output.dense.bias", COPY),
)
LAYER_PREFIX = "encoder.layer.{}."
# The heads' rows: their keys never carry the prefix.
HEAD_TABLE = (
    (r"(classifier|cls_classifier|distillation_classifier)/kernel", "{0}.weight", LINEAR1),
    (r"(classifier|cls_classifier|distillation_classifier)/bias", "{0}.bias", COPY),
)
RENAMES = KeyRenames(flax_leaves=HF_FLAX_LEAVES)

SUPPORTED_MODEL_TYPES = ("vit", "deit")
CLASS_STEMS = {"vit": "ViT", "deit": "DeiT"}
TEACHER_CLASS = "DeiTForImageClassificationWithTeacher"


def hf_entry(path: str, spec: ViTSpec, prefix: str) -> HFEntry | None:
    """The HF key(s) and kind of a '/'-joined jaxft parameter path, or None if the table has no row for it;
    `layers/...` (scanned) names one key per layer."""
    entry = lookup(path, HEAD_TABLE) or match_entry(
        path, spec.num_layers, GLOBAL_TABLE, LAYER_TABLE, LAYER_PREFIX, prefix
    )
    if entry is not None and entry.keys[0].endswith(".scale"):  # LayerNorm: torch's weight
        entry = HFEntry(tuple(k[: -len("scale")] + "weight" for k in entry.keys), entry.kind, entry.stacked)
    return entry


def body_prefix(model_type: str) -> str:
    return f"{model_type}."


def detect_prefix(spec: ViTSpec, hf: dict[str, Any], keys: set[str]) -> str:
    """The body prefix of a checkpoint's keys: task checkpoints have it, a bare ViTModel / DeiTModel not."""
    prefix = body_prefix(spec.family)
    return prefix if any(k.startswith(prefix) for k in keys) else ""


def ignorable_keys(spec: ViTSpec) -> tuple[str, ...]:
    """Checkpoint keys (regexes) that may be present with no parameter: the pooler of a bare ViTModel or
    DeiTModel (the classification classes have none), and the mask token of a masked-image-modelling model."""
    prefix = rf"({spec.family}\.)?"
    return (prefix + r"pooler\.dense\.(weight|bias)", prefix + r"embeddings\.mask_token")


def hf_class_name(spec: ViTSpec, model_type: str) -> str:
    if spec.distillation_head:
        return TEACHER_CLASS
    return CLASS_STEMS[model_type] + TASK_CLASS_SUFFIXES["image-classification"]


def hf_state_keys(spec: ViTSpec, prefix: str) -> set[str]:
    """The state-dict keys of ViTForImageClassification / DeiTForImageClassification(WithTeacher), written out
    from their modeling code rather than derived from the table."""
    w_b = ("weight", "bias")
    embeddings = ["cls_token", "position_embeddings"] + (["distillation_token"] if spec.family == "deit" else [])
    keys = {f"{prefix}embeddings.{n}" for n in embeddings}
    keys |= {f"{prefix}embeddings.patch_embeddings.projection.{w}" for w in w_b}
    modules = [f"attention.attention.{m}" for m in ("query", "key", "value")] + [
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
        "layernorm_before",
        "layernorm_after",
    ]
    layer = {f"{prefix}encoder.layer.{i}.{m}.{w}" for i in range(spec.num_layers) for m in modules for w in w_b}
    if not spec.qkv_bias:
        layer = {k for k in layer if not any(f".attention.attention.{m}.bias" in k for m in ("query", "key", "value"))}
    keys |= layer | {f"{prefix}layernorm.{w}" for w in w_b}
    heads = ("cls_classifier", "distillation_classifier") if spec.distillation_head else ("classifier",)
    return keys | {f"{h}.{w}" for h in heads for w in w_b}


# ------------------------------------------------------------------------------------------------- config


def spec_from_hf_config(
    hf: dict[str, Any], num_labels: int, dropout_rate: float = -1.0, *, scan_layers: bool = True
) -> ViTSpec:
    """ViTSpec from an HF config.json dict; ArchitectureError names whatever is not supported."""
    model_type = hf.get("model_type", "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ArchitectureError(
            f"model_type {model_type!r} is not a ViT-family model (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    act = hf.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise ArchitectureError(f"hidden_act {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    image, patch = hf.get("image_size", 224), hf.get("patch_size", 16)
    if not isinstance(image, int) or not isinstance(patch, int):
        raise ArchitectureError(f"image_size {image!r} and patch_size {patch!r} must be one number each (square)")
    if image % patch:
        raise ArchitectureError(f"image_size {image} is not a multiple of patch_size {patch}")
    hidden = hf.get("hidden_dropout_prob", 0.0)
    return ViTSpec(
        family=model_type,
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        image_size=image,
        patch_size=patch,
        num_channels=hf.get("num_channels", 3),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        dropout_rate=hidden if dropout_rate < 0 else dropout_rate,
        attention_dropout_rate=hf.get("attention_probs_dropout_prob", 0.0) if dropout_rate < 0 else dropout_rate,
        hidden_act=act,
        qkv_bias=hf.get("qkv_bias", True),
        num_labels=num_labels,
        distillation_head=TEACHER_CLASS in (hf.get("architectures") or []),
        scan_layers=scan_layers,
    )
