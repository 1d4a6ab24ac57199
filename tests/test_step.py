"""The train step: traces once, microbatching equals one batch, optimizers/schedules, bf16 and remat run."""

import re

import jax
import numpy as np
import optax
import pytest

from jaxft import mesh, optim
from jaxft.config import OptimConfig
from jaxft.step import classification_loss, nonfinite_leaves, train_step
from tests.fixtures import make_setup, random_batch


def test_step_traces_once_over_many_steps(tiny_bert):
    s = make_setup(tiny_bert)
    state = s.state
    for seed in range(4):
        state, metrics = s.step(state, mesh.make_global_batch(random_batch(seed=seed), s.mesh))
    assert s.step.traces == 1
    assert int(state.step) == 4


def test_finite_check_is_computed_once_not_copied_into_every_update(tiny_bert):
    """The step's one "all finite" flag guards every parameter's update. Were XLA to copy the flag's scalar
    logic into each update's fusion (as it did for a stacked .all()), the compiled step would hold ~400 scalar
    boolean ops per trainable leaf, and compile time would grow with the square of the leaf count."""
    s = make_setup(tiny_bert)
    hlo = s.step.lower(s.state, mesh.make_global_batch(random_batch(), s.mesh)).compile().as_text()
    leaves = len(jax.tree.leaves(s.state.trainable))
    scalar_logic = len(re.findall(r" = pred\[\]\S* (?:and|or|not)\(", hlo))
    assert 0 < scalar_logic < 16 * leaves, (scalar_logic, leaves)


@pytest.mark.parametrize(
    "values, expected",
    [
        ((1.0, 2.0, 3.0), [False, False, False]),
        ((1.0, np.nan, 3.0), [False, True, False]),
        ((np.inf, 2.0, -np.inf), [True, False, True]),
        # Finite, but their squares overflow float32: the norm is inf and the leaves are tested one by one.
        ((3e19, -3e19, 1.0), [False, False, False]),
        ((3e19, 2.0, np.nan), [False, False, True]),
    ],
)
def test_nonfinite_leaves_is_exact_also_where_the_norm_overflows(values, expected):
    tree = {"a": jax.numpy.full((4, 3), values[0]), "b": {"c": jax.numpy.full((5,), values[1])}}
    tree["d"] = jax.numpy.asarray([0.0, values[2]])
    tree["ids"] = jax.numpy.arange(3)  # not inexact: not a leaf of the answer
    norm = optax.tree.norm({k: v for k, v in tree.items() if k != "ids"})
    assert np.isfinite(float(norm)) == (not any(expected) and max(abs(v) for v in values) < 1e19)
    assert jax.jit(nonfinite_leaves)(tree, norm).tolist() == expected
    assert jax.jit(nonfinite_leaves)(tree).tolist() == expected  # the norm computed inside


def test_step_is_pure_and_callable_without_jit(tiny_bert):
    """Un-jitted, the step leaves its input state untouched, gives the same result twice, and equals the jitted
    step (which donates the state, so it runs last)."""
    s = make_setup(tiny_bert, dropout_rate=0.0)
    host = random_batch()
    batch = {k: jax.numpy.asarray(v) for k, v in host.items()}
    sched = optim.build_schedule(s.cfg.optim, s.cfg.train.max_steps)
    before = jax.tree.map(lambda x: np.array(jax.device_get(x)), s.state)
    out1, m1 = train_step(s.state, batch, graphdef=s.graphdef, tx=s.tx, schedule=sched, microbatches=1)
    out2, m2 = train_step(s.state, batch, graphdef=s.graphdef, tx=s.tx, schedule=sched, microbatches=1)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(lambda x: np.asarray(jax.device_get(x)), s.state), before)
    assert float(m1["loss"]) == float(m2["loss"])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(out1), jax.device_get(out2))
    assert int(out1.step) == 1
    unjitted = jax.device_get(out1)  # before the donation: out1 may share unchanged leaves with s.state
    jitted, mj = s.step(s.state, mesh.make_global_batch(host, s.mesh))
    np.testing.assert_allclose(float(mj["loss"]), float(m1["loss"]), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), jax.device_get(jitted), unjitted)


def test_gradient_accumulation_equals_one_big_batch(tiny_bert):
    batch = random_batch(batch=16)
    results = []
    for micro in (1, 4):
        s = make_setup(tiny_bert, microbatches=micro, dropout_rate=0.0)
        state, metrics = s.step(s.state, mesh.make_global_batch(batch, s.mesh))
        kernel = np.asarray(jax.device_get(state.trainable["classifier"]["kernel"][...]))
        results.append((float(metrics["loss"]), float(metrics["grad_norm"]), kernel))
    np.testing.assert_allclose(results[0][0], results[1][0], atol=1e-5)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-4)
    np.testing.assert_allclose(results[0][2], results[1][2], atol=1e-6)


def test_dropout_uses_the_rng_and_is_reproducible(tiny_bert):
    s = make_setup(tiny_bert)
    b = mesh.make_global_batch(random_batch(), s.mesh)
    _, m1 = s.step(jax.tree.map(lambda x: x.copy(), s.state), b)
    _, m2 = s.step(jax.tree.map(lambda x: x.copy(), s.state), b)
    s0 = make_setup(tiny_bert, dropout_rate=0.0)
    _, m0 = s0.step(s0.state, mesh.make_global_batch(random_batch(), s0.mesh))
    assert float(m1["loss"]) == float(m2["loss"])
    assert float(m1["loss"]) != float(m0["loss"])


@pytest.mark.parametrize("name", ["adamw", "sgd", "adafactor"])
def test_each_optimizer_trains(tiny_bert, name):
    cfg = OptimConfig(name=name, learning_rate=5e-2 if name != "adamw" else 3e-3, schedule="constant", warmup_steps=0)
    s = make_setup(tiny_bert, optim_cfg=cfg, dropout_rate=0.0)
    state, batch = s.state, mesh.make_global_batch(random_batch(), s.mesh)
    losses = []
    for _ in range(6):
        state, metrics = s.step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0], losses


def test_bf16_compute_and_remat_run_close_to_fp32(tiny_bert):
    batch = random_batch()
    losses = {}
    for key, kw in {"fp32": {}, "bf16": {"compute_dtype": "bfloat16"}, "remat": {"remat": True}}.items():
        s = make_setup(tiny_bert, dropout_rate=0.0, **kw)
        state, metrics = s.step(s.state, mesh.make_global_batch(batch, s.mesh))
        losses[key] = float(metrics["loss"])
        assert state.trainable["classifier"]["kernel"][...].dtype == np.float32  # params stay fp32
    assert losses["remat"] == pytest.approx(losses["fp32"], abs=1e-6)
    assert losses["bf16"] == pytest.approx(losses["fp32"], abs=5e-2)


def test_schedules_warmup_then_decay():
    for kind in ("cosine", "linear", "constant"):
        sched = optim.build_schedule(OptimConfig(schedule=kind, learning_rate=1.0, warmup_steps=10), 110)
        assert float(sched(0)) == 0.0 and float(sched(10)) == pytest.approx(1.0)
        end = float(sched(110))
        assert end == pytest.approx(1.0) if kind == "constant" else end < 0.01


def test_clipping_bounds_the_update():
    tx = optim.build_optimizer(
        OptimConfig(name="sgd", momentum=0.0, clip_grad_norm=1.0, weight_decay=0.0), optax.constant_schedule(1.0)
    )
    params = {"w": jax.numpy.zeros((4,))}
    updates, _ = tx.update({"w": jax.numpy.full((4,), 100.0)}, tx.init(params), params)
    assert float(optax.tree.norm(updates)) == pytest.approx(1.0, rel=1e-5)


def test_token_classification_loss_ignores_padding():
    logits = jax.numpy.zeros((1, 3, 2)).at[0, 0, 1].set(5.0)
    batch = {"labels": jax.numpy.array([[1, -100, -100]]), "weights": jax.numpy.ones((1,))}
    loss, stats = classification_loss(logits, batch)
    assert float(stats["count"]) == 1.0 and float(loss) < 0.01
