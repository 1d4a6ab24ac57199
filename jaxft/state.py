"""The train state pytree, its abstract (shape-only) twin, and its creation from loaded parameters.

The state holds the trainable and frozen partitions separately, so only the trainable one is
differentiated and only it has optimizer state.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxft import paths


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: completed optimizer steps
    trainable: nnx.State
    frozen: nnx.State
    opt_state: Any
    rng: jax.Array  # base dropout key; step keys are fold_in(rng, step), so a resume replays them exactly


def split_params(
    graphdef_and_params: tuple[nnx.GraphDef, nnx.State], trainable_paths: set[str]
) -> tuple[nnx.State, nnx.State]:
    """(trainable, frozen) partitions of a parameter State."""
    _, params = graphdef_and_params
    flat = list(params.flat_state())
    trainable = {p: v for p, v in flat if paths.path_str(p) in trainable_paths}
    frozen = {p: v for p, v in flat if paths.path_str(p) not in trainable_paths}
    return nnx.from_flat_state(trainable), nnx.from_flat_state(frozen)


def merge_params(trainable: nnx.State, frozen: nnx.State) -> nnx.State:
    return nnx.merge_state(trainable, frozen)


def create_state(
    trainable: nnx.State,
    frozen: nnx.State,
    tx: optax.GradientTransformation,
    seed: int,
    opt_state_shardings: Any,
    replicated: jax.sharding.Sharding,
) -> TrainState:
    """A fresh state: the optimizer state is created directly in its shardings, scalars replicated."""
    opt_state = jax.jit(tx.init, out_shardings=opt_state_shardings)(trainable)
    return TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
        trainable=trainable,
        frozen=frozen,
        opt_state=opt_state,
        rng=jax.device_put(jax.random.key_data(jax.random.key(seed)), replicated),
    )


def abstract_opt_state(tx: optax.GradientTransformation, abstract_trainable: nnx.State) -> Any:
    return jax.eval_shape(tx.init, abstract_trainable)


def state_shardings(
    state_like: TrainState,
    trainable_shardings: nnx.State,
    frozen_shardings: nnx.State,
    opt_shardings: Any,
    replicated: Any,
) -> TrainState:
    return TrainState(
        step=replicated, trainable=trainable_shardings, frozen=frozen_shardings, opt_state=opt_shardings, rng=replicated
    )


def repartition(
    state: TrainState, new_trainable_paths: set[str], tx: optax.GradientTransformation, opt_state_shardings: Any
) -> TrainState:
    """Moves parameters between partitions (gradual unfreezing). Parameters already training keep their
    optimizer statistics; newly trained ones start from a fresh optimizer state."""
    all_params = merge_params(state.trainable, state.frozen)
    trainable, frozen = split_params((None, all_params), new_trainable_paths)
    old_opt = state.opt_state
    new_opt = jax.jit(tx.init, out_shardings=opt_state_shardings)(trainable)
    old_def = jax.tree.structure(state.trainable)
    new_def = jax.tree.structure(trainable)

    def carry(new_node, old_node):
        if jax.tree.structure(new_node) == new_def and jax.tree.structure(old_node) == old_def:
            old = {p: v for p, v in old_node.flat_state()}
            flat = {p: (old[p] if p in old else v) for p, v in new_node.flat_state()}
            return nnx.from_flat_state(flat)
        return old_node if jax.tree.structure(old_node) == jax.tree.structure(new_node) else new_node

    is_node = lambda x: isinstance(x, nnx.State)
    opt_state = jax.tree.map(carry, new_opt, old_opt, is_leaf=is_node)
    return state.replace(trainable=trainable, frozen=frozen, opt_state=opt_state)
