"""LR schedules and the optimizer chain: exact schedule values, weight-decay masking, clipping, LR multipliers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft import optim
from jaxft.config import OptimConfig

SGD = dict(name="sgd", momentum=0.0, weight_decay=0.0, clip_grad_norm=0.0)


def values(schedule, steps):
    return [float(schedule(s)) for s in steps]


def updates_of(cfg, grads, params, lr=1.0, lr_multipliers=None, steps=1):
    tx = optim.build_optimizer(cfg, optax.constant_schedule(lr), lr_multipliers)
    state, out = tx.init(params), []
    for _ in range(steps):
        u, state = tx.update(grads, state, params)
        out.append(jax.tree.map(np.asarray, u))
    return out if steps > 1 else out[0]


@pytest.mark.parametrize(
    "kwargs, max_steps, steps, expected",
    [
        (dict(schedule="constant", learning_rate=0.5), 100, [0, 50, 1000], [0.5, 0.5, 0.5]),
        (
            dict(schedule="constant", learning_rate=0.5, warmup_steps=4),
            100,
            [0, 1, 2, 4, 99],
            [0, 0.125, 0.25, 0.5, 0.5],
        ),
        (dict(schedule="linear", learning_rate=2.0), 100, [0, 25, 50, 100, 150], [2.0, 1.5, 1.0, 0.0, 0.0]),
        (
            dict(schedule="linear", learning_rate=1.0, warmup_steps=10, end_learning_rate_ratio=0.1),
            110,
            [0, 5, 10, 35, 60, 110, 500],
            [0.0, 0.5, 1.0, 0.775, 0.55, 0.1, 0.1],
        ),
        (
            dict(schedule="cosine", learning_rate=2.0),
            100,
            [0, 25, 50, 75, 100, 200],
            [2.0, 1 + math.cos(math.pi / 4), 1.0, 1 - math.cos(math.pi / 4), 0.0, 0.0],
        ),
        (
            dict(schedule="cosine", learning_rate=1.0, warmup_steps=10, end_learning_rate_ratio=0.1),
            110,
            [0, 5, 10, 35, 60, 110],
            [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)), 0.55, 0.1],
        ),
    ],
)
def test_schedule_values(kwargs, max_steps, steps, expected):
    sched = optim.build_schedule(OptimConfig(**kwargs), max_steps)
    np.testing.assert_allclose(values(sched, steps), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_warmup_longer_than_the_run_is_cut_to_the_run(kind):
    sched = optim.build_schedule(OptimConfig(schedule=kind, learning_rate=1.0, warmup_steps=20), 10)
    np.testing.assert_allclose(values(sched, [0, 5, 10]), [0.0, 0.5, 1.0], rtol=1e-6)


def test_cosine_is_the_default_schedule():
    sched = optim.build_schedule(OptimConfig(learning_rate=1.0), 10)
    np.testing.assert_allclose(values(sched, [5, 10]), [0.5, 0.0], atol=1e-7)


def test_schedule_drives_the_optimizer_step_by_step():
    cfg = OptimConfig(**SGD, schedule="constant", learning_rate=1.0, warmup_steps=4)
    tx = optim.build_optimizer(cfg, optim.build_schedule(cfg, 10))
    params = {"w": jnp.zeros((2,))}
    grads = {"w": jnp.ones((2,))}
    state, got = tx.init(params), []
    for _ in range(6):
        u, state = tx.update(grads, state, params)
        got.append(float(u["w"][0]))
    np.testing.assert_allclose(got, [0.0, -0.25, -0.5, -0.75, -1.0, -1.0], rtol=1e-6)


def test_adamw_first_step_is_lr_times_sign():
    cfg = OptimConfig(learning_rate=0.1, weight_decay=0.0, clip_grad_norm=0.0)
    u = updates_of(cfg, {"w": jnp.array([3.0, -4.0, 0.5])}, {"w": jnp.zeros((3,))}, lr=0.1)
    np.testing.assert_allclose(u["w"], [-0.1, 0.1, -0.1], rtol=1e-5)


def test_adamw_decays_matrices_only():
    cfg = OptimConfig(weight_decay=0.1, clip_grad_norm=0.0)
    params = {"kernel": jnp.full((2, 3), 2.0), "bias": jnp.full((3,), 2.0), "scale": jnp.full((3,), -1.0)}
    u = updates_of(cfg, jax.tree.map(jnp.zeros_like, params), params, lr=0.5)
    np.testing.assert_allclose(u["kernel"], np.full((2, 3), -0.1), rtol=1e-6)
    np.testing.assert_array_equal(u["bias"], np.zeros(3))
    np.testing.assert_array_equal(u["scale"], np.zeros(3))


def test_sgd_momentum_accumulates():
    cfg = OptimConfig(**{**SGD, "momentum": 0.9})
    got = updates_of(cfg, {"w": jnp.ones((1,))}, {"w": jnp.zeros((1,))}, lr=0.1, steps=3)
    np.testing.assert_allclose([float(u["w"][0]) for u in got], [-0.1, -0.19, -0.271], rtol=1e-6)


def test_sgd_without_momentum_is_plain_gradient_descent():
    got = updates_of(OptimConfig(**SGD), {"w": jnp.ones((1,))}, {"w": jnp.zeros((1,))}, lr=0.1, steps=3)
    np.testing.assert_allclose([float(u["w"][0]) for u in got], [-0.1, -0.1, -0.1], rtol=1e-6)


def test_sgd_weight_decay_is_masked_l2_on_the_gradient():
    cfg = OptimConfig(**{**SGD, "weight_decay": 0.5})
    params = {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)}
    grads = {"kernel": jnp.full((2, 2), 1.0), "bias": jnp.full((2,), 1.0)}
    u = updates_of(cfg, grads, params, lr=0.1)
    np.testing.assert_allclose(u["kernel"], np.full((2, 2), -0.2), rtol=1e-6)
    np.testing.assert_allclose(u["bias"], np.full((2,), -0.1), rtol=1e-6)


def test_adafactor_decay_skips_vectors():
    cfg = OptimConfig(name="adafactor", weight_decay=0.01, clip_grad_norm=0.0)
    params = {"kernel": jnp.full((4, 4), 2.0), "bias": jnp.full((4,), 2.0)}
    u = updates_of(cfg, jax.tree.map(jnp.zeros_like, params), params, lr=0.1)
    np.testing.assert_array_equal(u["bias"], np.zeros(4))
    assert (u["kernel"] < 0).all()


def test_adafactor_without_decay_leaves_zero_gradients_alone():
    cfg = OptimConfig(name="adafactor", weight_decay=0.0, clip_grad_norm=0.0)
    params = {"kernel": jnp.full((4, 4), 2.0)}
    u = updates_of(cfg, {"kernel": jnp.zeros((4, 4))}, params, lr=0.1)
    np.testing.assert_array_equal(u["kernel"], np.zeros((4, 4)))


@pytest.mark.parametrize(
    "clip, expected",
    [
        (0.0, [-3.0, -4.0]),
        (10.0, [-3.0, -4.0]),
        (5.0, [-3.0, -4.0]),
        (2.0, [-1.2, -1.6]),
        (1.0, [-0.6, -0.8]),
    ],
)
def test_clipping_by_global_norm(clip, expected):
    cfg = OptimConfig(**{**SGD, "clip_grad_norm": clip})
    u = updates_of(cfg, {"a": jnp.array([3.0]), "b": jnp.array([4.0])}, {"a": jnp.zeros(1), "b": jnp.zeros(1)})
    np.testing.assert_allclose([float(u["a"][0]), float(u["b"][0])], expected, rtol=1e-6)


def test_lr_multipliers_scale_each_parameter():
    params = {"a": jnp.zeros((2,)), "b": jnp.zeros((1,)), "c": jnp.zeros((1,))}
    grads = {"a": jnp.ones((2,)), "b": jnp.full((1,), 2.0), "c": jnp.ones((1,))}
    u = updates_of(OptimConfig(**SGD), grads, params, lr=0.1, lr_multipliers={"a": 0.5, "b": 3.0, "c": 1.0})
    np.testing.assert_allclose(u["a"], [-0.05, -0.05], rtol=1e-6)
    np.testing.assert_allclose(u["b"], [-0.6], rtol=1e-6)
    np.testing.assert_allclose(u["c"], [-0.1], rtol=1e-6)


def test_lr_multipliers_apply_after_clipping():
    cfg = OptimConfig(**{**SGD, "clip_grad_norm": 1.0})
    params = {"a": jnp.zeros(1), "b": jnp.zeros(1)}
    u = updates_of(cfg, {"a": jnp.array([3.0]), "b": jnp.array([4.0])}, params, lr_multipliers={"a": 2.0, "b": 1.0})
    np.testing.assert_allclose([float(u["a"][0]), float(u["b"][0])], [-1.2, -0.8], rtol=1e-6)


def test_lr_multipliers_with_adamw_scale_the_step():
    cfg = OptimConfig(weight_decay=0.0, clip_grad_norm=0.0)
    params = {"a": jnp.zeros(1), "b": jnp.zeros(1)}
    grads = {"a": jnp.array([5.0]), "b": jnp.array([-5.0])}
    u = updates_of(cfg, grads, params, lr=0.01, lr_multipliers={"a": 0.1, "b": 4.0})
    np.testing.assert_allclose([float(u["a"][0]), float(u["b"][0])], [-0.001, 0.04], rtol=1e-5)


def test_all_one_multipliers_change_nothing():
    params = {"a": jnp.zeros((2,))}
    grads = {"a": jnp.array([1.0, -2.0])}
    plain = updates_of(OptimConfig(**SGD), grads, params, lr=0.3)
    ones = updates_of(OptimConfig(**SGD), grads, params, lr=0.3, lr_multipliers={"a": 1.0})
    np.testing.assert_array_equal(ones["a"], plain["a"])
    np.testing.assert_allclose(plain["a"], [-0.3, 0.6], rtol=1e-6)
