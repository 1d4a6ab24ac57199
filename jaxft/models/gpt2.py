"""GPT-2 decoder math in Flax NNX: learned positions, fused qkv, LayerNorm with bias, GELU MLP, tied LM head.

Owns the forward pass and the logical axis names of every weight; knows nothing of HF keys, files or meshes.
Module and parameter names are HF's (`wte`, `c_attn`, `ln_f`, ...) so LoRA targets written with HF names match.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft import axes
from jaxft.models.decoder import (
    AttentionInputs,
    DecoderModel,
    cache_positions,
    make_attention_mask,
    make_cache_mask,
    make_positions,
    write_cache,
)
from jaxft.models.layers import ACTIVATIONS, LayerNorm, Linear, build_stacked, matmul, normal_init, split_key


@dataclasses.dataclass(frozen=True)
class GPT2Spec:
    """Architecture hyper-parameters, read from an HF config.json, plus the parameter layout (scan_layers)."""

    model_type: str = "gpt2"
    vocab_size: int = 50257
    hidden_size: int = 768  # n_embd
    num_layers: int = 12  # n_layer
    num_heads: int = 12  # n_head
    intermediate_size: int = 3072  # n_inner, or 4 * n_embd when unset
    max_positions: int = 1024  # n_positions: rows of the learned position table
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu_new"
    scale_attn_weights: bool = True  # False: raw q·k logits, no 1/sqrt(head_dim)
    tie_word_embeddings: bool = True  # GPT-2 always projects through wte
    # Stack the layers on a leading `layers` axis and run them with one lax.scan: compile time stays flat in depth.
    scan_layers: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads  # every head has its own keys and values (no grouped-query attention)


class Attention(nnx.Module):
    """Causal self-attention with HF's fused c_attn: one kernel [E, 3, N, H] yields q, k and v."""

    def __init__(self, spec: GPT2Spec, *, rngs: nnx.Rngs, dtype=jnp.float32):
        E, N, H = spec.hidden_size, spec.num_heads, spec.head_dim
        # Kept fused (as HF stores it) so the checkpoint maps by a reshape and a `.*c_attn` LoRA target is one
        # adapter; the q/k/v axis is never sharded (None), the heads are.
        qkv_axes = (None, axes.HEADS, axes.KV)
        self.c_attn = Linear((E,), (3, N, H), (axes.EMBED,), qkv_axes, bias=True, rngs=rngs, dtype=dtype)
        self.c_proj = Linear((N, H), (E,), (axes.HEADS, axes.KV), (axes.EMBED,), bias=True, rngs=rngs, dtype=dtype)
        self.scale = spec.head_dim**-0.5 if spec.scale_attn_weights else 1.0

    def __call__(self, x_BxLxE, mask_Bx1xLxL, compute_dtype, attention_impl, rng=None):
        rng_attn, rng_proj = split_key(rng, 2)
        qkv_BxLx3xNxH = self.c_attn(x_BxLxE, compute_dtype, rng_attn)
        q_BxLxNxH, k_BxLxNxH, v_BxLxNxH = (qkv_BxLx3xNxH[:, :, i] for i in range(3))
        ctx_BxLxNxH = jax.nn.dot_product_attention(
            q_BxLxNxH,
            k_BxLxNxH,
            v_BxLxNxH,
            mask=mask_Bx1xLxL,
            is_causal=True,
            scale=self.scale,
            implementation=attention_impl,
        )
        return self.c_proj(ctx_BxLxNxH, compute_dtype, rng_proj)

    def decode_cached(self, x_BxSxE, kv, index, mask_Bx1xSxT, compute_dtype, attention_impl):
        """Generation: S new tokens' k/v written into this layer's cache (k, v [B, T, N, H]) at slots index..,
        then attention over every slot the explicit mask allows. Returns (output, (k, v))."""
        qkv_BxSx3xNxH = self.c_attn(x_BxSxE, compute_dtype)
        q_BxSxNxH, k_BxSxNxH, v_BxSxNxH = (qkv_BxSx3xNxH[:, :, i] for i in range(3))
        k_BxTxNxH, v_BxTxNxH = write_cache(kv, k_BxSxNxH, v_BxSxNxH, index)
        ctx_BxSxNxH = jax.nn.dot_product_attention(
            q_BxSxNxH, k_BxTxNxH, v_BxTxNxH, mask=mask_Bx1xSxT, scale=self.scale, implementation=attention_impl
        )
        return self.c_proj(ctx_BxSxNxH, compute_dtype), (k_BxTxNxH, v_BxTxNxH)


class MLP(nnx.Module):
    """c_proj(act(c_fc(x)))."""

    def __init__(self, spec: GPT2Spec, *, rngs: nnx.Rngs, dtype=jnp.float32):
        E, F = spec.hidden_size, spec.intermediate_size
        self.c_fc = Linear((E,), (F,), (axes.EMBED,), (axes.MLP,), bias=True, rngs=rngs, dtype=dtype)
        self.c_proj = Linear((F,), (E,), (axes.MLP,), (axes.EMBED,), bias=True, rngs=rngs, dtype=dtype)
        self.hidden_act = spec.hidden_act

    def __call__(self, x_BxLxE, compute_dtype, rng=None):
        rng_fc, rng_proj = split_key(rng, 2)
        h_BxLxF = ACTIVATIONS[self.hidden_act](self.c_fc(x_BxLxE, compute_dtype, rng_fc))
        return self.c_proj(h_BxLxF, compute_dtype, rng_proj)


class Block(nnx.Module):
    """Pre-norm block (HF's GPT2Block): x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, spec: GPT2Spec, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.ln_1 = LayerNorm(spec.hidden_size, spec.layer_norm_eps, dtype=dtype)
        self.attn = Attention(spec, rngs=rngs, dtype=dtype)
        self.ln_2 = LayerNorm(spec.hidden_size, spec.layer_norm_eps, dtype=dtype)
        self.mlp = MLP(spec, rngs=rngs, dtype=dtype)

    def __call__(self, x_BxLxE, rope, mask_Bx1xLxL, compute_dtype, attention_impl, rng=None):
        # `rope` is always None (positions are added once, to the embeddings): the slot keeps the call signature
        # that DecoderModel's layer runner drives every family's blocks with.
        del rope
        rng_attn, rng_mlp = split_key(rng, 2)
        x_BxLxE = x_BxLxE + self.attn(self.ln_1(x_BxLxE), mask_Bx1xLxL, compute_dtype, attention_impl, rng_attn)
        return x_BxLxE + self.mlp(self.ln_2(x_BxLxE), compute_dtype, rng_mlp)

    def decode_cached(self, x_BxSxE, rope, kv, index, mask_Bx1xSxT, compute_dtype, attention_impl):
        """The same block over S new tokens with this layer's kv cache; returns (x, updated (k, v))."""
        del rope
        attn_BxSxE, kv = self.attn.decode_cached(
            self.ln_1(x_BxSxE), kv, index, mask_Bx1xSxT, compute_dtype, attention_impl
        )
        x_BxSxE = x_BxSxE + attn_BxSxE
        return x_BxSxE + self.mlp(self.ln_2(x_BxSxE), compute_dtype), kv


class GPT2Model(DecoderModel):
    """Decoder + tied LM head. `model(input_ids, attention_mask, segment_ids, positions)` returns fp32 logits
    [B, L, V]. No dropout: fine-tuning here runs without it (as for the Llama family), so HF's *_pdrop are unused.
    """

    def __init__(self, spec: GPT2Spec, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        if spec.hidden_size % spec.num_heads:
            raise ValueError(f"hidden_size {spec.hidden_size} is not a multiple of num_heads {spec.num_heads}")
        self.spec = spec
        E = spec.hidden_size
        wte, wpe = (normal_init(rngs, (n, E), param_dtype) for n in (spec.vocab_size, spec.max_positions))
        self.wte = nnx.Param(wte, logical_axes=(axes.VOCAB, axes.EMBED))
        self.wpe = nnx.Param(wpe, logical_axes=(axes.POSITIONS, axes.EMBED))
        if spec.scan_layers:
            self.layers = build_stacked(lambda r: Block(spec, rngs=r, dtype=param_dtype), spec.num_layers, rngs)
        else:
            self.layers = nnx.List([Block(spec, rngs=rngs, dtype=param_dtype) for _ in range(spec.num_layers)])
        self.ln_f = LayerNorm(E, spec.layer_norm_eps, dtype=param_dtype)
        self.init_options()

    def hidden_states(
        self, input_ids, attention_mask=None, segment_ids=None, positions=None, *, dropout_rng=None
    ) -> jax.Array:
        """The ln_f-normed hidden states [B, L, E] in the compute dtype (what `project` turns into logits)."""
        input_ids_BxL = jnp.asarray(input_ids)
        positions_BxL = make_positions(input_ids_BxL, segment_ids) if positions is None else jnp.asarray(positions)
        mask_Bx1xLxL = make_attention_mask(attention_mask, segment_ids)
        # Sum in the parameter dtype, as HF does, then cast once.
        x_BxLxE = jnp.take(self.wte[...], input_ids_BxL, axis=0) + jnp.take(self.wpe[...], positions_BxL, axis=0)
        x_BxLxE = self.run_layers(x_BxLxE.astype(self.compute_dtype), AttentionInputs(None, mask_Bx1xLxL), dropout_rng)
        return self.ln_f(x_BxLxE)

    def project(self, hidden_BxLxE: jax.Array) -> jax.Array:
        """Hidden states -> fp32 logits through the tied input embedding wte [V, E] (its E contracted in
        place, no transposed copy)."""
        cd = self.compute_dtype
        h2 = hidden_BxLxE.astype(cd).reshape(-1, hidden_BxLxE.shape[-1])
        logits = matmul(h2, self.wte[...], cd, w_contract=1)
        return logits.reshape(hidden_BxLxE.shape[:-1] + (-1,))

    def decode_with_cache(self, input_ids_BxS, cache, index, start_B, *, last_only: bool = False):
        """Generation over a kv cache, as LlamaModel.decode_with_cache: the S tokens go to slots index..,
        rows are left-padded from start_B. Positions past max_positions would read beyond wpe: the caller
        (jaxft.generate) refuses them."""
        input_ids_BxS = jnp.asarray(input_ids_BxS)
        slots_S = index + jnp.arange(input_ids_BxS.shape[1])
        mask_Bx1xSxT = make_cache_mask(slots_S, cache["k"].shape[2], start_B, None)
        positions_BxS = cache_positions(slots_S, start_B)
        x_BxSxE = jnp.take(self.wte[...], input_ids_BxS, axis=0) + jnp.take(self.wpe[...], positions_BxS, axis=0)
        x_BxSxE, cache = self.run_layers_cached(
            x_BxSxE.astype(self.compute_dtype), AttentionInputs(None, mask_Bx1xSxT), cache, index
        )
        if last_only:
            x_BxSxE = x_BxSxE[:, -1:]
        return self.project(self.ln_f(x_BxSxE)), cache
