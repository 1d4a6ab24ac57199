"""Llama-family decoder math in Flax NNX (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, Gemma, Gemma 3): GQA, RoPE,
RMSNorm, gated MLP; Gemma's (1 + w) norms, sandwich norms, scaled embeddings and interleaved sliding/global layers.

Owns the forward pass and the logical axis names of every weight; knows nothing of HF keys, files or meshes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft import axes
from jaxft.models.decoder import (
    AttentionInputs,
    DecoderModel,
    cache_positions,
    make_attention_mask,
    make_band_mask,
    make_cache_mask,
    make_positions,
    write_cache,
)
from jaxft.models.layers import ACTIVATIONS, Linear, RMSNorm, build_stacked, matmul, normal_init, split_key

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding settings; `kind` is HF's rope_type."""

    theta: float = 10000.0
    kind: str = "default"  # default | linear | dynamic | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_positions: int = 8192  # llama3 only


@dataclasses.dataclass(frozen=True)
class LlamaSpec:
    """Architecture hyper-parameters, read from an HF config.json, plus the parameter layout (scan_layers)."""

    model_type: str = "llama"  # llama | mistral | qwen2 | qwen3
    vocab_size: int = 32000
    hidden_size: int = 2048
    num_layers: int = 16
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 64
    intermediate_size: int = 8192
    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"
    max_positions: int = 8192  # dynamic RoPE scales beyond this
    rope: RopeSpec = RopeSpec()
    sliding_window: int | None = None  # same window in every layer; None = full causal attention
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k before RoPE
    tie_word_embeddings: bool = False
    # Gemma: norms scale by (1 + w); embeddings are multiplied by sqrt(hidden_size); attention scores are scaled
    # by query_scale (query_pre_attn_scalar ** -0.5) instead of head_dim ** -0.5; logits may be soft-capped.
    norm_offset: bool = False
    embed_scale: bool = False
    query_scale: float | None = None
    final_logit_softcap: float | None = None
    # Gemma 2/3: the attention and MLP outputs are normed too (post_attention_layernorm, post_feedforward_layernorm)
    # and the MLP input has its own norm (pre_feedforward_layernorm).
    sandwich_norms: bool = False
    # Interleaved layers (Gemma 3): per layer "sliding_attention" (window `sliding_window`, RoPE `local_rope`) or
    # "full_attention" (RoPE `rope`). Empty: every layer alike.
    layer_types: tuple[str, ...] = ()
    local_rope: RopeSpec | None = None
    # Stack the layers on a leading `layers` axis and run them with one lax.scan: compile time stays flat in depth.
    scan_layers: bool = True


# ------------------------------------------------------------------------------------------------- RoPE


def rope_inv_freq(rope: RopeSpec, head_dim: int) -> np.ndarray:
    """Static inverse frequencies [H/2] (fp32) for every rope kind except dynamic's length-dependent part."""
    inv = 1.0 / rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if rope.kind == "linear":
        inv = inv / rope.factor  # the same as dividing the positions by the factor
    elif rope.kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        old = rope.original_max_positions
        wavelen = 2 * math.pi / inv
        slowed = np.where(wavelen > old / rope.low_freq_factor, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * slowed / rope.factor + smooth * slowed
        medium = (wavelen >= old / rope.high_freq_factor) & (wavelen <= old / rope.low_freq_factor)
        inv = np.where(medium, smoothed, slowed)
    return inv.astype(np.float32)


def _dynamic_inv_freq(spec: LlamaSpec, positions_BxL: jax.Array) -> jax.Array:
    """Dynamic NTK scaling: past max_positions the base grows with the longest sequence in the batch."""
    rope, dim = spec.rope, spec.head_dim
    seq_len = jnp.maximum(jnp.max(positions_BxL) + 1, spec.max_positions).astype(jnp.float32)
    base = rope.theta * ((rope.factor * seq_len / spec.max_positions) - (rope.factor - 1)) ** (dim / (dim - 2))
    return 1.0 / base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)


def rope_cos_sin(spec: LlamaSpec, positions_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, L, H/2] in fp32, from per-token positions (so packed segments can restart at 0)."""
    if spec.rope.kind == "dynamic":
        inv_freq = _dynamic_inv_freq(spec, positions_BxL)
    else:
        inv_freq = jnp.asarray(rope_inv_freq(spec.rope, spec.head_dim))
    angles_BxLxH2 = positions_BxL[..., None].astype(jnp.float32) * inv_freq
    return jnp.cos(angles_BxLxH2), jnp.sin(angles_BxLxH2)


def apply_rope(x_BxLxNxH: jax.Array, cos_BxLxH2: jax.Array, sin_BxLxH2: jax.Array) -> jax.Array:
    """Rotates each (i, i + H/2) pair of features (HF's rotate_half layout), in fp32."""
    x = x_BxLxNxH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    cos, sin = cos_BxLxH2[:, :, None, :], sin_BxLxH2[:, :, None, :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxLxNxH.dtype)


# ------------------------------------------------------------------------------------------------- layers


def make_norm(spec: LlamaSpec, size: int, dtype: Any) -> RMSNorm:
    return RMSNorm(size, spec.rms_norm_eps, dtype=dtype, offset=spec.norm_offset)


class Attention(nnx.Module):
    def __init__(self, spec: LlamaSpec, *, rngs: nnx.Rngs, dtype=jnp.float32):
        E, N, K, H = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
        q_axes, kv_axes = (axes.HEADS, axes.KV), (axes.KV_HEADS, axes.KV)
        self.q_proj = Linear((E,), (N, H), (axes.EMBED,), q_axes, bias=spec.qkv_bias, rngs=rngs, dtype=dtype)
        self.k_proj = Linear((E,), (K, H), (axes.EMBED,), kv_axes, bias=spec.qkv_bias, rngs=rngs, dtype=dtype)
        self.v_proj = Linear((E,), (K, H), (axes.EMBED,), kv_axes, bias=spec.qkv_bias, rngs=rngs, dtype=dtype)
        self.o_proj = Linear((N, H), (E,), q_axes, (axes.EMBED,), bias=spec.o_bias, rngs=rngs, dtype=dtype)
        if spec.qk_norm:
            self.q_norm = make_norm(spec, H, dtype)
            self.k_norm = make_norm(spec, H, dtype)
        self.spec = spec
        self.scale = spec.query_scale or spec.head_dim**-0.5

    def _qkv(self, x_BxLxE, rope, compute_dtype, rngs=(None, None, None)):
        """q [B, L, N, H] and k, v [B, L, K, H], normed (Qwen3) and rotated."""
        rng_q, rng_k, rng_v = rngs
        q_BxLxNxH = self.q_proj(x_BxLxE, compute_dtype, rng_q)
        k_BxLxKxH = self.k_proj(x_BxLxE, compute_dtype, rng_k)
        v_BxLxKxH = self.v_proj(x_BxLxE, compute_dtype, rng_v)
        if self.spec.qk_norm:
            q_BxLxNxH, k_BxLxKxH = self.q_norm(q_BxLxNxH), self.k_norm(k_BxLxKxH)
        return apply_rope(q_BxLxNxH, *rope), apply_rope(k_BxLxKxH, *rope), v_BxLxKxH

    def __call__(self, x_BxLxE, rope, mask_Bx1xLxL, compute_dtype, attention_impl, rng=None):
        rng_q, rng_k, rng_v, rng_o = split_key(rng, 4)
        q_BxLxNxH, k_BxLxKxH, v_BxLxKxH = self._qkv(x_BxLxE, rope, compute_dtype, (rng_q, rng_k, rng_v))
        # Interleaved layers get their window in the mask (per layer, traced under scan); uniform ones statically.
        window = None if self.spec.layer_types else self.spec.sliding_window
        # dot_product_attention groups the N query heads over the K kv heads itself (no repeated k/v in memory);
        # its window (left, right) keeps keys with q - k <= left, HF's sliding window keeps q - k < window.
        ctx_BxLxNxH = jax.nn.dot_product_attention(
            q_BxLxNxH,
            k_BxLxKxH,
            v_BxLxKxH,
            mask=mask_Bx1xLxL,
            is_causal=True,
            scale=self.scale,
            local_window_size=None if window is None else (window - 1, 0),
            implementation=attention_impl,
        )
        return self.o_proj(ctx_BxLxNxH, compute_dtype, rng_o)

    def decode_cached(self, x_BxSxE, rope, kv, index, mask_Bx1xSxT, compute_dtype, attention_impl):
        """Generation: S new tokens' k/v written into this layer's cache (k, v [B, T, K, H]) at slots
        index.., then attention over every slot the explicit mask allows. Returns (output, (k, v))."""
        q_BxSxNxH, k_BxSxKxH, v_BxSxKxH = self._qkv(x_BxSxE, rope, compute_dtype)
        k_BxTxKxH, v_BxTxKxH = write_cache(kv, k_BxSxKxH, v_BxSxKxH, index)
        ctx_BxSxNxH = jax.nn.dot_product_attention(
            q_BxSxNxH,
            k_BxTxKxH,
            v_BxTxKxH,
            mask=mask_Bx1xSxT,
            scale=self.scale,
            implementation=attention_impl,
        )
        return self.o_proj(ctx_BxSxNxH, compute_dtype), (k_BxTxKxH, v_BxTxKxH)


class MLP(nnx.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, spec: LlamaSpec, *, rngs: nnx.Rngs, dtype=jnp.float32):
        E, F, b = spec.hidden_size, spec.intermediate_size, spec.mlp_bias
        self.gate_proj = Linear((E,), (F,), (axes.EMBED,), (axes.MLP,), bias=b, rngs=rngs, dtype=dtype)
        self.up_proj = Linear((E,), (F,), (axes.EMBED,), (axes.MLP,), bias=b, rngs=rngs, dtype=dtype)
        self.down_proj = Linear((F,), (E,), (axes.MLP,), (axes.EMBED,), bias=b, rngs=rngs, dtype=dtype)
        self.hidden_act = spec.hidden_act

    def __call__(self, x_BxLxE, compute_dtype, rng=None):
        rng_gate, rng_up, rng_down = split_key(rng, 3)
        gate_BxLxF = ACTIVATIONS[self.hidden_act](self.gate_proj(x_BxLxE, compute_dtype, rng_gate))
        h_BxLxF = gate_BxLxF * self.up_proj(x_BxLxE, compute_dtype, rng_up)
        return self.down_proj(h_BxLxF, compute_dtype, rng_down)


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attention(norm(x)), then x + mlp(norm(x)). With sandwich norms (Gemma 2/3) each
    branch's output is normed too, and post_attention_layernorm is that attention-output norm, as in HF."""

    def __init__(self, spec: LlamaSpec, *, rngs: nnx.Rngs, dtype=jnp.float32):
        E = spec.hidden_size
        self.input_layernorm = make_norm(spec, E, dtype)
        self.self_attn = Attention(spec, rngs=rngs, dtype=dtype)
        self.post_attention_layernorm = make_norm(spec, E, dtype)
        if spec.sandwich_norms:
            self.pre_feedforward_layernorm = make_norm(spec, E, dtype)
            self.post_feedforward_layernorm = make_norm(spec, E, dtype)
        self.mlp = MLP(spec, rngs=rngs, dtype=dtype)
        self.sandwich = spec.sandwich_norms

    def __call__(self, x_BxLxE, rope, mask_Bx1xLxL, compute_dtype, attention_impl, rng=None):
        rng_attn, rng_mlp = split_key(rng, 2)
        normed_BxLxE = self.input_layernorm(x_BxLxE)
        attn_BxLxE = self.self_attn(normed_BxLxE, rope, mask_Bx1xLxL, compute_dtype, attention_impl, rng_attn)
        return self._mlp_block(self._attention_residual(x_BxLxE, attn_BxLxE), compute_dtype, rng_mlp)

    def _attention_residual(self, x_BxLxE, attn_BxLxE):
        return x_BxLxE + (self.post_attention_layernorm(attn_BxLxE) if self.sandwich else attn_BxLxE)

    def _mlp_block(self, x_BxLxE, compute_dtype, rng=None):
        if not self.sandwich:
            return x_BxLxE + self.mlp(self.post_attention_layernorm(x_BxLxE), compute_dtype, rng)
        y_BxLxE = self.mlp(self.pre_feedforward_layernorm(x_BxLxE), compute_dtype, rng)
        return x_BxLxE + self.post_feedforward_layernorm(y_BxLxE)

    def decode_cached(self, x_BxSxE, rope, kv, index, mask_Bx1xSxT, compute_dtype, attention_impl):
        """The same block over S new tokens with this layer's kv cache; returns (x, updated (k, v))."""
        normed_BxSxE = self.input_layernorm(x_BxSxE)
        attn_BxSxE, kv = self.self_attn.decode_cached(
            normed_BxSxE, rope, kv, index, mask_Bx1xSxT, compute_dtype, attention_impl
        )
        return self._mlp_block(self._attention_residual(x_BxSxE, attn_BxSxE), compute_dtype), kv


def build_stacked_layers(spec: LlamaSpec, rngs: nnx.Rngs, dtype: Any) -> DecoderLayer:
    """One DecoderLayer whose every parameter has a leading `layers` axis of size num_layers."""
    return build_stacked(lambda r: DecoderLayer(spec, rngs=r, dtype=dtype), spec.num_layers, rngs)


# -------------------------------------------------------------------------------------------------- model


class LlamaModel(DecoderModel):
    """Decoder + LM head. `model(input_ids, attention_mask, segment_ids, positions)` returns fp32 logits [B, L, V]."""

    def __init__(self, spec: LlamaSpec, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        if spec.num_heads % spec.num_kv_heads:
            raise ValueError(f"num_heads {spec.num_heads} is not a multiple of num_kv_heads {spec.num_kv_heads}")
        self.spec = spec
        embedding = normal_init(rngs, (spec.vocab_size, spec.hidden_size), param_dtype)
        self.embed_tokens = nnx.Param(embedding, logical_axes=(axes.VOCAB, axes.EMBED))
        if spec.scan_layers:
            self.layers = build_stacked_layers(spec, rngs, param_dtype)
        else:
            self.layers = nnx.List([DecoderLayer(spec, rngs=rngs, dtype=param_dtype) for _ in range(spec.num_layers)])
        self.norm = make_norm(spec, spec.hidden_size, param_dtype)
        if not spec.tie_word_embeddings:
            E, V = spec.hidden_size, spec.vocab_size
            self.lm_head = Linear((E,), (V,), (axes.EMBED,), (axes.VOCAB,), bias=False, rngs=rngs, dtype=param_dtype)
        self.init_options()

    def hidden_states(
        self, input_ids, attention_mask=None, segment_ids=None, positions=None, *, dropout_rng=None
    ) -> jax.Array:
        """The final-normed hidden states [B, L, E] in the compute dtype (what `project` turns into logits)."""
        input_ids_BxL = jnp.asarray(input_ids)
        positions_BxL = make_positions(input_ids_BxL, segment_ids) if positions is None else jnp.asarray(positions)
        mask_Bx1xLxL = make_attention_mask(attention_mask, segment_ids)
        local = None
        if self.spec.layer_types:  # sliding layers: their own RoPE, and the window on top of the mask
            band_1x1xLxL = make_band_mask(input_ids_BxL.shape[1], self.spec.sliding_window)
            local_mask = band_1x1xLxL if mask_Bx1xLxL is None else mask_Bx1xLxL & band_1x1xLxL
            local = (rope_cos_sin(local_rope_spec(self.spec), positions_BxL), local_mask)
        inputs = AttentionInputs(rope_cos_sin(self.spec, positions_BxL), mask_Bx1xLxL, local, sliding_layers(self.spec))
        x_BxLxE = self.run_layers(self.embed(input_ids_BxL), inputs, dropout_rng)
        return self.norm(x_BxLxE)

    def embed(self, input_ids_BxL: jax.Array) -> jax.Array:
        """Token embeddings in the compute dtype (Gemma: times sqrt(hidden_size), rounded to the weights' dtype
        as HF does)."""
        table = self.embed_tokens[...]
        x_BxLxE = jnp.take(table, input_ids_BxL, axis=0)
        if self.spec.embed_scale:
            x_BxLxE = x_BxLxE * jnp.asarray(self.spec.hidden_size**0.5, table.dtype)
        return x_BxLxE.astype(self.compute_dtype)

    def project(self, hidden_BxLxE: jax.Array) -> jax.Array:
        """Hidden states -> fp32 logits through lm_head, or the input embedding when tied."""
        cd = self.compute_dtype
        h2 = hidden_BxLxE.astype(cd).reshape(-1, hidden_BxLxE.shape[-1])
        if self.spec.tie_word_embeddings:
            weight, contract = self.embed_tokens[...], 1  # [V, E]: contract its E, no transposed copy
        else:
            weight, contract = self.lm_head.kernel[...], 0  # [E, V]
        logits = matmul(h2, weight, cd, w_contract=contract)
        cap = self.spec.final_logit_softcap
        if cap:
            logits = jnp.tanh(logits / cap) * cap
        return logits.reshape(hidden_BxLxE.shape[:-1] + (-1,))

    def decode_with_cache(self, input_ids_BxS, cache, index, start_B, *, last_only: bool = False):
        """Generation over a kv cache: (fp32 logits [B, S, V] (S = 1 with last_only), updated cache).

        The S tokens go to cache slots index..index+S-1 (the same for every row: prefill writes 0..P-1, each
        step one slot). Rows are left-padded: row b's first real token sits at slot start_B[b], which is its
        position 0. Used for both the prefill (S = prompt length) and each new token (S = 1).
        """
        input_ids_BxS = jnp.asarray(input_ids_BxS)
        slots_S = index + jnp.arange(input_ids_BxS.shape[1])
        T, spec = cache["k"].shape[2], self.spec
        positions_BxS = cache_positions(slots_S, start_B)
        local = None
        if spec.layer_types:  # sliding layers: their own RoPE and windowed mask
            local_mask = make_cache_mask(slots_S, T, start_B, spec.sliding_window)
            local = (rope_cos_sin(local_rope_spec(spec), positions_BxS), local_mask)
        mask_Bx1xSxT = make_cache_mask(slots_S, T, start_B, None if spec.layer_types else spec.sliding_window)
        inputs = AttentionInputs(rope_cos_sin(spec, positions_BxS), mask_Bx1xSxT, local, sliding_layers(spec))
        x_BxSxE, cache = self.run_layers_cached(self.embed(input_ids_BxS), inputs, cache, index)
        if last_only:
            x_BxSxE = x_BxSxE[:, -1:]
        return self.project(self.norm(x_BxSxE)), cache


def sliding_layers(spec: LlamaSpec) -> np.ndarray | None:
    """[num_layers] bool, True where a layer attends within the sliding window, for interleaved models (Gemma 3);
    None when every layer is alike."""
    return np.asarray([t == "sliding_attention" for t in spec.layer_types]) if spec.layer_types else None


def local_rope_spec(spec: LlamaSpec) -> LlamaSpec:
    """The spec whose RoPE the sliding layers use."""
    return dataclasses.replace(spec, rope=spec.local_rope or spec.rope)
