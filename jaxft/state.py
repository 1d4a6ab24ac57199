"""The train state pytree: its partition of the parameters into trainable and frozen, its creation, and the move of
parameters between the partitions (gradual unfreezing).

The state holds the two partitions separately, so only the trainable one is differentiated and only it has
optimizer state. Which shapes and shardings a state has is setup.abstract_state's job.
"""

from __future__ import annotations

from collections.abc import Collection
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


def partition_params(params: nnx.State, trainable_paths: Collection[str]) -> tuple[nnx.State, nnx.State]:
    """(trainable, frozen): the parameters whose '/'-joined path is in `trainable_paths`, and the rest."""
    flat = list(nnx.to_flat_state(params))
    trainable = {p: v for p, v in flat if paths.path_str(p) in trainable_paths}
    frozen = {p: v for p, v in flat if paths.path_str(p) not in trainable_paths}
    return nnx.from_flat_state(trainable), nnx.from_flat_state(frozen)


def merge_params(trainable: nnx.State, frozen: nnx.State) -> nnx.State:
    return nnx.merge_state(trainable, frozen)


def trainable_paths(state: TrainState) -> list[str]:
    """The '/'-joined paths of the parameters the state trains, sorted (as run metadata records them)."""
    return sorted(paths.path_str(p) for p, _ in nnx.to_flat_state(state.trainable))


def init_state(
    trainable: nnx.State, frozen: nnx.State, tx: optax.GradientTransformation, seed: int, shardings: TrainState
) -> TrainState:
    """A fresh state: the optimizer state is created directly in its shardings, scalars replicated."""
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(trainable)
    return TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step),
        trainable=trainable,
        frozen=frozen,
        opt_state=opt_state,
        rng=jax.device_put(jax.random.key_data(jax.random.key(seed)), shardings.rng),
    )


def repartition(
    state: TrainState, new_trainable_paths: Collection[str], tx: optax.GradientTransformation, opt_state_shardings: Any
) -> TrainState:
    """Moves parameters between partitions (gradual unfreezing). Parameters already training keep their
    optimizer statistics; newly trained ones start from a fresh optimizer state."""
    trainable, frozen = partition_params(merge_params(state.trainable, state.frozen), new_trainable_paths)
    old_opt = state.opt_state
    new_opt = jax.jit(tx.init, out_shardings=opt_state_shardings)(trainable)
    old_def = jax.tree.structure(state.trainable)
    new_def = jax.tree.structure(trainable)

    def carry(new_node, old_node):
        if jax.tree.structure(new_node) == new_def and jax.tree.structure(old_node) == old_def:
            old = {p: v for p, v in nnx.to_flat_state(old_node)}
            flat = {p: (old[p] if p in old else v) for p, v in nnx.to_flat_state(new_node)}
            return nnx.from_flat_state(flat)
        return old_node if jax.tree.structure(old_node) == jax.tree.structure(new_node) else new_node

    is_node = lambda x: isinstance(x, nnx.State)
    opt_state = jax.tree.map(carry, new_opt, old_opt, is_leaf=is_node)
    return state.replace(trainable=trainable, frozen=frozen, opt_state=opt_state)
