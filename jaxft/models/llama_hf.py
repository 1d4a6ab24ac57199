"""The Llama-family HF key table (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 3): every rename, transpose and
layer stacking between HF tensors and jaxft parameters, and the LlamaSpec read from an HF config.

Reading or writing files is load.py's and export's job; this module only names and reshapes.
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
    match_entry,
)
from jaxft.models.layers import ACTIVATIONS
from jaxft.models.llama import ROPE_TYPES, LlamaSpec, RopeSpec

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
GEMMA_TYPES = ("gemma", "gemma2", "gemma3_text")
# model_type -> the stem of its transformers causal-LM class (LlamaForCausalLM, ...).
CLASS_STEMS = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gemma": "Gemma",
    "gemma2": "Gemma2",
    "gemma3_text": "Gemma3",
}
RENAMES = KeyRenames(flax_leaves=HF_FLAX_LEAVES)

COPY, FLAT, LINEAR1, LINEAR2 = Kind.COPY, Kind.FLAT, Kind.LINEAR1, Kind.LINEAR2
# (jaxft path regex outside the layers, HF key template, kind)
GLOBAL_TABLE = (
    (r"embed_tokens", "model.embed_tokens.weight", COPY),
    (r"norm/scale", "model.norm.weight", COPY),
    (r"lm_head/kernel", "lm_head.weight", LINEAR1),
)
# (jaxft path regex inside one layer, HF key template after "model.layers.{i}.", kind)
LAYER_TABLE = (
    (r"self_attn/(q|k|v)_proj/kernel", "self_attn.{0}_proj.weight", LINEAR1),
    (r"self_attn/(q|k|v)_proj/bias", "self_attn.{0}_proj.bias", FLAT),
    (r"self_attn/o_proj/kernel", "self_attn.o_proj.weight", LINEAR2),
    (r"self_attn/o_proj/bias", "self_attn.o_proj.bias", COPY),
    (r"self_attn/(q|k)_norm/scale", "self_attn.{0}_norm.weight", COPY),
    (r"input_layernorm/scale", "input_layernorm.weight", COPY),
    (r"post_attention_layernorm/scale", "post_attention_layernorm.weight", COPY),
    (r"(pre|post)_feedforward_layernorm/scale", "{0}_feedforward_layernorm.weight", COPY),  # Gemma 2/3
    (r"mlp/(gate|up|down)_proj/kernel", "mlp.{0}_proj.weight", LINEAR1),
    (r"mlp/(gate|up|down)_proj/bias", "mlp.{0}_proj.bias", COPY),
)
LAYER_PREFIX = "model.layers.{}."


def hf_entry(path: str, num_layers: int) -> HFEntry | None:
    """The HF key(s) and kind for a '/'-joined jaxft parameter path, or None if the table has no entry.

    `layers/3/mlp/up_proj/kernel` (unscanned) names one key; `layers/mlp/up_proj/kernel` (scanned) names
    num_layers keys.
    """
    return match_entry(path, num_layers, GLOBAL_TABLE, LAYER_TABLE, LAYER_PREFIX)


def ignorable_keys(spec: LlamaSpec) -> tuple[str, ...]:
    """Checkpoint keys (regexes) that may be present but have no parameter: old RoPE buffers, a tied lm_head."""
    keys = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)
    return keys + ((r"lm_head\.weight",) if spec.tie_word_embeddings else ())


def hf_class_name(spec: LlamaSpec, model_type: str) -> str:
    return CLASS_STEMS[model_type] + TASK_CLASS_SUFFIXES["causal-lm"]


def hf_state_keys(spec: LlamaSpec, prefix: str = "") -> set[str]:
    """The state-dict keys of LlamaForCausalLM and its Mistral / Qwen2 / Qwen3 / Gemma siblings, written out from
    their modeling code: biases, q/k norms and Gemma 2/3's sandwich norms where the config has them; a tied
    lm_head is the embedding, not a tensor of its own. (The table writes the body's "model." itself.)"""
    del prefix
    attn = [f"self_attn.{m}_proj.weight" for m in "qkvo"] + [f"self_attn.{m}_proj.bias" for m in "qkv" if spec.qkv_bias]
    attn += ["self_attn.o_proj.bias"] if spec.o_bias else []
    attn += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"] if spec.qk_norm else []
    mlp_params = ("weight", "bias") if spec.mlp_bias else ("weight",)
    mlp = [f"mlp.{m}_proj.{w}" for m in ("gate", "up", "down") for w in mlp_params]
    layer = attn + mlp + ["input_layernorm.weight", "post_attention_layernorm.weight"]
    layer += ["pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"] if spec.sandwich_norms else []
    keys = {"model.embed_tokens.weight", "model.norm.weight"} | (
        set() if spec.tie_word_embeddings else {"lm_head.weight"}
    )
    return keys | {f"model.layers.{i}.{name}" for i in range(spec.num_layers) for name in layer}


# ------------------------------------------------------------------------------------------------- config


def spec_from_hf_config(hf: dict[str, Any], *, scan_layers: bool = True) -> LlamaSpec:
    """LlamaSpec from an HF config.json dict; ArchitectureError names whatever is not supported."""
    model_type = hf.get("model_type", "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ArchitectureError(
            f"model_type {model_type!r} is not a Llama-family decoder (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    gemma = model_type in GEMMA_TYPES
    # Gemma's MLP reads hidden_activation (its hidden_act is a leftover that HF ignores).
    hidden_act = (hf.get("hidden_activation") or "gelu_pytorch_tanh") if gemma else hf.get("hidden_act", "silu")
    if hidden_act not in ACTIVATIONS:
        raise ArchitectureError(f"hidden_act {hidden_act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    if hf.get("attention_dropout", 0.0):
        raise ArchitectureError(f"attention_dropout {hf['attention_dropout']} is not supported (only 0.0)")
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ArchitectureError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    attention_bias = bool(hf.get("attention_bias", False))
    if gemma:
        _check_gemma(hf)
    layer_types = _interleaved_layer_types(hf) if model_type in ("gemma2", "gemma3_text") else ()
    return LlamaSpec(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        intermediate_size=hf["intermediate_size"],
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        hidden_act=hidden_act,
        max_positions=hf.get("max_position_embeddings", 2048),
        rope=rope_from_hf_config(hf, "full_attention"),
        sliding_window=hf.get("sliding_window") if layer_types else sliding_window_from_hf_config(hf),
        # Qwen2 always has q/k/v biases and no o bias; Llama, Qwen3 and Gemma put `attention_bias` on all four.
        qkv_bias=model_type == "qwen2" or (model_type in ("llama", "qwen3", *GEMMA_TYPES) and attention_bias),
        o_bias=model_type in ("llama", "qwen3", *GEMMA_TYPES) and attention_bias,
        mlp_bias=model_type == "llama" and bool(hf.get("mlp_bias", False)),
        qk_norm=model_type in ("qwen3", "gemma3_text"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),  # Gemma ties by default
        scan_layers=scan_layers,
        norm_offset=gemma,
        embed_scale=gemma,
        query_scale=hf["query_pre_attn_scalar"] ** -0.5 if hf.get("query_pre_attn_scalar") else None,
        final_logit_softcap=hf.get("final_logit_softcapping") or None,
        sandwich_norms=model_type in ("gemma2", "gemma3_text"),
        layer_types=layer_types,
        local_rope=rope_from_hf_config(hf, "sliding_attention") if layer_types else None,
    )


def _check_gemma(hf: dict[str, Any]) -> None:
    cap = hf.get("attn_logit_softcapping")
    if cap:
        raise ArchitectureError(
            f"attn_logit_softcapping {cap} (Gemma 2) is not supported: attention runs through "
            "jax.nn.dot_product_attention, which has no score soft-capping (Gemma 3 has none and is supported)"
        )
    if hf.get("use_bidirectional_attention"):
        raise ArchitectureError("use_bidirectional_attention is not supported (causal LMs only)")


def _interleaved_layer_types(hf: dict[str, Any]) -> tuple[str, ...]:
    """Gemma 2/3's per-layer attention kinds: config.json's layer_types, or the older sliding_window_pattern
    (every pattern-th layer global; Gemma 2 alternates)."""
    n = hf["num_hidden_layers"]
    kinds = hf.get("layer_types")
    if kinds is None:
        pattern = hf.get("sliding_window_pattern", 6 if hf.get("model_type") == "gemma3_text" else 2)
        kinds = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    kinds = tuple(kinds)
    unknown = sorted(set(kinds) - {"sliding_attention", "full_attention"})
    if unknown or len(kinds) != n:
        raise ArchitectureError(f"layer_types {list(kinds)} must name sliding_attention or full_attention per layer")
    if "sliding_attention" in kinds and not hf.get("sliding_window"):
        raise ArchitectureError("layer_types has sliding_attention layers but no sliding_window is set")
    return kinds


def rope_from_hf_config(hf: dict[str, Any], layer_type: str = "full_attention") -> RopeSpec:
    """RoPE settings from `rope_parameters` (transformers v5; per layer type for Gemma 3, whose sliding layers
    have their own) or `rope_theta` + `rope_scaling` (older configs; Gemma 3's `rope_local_base_freq`)."""
    params = hf.get("rope_parameters") or {}
    if any(isinstance(v, dict) for v in params.values()):
        if not isinstance(params.get(layer_type), dict):
            raise ArchitectureError(f"rope_parameters has no entry for {layer_type} layers")
        params = params[layer_type]
    elif hf.get("model_type") == "gemma3_text" and not params:  # an older Gemma 3 config
        if layer_type == "sliding_attention":
            params = {"rope_type": "default", "rope_theta": hf.get("rope_local_base_freq", 10000.0)}
        else:
            params = {"rope_theta": hf.get("rope_theta", 1_000_000.0), **(hf.get("rope_scaling") or {})}
    else:
        params = params or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ArchitectureError(f"rope_scaling type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ArchitectureError(f"partial_rotary_factor {partial} is not supported (only 1.0)")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if kind == "default":
        return RopeSpec(theta=theta)
    needed = ["factor"]
    if kind == "llama3":
        needed += ["low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]
    missing = [k for k in needed if params.get(k) is None]
    if missing:
        raise ArchitectureError(f"rope_scaling type {kind!r} needs {', '.join(missing)}")
    if kind != "llama3":
        return RopeSpec(theta=theta, kind=kind, factor=float(params["factor"]))
    return RopeSpec(
        theta=theta,
        kind=kind,
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_positions=int(params["original_max_position_embeddings"]),
    )


def sliding_window_from_hf_config(hf: dict[str, Any]) -> int | None:
    """The one window every layer uses, or None for full causal attention. A mix of sliding and full layers
    (Qwen2/3 with max_window_layers < num_hidden_layers) is rejected: the scanned layers share one static mask."""
    model_type, window = hf.get("model_type"), hf.get("sliding_window")
    if model_type == "mistral":
        return window
    if model_type not in ("qwen2", "qwen3"):
        return None
    layer_types = hf.get("layer_types")
    if layer_types is None:  # older configs: use_sliding_window switches layers >= max_window_layers
        sliding = bool(hf.get("use_sliding_window", False)) and window is not None
        first = hf.get("max_window_layers", 0)
        layer_types = [
            "sliding_attention" if sliding and i >= first else "full_attention" for i in range(hf["num_hidden_layers"])
        ]
    kinds = set(layer_types)
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"} and window is not None:
        return window
    raise ArchitectureError(
        f"layer_types {sorted(kinds)} (sliding window {window}): only all-full or all-sliding layers are supported"
    )
