"""Llama-family decoder math in Flax NNX (Llama 2/3, Mistral, Qwen2/2.5, Qwen3): GQA, RoPE, RMSNorm, SwiGLU.

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
    def __init__(self, size: int, eps: float, *, dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((size,), dtype), logical_axes=(axes.NORM,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # Statistics in fp32 whatever the compute dtype: a bf16 mean of squares is too coarse.
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, spec: LlamaSpec, *, rngs: nnx.Rngs, dtype=jnp.float32):
        E, N, K, H = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
        q_axes, kv_axes = (axes.HEADS, axes.KV), (KV_HEADS, axes.KV)
        self.q_proj = Linear((E,), (N, H), (axes.EMBED,), q_axes, bias=spec.qkv_bias, rngs=rngs, dtype=dtype)
        self.k_proj = Linear((E,), (K, H), (axes.EMBED,), kv_axes, bias=spec.qkv_bias, rngs=rngs, dtype=dtype)
        self.v_proj = Linear((E,), (K, H), (axes.EMBED,), kv_axes, bias=spec.qkv_bias, rngs=rngs, dtype=dtype)
        self.o_proj = Linear((N, H), (E,), q_axes, (axes.EMBED,), bias=spec.o_bias, rngs=rngs, dtype=dtype)
        if spec.qk_norm:
            self.q_norm = RMSNorm(H, spec.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(H, spec.rms_norm_eps, dtype=dtype)
        self.spec = spec

    def __call__(self, x_BxLxE, rope, mask_Bx1xLxL, compute_dtype, attention_impl, rng=None):
        rng_q, rng_k, rng_v, rng_o = lora.split(rng, 4)
        q_BxLxNxH = self.q_proj(x_BxLxE, compute_dtype, rng_q)
        k_BxLxKxH = self.k_proj(x_BxLxE, compute_dtype, rng_k)
        v_BxLxKxH = self.v_proj(x_BxLxE, compute_dtype, rng_v)
        if self.spec.qk_norm:
            q_BxLxNxH, k_BxLxKxH = self.q_norm(q_BxLxNxH), self.k_norm(k_BxLxKxH)
        q_BxLxNxH, k_BxLxKxH = apply_rope(q_BxLxNxH, *rope), apply_rope(k_BxLxKxH, *rope)
        window = self.spec.sliding_window
        # dot_product_attention groups the N query heads over the K kv heads itself (no repeated k/v in memory);
        # its window (left, right) keeps keys with q - k <= left, HF's sliding window keeps q - k < window.
        ctx_BxLxNxH = jax.nn.dot_product_attention(
            q_BxLxNxH,
            k_BxLxKxH,
            v_BxLxKxH,
            mask=mask_Bx1xLxL,
            is_causal=True,
            scale=self.spec.head_dim**-0.5,
            local_window_size=None if window is None else (window - 1, 0),
            implementation=attention_impl,
        )
        return self.o_proj(ctx_BxLxNxH, compute_dtype, rng_o)


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
    """Pre-norm block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, spec: LlamaSpec, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(spec, rngs=rngs, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(spec, rngs=rngs, dtype=dtype)

    def __call__(self, x_BxLxE, rope, mask_Bx1xLxL, compute_dtype, attention_impl, rng=None):
        rng_attn, rng_mlp = lora.split(rng, 2)
        normed_BxLxE = self.input_layernorm(x_BxLxE)
        x_BxLxE = x_BxLxE + self.self_attn(normed_BxLxE, rope, mask_Bx1xLxL, compute_dtype, attention_impl, rng_attn)
        return x_BxLxE + self.mlp(self.post_attention_layernorm(x_BxLxE), compute_dtype, rng_mlp)


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
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype=param_dtype)
        if not spec.tie_word_embeddings:
            E, V = spec.hidden_size, spec.vocab_size
            self.lm_head = Linear((E,), (V,), (axes.EMBED,), (axes.VOCAB,), bias=False, rngs=rngs, dtype=param_dtype)
        self.compute_dtype = jnp.dtype(jnp.float32)
        self.remat = "none"
        self.attention_impl: str | None = None

    def configure(
        self, compute_dtype: Any = jnp.float32, remat: bool | str = "none", attention_impl: str | None = None
    ) -> LlamaModel:
        """Sets static execution options (not parameters). remat: none | full | dots_saveable |
        dots_with_no_batch_dims_saveable (True/False mean full/none); attention_impl: None | "xla" | "cudnn"."""
        if isinstance(remat, bool):  # the engine's ModelConfig.remat is a bool
            remat = "full" if remat else "none"
        if remat != "none" and remat not in REMAT_POLICIES:
            raise ValueError(f"remat {remat!r} is not one of: none, {', '.join(REMAT_POLICIES)}")
        self.compute_dtype = jnp.dtype(compute_dtype)
        self.remat = remat
        self.attention_impl = attention_impl
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
        x_BxLxE = jnp.take(self.embed_tokens[...], input_ids_BxL, axis=0).astype(self.compute_dtype)
        x_BxLxE = self._decode(x_BxLxE, rope, mask_Bx1xLxL, dropout_rng)
        return self.norm(x_BxLxE)

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
        return logits.reshape(hidden_BxLxE.shape[:-1] + (-1,))

    def _decode(self, x_BxLxE, rope, mask_Bx1xLxL, rng=None):
        cd, impl, scanned = self.compute_dtype, self.attention_impl, self.spec.scan_layers
        layer_rngs = None if rng is None else jax.random.split(rng, self.spec.num_layers)
        if scanned:
            graphdef, stacked = nnx.split(self.layers)
            run = _layer_fn(graphdef, cd, impl, self.remat, scanned=True)

            def body(x, xs):
                params, layer_rng = xs
                return run(params, x, rope, mask_Bx1xLxL, layer_rng), None

            x_BxLxE, _ = jax.lax.scan(body, x_BxLxE, (stacked, layer_rngs))
            return x_BxLxE
        for i, layer in enumerate(self.layers):
            graphdef, params = nnx.split(layer)
            layer_rng = None if layer_rngs is None else layer_rngs[i]
            run = _layer_fn(graphdef, cd, impl, self.remat, scanned=False)
            x_BxLxE = run(params, x_BxLxE, rope, mask_Bx1xLxL, layer_rng)
        return x_BxLxE


def layer_index(path: str) -> int | None:
    """The decoder layer a '/'-joined parameter path of an unscanned model belongs to, or None
    (scanned models hold all layers in each `layers/...` tensor)."""
    parts = path.split("/")
    if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit():
        return int(parts[1])
    return None
