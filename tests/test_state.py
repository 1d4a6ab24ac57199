"""state.py: the trainable/frozen partition of the parameters, a fresh state in its shardings, and the move of
parameters between the partitions (gradual unfreezing) keeping values and the optimizer statistics of those that
keep training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxft import mesh as mesh_lib
from jaxft.config import MeshConfig
from jaxft.paths import path_str
from jaxft.state import TrainState, init_state, merge_params, partition_params, repartition, trainable_paths

PATHS = ["encoder/layer_0/kernel", "encoder/layer_1/kernel", "head/bias", "head/kernel"]


def params() -> nnx.State:
    rng = np.random.default_rng(0)
    return nnx.State(
        {
            "encoder": {
                "layer_0": {"kernel": nnx.Param(jnp.asarray(rng.standard_normal((8, 4)), jnp.float32))},
                "layer_1": {"kernel": nnx.Param(jnp.asarray(rng.standard_normal((8, 4)), jnp.float32))},
            },
            "head": {
                "bias": nnx.Param(jnp.asarray(rng.standard_normal((2,)), jnp.float32)),
                "kernel": nnx.Param(jnp.asarray(rng.standard_normal((4, 2)), jnp.float32)),
            },
        }
    )


def flat(state: nnx.State) -> dict[str, np.ndarray]:
    return {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


@pytest.fixture(scope="module")
def mesh():
    return mesh_lib.build_mesh(MeshConfig(data=8))


def shardings(mesh, opt_state=None) -> TrainState:
    rep = NamedSharding(mesh, PartitionSpec())
    return TrainState(step=rep, trainable=rep, frozen=rep, opt_state=rep if opt_state is None else opt_state, rng=rep)


# ------------------------------------------------------------------------------------------- partition


@pytest.mark.parametrize(
    "train",
    [
        {"head/bias", "head/kernel"},
        {"encoder/layer_1/kernel"},
        set(PATHS),
        set(),
    ],
)
def test_partition_then_merge_is_the_identity(train):
    p = params()
    trainable, frozen = partition_params(p, train)
    assert sorted(flat(trainable)) == sorted(train)
    assert sorted(flat(frozen)) == sorted(set(PATHS) - train)
    merged = merge_params(trainable, frozen)
    assert jax.tree.structure(merged) == jax.tree.structure(p)
    want = flat(p)
    got = flat(merged)
    assert sorted(got) == PATHS
    for k in PATHS:
        np.testing.assert_array_equal(got[k], want[k])


def test_partition_keeps_the_variable_type_and_metadata():
    p = nnx.State({"w": nnx.Param(jnp.ones((2, 3)), logical_axes=("embed", "mlp")), "b": nnx.Param(jnp.zeros(3))})
    trainable, _ = partition_params(p, {"w"})
    ((_, var),) = nnx.to_flat_state(trainable)
    assert isinstance(var, nnx.Param) and var.get_metadata()["logical_axes"] == ("embed", "mlp")


# -------------------------------------------------------------------------------------------- init_state


def test_init_state_is_step_zero_with_a_seeded_rng_and_optimizer_state_in_its_shardings(mesh):
    trainable, frozen = partition_params(params(), {"encoder/layer_0/kernel", "head/bias"})
    tx = optax.adam(1e-3)
    rows = NamedSharding(mesh, PartitionSpec("data"))
    rep = NamedSharding(mesh, PartitionSpec())
    opt_sh = jax.tree.map(lambda x: rows if x.shape[:1] == (8,) else rep, jax.eval_shape(tx.init, trainable))
    state = init_state(trainable, frozen, tx, seed=7, shardings=shardings(mesh, opt_sh))
    assert state.step.dtype == jnp.int32 and int(state.step) == 0 and state.step.sharding == rep
    np.testing.assert_array_equal(state.rng, jax.random.key_data(jax.random.key(7)))
    assert state.rng.sharding == rep
    assert not np.array_equal(state.rng, init_state(trainable, frozen, tx, 8, shardings(mesh, opt_sh)).rng)
    adam = state.opt_state[0]
    assert int(adam.count) == 0
    assert sorted(flat(adam.mu)) == sorted(flat(adam.nu)) == ["encoder/layer_0/kernel", "head/bias"]
    assert all(not v.any() for v in flat(adam.mu).values())
    (mu_kernel,) = [v.get_value() for p, v in nnx.to_flat_state(adam.mu) if path_str(p) == "encoder/layer_0/kernel"]
    assert mu_kernel.sharding == rows
    assert state.trainable is trainable and state.frozen is frozen


def test_trainable_paths_are_sorted_names_of_the_trainable_partition(mesh):
    trainable, frozen = partition_params(params(), {"head/kernel", "encoder/layer_1/kernel", "head/bias"})
    state = init_state(trainable, frozen, optax.sgd(0.1), 0, shardings(mesh))
    assert trainable_paths(state) == ["encoder/layer_1/kernel", "head/bias", "head/kernel"]


# ------------------------------------------------------------------------------------------- repartition


def trained_state(mesh, train: set[str], tx) -> TrainState:
    """A state whose optimizer has seen two (different) gradients, so its statistics are not zeros."""
    trainable, frozen = partition_params(params(), train)
    state = init_state(trainable, frozen, tx, 0, shardings(mesh))
    for scale in (1.0, -3.0):
        grads = jax.tree.map(lambda x, s=scale: jnp.full_like(x, s), state.trainable)
        updates, opt = tx.update(grads, state.opt_state, state.trainable)
        state = state.replace(trainable=optax.apply_updates(state.trainable, updates), opt_state=opt)
    return state


def test_repartition_moves_parameters_without_changing_their_values(mesh):
    tx = optax.adam(0.1)
    before = trained_state(mesh, {"head/bias", "head/kernel"}, tx)
    values = flat(merge_params(before.trainable, before.frozen))
    new = {"head/kernel", "encoder/layer_1/kernel"}  # one joins, one stays, one leaves
    after = repartition(before, new, tx, NamedSharding(mesh, PartitionSpec()))
    assert sorted(flat(after.trainable)) == sorted(new)
    assert sorted(flat(after.frozen)) == ["encoder/layer_0/kernel", "head/bias"]
    merged = flat(merge_params(after.trainable, after.frozen))
    assert sorted(merged) == PATHS
    for k in PATHS:
        np.testing.assert_array_equal(merged[k], values[k])
    assert trainable_paths(after) == sorted(new)
    assert int(after.step) == int(before.step) and np.array_equal(after.rng, before.rng)


def test_repartition_keeps_statistics_of_staying_parameters_and_starts_joining_ones_fresh(mesh):
    tx = optax.adam(0.1)
    before = trained_state(mesh, {"head/bias", "head/kernel"}, tx)
    old_mu, old_nu = flat(before.opt_state[0].mu), flat(before.opt_state[0].nu)
    assert old_mu["head/kernel"].any() and old_nu["head/kernel"].any()
    after = repartition(before, {"head/kernel", "encoder/layer_1/kernel"}, tx, NamedSharding(mesh, PartitionSpec()))
    mu, nu = flat(after.opt_state[0].mu), flat(after.opt_state[0].nu)
    assert sorted(mu) == sorted(nu) == ["encoder/layer_1/kernel", "head/kernel"]  # head/bias's left with it
    np.testing.assert_array_equal(mu["head/kernel"], old_mu["head/kernel"])
    np.testing.assert_array_equal(nu["head/kernel"], old_nu["head/kernel"])
    np.testing.assert_array_equal(mu["encoder/layer_1/kernel"], np.zeros((8, 4), np.float32))
    np.testing.assert_array_equal(nu["encoder/layer_1/kernel"], np.zeros((8, 4), np.float32))
    # the state trains on with the new partition
    grads = jax.tree.map(jnp.ones_like, after.trainable)
    updates, _ = tx.update(grads, after.opt_state, after.trainable)
    assert sorted(flat(updates)) == ["encoder/layer_1/kernel", "head/kernel"]


def test_repartition_to_the_same_paths_keeps_the_optimizer_state(mesh):
    tx = optax.adam(0.1)
    before = trained_state(mesh, {"head/bias"}, tx)
    after = repartition(before, {"head/bias"}, tx, NamedSharding(mesh, PartitionSpec()))
    for a, b in zip(jax.tree.leaves(before.opt_state), jax.tree.leaves(after.opt_state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_repartition_places_the_new_optimizer_state_in_the_given_shardings(mesh):
    tx = optax.sgd(0.1, momentum=0.9)
    before = trained_state(mesh, {"head/bias"}, tx)
    rows, rep = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
    new = {"head/bias", "encoder/layer_0/kernel"}
    abstract = jax.eval_shape(tx.init, partition_params(params(), new)[0])
    opt_sh = jax.tree.map(lambda x: rows if x.shape[:1] == (8,) else rep, abstract)
    after = repartition(before, new, tx, opt_sh)
    (trace,) = [
        v.get_value() for p, v in nnx.to_flat_state(after.opt_state[0].trace) if path_str(p) == "encoder/layer_0/kernel"
    ]
    assert trace.sharding == rows
