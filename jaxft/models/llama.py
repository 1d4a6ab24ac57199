"""Llama-family decoder math in Flax NNX (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, Gemma, Gemma 3): GQA, RoPE,
RMSNorm, gated MLP; Gemma's (1 + w) norms, sandwich norms, scaled embeddings and interleaved sliding/global layers.

Owns the forward pass and the logical axis names of every weight; knows nothing of HF keys, files or meshes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft import axes
from jaxft.models import lora
from jaxft.models.remat import REMAT_POLICIES

# Key/value heads under grouped-query attention: fewer than the query heads (axes.HEADS), so a mesh rule may
# need to treat them differently (a tensor axis larger than the kv head count must replicate them).
KV_HEADS = "kv_heads"

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


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


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


# ------------------------------------------------------------------------------------------ masks, positions


def make_positions(input_ids_BxL: jax.Array, segment_ids_BxL: jax.Array | None) -> jax.Array:
    """0, 1, 2, ... per row, restarting at every segment change when segment ids are given (packed rows)."""
    idx_BxL = jnp.broadcast_to(jnp.arange(input_ids_BxL.shape[1]), input_ids_BxL.shape)
    if segment_ids_BxL is None:
        return idx_BxL
    seg = jnp.asarray(segment_ids_BxL)
    starts = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    return idx_BxL - jax.lax.cummax(jnp.where(starts, idx_BxL, 0), axis=1)


def make_attention_mask(attention_mask_BxL: Any, segment_ids_BxL: Any) -> jax.Array | None:
    """[B, 1, L, L] bool: keys that are real tokens of the query's own segment; None when nothing restricts.

    Causality and the sliding window are not in it: dot_product_attention adds them from static flags.
    """
    mask = None
    if segment_ids_BxL is not None:
        seg = jnp.asarray(segment_ids_BxL)
        mask = seg[:, :, None] == seg[:, None, :]
    if attention_mask_BxL is not None:
        keys_Bx1xL = (jnp.asarray(attention_mask_BxL) > 0)[:, None, :]
        mask = keys_Bx1xL if mask is None else mask & keys_Bx1xL
    return None if mask is None else mask[:, None]


def make_cache_mask(slots_S: jax.Array, length: int, start_B: jax.Array, window: int | None) -> jax.Array:
    """[B, 1, S, T] bool for S queries at cache slots `slots_S` over a cache of T slots whose rows are left-padded
    (row b's tokens fill slots start_B[b]..): keys that are filled, not after the query, and within the sliding
    window. dot_product_attention's is_causal aligns top-left, wrong once the queries sit at the cache's end.
    A padding query keeps its own slot, so no row of the softmax is empty."""
    keys_T = jnp.arange(length)
    ok_BxSxT = (keys_T[None, None, :] >= start_B[:, None, None]) & (keys_T[None, :] <= slots_S[:, None])[None]
    if window is not None:
        ok_BxSxT = ok_BxSxT & (slots_S[:, None] - keys_T[None, :] < window)[None]
    return (ok_BxSxT | (keys_T[None, :] == slots_S[:, None])[None])[:, None]


def cache_positions(slots_S: jax.Array, start_B: jax.Array) -> jax.Array:
    """[B, S] positions of tokens at cache slots `slots_S` in left-padded rows (0 at a row's first token)."""
    return jnp.maximum(slots_S[None, :] - start_B[:, None], 0)


# ------------------------------------------------------------------------------------------------- layers


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    return 0.02 * jax.random.normal(rngs.params(), shape, dtype)


class Linear(nnx.Module):
    """y = x·W (+ b) over the last `len(in_shape)` dims; W has shape in_shape + out_shape."""

    def __init__(self, in_shape, out_shape, in_axes, out_axes, *, bias: bool, rngs: nnx.Rngs, dtype=jnp.float32):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        self.kernel = nnx.Param(_normal(rngs, in_shape + out_shape, dtype), logical_axes=tuple(in_axes + out_axes))
        if bias:
            self.bias = nnx.Param(jnp.zeros(out_shape, dtype), logical_axes=tuple(out_axes))
        self.n_in = len(in_shape)

    def __call__(self, x: jax.Array, compute_dtype: Any, rng: jax.Array | None = None) -> jax.Array:
        """`rng` drives LoRA dropout only (training); the base path has no dropout."""
        kernel = self.kernel[...].astype(compute_dtype)
        in_shape, out_shape = kernel.shape[: self.n_in], kernel.shape[self.n_in :]
        lead = x.shape[: x.ndim - self.n_in]
        # One plain 2-D matmul (XLA:CPU is slow on dots with several batch/contracting dims), accumulated in fp32.
        x2 = x.astype(compute_dtype).reshape(-1, math.prod(in_shape))
        y = jnp.matmul(x2, kernel.reshape(x2.shape[1], -1), preferred_element_type=jnp.float32)
        if hasattr(self, "lora_a"):
            y = y + lora.delta(self, x2, compute_dtype, rng)
        y = y.reshape(lead + out_shape)
        if hasattr(self, "bias"):
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(compute_dtype)


class RMSNorm(nnx.Module):
    """x / rms(x) · w, or · (1 + w) with `offset` (Gemma, whose w starts at 0)."""

    def __init__(self, size: int, eps: float, *, dtype=jnp.float32, offset: bool = False):
        self.scale = nnx.Param((jnp.zeros if offset else jnp.ones)((size,), dtype), logical_axes=(axes.NORM,))
        self.eps = eps
        self.offset = offset

    def __call__(self, x: jax.Array) -> jax.Array:
        # Statistics in fp32 whatever the compute dtype: a bf16 mean of squares is too coarse.
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        return (y * (1.0 + scale if self.offset else scale)).astype(x.dtype)


def make_norm(spec: LlamaSpec, size: int, dtype: Any) -> RMSNorm:
    return RMSNorm(size, spec.rms_norm_eps, dtype=dtype, offset=spec.norm_offset)


class Attention(nnx.Module):
    def __init__(self, spec: LlamaSpec, *, rngs: nnx.Rngs, dtype=jnp.float32):
        E, N, K, H = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
        q_axes, kv_axes = (axes.HEADS, axes.KV), (KV_HEADS, axes.KV)
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
        rng_q, rng_k, rng_v, rng_o = lora.split(rng, 4)
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


def write_cache(kv, k_BxSxKxH, v_BxSxKxH, index):
    """The layer's cache (k, v [B, T, K, H]) with S new keys and values written at slots index.. index+S-1."""
    k_BxTxKxH, v_BxTxKxH = kv
    k_BxTxKxH = jax.lax.dynamic_update_slice_in_dim(k_BxTxKxH, k_BxSxKxH.astype(k_BxTxKxH.dtype), index, axis=1)
    v_BxTxKxH = jax.lax.dynamic_update_slice_in_dim(v_BxTxKxH, v_BxSxKxH.astype(v_BxTxKxH.dtype), index, axis=1)
    return k_BxTxKxH, v_BxTxKxH


class MLP(nnx.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, spec: LlamaSpec, *, rngs: nnx.Rngs, dtype=jnp.float32):
        E, F, b = spec.hidden_size, spec.intermediate_size, spec.mlp_bias
        self.gate_proj = Linear((E,), (F,), (axes.EMBED,), (axes.MLP,), bias=b, rngs=rngs, dtype=dtype)
        self.up_proj = Linear((E,), (F,), (axes.EMBED,), (axes.MLP,), bias=b, rngs=rngs, dtype=dtype)
        self.down_proj = Linear((F,), (E,), (axes.MLP,), (axes.EMBED,), bias=b, rngs=rngs, dtype=dtype)
        self.hidden_act = spec.hidden_act

    def __call__(self, x_BxLxE, compute_dtype, rng=None):
        rng_gate, rng_up, rng_down = lora.split(rng, 3)
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
        rng_attn, rng_mlp = lora.split(rng, 2)
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


def build_stacked(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """One layer (from `make_layer`) whose every parameter has a leading `layers` axis of size num_layers."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(layer_rngs: nnx.Rngs) -> nnx.Module:
        return make_layer(layer_rngs)

    layers = make(rngs)
    # vmap stacks the values but leaves our `logical_axes` metadata as it was: name the new axis here.
    for _, node in nnx.iter_graph(layers):
        if isinstance(node, nnx.Variable):
            node.set_metadata("logical_axes", (axes.LAYERS,) + tuple(node.get_metadata()["logical_axes"]))
    return layers


def build_stacked_layers(spec: LlamaSpec, rngs: nnx.Rngs, dtype: Any) -> DecoderLayer:
    """One DecoderLayer whose every parameter has a leading `layers` axis of size num_layers."""
    return build_stacked(lambda r: DecoderLayer(spec, rngs=r, dtype=dtype), spec.num_layers, rngs)


def _layer_fn(graphdef: nnx.GraphDef, compute_dtype: Any, attention_impl: str | None, remat: str, scanned: bool):
    """A pure (layer params, x, rope, mask, rng) -> x with the static options bound, wrapped in jax.checkpoint."""

    def run(params, x_BxLxE, rope, mask_Bx1xLxL, rng):
        return nnx.merge(graphdef, params)(x_BxLxE, rope, mask_Bx1xLxL, compute_dtype, attention_impl, rng)

    if remat == "none":
        return run
    # Inside scan the loop boundary already stops XLA from merging the recomputation away.
    return jax.checkpoint(run, policy=REMAT_POLICIES[remat], prevent_cse=not scanned)


# -------------------------------------------------------------------------------------------------- model


class LlamaModel(nnx.Module):
    """Decoder + LM head. `model(input_ids, attention_mask, segment_ids, positions)` returns fp32 logits [B, L, V]."""

    def __init__(self, spec: LlamaSpec, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        if spec.num_heads % spec.num_kv_heads:
            raise ValueError(f"num_heads {spec.num_heads} is not a multiple of num_kv_heads {spec.num_kv_heads}")
        self.spec = spec
        embedding = _normal(rngs, (spec.vocab_size, spec.hidden_size), param_dtype)
        self.embed_tokens = nnx.Param(embedding, logical_axes=(axes.VOCAB, axes.EMBED))
        if spec.scan_layers:
            self.layers = build_stacked_layers(spec, rngs, param_dtype)
        else:
            self.layers = nnx.List([DecoderLayer(spec, rngs=rngs, dtype=param_dtype) for _ in range(spec.num_layers)])
        self.norm = make_norm(spec, spec.hidden_size, param_dtype)
        if not spec.tie_word_embeddings:
            E, V = spec.hidden_size, spec.vocab_size
            self.lm_head = Linear((E,), (V,), (axes.EMBED,), (axes.VOCAB,), bias=False, rngs=rngs, dtype=param_dtype)
        self.compute_dtype = jnp.dtype(jnp.float32)
        self.remat = "none"
        self.attention_impl: str | None = None
        self.logits_chunk = 0

    def configure(
        self,
        compute_dtype: Any = jnp.float32,
        remat: bool | str = "none",
        attention_impl: str | None = None,
        logits_chunk: int = 0,
    ) -> LlamaModel:
        """Sets static execution options (not parameters). remat: none | full | dots_saveable |
        dots_with_no_batch_dims_saveable (True/False mean full/none); attention_impl: None | "xla" | "cudnn";
        logits_chunk: positions per row whose logits the training loss computes at a time (0: all)."""
        if isinstance(remat, bool):  # the engine's ModelConfig.remat is a bool
            remat = "full" if remat else "none"
        if remat != "none" and remat not in REMAT_POLICIES:
            raise ValueError(f"remat {remat!r} is not one of: none, {', '.join(REMAT_POLICIES)}")
        self.compute_dtype = jnp.dtype(compute_dtype)
        self.remat = remat
        self.attention_impl = attention_impl
        self.logits_chunk = int(logits_chunk)
        return self

    def __call__(
        self, input_ids, attention_mask=None, segment_ids=None, positions=None, *, dropout_rng=None
    ) -> jax.Array:
        """Logits [B, L, V] in fp32.

        attention_mask [B, L]: 0 marks padding (never attended to). segment_ids [B, L]: packed sequences;
        a token attends only to earlier tokens of its own segment. positions [B, L]: RoPE positions; by
        default 0.. per row, restarting at each segment when segment_ids are given. dropout_rng: LoRA
        dropout while training (the only dropout in the decoders).
        """
        hidden = self.hidden_states(input_ids, attention_mask, segment_ids, positions, dropout_rng=dropout_rng)
        return self.project(hidden)

    def hidden_states(
        self, input_ids, attention_mask=None, segment_ids=None, positions=None, *, dropout_rng=None
    ) -> jax.Array:
        """The final-normed hidden states [B, L, E] in the compute dtype (what `project` turns into logits)."""
        input_ids_BxL = jnp.asarray(input_ids)
        positions_BxL = make_positions(input_ids_BxL, segment_ids) if positions is None else jnp.asarray(positions)
        rope = rope_cos_sin(self.spec, positions_BxL)
        mask_Bx1xLxL = make_attention_mask(attention_mask, segment_ids)
        local = None
        if self.spec.layer_types:  # sliding layers: their own RoPE, and the window on top of the mask
            L = input_ids_BxL.shape[1]
            q, k = np.arange(L)[:, None], np.arange(L)[None, :]
            band_1x1xLxL = jnp.asarray(q - k < self.spec.sliding_window)[None, None]
            local_mask = band_1x1xLxL if mask_Bx1xLxL is None else mask_Bx1xLxL & band_1x1xLxL
            local = (rope_cos_sin(local_rope_spec(self.spec), positions_BxL), local_mask)
        x_BxLxE = self.embed(input_ids_BxL)
        x_BxLxE = self._decode(x_BxLxE, rope, mask_Bx1xLxL, dropout_rng, local)
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
        dims = (((1,), (contract,)), ((), ()))
        logits = jax.lax.dot_general(h2, weight.astype(cd), dims, preferred_element_type=jnp.float32)
        cap = self.spec.final_logit_softcap
        if cap:
            logits = jnp.tanh(logits / cap) * cap
        return logits.reshape(hidden_BxLxE.shape[:-1] + (-1,))

    def init_cache(self, batch: int, length: int) -> dict[str, jax.Array]:
        """An empty kv cache for generation: k and v [layers, B, T, K, H] in the compute dtype."""
        s = self.spec
        shape = (s.num_layers, batch, length, s.num_kv_heads, s.head_dim)
        return {"k": jnp.zeros(shape, self.compute_dtype), "v": jnp.zeros(shape, self.compute_dtype)}

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
        rope = rope_cos_sin(spec, positions_BxS)
        local = None
        if spec.layer_types:  # sliding layers: their own RoPE and windowed mask
            local_mask = make_cache_mask(slots_S, T, start_B, spec.sliding_window)
            local = (rope_cos_sin(local_rope_spec(spec), positions_BxS), local_mask)
        mask_Bx1xSxT = make_cache_mask(slots_S, T, start_B, None if spec.layer_types else spec.sliding_window)
        x_BxSxE = self.embed(input_ids_BxS)
        x_BxSxE, cache = decode_layers_cached(self, x_BxSxE, rope, mask_Bx1xSxT, cache, index, local)
        if last_only:
            x_BxSxE = x_BxSxE[:, -1:]
        return self.project(self.norm(x_BxSxE)), cache

    def _decode(self, x_BxLxE, rope, mask_Bx1xLxL, rng=None, local=None):
        """The layers; `local` = (RoPE, mask) of sliding layers when layers are interleaved (spec.layer_types)."""
        cd, impl, scanned = self.compute_dtype, self.attention_impl, self.spec.scan_layers
        layer_rngs = None if rng is None else jax.random.split(rng, self.spec.num_layers)
        sliding_Ly = sliding_layers(self.spec)
        if scanned:
            graphdef, stacked = nnx.split(self.layers)
            run = _layer_fn(graphdef, cd, impl, self.remat, scanned=True)

            def body(x, xs):
                params, layer_rng, sliding = xs
                layer_rope, layer_mask = layer_attention_inputs(sliding, rope, mask_Bx1xLxL, local)
                return run(params, x, layer_rope, layer_mask, layer_rng), None

            x_BxLxE, _ = jax.lax.scan(body, x_BxLxE, (stacked, layer_rngs, sliding_Ly))
            return x_BxLxE
        for i, layer in enumerate(self.layers):
            graphdef, params = nnx.split(layer)
            layer_rng = None if layer_rngs is None else layer_rngs[i]
            run = _layer_fn(graphdef, cd, impl, self.remat, scanned=False)
            sliding = None if sliding_Ly is None else bool(sliding_Ly[i])
            layer_rope, layer_mask = layer_attention_inputs(sliding, rope, mask_Bx1xLxL, local)
            x_BxLxE = run(params, x_BxLxE, layer_rope, layer_mask, layer_rng)
        return x_BxLxE


def sliding_layers(spec: Any) -> np.ndarray | None:
    """[num_layers] bool, True where a layer attends within the sliding window, for interleaved models (Gemma 3);
    None when every layer is alike."""
    layer_types = getattr(spec, "layer_types", ())
    return np.asarray([t == "sliding_attention" for t in layer_types]) if layer_types else None


def local_rope_spec(spec: LlamaSpec) -> LlamaSpec:
    """The spec whose RoPE the sliding layers use."""
    return dataclasses.replace(spec, rope=spec.local_rope or spec.rope)


def layer_attention_inputs(sliding, rope, mask, local):
    """(RoPE, mask) for one layer: the global ones, or `local`'s for a sliding layer. `sliding` is None (layers
    alike), a Python bool (unscanned) or a traced bool (the scanned layer's flag)."""
    if sliding is None or local is None:
        return rope, mask
    local_rope, local_mask = local
    if isinstance(sliding, bool):
        return (local_rope, local_mask) if sliding else (rope, mask)
    full_mask = jnp.ones_like(local_mask) if mask is None else mask
    pick = lambda full, loc: jnp.where(sliding, loc, full)
    return jax.tree.map(pick, rope, local_rope), pick(full_mask, local_mask)


def decode_layers_cached(model: nnx.Module, x_BxSxE, rope, mask_Bx1xSxT, cache: dict, index, local=None):
    """The layers over S new tokens with a kv cache {"k", "v": [layers, B, T, K, H]}: scanned models scan over
    the cache's layer slices as they scan over the stacked weights; unscanned ones loop. No remat, no dropout.
    `local` = (RoPE, mask) of sliding layers in interleaved models."""
    cd, impl = model.compute_dtype, model.attention_impl
    sliding_Ly = sliding_layers(model.spec)
    if model.spec.scan_layers:
        graphdef, stacked = nnx.split(model.layers)

        def body(x, xs):
            params, k, v, sliding = xs
            layer_rope, layer_mask = layer_attention_inputs(sliding, rope, mask_Bx1xSxT, local)
            layer = nnx.merge(graphdef, params)
            return layer.decode_cached(x, layer_rope, (k, v), index, layer_mask, cd, impl)

        x_BxSxE, (k, v) = jax.lax.scan(body, x_BxSxE, (stacked, cache["k"], cache["v"], sliding_Ly))
        return x_BxSxE, {"k": k, "v": v}
    ks, vs = [], []
    for i, layer in enumerate(model.layers):
        sliding = None if sliding_Ly is None else bool(sliding_Ly[i])
        layer_rope, layer_mask = layer_attention_inputs(sliding, rope, mask_Bx1xSxT, local)
        x_BxSxE, (k, v) = layer.decode_cached(
            x_BxSxE, layer_rope, (cache["k"][i], cache["v"][i]), index, layer_mask, cd, impl
        )
        ks.append(k)
        vs.append(v)
    return x_BxSxE, {"k": jnp.stack(ks), "v": jnp.stack(vs)}


def layer_index(path: str) -> int | None:
    """The decoder layer a '/'-joined parameter path of an unscanned model belongs to, or None
    (scanned models hold all layers in each `layers/...` tensor)."""
    parts = path.split("/")
    if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit():
        return int(parts[1])
    return None
