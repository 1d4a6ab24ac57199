"""compile.py: CountingJit's trace count and jit options, the batch shardings, and what the train, eval and predict
steps are jitted with (state donation, shardings in and out), read from their lowering (no XLA compile)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxft import compile, mesh
from jaxft.config import MeshConfig
from jaxft.sharding import shardings_like
from jaxft.state import merge_params
from tests.fixtures import make_setup, random_batch

# -------------------------------------------------------------------------------------------- CountingJit


def test_counting_jit_traces_once_per_input_signature():
    f = compile.CountingJit(lambda x, y: x * y)
    assert f.traces == 0
    np.testing.assert_array_equal(f(jnp.arange(3.0), jnp.float32(2)), [0.0, 2.0, 4.0])
    f(jnp.ones(3), jnp.float32(5))
    f(jnp.zeros(3), jnp.float32(1))
    assert f.traces == 1  # same shapes and dtypes: the cached trace
    f(jnp.ones(4), jnp.float32(1))
    assert f.traces == 2  # a new shape traces again
    f(jnp.ones(4, jnp.int32), jnp.int32(1))
    assert f.traces == 3  # so does a new dtype
    f(jnp.ones(3), jnp.float32(2))
    assert f.traces == 3  # the first signature is still cached


def test_counting_jit_lower_traces_and_lowers_the_same_function():
    f = compile.CountingJit(lambda x: jnp.sin(x) + 1)
    lowered = f.lower(jax.ShapeDtypeStruct((2, 3), jnp.float32))
    assert f.traces == 1
    assert [a.shape for a in jax.tree.leaves(lowered.out_info)] == [(2, 3)]
    assert "sine" in lowered.as_text()


def test_counting_jit_passes_jit_options():
    donating = compile.CountingJit(lambda x: x + 1, donate_argnums=(0,))
    x = jnp.arange(8.0)
    np.testing.assert_array_equal(donating(x), np.arange(8.0) + 1)
    assert x.is_deleted()  # the input's buffer was donated
    kept = compile.CountingJit(lambda x: x + 1)
    y = jnp.arange(8.0)
    kept(y)
    assert not y.is_deleted()

    m = mesh.build_mesh(MeshConfig(data=8))
    rows = NamedSharding(m, PartitionSpec("data"))
    placed = compile.CountingJit(lambda x: x * 2, out_shardings=rows)
    assert placed(jnp.ones(16)).sharding == rows


def test_counting_jit_keeps_the_wrapped_functions_name():
    def my_step(x):
        return x

    f = compile.CountingJit(my_step)
    assert f.jitted.__name__ == "my_step"


# ---------------------------------------------------------------------------------------- batch shardings


def test_batch_shardings_split_rows_over_data_and_fsdp():
    m = mesh.build_mesh(MeshConfig(data=4, fsdp=2))
    rows = NamedSharding(m, PartitionSpec(("data", "fsdp")))
    default = compile.batch_shardings(m)
    assert default == {k: rows for k in ("input_ids", "attention_mask", "token_type_ids", "labels", "weights")}
    assert compile.batch_shardings(m, ("input_ids", "loss_mask")) == {"input_ids": rows, "loss_mask": rows}


# --------------------------------------------------------------------------------- train/eval/predict steps


@pytest.fixture(scope="module")
def tiny(tiny_bert):
    s = make_setup(tiny_bert, mesh_shape=(4, 2, 1))
    return s, mesh.make_global_batch(random_batch(), s.mesh)


def test_train_step_donates_the_state_only_and_keeps_its_shardings(tiny):
    s, batch = tiny
    step = compile.jit_train_step(s.graphdef, s.tx, s.schedule, 1, s.layout.shardings, s.mesh)
    lowered = step.lower(s.state, batch)
    assert step.traces == 1
    state_args, batch_args = lowered.args_info[0]
    assert all(a.donated for a in jax.tree.leaves(state_args))
    assert not any(a.donated for a in jax.tree.leaves(batch_args))
    out_state, out_metrics = lowered.out_info
    got = [o.sharding for o in jax.tree.leaves(out_state)]
    want = jax.tree.leaves(s.layout.shardings)
    assert len(got) == len(want) > 0
    assert got == want  # the state stays where it lives
    # parameters really are split: fsdp is 2 here, so some kernel is sharded over it
    assert any("fsdp" in jax.tree.leaves(tuple(sh.spec)) for sh in want)
    replicated = NamedSharding(s.mesh, PartitionSpec())
    assert sorted(out_metrics) == [
        "accuracy",
        "grad_norm",
        "learning_rate",
        "loss",
        "nonfinite",
        "nonfinite_leaf",
        "padded_tokens",
        "tokens",
    ]
    assert all(o.shape == () and o.sharding == replicated for o in out_metrics.values())


def test_eval_step_returns_replicated_sums_and_does_not_donate(tiny):
    s, batch = tiny
    step = compile.jit_eval_step(s.graphdef, s.mesh)
    lowered = step.lower(s.state.trainable, s.state.frozen, batch)
    assert not any(a.donated for a in jax.tree.leaves(lowered.args_info))
    replicated = NamedSharding(s.mesh, PartitionSpec())
    out = lowered.out_info
    assert {k: (v.shape, v.sharding) for k, v in out.items()} == {
        "loss_sum": ((), replicated),
        "correct": ((), replicated),
        "count": ((), replicated),
        "tp": ((2,), replicated),
        "predicted": ((2,), replicated),
        "true": ((2,), replicated),
        "confusion": ((2, 2), replicated),
    }


def test_predict_step_returns_replicated_probabilities(tiny):
    s, batch = tiny
    params = merge_params(s.state.trainable, s.state.frozen)
    step = compile.jit_predict_step(s.graphdef, shardings_like(params, s.skeleton.param_shardings), s.mesh)
    fields = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    out = step.lower(params, fields).out_info
    assert out.shape == (16, 2) and out.dtype == jnp.float32
    assert out.sharding.is_fully_replicated  # every process gets every row's probabilities
    assert step.traces == 1
