"""Model families. Each has a math file (bert.py) and an HF key table (bert_hf.py)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.models.bert import BertModel, BertSpec
from jaxft.models.bert_hf import ArchitectureError, spec_from_hf_config

__all__ = [
    "ArchitectureError",
    "BertModel",
    "BertSpec",
    "build_abstract_model",
    "init_params",
    "spec_from_hf_config",
]


def build_abstract_model(spec: BertSpec, param_dtype: Any = jnp.float32) -> tuple[nnx.GraphDef, nnx.State]:
    """Shapes only: the graph definition and a State of ShapeDtypeStructs carrying logical axis metadata."""
    model = nnx.eval_shape(lambda: BertModel(spec, rngs=nnx.Rngs(0), param_dtype=jnp.dtype(param_dtype)))
    return nnx.split(model)


def init_params(
    spec: BertSpec, param_dtype: Any, wanted: set[str], shardings: dict[str, Any], seed: int
) -> dict[str, jax.Array]:
    """Fresh initial values for the `wanted` parameter paths only, created directly in their shardings.

    The whole model's init is traced, but XLA drops every initializer whose output is not requested,
    so only the wanted tensors (typically a new head) are ever computed.
    """
    from jaxft.paths import path_str

    if not wanted:
        return {}

    def init():
        model = BertModel(spec, rngs=nnx.Rngs(seed), param_dtype=jnp.dtype(param_dtype))
        return {path_str(p): v.get_value() for p, v in nnx.state(model).flat_state() if path_str(p) in wanted}

    out_shardings = {p: shardings[p] for p in wanted}
    return jax.jit(init, out_shardings=out_shardings)()
