"""LoRA adapters on the decoders' linear layers: y = x·W + (dropout(x)·A)·B · alpha/rank, with W frozen by the
freeze rules and A [in..., r], B [r, out...] trained. B starts at zero, so an adapted model starts as the base.

Owns the adapter parameters and the merged kernel (a Linear with an adapter adds its term itself: layers.Linear);
which layers get one is decided by `paths.match_first` over `lora.targets` (module paths such as
`layers/self_attn/q_proj`), and freezing is freeze.py's job.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft import axes, paths
from jaxft.models.layers import Adapter, Linear


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]  # regexes over module paths, e.g. ".*(q|k|v|o)_proj"


ADAPTER_PARAMS = r".*/lora_[ab]"  # the parameter paths this module adds (for load.new_params, freeze rules)


def is_adapter(path: str) -> bool:
    """Whether a '/'-joined parameter path is a LoRA adapter's A or B."""
    return paths.matches_any(path, (ADAPTER_PARAMS,))


def adapted_kernel(adapter_path: str) -> str:
    """The kernel an adapter parameter sits beside: `.../q_proj/lora_a` -> `.../q_proj/kernel`."""
    return adapter_path.rpartition("/")[0] + "/kernel"


def adapter_paths(kernel_path: str) -> tuple[str, str]:
    """(A, B) parameter paths of the adapter on the layer whose kernel is `kernel_path`."""
    module = kernel_path.rpartition("/")[0]
    return f"{module}/lora_a", f"{module}/lora_b"


def attach(model: nnx.Module, spec: LoraSpec, rngs: nnx.Rngs) -> list[str]:
    """Adds an adapter to every linear layer whose module path a `spec.targets` regex fully matches; a regex
    that matches no linear layer is an error (paths.RuleError). Returns the adapted module paths."""
    linears = {paths.path_str(p): node for p, node in nnx.iter_graph(model) if isinstance(node, Linear)}
    taken = paths.match_first(list(linears), spec.targets, "lora.targets", require_cover=False)
    adapted = [p for p, rule in taken.items() if rule is not None]
    for path in adapted:
        add_adapter(linears[path], spec, rngs)
    return adapted


def add_adapter(linear: Linear, spec: LoraSpec, rngs: nnx.Rngs) -> None:
    """A [lead..., in..., r] and B [lead..., r, out...] next to the kernel [lead..., in..., out...], where lead is
    the stacked `layers` axis of a scanned model (each scan step then sees one layer's adapter)."""
    kernel = linear.kernel
    logical = tuple(kernel.get_metadata()["logical_axes"])
    lead = 1 if logical and logical[0] == axes.LAYERS else 0
    n_in = linear.n_in
    shape = tuple(kernel.shape)
    in_shape, out_shape = shape[lead : lead + n_in], shape[lead + n_in :]
    # PEFT's default: A like a torch Linear(in, r) init (uniform ±1/sqrt(fan_in)), B zeros.
    bound = 1.0 / math.sqrt(math.prod(in_shape))
    a = jax.random.uniform(rngs.params(), shape[:lead] + in_shape + (spec.rank,), kernel.dtype, -bound, bound)
    linear.lora_a = nnx.Param(a, logical_axes=logical[: lead + n_in] + (None,))
    b = jnp.zeros(shape[:lead] + (spec.rank,) + out_shape, kernel.dtype)
    linear.lora_b = nnx.Param(b, logical_axes=logical[:lead] + (None,) + logical[lead + n_in :])
    linear.adapter = Adapter(scale=spec.alpha / spec.rank, dropout=spec.dropout)


def merged_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float, n_in: int) -> jax.Array:
    """W + scale·A·B in the kernel's layout (one layer; export folds adapters in with this)."""
    in_shape, out_shape = kernel.shape[:n_in], kernel.shape[n_in:]
    a2 = a.reshape(math.prod(in_shape), -1).astype(jnp.float32)
    b2 = b.reshape(a2.shape[1], -1).astype(jnp.float32)
    return (kernel.astype(jnp.float32) + scale * (a2 @ b2).reshape(in_shape + out_shape)).astype(kernel.dtype)
