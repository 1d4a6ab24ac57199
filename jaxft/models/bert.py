"""BERT-family encoder math in Flax NNX (BERT, MiniLM, RoBERTa) with classification heads.

Owns the forward pass and the logical axis names of every weight; knows nothing of HF keys or meshes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft import axes
from jaxft.models.layers import ACTIVATIONS, REMAT_POLICIES, Dense, Embed, LayerNorm, dropout, remat_name, split_key


@dataclasses.dataclass(frozen=True)
class BertSpec:
    """Architecture hyper-parameters, read from an HF config.json."""

    family: str = "bert"  # bert | roberta
    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout_rate: float = 0.1
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    task: str = "sequence-classification"
    num_labels: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class Embeddings(nnx.Module):
    def __init__(self, spec: BertSpec, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.word = Embed(spec.vocab_size, spec.hidden_size, axes.VOCAB, rngs=rngs, dtype=dtype)
        self.position = Embed(spec.max_positions, spec.hidden_size, axes.POSITIONS, rngs=rngs, dtype=dtype)
        self.token_type = Embed(spec.type_vocab_size, spec.hidden_size, axes.TYPES, rngs=rngs, dtype=dtype)
        self.norm = LayerNorm(spec.hidden_size, spec.layer_norm_eps, dtype=dtype)
        self.spec = spec

    def __call__(self, input_ids_BxL, token_type_ids_BxL, attention_mask_BxL, rng, compute_dtype):
        if self.spec.family == "roberta":
            # RoBERTa numbers real tokens from pad_token_id + 1 and gives padding the pad position.
            is_token = (input_ids_BxL != self.spec.pad_token_id).astype(jnp.int32)
            positions_BxL = jnp.cumsum(is_token, axis=1) * is_token + self.spec.pad_token_id
        else:
            positions_BxL = jnp.broadcast_to(jnp.arange(input_ids_BxL.shape[1]), input_ids_BxL.shape)
        x_BxLxE = self.word(input_ids_BxL) + self.position(positions_BxL) + self.token_type(token_type_ids_BxL)
        x_BxLxE = self.norm(x_BxLxE.astype(compute_dtype))
        return dropout(x_BxLxE, self.spec.dropout_rate, rng)


class Attention(nnx.Module):
    def __init__(self, spec: BertSpec, *, rngs: nnx.Rngs, dtype=jnp.float32):
        E, N, H = spec.hidden_size, spec.num_heads, spec.head_dim
        qkv_out = (axes.HEADS, axes.KV)
        self.query = Dense((E,), (N, H), (axes.EMBED,), qkv_out, rngs=rngs, dtype=dtype)
        self.key = Dense((E,), (N, H), (axes.EMBED,), qkv_out, rngs=rngs, dtype=dtype)
        self.value = Dense((E,), (N, H), (axes.EMBED,), qkv_out, rngs=rngs, dtype=dtype)
        self.output = Dense((N, H), (E,), qkv_out, (axes.EMBED,), rngs=rngs, dtype=dtype)
        self.spec = spec

    def __call__(self, x_BxLxE, mask_Bx1x1xL, rng, compute_dtype, queries: int | None = None):
        """`queries=k` attends from the first k positions only (keys and values still cover all of them)."""
        rng_probs, rng_out = split_key(rng, 2)
        q_BxLxNxH = self.query(x_BxLxE[:, :queries], compute_dtype)
        k_BxLxNxH = self.key(x_BxLxE, compute_dtype)
        v_BxLxNxH = self.value(x_BxLxE, compute_dtype)
        scale = self.spec.head_dim**-0.5
        logits_BxNxLxL = jnp.einsum("blnh,bmnh->bnlm", q_BxLxNxH * scale, k_BxLxNxH)
        big_neg = jnp.finfo(logits_BxNxLxL.dtype).min
        logits_BxNxLxL = jnp.where(mask_Bx1x1xL, logits_BxNxLxL, big_neg)
        probs = jax.nn.softmax(logits_BxNxLxL.astype(jnp.float32), axis=-1).astype(compute_dtype)
        probs = dropout(probs, self.spec.dropout_rate, rng_probs)
        ctx_BxLxNxH = jnp.einsum("bnlm,bmnh->blnh", probs, v_BxLxNxH)
        return dropout(self.output(ctx_BxLxNxH, compute_dtype), self.spec.dropout_rate, rng_out)


class Layer(nnx.Module):
    def __init__(self, spec: BertSpec, *, rngs: nnx.Rngs, dtype=jnp.float32):
        E, F = spec.hidden_size, spec.intermediate_size
        self.attention = Attention(spec, rngs=rngs, dtype=dtype)
        self.attention_norm = LayerNorm(E, spec.layer_norm_eps, dtype=dtype)
        self.up = Dense((E,), (F,), (axes.EMBED,), (axes.MLP,), rngs=rngs, dtype=dtype)
        self.down = Dense((F,), (E,), (axes.MLP,), (axes.EMBED,), rngs=rngs, dtype=dtype)
        self.mlp_norm = LayerNorm(E, spec.layer_norm_eps, dtype=dtype)
        self.spec = spec

    def __call__(self, x_BxLxE, mask_Bx1x1xL, rng, compute_dtype, queries: int | None = None):
        rng_attn, rng_mlp = split_key(rng, 2)
        attended = self.attention(x_BxLxE, mask_Bx1x1xL, rng_attn, compute_dtype, queries)
        x_BxLxE = self.attention_norm(x_BxLxE[:, :queries] + attended)
        h_BxLxF = ACTIVATIONS[self.spec.hidden_act](self.up(x_BxLxE, compute_dtype))
        y_BxLxE = dropout(self.down(h_BxLxF, compute_dtype), self.spec.dropout_rate, rng_mlp)
        return self.mlp_norm(x_BxLxE + y_BxLxE)


class Encoder(nnx.Module):
    def __init__(self, spec: BertSpec, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.layers = nnx.List([Layer(spec, rngs=rngs, dtype=dtype) for _ in range(spec.num_layers)])

    def __call__(self, x_BxLxE, mask_Bx1x1xL, rng, compute_dtype, remat: str, last_queries: int | None = None):
        """`last_queries=1`: the last layer computes only the first token's output, which is all a
        [CLS]-pooled head reads; the result is identical and that layer costs about 1/L as much."""
        n = len(self.layers)
        for i, (layer, layer_rng) in enumerate(zip(self.layers, split_key(rng, n))):
            queries = last_queries if i == n - 1 else None
            if remat != "none":
                checkpointed = nnx.remat(_layer_fn(compute_dtype, queries), policy=REMAT_POLICIES[remat])
                x_BxLxE = checkpointed(layer, x_BxLxE, mask_Bx1x1xL, layer_rng)
            else:
                x_BxLxE = layer(x_BxLxE, mask_Bx1x1xL, layer_rng, compute_dtype, queries)
        return x_BxLxE


def _layer_fn(compute_dtype, queries):
    """A layer call with its static options bound, for nnx.remat (which traces every argument)."""

    def run(layer: Layer, x, mask, rng):
        return layer(x, mask, rng, compute_dtype, queries)

    return run


class Pooler(nnx.Module):
    def __init__(self, spec: BertSpec, *, rngs: nnx.Rngs, dtype=jnp.float32):
        E = spec.hidden_size
        self.dense = Dense((E,), (E,), (axes.EMBED,), (None,), rngs=rngs, dtype=dtype)

    def __call__(self, x_BxLxE, compute_dtype):
        return jnp.tanh(self.dense(x_BxLxE[:, 0], compute_dtype))


class RobertaClassifier(nnx.Module):
    """RoBERTa's sequence head: dense + tanh + projection on the <s> token (no pooler)."""

    def __init__(self, spec: BertSpec, *, rngs: nnx.Rngs, dtype=jnp.float32):
        E, C = spec.hidden_size, spec.num_labels
        self.dense = Dense((E,), (E,), (axes.EMBED,), (None,), rngs=rngs, dtype=dtype)
        self.out_proj = Dense((E,), (C,), (None,), (axes.LABELS,), rngs=rngs, dtype=dtype)
        self.rate = spec.dropout_rate

    def __call__(self, x_BxLxE, rng, compute_dtype):
        rng_a, rng_b = split_key(rng, 2)
        h_BxE = dropout(x_BxLxE[:, 0], self.rate, rng_a)
        h_BxE = jnp.tanh(self.dense(h_BxE, compute_dtype))
        return self.out_proj(dropout(h_BxE, self.rate, rng_b), compute_dtype)


class BertModel(nnx.Module):
    """Encoder + task head. `model(input_ids=..., attention_mask=..., token_type_ids=...)` returns logits."""

    def __init__(self, spec: BertSpec, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.spec = spec
        self.embeddings = Embeddings(spec, rngs=rngs, dtype=param_dtype)
        self.encoder = Encoder(spec, rngs=rngs, dtype=param_dtype)
        E, C = spec.hidden_size, spec.num_labels
        seq_head = spec.task == "sequence-classification"
        if spec.family == "bert" and seq_head:
            self.pooler = Pooler(spec, rngs=rngs, dtype=param_dtype)
        if spec.family == "roberta" and seq_head:
            self.classifier = RobertaClassifier(spec, rngs=rngs, dtype=param_dtype)
        else:
            self.classifier = Dense((E,), (C,), (axes.EMBED,), (axes.LABELS,), rngs=rngs, dtype=param_dtype)
        self.compute_dtype = jnp.float32
        self.remat = "none"

    def configure(self, compute_dtype: Any = jnp.float32, remat: bool | str = "none") -> BertModel:
        """Sets static execution options (not parameters). remat: none | full | dots_saveable |
        dots_with_no_batch_dims_saveable (True/False mean full/none)."""
        self.remat = remat_name(remat)
        self.compute_dtype = jnp.dtype(compute_dtype)
        return self

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, dropout_rng=None):
        """Logits: [B, C] for sequence classification, [B, L, C] for token classification (fp32)."""
        input_ids = jnp.asarray(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        cd = self.compute_dtype
        rng_emb, rng_enc, rng_head = split_key(dropout_rng, 3)
        mask_Bx1x1xL = (jnp.asarray(attention_mask) > 0)[:, None, None, :]
        x_BxLxE = self.embeddings(input_ids, jnp.asarray(token_type_ids), attention_mask, rng_emb, cd)
        first_only = 1 if self.spec.task == "sequence-classification" else None
        x_BxLxE = self.encoder(x_BxLxE, mask_Bx1x1xL, rng_enc, cd, self.remat, first_only)
        if self.spec.task == "token-classification":
            logits = self.classifier(dropout(x_BxLxE, self.spec.dropout_rate, rng_head), cd)
        elif self.spec.family == "roberta":
            logits = self.classifier(x_BxLxE, rng_head, cd)
        else:
            pooled_BxE = dropout(self.pooler(x_BxLxE, cd), self.spec.dropout_rate, rng_head)
            logits = self.classifier(pooled_BxE, cd)
        return logits.astype(jnp.float32)
