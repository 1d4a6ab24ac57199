"""Vision Transformer math in Flax NNX (ViT, DeiT) with an image-classification head.

`model(pixel_values=...)` takes [B, C, H, W] float pixels as HF image processors emit them (channels first,
already normalised) and returns [B, num_labels] logits. Inside, images are channels-last patches: a patch
embedding is one matmul over each patch's p·p·C values. Owns the forward pass and the logical axis names of every
weight; knows nothing of HF keys or meshes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft import axes
from jaxft.models.layers import (
    ACTIVATIONS,
    REMAT_POLICIES,
    LayerNorm,
    Linear,
    build_stacked,
    dropout,
    matmul,
    normal_init,
    remat_name,
    split_key,
)


@dataclasses.dataclass(frozen=True)
class ViTSpec:
    """Architecture hyper-parameters, read from an HF config.json."""

    family: str = "vit"  # vit | deit
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    layer_norm_eps: float = 1e-12
    dropout_rate: float = 0.0  # hidden_dropout_prob
    attention_dropout_rate: float = 0.0  # attention_probs_dropout_prob
    hidden_act: str = "gelu"
    qkv_bias: bool = True
    num_labels: int = 2
    # DeiT distilled with a teacher: a second head on the distillation token; the logits are the two heads'
    # mean, as DeiTForImageClassificationWithTeacher gives them.
    distillation_head: bool = False
    scan_layers: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def special_tokens(self) -> int:
        """Tokens before the patches: [CLS], and DeiT's distillation token."""
        return 2 if self.family == "deit" else 1

    @property
    def num_tokens(self) -> int:
        return self.special_tokens + self.grid**2


class PatchEmbed(nnx.Module):
    """HF's Conv2d(C, E, kernel=p, stride=p) as one matmul per patch: kernel [p, p, C, E] (channels last)."""

    def __init__(self, spec: ViTSpec, *, rngs: nnx.Rngs, dtype=jnp.float32):
        p, C, E = spec.patch_size, spec.num_channels, spec.hidden_size
        self.kernel = nnx.Param(normal_init(rngs, (p, p, C, E), dtype), logical_axes=(None, None, None, axes.EMBED))
        self.bias = nnx.Param(jnp.zeros((E,), dtype), logical_axes=(axes.EMBED,))
        self.patch = p

    def __call__(self, pixels_BxCxHxW: jax.Array, compute_dtype: Any) -> jax.Array:
        B, C, H, W = pixels_BxCxHxW.shape
        p = self.patch
        x = pixels_BxCxHxW.astype(compute_dtype).reshape(B, C, H // p, p, W // p, p)
        patches_BxNxP = x.transpose(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)
        kernel = self.kernel[...].reshape(p * p * C, -1)
        y = matmul(patches_BxNxP.reshape(B * (H // p) * (W // p), -1), kernel, compute_dtype)
        y = y.reshape(B, (H // p) * (W // p), -1)
        return (y + self.bias[...].astype(jnp.float32)).astype(compute_dtype)


class Embeddings(nnx.Module):
    def __init__(self, spec: ViTSpec, *, rngs: nnx.Rngs, dtype=jnp.float32):
        E = spec.hidden_size
        self.patch = PatchEmbed(spec, rngs=rngs, dtype=dtype)
        self.cls_token = nnx.Param(normal_init(rngs, (1, 1, E), dtype), logical_axes=(None, None, axes.EMBED))
        self.distillation_token = nnx.data(
            nnx.Param(normal_init(rngs, (1, 1, E), dtype), logical_axes=(None, None, axes.EMBED))
            if spec.family == "deit"
            else None
        )
        self.position_embeddings = nnx.Param(
            normal_init(rngs, (1, spec.num_tokens, E), dtype), logical_axes=(None, axes.POSITIONS, axes.EMBED)
        )
        self.spec = spec

    def __call__(self, pixels_BxCxHxW: jax.Array, rng, compute_dtype: Any) -> jax.Array:
        s = self.spec
        if pixels_BxCxHxW.ndim != 4 or tuple(pixels_BxCxHxW.shape[1:]) != (s.num_channels, s.image_size, s.image_size):
            raise ValueError(
                f"pixel_values must be [B, {s.num_channels}, {s.image_size}, {s.image_size}] (channels first, as HF "
                f"image processors give them), not {list(pixels_BxCxHxW.shape)}"
            )
        x_BxNxE = self.patch(pixels_BxCxHxW, compute_dtype)
        B = x_BxNxE.shape[0]
        special = [self.cls_token[...]] + (
            [self.distillation_token[...]] if self.distillation_token is not None else []
        )
        special_BxSxE = [jnp.broadcast_to(t.astype(compute_dtype), (B, 1, t.shape[-1])) for t in special]
        x_BxTxE = jnp.concatenate(special_BxSxE + [x_BxNxE], axis=1)
        x_BxTxE = x_BxTxE + self.position_embeddings[...].astype(compute_dtype)
        return dropout(x_BxTxE, s.dropout_rate, rng)


class Attention(nnx.Module):
    def __init__(self, spec: ViTSpec, *, rngs: nnx.Rngs, dtype=jnp.float32):
        E, N, H = spec.hidden_size, spec.num_heads, spec.head_dim
        qkv = dict(in_axes=(axes.EMBED,), out_axes=(axes.HEADS, axes.KV), bias=spec.qkv_bias, rngs=rngs, dtype=dtype)
        self.query = Linear((E,), (N, H), **qkv)
        self.key = Linear((E,), (N, H), **qkv)
        self.value = Linear((E,), (N, H), **qkv)
        self.output = Linear((N, H), (E,), (axes.HEADS, axes.KV), (axes.EMBED,), bias=True, rngs=rngs, dtype=dtype)
        self.spec = spec

    def __call__(self, x_BxTxE, rng, compute_dtype):
        rng_probs, rng_out, rng_q, rng_k, rng_v, rng_o = split_key(rng, 6)
        q_BxTxNxH = self.query(x_BxTxE, compute_dtype, rng_q)
        k_BxTxNxH = self.key(x_BxTxE, compute_dtype, rng_k)
        v_BxTxNxH = self.value(x_BxTxE, compute_dtype, rng_v)
        scale = self.spec.head_dim**-0.5
        logits_BxNxTxT = jnp.einsum("btnh,bsnh->bnts", q_BxTxNxH * scale, k_BxTxNxH)
        probs = jax.nn.softmax(logits_BxNxTxT.astype(jnp.float32), axis=-1).astype(compute_dtype)
        probs = dropout(probs, self.spec.attention_dropout_rate, rng_probs)
        ctx_BxTxNxH = jnp.einsum("bnts,bsnh->btnh", probs, v_BxTxNxH)
        return dropout(self.output(ctx_BxTxNxH, compute_dtype, rng_o), self.spec.dropout_rate, rng_out)


class Layer(nnx.Module):
    """Pre-norm: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, spec: ViTSpec, *, rngs: nnx.Rngs, dtype=jnp.float32):
        E, F = spec.hidden_size, spec.intermediate_size
        self.attention_norm = LayerNorm(E, spec.layer_norm_eps, dtype=dtype)
        self.attention = Attention(spec, rngs=rngs, dtype=dtype)
        self.mlp_norm = LayerNorm(E, spec.layer_norm_eps, dtype=dtype)
        self.up = Linear((E,), (F,), (axes.EMBED,), (axes.MLP,), bias=True, rngs=rngs, dtype=dtype)
        self.down = Linear((F,), (E,), (axes.MLP,), (axes.EMBED,), bias=True, rngs=rngs, dtype=dtype)
        self.spec = spec

    def __call__(self, x_BxTxE, rng, compute_dtype):
        rng_attn, rng_mlp, rng_up, rng_down = split_key(rng, 4)
        x_BxTxE = x_BxTxE + self.attention(self.attention_norm(x_BxTxE), rng_attn, compute_dtype)
        h_BxTxF = ACTIVATIONS[self.spec.hidden_act](self.up(self.mlp_norm(x_BxTxE), compute_dtype, rng_up))
        y_BxTxE = self.down(h_BxTxF, compute_dtype, rng_down)
        return x_BxTxE + dropout(y_BxTxE, self.spec.dropout_rate, rng_mlp)


@jax.custom_vjp
def _materialized_grad(x: jax.Array) -> jax.Array:
    """The identity, whose gradient XLA:CPU computes in full before passing it on.

    The residual stream's gradient is a chain of cheap elementwise ops (the residual adds and each LayerNorm's
    backward) from the top layer down. Unrolled, XLA:CPU fuses that chain into each of its consumers instead of
    materialising it, so each layer's fusions recompute the chain of every layer above it: ViT-B's unrolled
    backward had fusions of 800 instructions, its cost quadratic in depth. Dividing the gradient by exactly 1, a
    divide XLA cannot fold and does not duplicate into several consumers, cuts the chain at each layer's input
    (jax.lax.optimization_barrier does not: XLA:CPU drops barriers before fusion). The scanned stack needs none of
    this: the loop body's boundary already materialises it."""
    return x


def _materialized_grad_fwd(x):
    return x, None


def _materialized_grad_bwd(_, g):
    # 1 + 0·g is exactly 1 where g is finite (and NaN where it is not, where g is lost anyway).
    return (g / (1 + 0 * g),)


_materialized_grad.defvjp(_materialized_grad_fwd, _materialized_grad_bwd)


def _layer_fn(graphdef: nnx.GraphDef, compute_dtype: Any, remat: str, scanned: bool):
    """A pure (layer params, x, rng) -> x with the static options bound, under jax.checkpoint unless remat=none."""

    def run(params, x_BxTxE, rng):
        x_BxTxE = x_BxTxE if scanned else _materialized_grad(x_BxTxE)
        return nnx.merge(graphdef, params)(x_BxTxE, rng, compute_dtype)

    if remat == "none":
        return run
    return jax.checkpoint(run, policy=REMAT_POLICIES[remat], prevent_cse=not scanned)


class ViTModel(nnx.Module):
    """Embeddings, the layers (one stacked, scanned block, or a list), the final norm and the classifier on the
    [CLS] token (DeiT with a teacher: the mean of that and a head on the distillation token)."""

    def __init__(self, spec: ViTSpec, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.spec = spec
        self.embeddings = Embeddings(spec, rngs=rngs, dtype=param_dtype)
        make = lambda r: Layer(spec, rngs=r, dtype=param_dtype)
        if spec.scan_layers:
            self.layers = build_stacked(make, spec.num_layers, rngs)
        else:
            self.layers = nnx.List([make(rngs) for _ in range(spec.num_layers)])
        E, C = spec.hidden_size, spec.num_labels
        self.norm = LayerNorm(E, spec.layer_norm_eps, dtype=param_dtype)
        head = dict(in_axes=(axes.EMBED,), out_axes=(axes.LABELS,), bias=True, rngs=rngs, dtype=param_dtype)
        if spec.distillation_head:
            self.cls_classifier = Linear((E,), (C,), **head)
            self.distillation_classifier = Linear((E,), (C,), **head)
        else:
            self.classifier = Linear((E,), (C,), **head)
        self.compute_dtype = jnp.dtype(jnp.float32)
        self.remat = "none"

    def configure(self, compute_dtype: Any = jnp.float32, remat: bool | str = "none") -> ViTModel:
        """Sets static execution options (not parameters). remat: none | full | dots_saveable |
        dots_with_no_batch_dims_saveable (True/False mean full/none)."""
        self.remat = remat_name(remat)
        self.compute_dtype = jnp.dtype(compute_dtype)
        return self

    def __call__(self, pixel_values, *, dropout_rng=None) -> jax.Array:
        """Logits [B, num_labels] in fp32 from pixel_values [B, C, H, W]."""
        cd = self.compute_dtype
        rng_emb, rng_layers = split_key(dropout_rng, 2)
        x_BxTxE = self.embeddings(jnp.asarray(pixel_values), rng_emb, cd)
        x_BxTxE = self.norm(self.run_layers(x_BxTxE, rng_layers))
        if self.spec.distillation_head:
            cls = self.cls_classifier(x_BxTxE[:, 0], cd).astype(jnp.float32)
            distilled = self.distillation_classifier(x_BxTxE[:, 1], cd).astype(jnp.float32)
            return (cls + distilled) / 2
        return self.classifier(x_BxTxE[:, 0], cd).astype(jnp.float32)

    def run_layers(self, x_BxTxE: jax.Array, rng: jax.Array | None) -> jax.Array:
        """Every layer over x: one lax.scan over the stacked layers, or a loop over the list; each under remat."""
        layer_rngs = None if rng is None else jax.random.split(rng, self.spec.num_layers)
        if self.spec.scan_layers:
            graphdef, stacked = nnx.split(self.layers)
            run = _layer_fn(graphdef, self.compute_dtype, self.remat, scanned=True)
            x_BxTxE, _ = jax.lax.scan(lambda x, xs: (run(xs[0], x, xs[1]), None), x_BxTxE, (stacked, layer_rngs))
            return x_BxTxE
        for i, layer in enumerate(self.layers):
            graphdef, params = nnx.split(layer)
            run = _layer_fn(graphdef, self.compute_dtype, self.remat, scanned=False)
            x_BxTxE = run(params, x_BxTxE, None if layer_rngs is None else layer_rngs[i])
        return x_BxTxE
