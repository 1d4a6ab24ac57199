"""What the decoder families share: positions and attention masks (packed rows, left-padded kv caches), kv-cache
writes, and `DecoderModel`, whose layer runner drives any family's stacked (scanned) or per-layer blocks, with remat,
the per-layer attention inputs of interleaved sliding/global models, and cached generation.

A family's block is called as block(x, rope, mask, compute_dtype, attention_impl, rng) and, for generation,
block.decode_cached(x, rope, (k, v), index, mask, compute_dtype, attention_impl). It knows no HF keys or meshes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.models.layers import REMAT_POLICIES, remat_name

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


def make_band_mask(length: int, window: int) -> jax.Array:
    """[1, 1, L, L] bool: keys less than `window` positions before the query (a sliding layer's reach)."""
    q, k = np.arange(length)[:, None], np.arange(length)[None, :]
    return jnp.asarray(q - k < window)[None, None]


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


def write_cache(kv, k_BxSxKxH, v_BxSxKxH, index):
    """The layer's cache (k, v [B, T, K, H]) with S new keys and values written at slots index.. index+S-1."""
    k_BxTxKxH, v_BxTxKxH = kv
    k_BxTxKxH = jax.lax.dynamic_update_slice_in_dim(k_BxTxKxH, k_BxSxKxH.astype(k_BxTxKxH.dtype), index, axis=1)
    v_BxTxKxH = jax.lax.dynamic_update_slice_in_dim(v_BxTxKxH, v_BxSxKxH.astype(v_BxTxKxH.dtype), index, axis=1)
    return k_BxTxKxH, v_BxTxKxH


# ------------------------------------------------------------------------------------------ per-layer inputs


@dataclasses.dataclass(frozen=True)
class AttentionInputs:
    """What each block's attention takes besides x: RoPE (cos, sin), or None for learned positions, and the mask.

    Interleaved models (Gemma 3) add `local`, the sliding layers' own (RoPE, mask), and `sliding_Ly` [num_layers]
    bool, which layers those are; then each layer picks its pair (`for_layer`).
    """

    rope: Any
    mask: jax.Array | None
    local: tuple[Any, jax.Array] | None = None
    sliding_Ly: np.ndarray | None = None

    def for_layer(self, sliding: Any) -> tuple[Any, jax.Array | None]:
        """(RoPE, mask) of one layer. `sliding` is None (layers alike), a Python bool (unscanned) or a traced bool
        (the scanned layer's flag)."""
        if sliding is None or self.local is None:
            return self.rope, self.mask
        local_rope, local_mask = self.local
        if isinstance(sliding, bool):
            return (local_rope, local_mask) if sliding else (self.rope, self.mask)
        full_mask = jnp.ones_like(local_mask) if self.mask is None else self.mask
        pick = lambda full, loc: jnp.where(sliding, loc, full)
        return jax.tree.map(pick, self.rope, local_rope), pick(full_mask, local_mask)

    def layer_flag(self, i: int) -> bool | None:
        return None if self.sliding_Ly is None else bool(self.sliding_Ly[i])


def _layer_fn(graphdef: nnx.GraphDef, compute_dtype: Any, attention_impl: str | None, remat: str, scanned: bool):
    """A pure (layer params, x, rope, mask, rng) -> x with the static options bound, wrapped in jax.checkpoint."""

    def run(params, x_BxLxE, rope, mask_Bx1xLxL, rng):
        return nnx.merge(graphdef, params)(x_BxLxE, rope, mask_Bx1xLxL, compute_dtype, attention_impl, rng)

    if remat == "none":
        return run
    # Inside scan the loop boundary already stops XLA from merging the recomputation away.
    return jax.checkpoint(run, policy=REMAT_POLICIES[remat], prevent_cse=not scanned)


# ------------------------------------------------------------------------------------------------- model


class DecoderModel(nnx.Module):
    """The part of a decoder + LM head that does not depend on the family: static execution options, the call,
    the layer runners and the kv cache. A family sets `spec` (with num_layers, num_kv_heads, head_dim,
    scan_layers) and `layers` (one stacked block, or an nnx.List of blocks) and defines `hidden_states`,
    `project` and `decode_with_cache`."""

    def init_options(self) -> None:
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
    ) -> DecoderModel:
        """Sets static execution options (not parameters). remat: none | full | dots_saveable |
        dots_with_no_batch_dims_saveable (True/False mean full/none); attention_impl: None | "xla" | "cudnn";
        logits_chunk: positions per row whose logits the training loss computes at a time (0: all)."""
        self.remat = remat_name(remat)
        self.compute_dtype = jnp.dtype(compute_dtype)
        self.attention_impl = attention_impl
        self.logits_chunk = int(logits_chunk)
        return self

    def __call__(
        self, input_ids, attention_mask=None, segment_ids=None, positions=None, *, dropout_rng=None
    ) -> jax.Array:
        """Logits [B, L, V] in fp32.

        attention_mask [B, L]: 0 marks padding (never attended to). segment_ids [B, L]: packed sequences;
        a token attends only to earlier tokens of its own segment. positions [B, L]: token positions; by
        default 0.. per row, restarting at each segment when segment_ids are given. dropout_rng: LoRA
        dropout while training (the only dropout in the decoders).
        """
        hidden = self.hidden_states(input_ids, attention_mask, segment_ids, positions, dropout_rng=dropout_rng)
        return self.project(hidden)

    def init_cache(self, batch: int, length: int) -> dict[str, jax.Array]:
        """An empty kv cache for generation: k and v [layers, B, T, K, H] in the compute dtype."""
        s = self.spec
        shape = (s.num_layers, batch, length, s.num_kv_heads, s.head_dim)
        return {"k": jnp.zeros(shape, self.compute_dtype), "v": jnp.zeros(shape, self.compute_dtype)}

    def run_layers(self, x_BxLxE: jax.Array, inputs: AttentionInputs, rng: jax.Array | None = None) -> jax.Array:
        """Every block over x: one lax.scan over the stacked blocks, or a loop over the list; each under remat."""
        cd, impl, scanned = self.compute_dtype, self.attention_impl, self.spec.scan_layers
        layer_rngs = None if rng is None else jax.random.split(rng, self.spec.num_layers)
        if scanned:
            graphdef, stacked = nnx.split(self.layers)
            run = _layer_fn(graphdef, cd, impl, self.remat, scanned=True)

            def body(x, xs):
                params, layer_rng, sliding = xs
                rope, mask = inputs.for_layer(sliding)
                return run(params, x, rope, mask, layer_rng), None

            x_BxLxE, _ = jax.lax.scan(body, x_BxLxE, (stacked, layer_rngs, inputs.sliding_Ly))
            return x_BxLxE
        for i, layer in enumerate(self.layers):
            graphdef, params = nnx.split(layer)
            run = _layer_fn(graphdef, cd, impl, self.remat, scanned=False)
            rope, mask = inputs.for_layer(inputs.layer_flag(i))
            x_BxLxE = run(params, x_BxLxE, rope, mask, None if layer_rngs is None else layer_rngs[i])
        return x_BxLxE

    def run_layers_cached(self, x_BxSxE: jax.Array, inputs: AttentionInputs, cache: dict, index) -> tuple:
        """The blocks over S new tokens with a kv cache {"k", "v": [layers, B, T, K, H]}: stacked blocks scan over
        the cache's layer slices as they scan over the weights; listed ones loop. No remat, no dropout.
        Returns (x, the updated cache)."""
        cd, impl = self.compute_dtype, self.attention_impl
        if self.spec.scan_layers:
            graphdef, stacked = nnx.split(self.layers)

            def body(x, xs):
                params, k, v, sliding = xs
                rope, mask = inputs.for_layer(sliding)
                return nnx.merge(graphdef, params).decode_cached(x, rope, (k, v), index, mask, cd, impl)

            x_BxSxE, (k, v) = jax.lax.scan(body, x_BxSxE, (stacked, cache["k"], cache["v"], inputs.sliding_Ly))
            return x_BxSxE, {"k": k, "v": v}
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            rope, mask = inputs.for_layer(inputs.layer_flag(i))
            x_BxSxE, (k, v) = layer.decode_cached(x_BxSxE, rope, (cache["k"][i], cache["v"][i]), index, mask, cd, impl)
            ks.append(k)
            vs.append(v)
        return x_BxSxE, {"k": jnp.stack(ks), "v": jnp.stack(vs)}
