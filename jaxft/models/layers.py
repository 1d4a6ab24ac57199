"""Model layers every family shares, in Flax NNX: linear layers (with an optional LoRA adapter), norms, embeddings,
dropout, the activations by HF name, remat policies by name, the init and key-splitting helpers, and layer stacking.

It owns math and logical axis names only; it knows nothing of HF keys, files or meshes, and imports no family.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxft import axes

# HF's activation names (config.json's hidden_act / hidden_activation / activation_function). gelu_new and
# gelu_pytorch_tanh are both the tanh approximation.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}

# The name `matmul` gives its result: a remat policy sees a custom VJP as one opaque call, not as a dot, so the
# policies that save dots save these by name too.
MATMUL_NAME = "jaxft_matmul"
_policies = jax.checkpoint_policies
_saves_matmuls = _policies.save_only_these_names(MATMUL_NAME)

# name -> jax.checkpoint policy; "none" (not listed) skips jax.checkpoint, "full" saves nothing and recomputes all.
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "full": None,
    "dots_saveable": _policies.save_from_both_policies(_policies.dots_saveable, _saves_matmuls),
    # Saves the weight matmuls but not the [B, N, L, L] attention logits, which dots_saveable also keeps.
    "dots_with_no_batch_dims_saveable": _policies.save_from_both_policies(
        _policies.dots_with_no_batch_dims_saveable, _saves_matmuls
    ),
}


def remat_name(remat: bool | str) -> str:
    """A remat setting as a policy name: none | full | dots_saveable | ... (True/False, from older runs, mean
    full/none); ValueError for anything else."""
    if isinstance(remat, bool):
        remat = "full" if remat else "none"
    if remat != "none" and remat not in REMAT_POLICIES:
        raise ValueError(f"remat {remat!r} is not one of: none, {', '.join(REMAT_POLICIES)}")
    return remat


def split_key(rng: jax.Array | None, n: int) -> list[jax.Array | None]:
    """n keys from `rng`, or n Nones when there is none (eval: no dropout anywhere below)."""
    return [None] * n if rng is None else list(jax.random.split(rng, n))


def normal_init(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """The HF families' weight init, N(0, 0.02²); only fresh parameters (a new head) ever keep it."""
    return 0.02 * jax.random.normal(rngs.params(), shape, dtype)


# Dropout draws 8 random bits per element, four per 32-bit threefry word: a full word per element made
# dropout a third of the step time on CPU. The keep probability is quantised to 1/256 (rate 0.1 becomes
# 26/256 = 0.1016) and the scale uses the quantised value, so the expected activation is exactly preserved.
_DROPOUT_LEVELS = 256


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when rng is None (eval) or rate is 0."""
    if rng is None or rate <= 0.0:
        return x
    threshold = max(1, min(_DROPOUT_LEVELS, round((1.0 - rate) * _DROPOUT_LEVELS)))
    n = math.prod(x.shape)
    words = jax.random.bits(rng, (-(-n // 4),), jnp.uint32)
    bits = jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(-1)[:n].reshape(x.shape)
    keep = bits.astype(jnp.int32) < threshold
    return jnp.where(keep, x * (_DROPOUT_LEVELS / threshold), jnp.zeros_like(x))


def _contract(lhs_dim: int, rhs_dim: int) -> tuple:
    return (((lhs_dim,), (rhs_dim,)), ((), ()))


def matmul(x_TxK: jax.Array, w: jax.Array, compute_dtype: Any, w_contract: int = 0) -> jax.Array:
    """x [T, K] · w (w [K, N], or [N, K] contracted on its last dim with w_contract=1) with both operands in the
    compute dtype, accumulated and returned in fp32 [T, N]. w may be the fp32 master weight: its gradient comes
    back in w's dtype straight from the fp32 accumulator, not rounded to the compute dtype on the way.

    The backward pass runs both of its matmuls in the compute dtype too, as bf16 autocast does. Left to JAX, the
    transpose of a dot with an fp32 result takes the fp32 cotangent into the input gradient's dot, so that a bf16
    model's backward matmuls, two thirds of its FLOPs, ran in fp32. Where the caller casts the fp32 result to the
    compute dtype (every Linear), the cotangent holds values of that dtype and rounding it back is exact. The
    result is named MATMUL_NAME for the remat policies."""
    y = _matmul(x_TxK, w, jnp.dtype(compute_dtype), w_contract, jnp.dtype(x_TxK.dtype), jnp.dtype(w.dtype))
    return checkpoint_name(y, MATMUL_NAME)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _matmul(x_TxK: jax.Array, w: jax.Array, compute_dtype: Any, w_contract: int, x_dtype: Any, w_dtype: Any):
    return jax.lax.dot_general(
        x_TxK.astype(compute_dtype),
        w.astype(compute_dtype),
        _contract(1, w_contract),
        preferred_element_type=jnp.float32,
    )


def _matmul_fwd(x_TxK, w, compute_dtype, w_contract, x_dtype, w_dtype):
    # The residuals are the operands as the forward dot took them: in a scanned stack, a saved fp32 weight would be
    # stacked into a second fp32 copy of every layer's weights.
    x_TxK, w = x_TxK.astype(compute_dtype), w.astype(compute_dtype)
    return _matmul(x_TxK, w, compute_dtype, w_contract, x_dtype, w_dtype), (x_TxK, w)


def _matmul_bwd(compute_dtype, w_contract, x_dtype, w_dtype, residuals, g_TxN):
    x_TxK, w = residuals
    g_TxN = g_TxN.astype(compute_dtype)
    dx = jax.lax.dot_general(g_TxN, w, _contract(1, 1 - w_contract), preferred_element_type=jnp.float32)
    transposed = w_contract == 1
    if compute_dtype == jnp.bfloat16:
        cpu, default = (functools.partial(f, transposed) for f in (_weight_grad_cpu_bf16, _weight_grad))
        dw = jax.lax.platform_dependent(x_TxK, g_TxN, cpu=cpu, default=default)
    else:
        dw = _weight_grad(transposed, x_TxK, g_TxN)
    return dx.astype(x_dtype), dw.astype(w_dtype)


def _weight_grad(transposed: bool, x_TxK: jax.Array, g_TxN: jax.Array) -> jax.Array:
    """x^T g [K, N] (g^T x [N, K] when `transposed`) in fp32, the tokens contracted."""
    return jax.lax.dot_general(
        *((g_TxN, x_TxK) if transposed else (x_TxK, g_TxN)), _contract(0, 0), preferred_element_type=jnp.float32
    )


def _weight_grad_cpu_bf16(transposed: bool, x_TxK: jax.Array, g_TxN: jax.Array) -> jax.Array:
    """_weight_grad for bf16 operands on XLA:CPU, computed as a dot whose left operand is contracted
    on its last dimension.

    XLA:CPU runs bf16 matmuls (through YNNPACK) only in that form; any other, x^T g among them, is run in fp32
    after a conversion of both operands, at under half the bf16 rate. XLA folds a transpose into the dot's
    dimension numbers, so the smaller side, x [T, K] or g [T, N], is transposed by a matmul with the identity,
    which it cannot fold: exact (each output is one product by 1), at 2·min(K, N)²·T FLOPs, a quarter to one times
    the gradient's own 2·K·N·T. If the result then comes out the other way round, it is transposed behind a
    division by one that XLA does not fold: folded into the dot, the transpose would make a bf16 dot XLA:CPU
    cannot run at all ("Unsupported element type for DotThunk")."""
    x_smaller = x_TxK.shape[1] <= g_TxN.shape[1]
    small, other = (x_TxK, g_TxN) if x_smaller else (g_TxN, x_TxK)
    # [K, N] when x is the smaller side, else [N, K]
    out = jax.lax.dot_general(_transpose_by_matmul(small), other, _contract(1, 0), preferred_element_type=jnp.float32)
    return out if x_smaller != transposed else _transpose_unfolded(out)


def _transpose_by_matmul(a_TxK: jax.Array) -> jax.Array:
    """a^T [K, T] in a's dtype, laid out row-major: I_K · a^T."""
    eye = jnp.eye(a_TxK.shape[1], dtype=a_TxK.dtype)
    return jax.lax.dot_general(eye, a_TxK, _contract(1, 1), preferred_element_type=jnp.float32).astype(a_TxK.dtype)


def _transpose_unfolded(a: jax.Array) -> jax.Array:
    """a^T, with a division by exactly one (NaN where a is not finite) that keeps XLA from folding the transpose
    into the dot that made a."""
    return (a / (1 + 0 * a)).T


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


@dataclasses.dataclass(frozen=True)
class Adapter:
    """The static settings of a LoRA adapter on a Linear (its A and B are the Linear's lora_a / lora_b)."""

    scale: float  # alpha / rank
    dropout: float  # on the adapter's input, while training


class Linear(nnx.Module):
    """The decoders' y = x·W (+ b) over the last `len(in_shape)` dims, accumulated in fp32; W is in_shape + out_shape.

    With a LoRA adapter (`adapter` set by jaxft.models.lora, with `lora_a` [in..., r] and `lora_b` [r, out...]),
    y gains (dropout(x)·A)·B · scale.
    """

    def __init__(self, in_shape, out_shape, in_axes, out_axes, *, bias: bool, rngs: nnx.Rngs, dtype=jnp.float32):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        self.kernel = nnx.Param(normal_init(rngs, in_shape + out_shape, dtype), logical_axes=tuple(in_axes + out_axes))
        self.bias = nnx.data(nnx.Param(jnp.zeros(out_shape, dtype), logical_axes=tuple(out_axes)) if bias else None)
        self.n_in = len(in_shape)
        self.adapter: Adapter | None = None
        self.lora_a = nnx.data(None)
        self.lora_b = nnx.data(None)

    def __call__(self, x: jax.Array, compute_dtype: Any, rng: jax.Array | None = None) -> jax.Array:
        """`rng` drives LoRA dropout only (training); the base path has no dropout."""
        kernel = self.kernel[...]
        in_shape, out_shape = kernel.shape[: self.n_in], kernel.shape[self.n_in :]
        lead = x.shape[: x.ndim - self.n_in]
        # One plain 2-D matmul (XLA:CPU is slow on dots with several batch/contracting dims), accumulated in fp32.
        x2 = x.astype(compute_dtype).reshape(-1, math.prod(in_shape))
        y = matmul(x2, kernel.reshape(x2.shape[1], -1), compute_dtype)
        if self.adapter is not None:
            y = y + self._adapter_delta(x2, compute_dtype, rng)
        y = y.reshape(lead + out_shape)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(compute_dtype)

    def _adapter_delta(self, x2: jax.Array, compute_dtype: Any, rng: jax.Array | None) -> jax.Array:
        """The adapter's contribution for flattened inputs x2 [T, in], as fp32 [T, out]."""
        a, b = self.lora_a[...], self.lora_b[...]
        a2, b2 = a.reshape(x2.shape[1], -1), b.reshape(a.shape[-1], -1)
        xa = matmul(dropout(x2, self.adapter.dropout, rng), a2, compute_dtype)
        return matmul(xa.astype(compute_dtype), b2, compute_dtype) * self.adapter.scale


class Dense(nnx.Module):
    """The encoders' y = x·W + b over the last `len(in_shape)` dims, accumulated in fp32 and returned in the compute
    dtype; W is in_shape + out_shape."""

    def __init__(self, in_shape, out_shape, in_axes, out_axes, *, rngs: nnx.Rngs, dtype=jnp.float32):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        self.kernel = nnx.Param(normal_init(rngs, in_shape + out_shape, dtype), logical_axes=in_axes + out_axes)
        self.bias = nnx.Param(jnp.zeros(out_shape, dtype), logical_axes=out_axes)
        self.n_in = len(in_shape)

    def __call__(self, x: jax.Array, compute_dtype: Any) -> jax.Array:
        kernel = self.kernel[...]
        in_shape, out_shape = kernel.shape[: self.n_in], kernel.shape[self.n_in :]
        lead = x.shape[: x.ndim - self.n_in]
        # One plain 2-D matmul: XLA:CPU runs dots with several batch/contracting dims (which the weight
        # gradient of a [B, L, E] input becomes) far slower than the same flops as [B·L, E] × [E, F].
        x2 = x.astype(compute_dtype).reshape(-1, math.prod(in_shape))
        y = matmul(x2, kernel.reshape(math.prod(in_shape), math.prod(out_shape)), compute_dtype)
        return (y.reshape(lead + out_shape) + self.bias[...].astype(jnp.float32)).astype(compute_dtype)


class LayerNorm(nnx.Module):
    """(x - mean) / std · w + b over the last dim, statistics in fp32."""

    def __init__(self, size: int, eps: float, *, dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((size,), dtype), logical_axes=(axes.NORM,))
        self.bias = nnx.Param(jnp.zeros((size,), dtype), logical_axes=(axes.NORM,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # Statistics in fp32 whatever the compute dtype: bf16 variance is too coarse.
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


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


class Embed(nnx.Module):
    """A lookup table [num, size] whose rows are named by `num_axis` (vocab, positions, token types)."""

    def __init__(self, num: int, size: int, num_axis: str, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.embedding = nnx.Param(normal_init(rngs, (num, size), dtype), logical_axes=(num_axis, axes.EMBED))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)


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
