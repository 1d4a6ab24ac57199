"""The GPT-2 HF key table: every rename, reshape and layer stacking between HF tensors and jaxft parameters,
and the GPT2Spec read from an HF config.

Reading or writing files is load.py's and export's job; this module only names and reshapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jaxft.models.gpt2 import GPT2Spec
from jaxft.models.hf_layout import HF_FLAX_LEAVES, ArchitectureError, HFEntry, KeyRenames, Kind, match_entry
from jaxft.models.layers import ACTIVATIONS

# GPT-2 keeps its projections in HF's Conv1D, whose weight is already [in, out], unlike torch Linear's
# [out, in]: the CONV kinds (a plain reshape, no transpose), plus COPY and FLAT (HF [3*N*H] -> [3, N, H]).
COPY, FLAT, CONV1, CONV2 = Kind.COPY, Kind.FLAT, Kind.CONV1, Kind.CONV2
# (jaxft path regex outside the layers, HF key template after the prefix, kind)
GLOBAL_TABLE = (
    (r"wte", "wte.weight", COPY),
    (r"wpe", "wpe.weight", COPY),
    (r"ln_f/scale", "ln_f.weight", COPY),
    (r"ln_f/bias", "ln_f.bias", COPY),
)
# (jaxft path regex inside one layer, HF key template after "{prefix}h.{i}.", kind)
LAYER_TABLE = (
    (r"(ln_1|ln_2)/scale", "{0}.weight", COPY),
    (r"(ln_1|ln_2)/bias", "{0}.bias", COPY),
    (r"attn/c_attn/kernel", "attn.c_attn.weight", CONV1),
    (r"attn/c_attn/bias", "attn.c_attn.bias", FLAT),
    (r"attn/c_proj/kernel", "attn.c_proj.weight", CONV2),
    (r"attn/c_proj/bias", "attn.c_proj.bias", COPY),
    (r"mlp/(c_fc|c_proj)/kernel", "mlp.{0}.weight", CONV1),
    (r"mlp/(c_fc|c_proj)/bias", "mlp.{0}.bias", COPY),
)
LAYER_PREFIX = "h.{}."
# GPT2LMHeadModel (and the task heads) keep the body under "transformer."; a bare GPT2Model (the hub's `gpt2`) not.
BODY_PREFIX = "transformer."
CLASS_NAME = "GPT2LMHeadModel"  # not GPT2ForCausalLM: the one class that breaks transformers' naming pattern
RENAMES = KeyRenames(flax_leaves=HF_FLAX_LEAVES)


def detect_prefix(keys: Sequence[str]) -> str:
    """The body prefix of a checkpoint's keys: "transformer." for GPT2LMHeadModel, "" for a bare GPT2Model."""
    return BODY_PREFIX if any(k.startswith(BODY_PREFIX) for k in keys) else ""


def hf_entry(path: str, num_layers: int, prefix: str = BODY_PREFIX) -> HFEntry | None:
    """The HF key(s) and kind for a '/'-joined jaxft parameter path, or None if the table has no entry.

    `layers/3/mlp/c_fc/kernel` (unscanned) names one key; `layers/mlp/c_fc/kernel` (scanned) names num_layers keys.
    """
    return match_entry(path, num_layers, GLOBAL_TABLE, LAYER_TABLE, LAYER_PREFIX, prefix)


def hf_state_keys(spec: GPT2Spec, prefix: str) -> set[str]:
    """GPT2LMHeadModel's state-dict keys: LayerNorms and Conv1D projections with biases; its lm_head is always
    tied to wte."""
    w_b = ("weight", "bias")
    modules = ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    keys = {f"{prefix}wte.weight", f"{prefix}wpe.weight"} | {f"{prefix}ln_f.{w}" for w in w_b}
    return keys | {f"{prefix}h.{i}.{m}.{w}" for i in range(spec.num_layers) for m in modules for w in w_b}


def ignorable_keys(spec: GPT2Spec) -> tuple[str, ...]:
    """Checkpoint keys (regexes) that may be present but have no parameter: the tied lm_head, and the causal-mask
    buffers (`attn.bias`, `attn.masked_bias`) that older checkpoints saved, with or without the body prefix."""
    del spec  # every GPT-2 ties its head; the argument keeps the families' common signature
    return (r"lm_head\.weight", r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)")


# ------------------------------------------------------------------------------------------------- config


def spec_from_hf_config(hf: dict[str, Any], *, scan_layers: bool = True) -> GPT2Spec:
    """GPT2Spec from an HF config.json dict; ArchitectureError names whatever is not supported."""
    model_type = hf.get("model_type", "")
    if model_type != "gpt2":
        raise ArchitectureError(f"model_type {model_type!r} is not GPT-2 (supported: gpt2)")
    hidden_act = hf.get("activation_function", "gelu_new")
    if hidden_act not in ACTIVATIONS:
        raise ArchitectureError(
            f"activation_function {hidden_act!r} is not supported (supported: {', '.join(ACTIVATIONS)})"
        )
    # The first scales each layer's logits by a different 1/(i+1) (the blocks share one static scale); the second
    # adds cross-attention to an encoder that a decoder-only fine-tune never has.
    for field in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf.get(field, False):
            raise ArchitectureError(f"{field}=True is not supported (only False)")
    if not hf.get("tie_word_embeddings", True):
        raise ArchitectureError("tie_word_embeddings=False is not supported (GPT-2 projects through wte)")
    hidden, heads = hf["n_embd"], hf["n_head"]
    if hidden % heads:
        raise ArchitectureError(f"n_embd {hidden} is not a multiple of n_head {heads}")
    return GPT2Spec(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=hf["n_layer"],
        num_heads=heads,
        intermediate_size=hf.get("n_inner") or 4 * hidden,
        max_positions=hf.get("n_positions", 1024),
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        hidden_act=hidden_act,
        scale_attn_weights=bool(hf.get("scale_attn_weights", True)),
        tie_word_embeddings=True,
        scan_layers=scan_layers,
    )
