"""Logical axis names → mesh axes through one ordered rules table, and the shardings of a state.

Model code never names mesh axes; moving from data-parallel to FSDP or tensor-parallel is a rules edit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxft import paths


class ShardingError(ValueError):
    """A parameter dimension that the chosen mesh axis does not divide, or an unknown logical axis."""


def logical_to_spec(logical: Sequence[str | None], rules: Sequence[tuple[str, Any]]) -> PartitionSpec:
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in logical:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ShardingError(f"mesh.rules: logical axis {name!r} has no rule")
        target = table[name]
        names = (target,) if isinstance(target, str) else tuple(target or ())
        # A mesh axis may shard only one dimension of a tensor; later dims stay replicated.
        names = tuple(n for n in names if n not in used)
        used.update(names)
        out.append(names[0] if len(names) == 1 else (names or None))
    return PartitionSpec(*out)


def _check_divisible(path: str, shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh) -> None:
    for dim, (size, names) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape))):
        if names is None:
            continue
        names = (names,) if isinstance(names, str) else names
        parts = 1
        for n in names:
            parts *= mesh.shape[n]
        if size % parts:
            raise ShardingError(
                f"{path}: dimension {dim} of shape {list(shape)} is not divisible by mesh axes "
                f"{'×'.join(names)} = {parts}"
            )


def infer_param_specs(abstract_params: nnx.State, rules, mesh: Mesh) -> dict[str, PartitionSpec]:
    """PartitionSpec for every parameter, from its `logical_axes` metadata; checks divisibility."""
    specs = {}
    for path, var in nnx.to_flat_state(abstract_params):
        name = paths.path_str(path)
        logical = var.get_metadata().get("logical_axes")
        if logical is None:
            raise ShardingError(f"{name}: parameter has no logical axis names")
        spec = logical_to_spec(logical, rules)
        _check_divisible(name, tuple(var.shape), spec, mesh)
        specs[name] = spec
    return specs


def to_named_shardings(specs: dict[str, PartitionSpec], mesh: Mesh) -> dict[str, NamedSharding]:
    return {k: NamedSharding(mesh, s) for k, s in specs.items()}


def shardings_like(state: nnx.State, shardings_by_path: dict[str, NamedSharding]) -> nnx.State:
    """A State of the same structure with each leaf replaced by its sharding."""
    flat = {path: var.replace(shardings_by_path[paths.path_str(path)]) for path, var in nnx.to_flat_state(state)}
    return nnx.from_flat_state(flat)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_like_params(tree: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optimizer-state tree: each subtree shaped like the parameters shares their shardings.

    optax states hold parameter-shaped trees (mu, nu, momentum) and scalars (count). Adafactor's factored
    statistics have the parameters' tree structure but other shapes; those leaves are replicated.
    """
    param_def = jax.tree.structure(params)

    def is_param_tree(node) -> bool:
        return jax.tree.structure(node) == param_def

    def assign(node):
        if is_param_tree(node):
            return jax.tree.map(
                lambda leaf, p, s: s if tuple(leaf.shape) == tuple(p.shape) else replicated(mesh),
                node,
                params,
                param_shardings,
            )
        return replicated(mesh)

    return jax.tree.map(assign, tree, is_leaf=is_param_tree)
